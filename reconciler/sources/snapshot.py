"""One consistent read of every input: manifest sources + instances -> :class:`Snapshot`. I/O edge."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from reconciler.model import Desired, Instance, Problem, Reason, Source
from reconciler.settings import Settings
from reconciler.sources.loader import LoadResult, load_instances, load_manifests
from reconciler.validate import resolve


def sources_for(settings: Settings, *, include_api: bool = True) -> list[Source]:
    """``--manifests`` dirs in the order given (read-only), then the API-owned dir (last, writable).

    ``include_api=False`` leaves the API dir out when it does not exist (offline commands).
    """
    out = [Source(path, i, read_only=True) for i, path in enumerate(settings.manifest_dirs)]
    if include_api or os.path.isdir(settings.api_dir):
        out.append(Source(settings.api_dir, len(out), read_only=False))
    return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    desired: Desired
    load: LoadResult
    instances_error: str | None
    revision: str

    @property
    def problems(self) -> tuple[Problem, ...]:
        return self.desired.problems


def take_snapshot(settings: Settings, *, sources: list[Source] | None = None,
                  with_instances: bool = True) -> Snapshot:
    srcs = sources if sources is not None else sources_for(settings)
    load = load_manifests(srcs, settings.max_file_bytes)
    problems = list(load.problems)
    instances_error = None
    instances: list[Instance] = []
    if with_instances:
        instances, inst_problems, instances_error = load_instances(settings.instances_path,
                                                                   settings.max_file_bytes, load.digests)
        problems.extend(inst_problems)
        if instances_error is not None:
            problems.append(Problem(settings.instances_path, None,
                                    f"instances directory unavailable: {instances_error}",
                                    Reason.SOURCE_UNAVAILABLE))
    desired = resolve(load.ingresses, instances, settings, problems)
    return Snapshot(desired, load, instances_error, digest([d.encode() for d in load.digests]))


def api_dir_ready(settings: Settings) -> None:
    """Create the API-owned manifest dir (0700) so it is always a readable source."""
    os.makedirs(settings.api_dir, mode=0o700, exist_ok=True)


def digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]
