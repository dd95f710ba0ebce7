"""Keeps a data-plane process running -- Caddy, the DNS responder -- on a thread of its own: the loop
never waits on a start.

The keeper starts (or adopts) the process through its supervisor, notices when it dies and starts it
again, and publishes what it knows for status, readiness and metrics (Caddy's words below; the
responder's keeper is the same with its control socket for the admin API):

* A Caddy that ran for ``stable_after`` seconds and then died is restarted at once. One that died sooner
  (or exited before its admin API answered) counts as a *failure*: restarts then wait with capped
  exponential backoff, and the count holds until a Caddy has stayed up ``stable_after`` seconds. Two such
  quick deaths in a row make it *flapping*, which status and ``/readyz`` say.
* Any error of a start -- a hung start, a binary that is gone, a full or read-only disk -- is logged and
  retried with backoff; nothing a start raises ends the thread.
* ``generation`` counts start attempts: a pass that converged Caddy counts for readiness only while the
  generation it started under is still the current one (a restarted Caddy must be converged again).
* ``running`` means "its admin API answers", not "a process exists": a start that hangs is ``starting``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from reconciler.errors import CaddyAdminInUse, CaddyExited, ResponderExited

STARTING = "starting"
RUNNING = "running"
DOWN = "down"
UNRESPONSIVE = "unresponsive"  # the process lives, its admin API does not answer

#: consecutive quick deaths (died soon after its start, or exited before answering) that make it "flapping"
FLAPPING_AFTER = 2


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(cap, base * (2 ** min(max(0, attempt), 64)))  # the exponent capped: no float overflow
    return (rng or random).uniform(delay / 2, delay)


@dataclass(slots=True)
class Record:
    """What the keeper knows of Caddy's lives (changed under the keeper's lock)."""

    phase: str = STARTING
    since: float = 0.0  # monotonic time the phase began
    #: start attempts so far (see the module docstring)
    generation: int = 0
    #: successful starts after the first one
    restarts: int = 0
    #: failed starts and quick deaths in a row (restarts back off)
    failures: int = 0
    #: quick deaths in a row (a start that answered, then died within ``stable_after``; or a crash at start)
    quick_deaths: int = 0
    last_error: str | None = None
    retry_at: float = 0.0  # monotonic time of the next attempt


@dataclass(slots=True)
class FirstStart:
    """The handshake with whoever waits for the first start (see :meth:`Keeper.wait_first`)."""

    done: threading.Event = field(default_factory=threading.Event)
    finished: bool = False  # the first attempt ended (under the keeper's lock)
    abandoned: bool = False  # its waiter gave up: the keeper announces its success itself
    #: its error, when it was one a start cannot get past (another server on the admin address)
    error: CaddyAdminInUse | None = None


class Supervised(Protocol):
    """What a keeper needs of a supervisor (:class:`reconciler.caddy.supervisor.CaddySupervisor`,
    :class:`reconciler.responder.supervisor.ResponderSupervisor`)."""

    label: str  # "Caddy"
    event: str  # prefix of log events: "caddy"
    readiness: str  # what answers when it is up: "admin API"
    pid: int | None
    answered: bool
    started_at: float | None
    cancel: threading.Event

    def ensure_running(self) -> bool: ...
    def adopted_check(self) -> None: ...
    def tend(self) -> None: ...
    def alive(self) -> bool: ...
    def process_alive(self) -> bool: ...
    def running(self) -> bool: ...
    def note_exit(self, now: float) -> dict[str, Any]: ...
    def log_tail(self, lines: int = 5) -> str: ...
    def state(self) -> dict[str, Any]: ...
    def unresponsive(self) -> str: ...


class Keeper:
    def __init__(self, supervisor: Supervised, *, on_started: Callable[[], object],
                 log: Callable[..., Any], stable_after: float = 30.0, interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.supervisor = supervisor
        self._on_started = on_started
        self._log = log
        self.stable_after = stable_after
        self.interval = interval
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first = FirstStart()
        self.record = Record(since=clock())

    @property
    def generation(self) -> int:
        return self.record.generation

    @property
    def restarts(self) -> int:
        return self.record.restarts

    @property
    def failures(self) -> int:
        return self.record.failures

    @property
    def phase(self) -> str:
        return self.record.phase

    @property
    def first_error(self) -> CaddyAdminInUse | None:
        return self._first.error

    # -- thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self.supervisor.event}-keeper", daemon=True)
        self._thread.start()

    def wait_first(self, timeout: float) -> bool:
        """Wait for the first start attempt to end (at most ``timeout``). True when it did: the caller runs
        the first pass then; else the keeper announces the start when it comes (``on_started``)."""
        self._first.done.wait(timeout)
        with self._lock:
            if self._first.finished:
                return True
            self._first.abandoned = True
            return False

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.supervisor.cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._attempt(first=True)
        except Exception as exc:  # (logging itself failed): the ticks below go on trying
            with self._lock:
                self._first.finished = True
                self._phase(DOWN, self._clock())
                self.record.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._first.done.set()
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as exc:  # never let supervision end: log and look again at the next tick
                self._log(f"{self.supervisor.event}.keeper_error", error=f"{type(exc).__name__}: {exc}")

    def _tick(self) -> None:
        sup, r = self.supervisor, self.record
        now = self._clock()
        if sup.pid is not None:
            if sup.alive():
                sup.tend()
                started = sup.started_at
                if r.failures and started is not None and now - started >= self.stable_after:
                    self._log(f"{sup.event}.stable", pid=sup.pid, after_failures=r.failures)
                    with self._lock:
                        r.failures = r.quick_deaths = 0
                        r.last_error = None
                return
            self._died(now)
        if now >= r.retry_at and not self._stop.is_set():
            self._attempt()

    def _died(self, now: float) -> None:
        sup, r = self.supervisor, self.record
        answered = sup.answered
        exit_ = sup.note_exit(now)
        uptime = exit_.get("uptime_seconds")
        quick = not answered or uptime is None or uptime < self.stable_after
        with self._lock:
            if quick:
                r.failures += 1
                r.quick_deaths += 1
            else:
                r.failures = r.quick_deaths = 0
            self._phase(DOWN, now)
            how = _how(exit_)
            r.last_error = f"{sup.label} {how} after {uptime:.1f}s" if uptime is not None else f"{sup.label} {how}"
            delay = backoff(r.failures, rng=self._rng) if r.failures else 0.0
            r.retry_at = now + delay
        self._log(f"{sup.event}.died", pid=exit_["pid"], exit_code=exit_["code"], uptime_s=uptime,
                  failures=r.failures, flapping=self.flapping, retry_in=round(delay, 2),
                  log_tail=sup.log_tail(3))

    def _attempt(self, *, first: bool = False) -> None:
        sup, r = self.supervisor, self.record
        with self._lock:
            r.generation += 1
            self._phase(STARTING, self._clock())
        try:
            started = sup.ensure_running()
        except Exception as exc:  # a hung or failing start, a missing binary, a full disk: retried
            self._failed(exc, first)
            return
        if not started:  # adopted: e.g. a config.json damaged meanwhile is noticed (and repaired by a pass)
            sup.adopted_check()
        with self._lock:
            self._phase(RUNNING, self._clock())
            if first:
                self._first.finished = True
                announce = self._first.abandoned
            else:
                r.restarts += 1
                announce = True
        if announce:
            self._on_started()

    def _failed(self, exc: Exception, first: bool) -> None:
        r = self.record
        now = self._clock()
        with self._lock:
            r.failures += 1
            if isinstance(exc, (CaddyExited, ResponderExited)):  # a crash at start counts like a death soon after it
                r.quick_deaths += 1
            r.last_error = str(exc)
            delay = backoff(r.failures, rng=self._rng)
            r.retry_at = now + delay
            self._phase(DOWN, now)
            if first:
                self._first.finished = True
                if isinstance(exc, CaddyAdminInUse):
                    self._first.error = exc
        event = self.supervisor.event
        self._log(f"{event}.start_failed" if first else f"{event}.restart_failed", error=str(exc),
                  failures=r.failures, flapping=self.flapping, retry_in=round(delay, 2))

    def _phase(self, phase: str, now: float) -> None:
        if phase != self.record.phase:
            self.record.phase, self.record.since = phase, now

    # -- what others read ------------------------------------------------------------------------
    @property
    def flapping(self) -> bool:
        return self.record.quick_deaths >= FLAPPING_AFTER

    def up(self) -> bool:
        """Caddy runs and its admin API answers (checked now, from any thread)."""
        return self.record.phase == RUNNING and self.supervisor.running()

    def state(self) -> dict[str, Any]:
        sup = self.supervisor
        now = self._clock()
        with self._lock:
            r = replace(self.record)
        running = r.phase == RUNNING and sup.running()
        phase = r.phase
        if phase == RUNNING and not running:  # seen now, before the keeper's next look
            phase = UNRESPONSIVE if sup.process_alive() else DOWN
        state = {**sup.state(), "running": running, "state": phase,
                 "since_seconds": round(now - r.since, 1), "flapping": self.flapping, "failures": r.failures,
                 "restarts": r.restarts, "generation": r.generation, "last_error": r.last_error}
        if phase == DOWN:
            state["next_attempt_in"] = round(max(0.0, r.retry_at - now), 1)
        return state

    def problem(self) -> str | None:
        """Why the process cannot be called up now, for ``/readyz`` (None when it is)."""
        st = self.state()
        sup = self.supervisor
        if self.flapping:
            return (f"{sup.label} is flapping: it died {self.record.quick_deaths} times in a row within "
                    f"{self.stable_after:g}s of starting ({st['last_error']})"
                    + (f"; next start in {st['next_attempt_in']}s" if "next_attempt_in" in st else ""))
        if st["running"]:
            return None
        if st["state"] == STARTING:
            return f"{sup.label} is starting (for {st['since_seconds']}s; its {sup.readiness} has not answered yet)"
        if st["state"] == UNRESPONSIVE:
            return f"{sup.label} (pid {st['pid']}) {sup.unresponsive()}"
        detail = f": {st['last_error']}" if st["last_error"] else ""
        retry = f"; next attempt in {st['next_attempt_in']}s" if "next_attempt_in" in st else ""
        return f"{sup.label} is not running{detail}{retry}"


def _how(exit_: dict[str, Any]) -> str:
    code = exit_.get("code")
    if code is None:
        return "exited"
    return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
