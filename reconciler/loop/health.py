"""Health of the targets of health-checked rules, as Caddy sees it, between passes.

Caddy checks the targets (``health_checks`` in the config); :class:`HealthWatch` reads its verdicts
(:func:`reconciler.caddy.upstreams.read_upstreams`: the passive counts every ``interval`` seconds, the
gauge of verdicts every 10 s as Caddy refreshes it, and at once for a new set of targets) while the last
pass has health-checked rules, keeps the latest for the next pass's statuses, and asks for a pass (``health``: it
reads no file) when a target turned healthy or unhealthy -- so ``TargetUnhealthy`` shows within an interval
of Caddy's own verdict (Caddy refreshes it every 10 s), and a node with no health checks never asks Caddy.

:class:`Prober` probes the new targets of rules a health-gated cutover holds (:mod:`reconciler.cutover`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from reconciler.caddy.upstreams import join
from reconciler.cutover import ProbeKey, ProbeResult
from reconciler.errors import CaddyError
from reconciler.model import Desired, HealthCheck
from reconciler.settings import duration_seconds
from reconciler.status import health_targets

Upstreams = dict[str, dict[str, Any]]


#: how often Caddy refreshes its ``upstreams_healthy`` gauge (the watch reads it no more often)
GAUGE_REFRESH = 10.0


class HealthWatch:
    def __init__(self, *, read: Callable[[bool], tuple[Any, dict[str, bool] | None]],
                 desired: Callable[[], Desired | None], notify: Callable[[], object], zone: str,
                 interval: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 log: Callable[..., Any] | None = None) -> None:
        self._read = read
        self._desired = desired
        self._notify = notify
        self._zone = zone
        self._clock = clock
        self._log = log or (lambda *a, **k: None)
        self.interval = interval
        self._states: Upstreams = {}
        #: the gauge as last read, when, and for which upstreams (a new set is read at once: a load re-provisions)
        self._gauge: tuple[dict[str, bool], float, frozenset[str]] | None = None
        self._wanted: tuple[Desired | None, frozenset[str]] = (None, frozenset())
        self._verdicts: dict[str, bool | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0  # answers read from Caddy (tests, metrics)

    def states(self) -> Mapping[str, Mapping[str, Any]]:
        """What Caddy said last of its upstreams (empty before the first read)."""
        return self._states

    def wanted(self) -> frozenset[str]:
        """Caddy's names of the upstreams of the last pass's health-checked rules (kept per pass)."""
        desired = self._desired()
        if desired is not self._wanted[0]:
            dials = frozenset() if desired is None else frozenset(
                dial for rows in health_targets(desired, self._zone).values() for _, _, dial in rows)
            self._wanted = (desired, dials)
        return self._wanted[1]

    def poll(self) -> bool:
        """One look (while health-checked rules exist); True when a verdict changed and a pass was asked."""
        wanted = self.wanted()
        if not wanted:
            return False
        gauge = self._gauge
        fresh = gauge is None or gauge[2] != wanted or self._clock() - gauge[1] >= GAUGE_REFRESH
        try:
            rows, healthy = self._read(fresh)
        except CaddyError:  # Caddy restarting: its next start triggers a pass anyway
            return False
        if healthy is not None:
            gauge = self._gauge = (healthy, self._clock(), wanted)
        states = self._states = join(rows, gauge[0] if gauge is not None else {})
        self.reads += 1
        verdicts = {dial: states.get(dial, {}).get("healthy") for dial in wanted}
        changed = verdicts != {d: self._verdicts.get(d) for d in wanted}
        self._verdicts = verdicts
        if changed:
            self._notify()
        return changed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # never end the watch: the next look may do
                self._log("health.watch_error", error=repr(exc))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


#: what a pass asks the prober: probe key -> (the rule's check, the instance's address; None: not running)
Wanted = dict[ProbeKey, tuple[HealthCheck, str | None]]


def answer_of(exc: httpx.HTTPError) -> str:
    """A probe's failure as statuses quote it (short, no traceback)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if "Connection refused" in text or "[Errno 111]" in text:
        return "connection refused"
    return text[:200]


class Prober:
    """Probes the new targets of rules held by a cutover (see :mod:`reconciler.cutover`) from the
    reconciler itself -- ``GET path`` on the instance's address, as Caddy's active check would -- each at its
    rule's interval, and asks for a pass (``health``) when a target's verdict or last answer changes, or a
    held rule's deadline comes (its status turns Stalled)."""

    def __init__(self, *, notify: Callable[[], object], clock: Callable[[], float] = time.monotonic,
                 transport: httpx.BaseTransport | None = None, log: Callable[..., Any] | None = None) -> None:
        self._notify = notify
        self._clock = clock
        self._log = log or (lambda *a, **k: None)
        # straight to the instance, as Caddy's check goes (never through a proxy of the environment)
        # (plain HTTP: no CA bundle loaded, ~4 MB of memory per client)
        self._client = httpx.Client(transport=transport, follow_redirects=False, trust_env=False, verify=False)
        self._lock = threading.Lock()
        self._wanted: Wanted = {}
        self._results: dict[ProbeKey, ProbeResult] = {}
        self._due: dict[ProbeKey, float] = {}
        self._deadline: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def results(self) -> Mapping[ProbeKey, ProbeResult]:
        with self._lock:
            return dict(self._results)

    def want(self, wanted: Wanted, *, deadline_in: float | None = None) -> None:
        """What to probe from now on (results of anything else are dropped), and when to ask for a pass
        for a deadline."""
        with self._lock:
            self._wanted = dict(wanted)
            self._results = {k: v for k, v in self._results.items() if k in wanted}
            self._due = {k: self._due.get(k, 0.0) for k in wanted}
            self._deadline = None if deadline_in is None else self._clock() + deadline_in
        self._wake.set()

    def probe_once(self, key: ProbeKey, check: HealthCheck, address: str | None) -> ProbeResult:
        """Probe one target now (and remember the result)."""
        instance, port, path, expect = key
        if address is None:
            ok, answer = False, f"instance {instance!r} is not running or not known"
        else:
            host = f"[{address}]" if ":" in address else address
            try:
                r = self._client.get(f"http://{host}:{port}{path}", timeout=duration_seconds(check.timeout) or 2.0)
                ok = r.status_code == expect if expect is not None else 200 <= r.status_code < 300
                answer = f"HTTP {r.status_code}"
            except httpx.HTTPError as exc:
                ok, answer = False, answer_of(exc)
        with self._lock:
            last = self._results.get(key)
            streak = last.streak + 1 if last is not None and last.ok == ok else 1
            result = ProbeResult(ok, streak, answer)
            if key in self._wanted:
                self._results[key] = result
        return result

    def tick(self) -> float:
        """Probe what is due; ask for a pass when something changed. Returns seconds until the next thing."""
        now = self._clock()
        with self._lock:
            due = [(k, self._wanted[k]) for k, at in self._due.items() if at <= now and k in self._wanted]
            deadline = self._deadline
        changed = False
        for key, (check, address) in due:
            with self._lock:
                before = self._results.get(key)
            after = self.probe_once(key, check, address)
            passed = (after.ok and after.streak >= check.passes)
            was = before is not None and before.ok and before.streak >= check.passes
            if before is None or passed != was or after.answer != before.answer:
                changed = True
            with self._lock:
                if key in self._due:
                    self._due[key] = self._clock() + (duration_seconds(check.interval) or 1.0)
        if deadline is not None and self._clock() >= deadline:
            with self._lock:
                self._deadline = None
            changed = True
        if changed:
            self._notify()
        with self._lock:
            times = [*self._due.values(), *([self._deadline] if self._deadline is not None else [])]
        return max(0.05, min(times) - self._clock()) if times else 3600.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cutover-prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.tick()
            except Exception as exc:  # never end the prober: the next tick may do
                self._log("health.prober_error", error=repr(exc))
                wait = 1.0
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._client.close()
