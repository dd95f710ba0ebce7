"""Prometheus metrics of the reconciler (prometheus_client), updated once per pass."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.zone import ANSWER_KINDS


class _PassLike(Protocol):
    @property
    def outcome(self) -> str: ...
    @property
    def duration(self) -> float: ...
    @property
    def loads(self) -> int: ...
    @property
    def revision(self) -> str: ...


class _StatusLike(Protocol):
    @property
    def reason(self) -> str: ...
    @property
    def ready(self) -> bool: ...
    @property
    def name(self) -> str: ...
    @property
    def health(self) -> tuple[Mapping[str, Any], ...]: ...


class Metrics:
    """One registry per daemon (so tests can build several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.passes = Counter("hypeman_ingress_reconcile_passes", "Reconcile passes by outcome", ["outcome"],
                              registry=r)
        self.duration = Histogram("hypeman_ingress_reconcile_duration_seconds", "Duration of reconcile passes",
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.loads = Counter("hypeman_ingress_caddy_loads", "POST /load calls made to Caddy", registry=r)
        self.failures = Counter("hypeman_ingress_reconcile_failures", "Passes that did not converge", ["outcome"],
                                registry=r)
        self.ingresses = Gauge("hypeman_ingress_ingresses", "Ingresses by state", ["reason", "ready"], registry=r)
        self.problems = Gauge("hypeman_ingress_input_problems", "Problems found in the inputs", registry=r)
        self.target_healthy = Gauge("hypeman_ingress_target_healthy",
                                    "1 when Caddy counts the target of a health-checked rule healthy, 0 when not "
                                    "(absent: not reported yet)", ["ingress", "rule", "target"], registry=r)
        self._targets: set[tuple[str, str, str]] = set()
        self.caddy_up = Gauge("hypeman_ingress_caddy_up", "1 when Caddy is running", registry=r)
        self.caddy_restarts = Gauge("hypeman_ingress_caddy_restarts", "Caddy restarts by the supervisor",
                                    registry=r)
        self.caddy_flapping = Gauge("hypeman_ingress_caddy_flapping",
                                    "1 while Caddy keeps dying soon after it is started", registry=r)
        self.storage_failing = Gauge("hypeman_ingress_storage_failing_files",
                                     "Files under the data dir that cannot be written now (full disk, read-only...)",
                                     registry=r)
        self.last_applied = Info("hypeman_ingress_last_applied", "Revision of the last applied inputs", registry=r)
        self.last_applied_time = Gauge("hypeman_ingress_last_applied_timestamp_seconds",
                                       "When a config was last applied (or found converged)", registry=r)
        self._seen: set[tuple[str, str]] = set()
        self.responder_up = Gauge("hypeman_ingress_responder_up", "1 when the DNS responder answers", registry=r)
        self.responder_restarts = Gauge("hypeman_ingress_responder_restarts",
                                        "DNS responder restarts by the supervisor", registry=r)
        self.responder_records = Gauge("hypeman_ingress_dns_records",
                                       "Names the DNS responder answers with an address (a running instance's "
                                       "name, its id, hashed forms of references that are no DNS label)",
                                       registry=r)
        self.node = Info("hypeman_ingress_node",
                         "This node: its name, the version of hypeman-ingress, whether it is one of a fleet, "
                         "and what its Caddy runs -- the revision of the inputs, the git commit(s) of the "
                         "sources and the node-neutral config hash, equal on every node of a converged fleet",
                         registry=r)
        self._answers: dict[str, int] = {}
        r.register(_Answers(self))

    def observe_pass(self, result: _PassLike, *, converged: bool, problems: int, wall: float) -> None:
        self.passes.labels(result.outcome).inc()
        self.duration.observe(result.duration)
        if result.loads:
            self.loads.inc(result.loads)
        if not converged:
            self.failures.labels(result.outcome).inc()
        else:
            self.last_applied.info({"revision": result.revision})
            self.last_applied_time.set(wall)
        self.problems.set(problems)

    def observe_ingresses(self, statuses: Iterable[_StatusLike]) -> None:
        counts = Tally((s.reason, "true" if s.ready else "false") for s in statuses)
        for key in self._seen - set(counts):
            self.ingresses.labels(*key).set(0)
        for key, n in counts.items():
            self.ingresses.labels(*key).set(n)
        self._seen |= set(counts)
        targets: dict[tuple[str, str, str], bool] = {}
        for st in statuses:
            for row in st.health:
                if row.get("healthy") is not None:
                    targets[(st.name, str(row.get("rule")), str(row.get("target")))] = bool(row["healthy"])
        for gone in self._targets - set(targets):
            self.target_healthy.remove(*gone)
        for target, ok in targets.items():
            self.target_healthy.labels(*target).set(1 if ok else 0)
        self._targets = set(targets)

    def observe_caddy(self, *, up: bool, restarts: int, flapping: bool = False) -> None:
        self.caddy_up.set(1 if up else 0)
        self.caddy_restarts.set(restarts)
        self.caddy_flapping.set(1 if flapping else 0)

    def observe_responder(self, *, up: bool, restarts: int, records: int | None, counters: dict[str, int]) -> None:
        self.responder_up.set(1 if up else 0)
        self.responder_restarts.set(restarts)
        if records is not None:
            self.responder_records.set(records)
        self._answers = dict(counters)

    def observe_node(self, *, name: str, version: str, fleet: bool, config_hash: str | None,
                     revision: str | None, commits: Iterable[str]) -> None:
        self.node.info({"node": name, "version": version, "fleet": "true" if fleet else "false",
                        "config_hash": config_hash or "",
                        "revision": revision or "", "commit": ",".join(sorted(set(commits)))})

    def observe_storage(self, failing: int) -> None:
        self.storage_failing.set(failing)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Answers(Collector):
    """``hypeman_ingress_dns_answers_total{answer}``: the responder's own counters (a counter: it starts
    again from 0 when the responder restarts, which ``rate()`` handles)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("hypeman_ingress_dns_answers",
                                     "DNS answers of the responder by kind (address, nodata, nxdomain, refused, "
                                     "formerr) since it started", labels=["answer"])
        for kind in ANSWER_KINDS:
            family.add_metric([kind], self.metrics._answers.get(kind, 0))
        yield family
