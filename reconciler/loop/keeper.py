"""Keeps Caddy running, on a thread of its own: the loop never waits on a Caddy start.

The keeper starts (or adopts) Caddy, notices when it dies and starts it again, and publishes what it
knows for status, readiness and metrics:

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
from typing import Any

from reconciler.caddy.supervisor import CaddySupervisor
from reconciler.errors import CaddyAdminInUse, CaddyExited

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


class CaddyKeeper:
    def __init__(self, supervisor: CaddySupervisor, *, on_started: Callable[[], None],
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
        self._first_done = threading.Event()
        self._first_finished = False  # the first attempt ended (under the lock)
        self._first_abandoned = False  # its waiter gave up: the keeper announces its success itself
        self._thread: threading.Thread | None = None
        #: start attempts so far (see the module docstring)
        self.generation = 0
        #: successful starts after the first one
        self.restarts = 0
        self.failures = 0
        #: consecutive quick deaths (a start that answered, then died within ``stable_after``)
        self.quick_deaths = 0
        self.phase = STARTING
        self.last_error: str | None = None
        self._retry_at = 0.0
        self._phase_since = clock()
        #: the first attempt's error when it was one that a start cannot get past (another admin server)
        self.first_error: CaddyAdminInUse | None = None

    # -- thread ----------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="caddy-keeper", daemon=True)
        self._thread.start()

    def wait_first(self, timeout: float) -> bool:
        """Wait for the first start attempt to end (at most ``timeout``). True when it did: the caller runs
        the first pass then; else the keeper announces the start when it comes (``on_started``)."""
        self._first_done.wait(timeout)
        with self._lock:
            if self._first_finished:
                return True
            self._first_abandoned = True
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
                self._first_finished = True
                self._set_phase(DOWN, self._clock())
                self.last_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._first_done.set()
        while not self._stop.wait(self.interval):
            try:
                self._tick()
            except Exception as exc:  # never let supervision end: log and look again at the next tick
                self._log("caddy.keeper_error", error=f"{type(exc).__name__}: {exc}")

    def _tick(self) -> None:
        sup = self.supervisor
        now = self._clock()
        if sup.pid is not None:
            if sup.alive():
                started = sup.started_at
                if self.failures and started is not None and now - started >= self.stable_after:
                    self._log("caddy.stable", pid=sup.pid, after_failures=self.failures)
                    with self._lock:
                        self.failures = self.quick_deaths = 0
                        self.last_error = None
                return
            self._died(now)
        if now >= self._retry_at and not self._stop.is_set():
            self._attempt()

    def _died(self, now: float) -> None:
        sup = self.supervisor
        answered = sup.answered
        exit_ = sup.note_exit(now)
        uptime = exit_.get("uptime_seconds")
        quick = not answered or uptime is None or uptime < self.stable_after
        with self._lock:
            if quick:
                self.failures += 1
                self.quick_deaths += 1
            else:
                self.failures = self.quick_deaths = 0
            self._set_phase(DOWN, now)
            how = _how(exit_)
            self.last_error = f"Caddy {how} after {uptime:.1f}s" if uptime is not None else f"Caddy {how}"
            delay = backoff(self.failures, rng=self._rng) if self.failures else 0.0
            self._retry_at = now + delay
        self._log("caddy.died", pid=exit_["pid"], exit_code=exit_["code"], uptime_s=uptime,
                  failures=self.failures, flapping=self.flapping, retry_in=round(delay, 2),
                  log_tail=sup.log_tail(3))

    def _attempt(self, *, first: bool = False) -> None:
        sup = self.supervisor
        with self._lock:
            self.generation += 1
            self._set_phase(STARTING, self._clock())
        try:
            started = sup.ensure_running()
        except Exception as exc:  # a hung or failing start, a missing binary, a full disk: retried
            now = self._clock()
            with self._lock:
                self.failures += 1
                if isinstance(exc, CaddyExited):  # a crash at start counts like a death soon after it
                    self.quick_deaths += 1
                self.last_error = str(exc)
                delay = backoff(self.failures, rng=self._rng)
                self._retry_at = now + delay
                self._set_phase(DOWN, now)
                if first:
                    self._first_finished = True
                    if isinstance(exc, CaddyAdminInUse):
                        self.first_error = exc
            self._log("caddy.start_failed" if first else "caddy.restart_failed", error=str(exc),
                      failures=self.failures, flapping=self.flapping, retry_in=round(delay, 2))
            return
        if not started:  # adopted: a config.json damaged meanwhile is noticed (and repaired by a pass)
            sup.config.check()
        with self._lock:
            self._set_phase(RUNNING, self._clock())
            if first:
                self._first_finished = True
                announce = self._first_abandoned
            else:
                self.restarts += 1
                announce = True
        if announce:
            self._on_started()

    def _set_phase(self, phase: str, now: float) -> None:
        if phase != self.phase:
            self.phase, self._phase_since = phase, now

    # -- what others read ------------------------------------------------------------------------
    @property
    def flapping(self) -> bool:
        return self.quick_deaths >= FLAPPING_AFTER

    def up(self) -> bool:
        """Caddy runs and its admin API answers (checked now, from any thread)."""
        return self.phase == RUNNING and self.supervisor.running()

    def state(self) -> dict[str, Any]:
        sup = self.supervisor
        now = self._clock()
        with self._lock:
            phase, failures, since, error = self.phase, self.failures, self._phase_since, self.last_error
            retry_at, restarts, generation = self._retry_at, self.restarts, self.generation
        running = phase == RUNNING and sup.running()
        if phase == RUNNING and not running:  # seen now, before the keeper's next look
            phase = UNRESPONSIVE if sup.process_alive() else DOWN
        state = {**sup.state(), "running": running, "state": phase,
                 "since_seconds": round(now - since, 1), "flapping": self.flapping, "failures": failures,
                 "restarts": restarts, "generation": generation, "last_error": error,
                 "last_exit": sup.last_exit, "config": sup.config_path}
        if phase == DOWN:
            state["next_attempt_in"] = round(max(0.0, retry_at - now), 1)
        return state

    def problem(self) -> str | None:
        """Why Caddy cannot be called up now, for ``/readyz`` (None when it is)."""
        st = self.state()
        if self.flapping:
            return (f"Caddy is flapping: it died {self.quick_deaths} times in a row within "
                    f"{self.stable_after:g}s of starting ({st['last_error']})"
                    + (f"; next start in {st['next_attempt_in']}s" if "next_attempt_in" in st else ""))
        if st["running"]:
            return None
        if st["state"] == STARTING:
            return f"Caddy is starting (for {st['since_seconds']}s; its admin API has not answered yet)"
        if st["state"] == UNRESPONSIVE:
            return (f"Caddy (pid {st['pid']}) does not answer on its admin API {self.supervisor.settings.admin_url}: "
                    f"{self.supervisor.client.contact.error}")
        detail = f": {st['last_error']}" if st["last_error"] else ""
        retry = f"; next attempt in {st['next_attempt_in']}s" if "next_attempt_in" in st else ""
        return f"Caddy is not running{detail}{retry}"


def _how(exit_: dict[str, Any]) -> str:
    code = exit_.get("code")
    if code is None:
        return "exited"
    return f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}"
