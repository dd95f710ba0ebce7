"""The outer reconcile, as in Flux's kustomize-controller: wait for a burst of triggers, run one pass
(:meth:`reconciler.loop.reconcile.Reconciler.run_pass`), decide the requeue -- backoff after a transient
failure, a quick look while certificates are being issued, else the next event or resync -- and release
the API writes that waited for that pass. Nothing a pass raises ends the loop: an unexpected error is
logged with its traceback and retried with backoff."""

from __future__ import annotations

import contextlib
import gc
import random
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from reconciler.fsutil import StorageHealth
from reconciler.loop.background import Background
from reconciler.loop.changes import ChangeLog
from reconciler.loop.keeper import Keeper, backoff
from reconciler.loop.read import Inputs
from reconciler.loop.reconcile import FAILED, PassResult, Reconciler
from reconciler.loop.signals import SignalPolicy
from reconciler.loop.triggers import Burst, Trigger, Triggers
from reconciler.model import Reason
from reconciler.sources.watcher import Watcher
from reconciler.status import IngressStatus

log = structlog.get_logger("hypeman.ingress")

__all__ = ["Housekeeping", "Loop", "Requeue", "Tickets", "backoff", "requeue"]


@dataclass(frozen=True, slots=True)
class Requeue:
    """When to look again after a pass (None: at the next event or resync)."""

    failures: int  # transient failures in a row
    delay: float | None
    #: the delay is a backoff after a failure (the pass's log line says so)
    backoff: bool = False


def requeue(result: PassResult, statuses: Iterable[IngressStatus], failures: int, *,
            rng: random.Random | None = None) -> Requeue:
    """Transient failure (Caddy unreachable): capped exponential backoff. Converged but a certificate
    pending: look again in 2 s (issuance usually takes seconds); failing: in 15 s (Caddy retries with
    backoff; notice its success in time)."""
    if result.transient:
        return Requeue(failures + 1, backoff(failures + 1, rng=rng), True)
    reasons = {st.reason for st in statuses}
    if Reason.CERTIFICATE_PENDING in reasons:
        return Requeue(0, 2.0)
    if Reason.CERTIFICATE_FAILING in reasons:
        return Requeue(0, 15.0)
    return Requeue(0, None)


class Tickets:
    """API writes wait for the pass of the burst their notification joined (its number) to finish."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._served = 0
        self._converged = False

    def done(self, number: int, converged: bool) -> None:
        with self._cond:
            self._served = max(self._served, number)
            self._converged = converged
            self._cond.notify_all()

    def wait(self, ticket: int, timeout: float, stopped: Callable[[], bool]) -> bool:
        """True once the ticket's pass (or a later one) has converged Caddy; False when it did not, or the
        timeout or a stop came first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._served < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or stopped():
                    return False
                self._cond.wait(min(remaining, 0.5))
            return self._converged


class Housekeeping:
    """What the loop does between passes: log the signals received, hand the retries of failed file writes
    to the report thread (in order with the passes' own writes), and rewrite the status once the disk is
    fine again (it said the disk failed)."""

    def __init__(self, *, storage: StorageHealth, background: Background, reconciler: Reconciler,
                 signals: SignalPolicy | None = None) -> None:
        self.storage = storage
        self.background = background
        self.reconciler = reconciler
        self.signals = signals
        self._failed = False

    def tick(self) -> None:
        if self.signals is not None:
            self.signals.log_received()
        for job in self.storage.due():
            self.background.submit(job)
        failing = self.storage.failing()
        if self._failed and not failing:
            self.reconciler.rewrite_status()
        self._failed = failing


class Loop:
    """``prefetched``: the first pass's inputs, read while Caddy started (taken once)."""

    def __init__(self, *, reconciler: Reconciler, triggers: Triggers, keeper: Keeper, watcher: Watcher,
                 changes: ChangeLog, background: Background, housekeeping: Housekeeping,
                 prefetched: Callable[[], tuple[Inputs, float] | None] = lambda: None,
                 health_interval: float = 0.5) -> None:
        self.reconciler = reconciler
        self.triggers = triggers
        self.keeper = keeper
        self.watcher = watcher
        self.changes = changes
        self.background = background
        self.housekeeping = housekeeping
        self._prefetched = prefetched
        self.health_interval = health_interval
        self.tickets = Tickets()
        self.passes: list[PassResult] = []  # the last 100
        self._requeue = Requeue(0, None)
        #: the last pass, when it raised (None after a pass that did not)
        self.crash: PassResult | None = None

    def run(self, *, max_passes: int | None = None) -> int:
        """Until stopped (or ``max_passes`` passes, for tests)."""
        self.triggers.notify(Trigger.START, immediate=True)
        while not self.triggers.stopped:
            burst = self.triggers.wait(timeout=self.health_interval)
            try:
                self.housekeeping.tick()
            except Exception as exc:  # bookkeeping only: never worth ending the loop
                _log_safely("daemon.tick_failed", error=f"{type(exc).__name__}: {exc}")
            if burst is None or self.triggers.stopped:
                continue
            self._turn(burst)
            if max_passes is not None and len(self.passes) >= max_passes:
                break
        return 0

    def _turn(self, burst: Burst) -> None:
        """One pass for ``burst`` and its bookkeeping."""
        queued = time.monotonic() - burst.first_event if burst.first_event is not None else None
        # the first read serves the first pass -- unless something changed since (a file event or an API write
        # joined the burst: those must be read now); taken once either way
        first = self._prefetched() if Trigger.START in burst.triggers else None
        prefetched = first if burst.triggers <= {Trigger.START, Trigger.CADDY_RESTART} else None
        result: PassResult | None = None
        try:
            try:
                # no cyclic GC inside a pass: at 10k ingresses its collections cost ~30 % of a pass
                # (the pass's garbage is acyclic and freed by refcounting; the rest waits a moment)
                gc.disable()
                self.background.pause()  # the report thread waits while the pass reads and renders
                try:
                    result = self.reconciler.run_pass(burst, prefetched=prefetched)
                finally:
                    self.background.resume()
                    gc.enable()
            except Exception as exc:
                self._crashed(burst, exc)
                return
            self._record(result, queued)
        finally:
            self.tickets.done(burst.number, result is not None and result.converged)
        if burst.paths is None:
            # after a full read, park what is long-lived out of the collector's way (later
            # collections only walk what changed since); unfreeze first so nothing leaks
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        if self.watcher.refresh():
            self.triggers.notify(Trigger.WATCH)

    def _record(self, result: PassResult, queued: float | None) -> None:
        """What the loop needs of a pass at once (retries, readiness); its log lines and metrics go to the
        report thread, after the pass's state files (in the order they happened)."""
        self.crash = None
        self._remember(result)
        snapshot = self.reconciler.snapshot
        statuses = snapshot.statuses if snapshot is not None else ()
        self._requeue = requeue(result, statuses, self._requeue.failures)
        if self._requeue.delay is not None:
            self.triggers.retry_in(self._requeue.delay)
        retry_in = self._requeue.delay if self._requeue.backoff else None
        changes = self.changes
        self.background.submit(lambda: changes.report(result, statuses, retry_in=retry_in, queued=queued))

    def _remember(self, result: PassResult) -> None:
        self.passes.append(result)
        del self.passes[:-100]
        self.changes.metrics.observe_pass(result, converged=result.converged, problems=len(result.problems),
                                          wall=time.time())

    def _crashed(self, burst: Burst, exc: Exception) -> None:
        """A pass raised what no stage expected (a bug, or an I/O edge failing in a new way): logged with
        its traceback, counted as an ``error`` pass, and retried with backoff (reading everything again)."""
        failures = self._requeue.failures + 1
        retry_in = backoff(failures)
        self._requeue = Requeue(failures, retry_in, True)
        self.triggers.retry_in(retry_in)
        error = f"internal error: {type(exc).__name__}: {exc}"
        self.crash = PassResult(burst.name, "-", FAILED, 0.0, error=error, started_at=time.time())
        self._remember(self.crash)
        _log_safely("reconcile.crashed", trigger=burst.name, error=error, retry_in=round(retry_in, 2),
                    traceback=traceback.format_exception(exc, limit=-20))


def _log_safely(event: str, **fields: Any) -> None:
    with contextlib.suppress(Exception):  # (stderr itself may be what fails)
        log.error(event, **fields)
