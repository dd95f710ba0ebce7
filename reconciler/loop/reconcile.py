"""The inner reconcile: one level-triggered pass, as a ladder of four stages.

1. **read** (:mod:`reconciler.loop.read`) -- every input, incrementally, last good per file, resolved;
2. **plan** (:mod:`reconciler.loop.apply`) -- remembered culprits left out, the config rendered;
3. **apply** (:mod:`reconciler.loop.apply`) -- compared with Caddy's, loaded only when different, the
   culprits of a refusal isolated and the rest loaded;
4. **report** (:mod:`reconciler.loop.report`) -- statuses, certificates, the status document, the state
   files; then one immutable :class:`PassSnapshot` is published for everyone else to read.

The outer loop (when to run a pass, retries, readiness) is :mod:`reconciler.loop.daemon`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.caddy.admin import AdminClient
from reconciler.caddy.configfile import ConfigFile
from reconciler.cutover import Cutover, Decision
from reconciler.fleet import node_tokens
from reconciler.loop.apply import Applied, Applier, Culprits, Plan, plan
from reconciler.loop.health import Prober
from reconciler.loop.read import InputReader, Inputs
from reconciler.loop.report import AppliedHash, Certificates, Job, Reporter
from reconciler.loop.triggers import Burst
from reconciler.model import Desired, Instance, Outcome, Problem
from reconciler.render import Renderer
from reconciler.settings import Settings
from reconciler.state.store import GoodMap, StateStore
from reconciler.status import IngressStatus, PassRecord, StatusDocument, with_progress

# the outcomes, by their old names (scripts and tests import them)
APPLIED, UNCHANGED, PARTIAL = Outcome.APPLIED, Outcome.UNCHANGED, Outcome.PARTIAL
REJECTED, UNAVAILABLE, FAILED = Outcome.REJECTED, Outcome.UNAVAILABLE, Outcome.FAILED


@dataclass(frozen=True, slots=True)
class PassResult:
    trigger: str
    revision: str
    outcome: Outcome
    duration: float
    changes: int = 0
    error: str | None = None
    problems: tuple[Problem, ...] = field(default=(), repr=False)
    rejected: tuple[str, ...] = ()
    loads: int = 0
    #: seconds per phase: read (inputs + validation), render, load (Caddy's POST /load, as we saw it), apply
    #: (the rest of applying: compare, save), status
    phases: tuple[tuple[str, float], ...] = ()
    #: wall-clock time the pass started (its log line may be written a moment after it finished)
    started_at: float = 0.0

    @property
    def converged(self) -> bool:
        """Caddy runs exactly the config this pass wanted (culprits excluded)."""
        return self.outcome.converged

    @property
    def transient(self) -> bool:
        return self.outcome == Outcome.UNAVAILABLE


@dataclass(frozen=True, slots=True)
class PassSnapshot:
    """What one pass published, in one piece: everyone outside the loop (the API, readiness, metrics)
    reads this, never the reconciler's working state, so a status never mixes two passes."""

    result: PassResult
    statuses: tuple[IngressStatus, ...]
    by_name: Mapping[str, IngressStatus]
    document: StatusDocument
    #: the Caddy generation the pass started under (see :class:`reconciler.loop.keeper.Keeper`)
    generation: int
    #: the last good file versions (manifests, instances) as of this pass
    good: tuple[GoodMap, GoodMap]
    #: what the pass resolved (the on-demand TLS permission asks it which names may get a certificate)
    desired: Desired = field(default_factory=lambda: Desired(()))
    #: what it rendered: ``desired`` with the rules a cutover holds on their old targets (what Caddy checks)
    rendered: Desired | None = None

    def status(self) -> dict[str, Any]:
        """The status document with every ingress (``GET /status``)."""
        return {**self.document.to_dict(), "ingresses": [s.to_dict() for s in self.statuses]}


class Reconciler:
    """Runs passes; keeps what must survive between them in its stages (caches, culprits, what Caddy
    runs, the status history) and publishes :attr:`snapshot` after each."""

    def __init__(self, *, settings: Settings, client: AdminClient, reader: InputReader | None = None,
                 validate: Callable[[dict[str, Any]], str | None] | None = None,
                 store: StateStore | None = None, config_file: ConfigFile | None = None,
                 health: Callable[[], dict[str, Any]] | None = None,
                 generation: Callable[[], int] | None = None, certs: Certificates | None = None,
                 defer: Callable[[Job], None] | None = None, on_load: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 include_api: bool = True, good_before: tuple[GoodMap, GoodMap] | None = None,
                 upstreams: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
                 prober: Prober | None = None) -> None:
        if reader is None:  # (the daemon's composition root reads the last good versions itself)
            good = store.load_lastgood() if store is not None else ({}, {})
            reader = InputReader(settings, good=good, wall=wall, include_api=include_api)
        self.reader = reader
        #: the last good versions the previous run left (what the API counts with before the first pass);
        #: given when the reader may be at work on another thread meanwhile (the daemon's first read)
        self._good_before = good_before if good_before is not None else self.reader.good()
        self.render = Renderer(settings)
        self.culprits = Culprits()
        self.applier = Applier(settings, client, validate=validate or (lambda config: None), on_load=on_load,
                               clock=clock)
        #: the node-neutral hash of the config Caddy runs (what the nodes of a fleet compare)
        self.applied_hash = AppliedHash(node_tokens(settings))
        #: health-gated cutover: what health-checked rules serve, and the prober of their new targets (None:
        #: no gating -- offline commands, where no change is ever held)
        self.cutover = Cutover()
        self.prober = prober
        self.reporter = Reporter(store=store, config_file=config_file, certs=certs, defer=defer, health=health,
                                 applied_hash=self.applied_hash, upstreams=upstreams, zone=settings.dns_zone)
        #: how many times Caddy was (re)started: what a pass trusts about Caddy holds for one generation
        self._generation = generation or (lambda: 0)
        self._clock, self._wall = clock, wall
        #: what the last pass published (None before the first)
        self.snapshot: PassSnapshot | None = None

    # -- the pass -------------------------------------------------------------------------------
    def run_pass(self, burst: Burst | str, prefetched: tuple[Inputs, float] | None = None) -> PassResult:
        """One pass. ``prefetched``: inputs already read for it (by :meth:`InputReader.read`), and how long
        that took."""
        burst = burst if isinstance(burst, Burst) else Burst.of(*burst.split("+"))
        start, started_at, generation = self._clock(), self._wall(), self._generation()
        inputs = self.reader.read(burst.paths) if prefetched is None else prefetched[0]
        read_done = self._clock()
        decision = self._cutover(inputs.desired)
        planned = plan(decision.desired, burst, self.culprits, self.render)
        render_done = self._clock()
        speculative: list[list[IngressStatus]] = []  # the statuses if the load works, worked out meanwhile
        shown = decision.for_status
        applied = self.applier.apply(planned, generation, lambda: speculative.append(
            self.reporter.statuses(inputs, applied=True, error=None, rejected=dict(planned.known_bad),
                                   desired=shown)))
        self.culprits.remember(planned.desired, applied.rejected)  # (as plan() asks: held rules included)
        if applied.outcome.converged:
            self.cutover.served(left_out=set(applied.rejected) | set(planned.known_bad))
        apply_done = self._clock()
        statuses = with_progress(self._statuses(inputs, shown, planned, applied, speculative), decision.progress)
        read_time = read_done - start if prefetched is None else prefetched[1]
        phases = (("read", read_time), ("render", render_done - read_done), ("load", applied.load_time),
                  ("apply", apply_done - render_done - applied.load_time))
        result = self._report(burst, inputs, planned, applied, statuses, generation,
                              (start, started_at, phases))
        result = replace(result, phases=(*phases, ("status", self._clock() - apply_done)))
        self.applier.forget_body()
        return result

    def _cutover(self, desired: Desired) -> Decision:
        """Which targets each health-checked rule serves this pass (see :mod:`reconciler.cutover`), and what
        the prober probes next."""
        prober = self.prober
        if prober is None:
            return Decision(desired, {}, {}, ())
        by_id: dict[str, Instance] | None = None

        def lookup(ref: str) -> Instance | None:
            nonlocal by_id
            inst = desired.instances.get(ref)
            if inst is None:
                if by_id is None:
                    by_id = {i.id: i for i in desired.instances.values() if i.id}
                inst = by_id.get(ref)
            return inst

        def alive(ref: str) -> bool:
            inst = lookup(ref)
            return inst is not None and inst.running

        decision = self.cutover.decide(desired, now=self._clock(), probes=prober.results(), alive=alive)
        wanted = {}
        for key, check in decision.probes.items():
            inst = lookup(key[0])
            wanted[key] = (check, inst.ip if inst is not None and inst.running else None)
        prober.want(wanted, deadline_in=decision.next_deadline)
        return decision

    def _statuses(self, inputs: Inputs, shown: Desired, planned: Plan, applied: Applied,
                  speculative: list[list[IngressStatus]]) -> list[IngressStatus]:
        ok = applied.config is not None
        if speculative and (ok, applied.error, dict(applied.rejected)) == (True, None, dict(planned.known_bad)):
            statuses = speculative[0]
        else:
            statuses = self.reporter.statuses(inputs, applied=ok, error=applied.error, rejected=applied.rejected,
                                              desired=shown)
        return statuses

    def _report(self, burst: Burst, inputs: Inputs, planned: Plan, applied: Applied,
                statuses: list[IngressStatus], generation: int,
                timing: tuple[float, float, tuple[tuple[str, float], ...]]) -> PassResult:
        start, started_at, phases = timing
        statuses, certificates = self.reporter.certificates(inputs.desired, planned.config, statuses)
        statuses = self.reporter.upstream_health(planned.target, statuses)  # (the targets Caddy was given)
        error = applied.error
        if applied.rejected and error is None:
            error = "; ".join(f"{n}: {m}" for n, m in sorted(applied.rejected.items()))
        result = PassResult(burst.name, inputs.revision, applied.outcome, self._clock() - start, applied.changes,
                            error, inputs.desired.problems, tuple(sorted(applied.rejected)), applied.loads, phases,
                            started_at)
        record = PassRecord(self._wall(), result.trigger, result.revision, result.outcome, result.changes,
                            round(result.duration * 1000, 1), result.error)
        doc = self.reporter.document(record, inputs, applied=applied.config is not None,
                                     certificates=certificates, statuses=statuses)
        good = self.reader.good()
        config = applied.config
        applier = self.applier
        self.reporter.persist(applied, lambda: applier.encoded(config) if config is not None else b"", good, doc,
                              statuses)
        self.snapshot = PassSnapshot(result, tuple(statuses), {s.name: s for s in statuses}, doc, generation, good,
                                     inputs.desired, planned.target)
        return result

    # -- for others -----------------------------------------------------------------------------
    def good_versions(self) -> tuple[GoodMap, GoodMap]:
        """The last good file versions the loop serves, as of its last pass (before the first: as the
        previous run left them); never changed afterwards, so any thread may read them."""
        snap = self.snapshot
        return snap.good if snap is not None else self._good_before

    def rewrite_status(self) -> None:
        """Save the status again with fresh health fields (between passes, on the loop's thread)."""
        snap = self.snapshot
        if snap is not None:
            doc = self.reporter.rewrite_status(snap.document, list(snap.statuses))
            self.snapshot = replace(snap, document=doc)

    def status_document(self) -> dict[str, Any]:
        """The status with every ingress; before the first pass, as the previous run left it."""
        snap = self.snapshot
        return snap.status() if snap is not None else dict(self.reporter.before)

    def desired_config(self) -> tuple[Inputs, dict[str, Any]]:
        """What the offline commands (render, diff) show: the inputs and their config."""
        inputs = self.reader.read()
        return inputs, self.render(inputs.desired)

