"""Stage 1 of a pass, *read*: every input (incrementally, last good per file, the empty-source guard),
resolved against the conflict rules, with the revision that names it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from reconciler.model import Desired, Ingress, Instance, Problem, Reason, Source
from reconciler.settings import Settings
from reconciler.sources.dirs import digest, sources_for
from reconciler.sources.inputs import ReadResult, SourceHealth, ingress_reader, instance_reader
from reconciler.state.store import GoodMap, copy_good
from reconciler.validate import Resolver


@dataclass(frozen=True, slots=True)
class Inputs:
    """Everything one pass read: the resolved desired state, what each reader saw, the revision."""

    desired: Desired
    manifests: ReadResult[Ingress]
    instances: ReadResult[Instance]
    #: a digest of every input (files of every source and the instances)
    revision: str
    #: source path -> git commit of its checkout
    commits: dict[str, str]

    @property
    def sources(self) -> list[SourceHealth]:
        return self.manifests.sources + self.instances.sources


class InputReader:
    """The readers of manifests and instances and the resolver, kept from pass to pass (their memories
    make an unchanged file cost a stat). ``good``: the last good versions to start from."""

    def __init__(self, settings: Settings, *, good: tuple[GoodMap, GoodMap] = ({}, {}),
                 wall: Callable[[], float] = time.time, include_api: bool = True) -> None:
        self.settings = settings
        self.include_api = include_api
        self.manifests = ingress_reader(max_bytes=settings.max_file_bytes, good=good[0], wall=wall)
        self.instances = instance_reader(max_bytes=settings.max_file_bytes, good=good[1], wall=wall)
        self.resolve = Resolver(settings)
        #: id(ingress) -> (it, whether a rule of it holds a request header auth value)
        self._secret_memo: dict[int, tuple[Ingress, bool]] = {}
        #: who gets the instances as soon as they are read -- before the ingresses are resolved -- (the
        #: responder's publisher, through :class:`reconciler.loop.fastpath.InstanceFastPath`)
        self.on_instances: Callable[[list[Instance]], object] | None = None

    def read(self, changed: frozenset[str] | None = None) -> Inputs:
        """Read every input; ``changed`` (the paths a watch burst reported) limits what is read again."""
        s = self.settings
        manifests = self.manifests.read(sources_for(s, include_api=self.include_api), changed)
        instances = self.instances.read([Source(s.instances_path, 0)], changed)
        if self.on_instances is not None:
            self.on_instances(instances.items)
        exposed = self._exposed(manifests.items)
        desired = self.resolve(manifests.items, instances.items, [*manifests.problems, *instances.problems, *exposed])
        revision = digest([d.encode() for d in (*manifests.digests, "--instances--", *instances.digests)])
        commits = {h.path: h.commit for h in manifests.sources if h.commit}
        return Inputs(desired, manifests, instances, revision, commits)

    def _exposed(self, ingresses: list[Ingress]) -> list[Problem]:
        """Manifest files holding a request header auth value (a secret) that others than their owner may
        read: reported (they still serve), so the operator can ``chmod 600`` them."""
        memo, seen = self._secret_memo, {}
        out: list[Problem] = []
        for ing in ingresses:
            hit = memo.get(id(ing))
            if hit is None or hit[0] is not ing:
                hit = (ing, any(r.header_auth is not None for r in ing.rules))
            seen[id(ing)] = hit
            if not hit[1]:
                continue
            try:
                mode = os.stat(ing.origin.file).st_mode & 0o777
            except OSError:
                continue
            if mode & 0o077:
                who = " and ".join(w for w, bits in (("its group", 0o070), ("others", 0o007)) if mode & bits)
                out.append(Problem(ing.origin.file, ing.origin.line,
                                   f"holds a request_header_auth value and {who} may read it (mode {mode:04o}); "
                                   f"chmod 600 {ing.origin.file}", Reason.INSECURE_FILE, ing.name))
        self._secret_memo = seen
        return out

    def good(self) -> tuple[GoodMap, GoodMap]:
        """A copy of the last good file versions (the readers go on updating theirs)."""
        return copy_good(self.manifests.good), copy_good(self.instances.good)
