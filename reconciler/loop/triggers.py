"""Trigger queue with a trailing debounce and a maximum wait, plus timers (resync, retry). Thread-safe.

Watch events, API writes and Caddy restarts call :meth:`Triggers.notify`; the loop calls
:meth:`Triggers.wait`, which returns once the burst has been quiet for ``debounce`` seconds (or
``debounce_max`` after its first event, so a never-ending trickle still converges), or when the
resync or retry timer fires. A burst that touched only a few paths so far (one file saved: its rename,
or its writes and close) needs only the shorter ``quick`` quiet period. The clock is injectable for tests.

Signal handlers must not take a lock (the handler runs in the main thread, which may hold it at that
moment): :meth:`Triggers.notify_from_signal` and :meth:`Triggers.stop_from_signal` only append to a list
or set a flag, then wake the waiter if the lock happens to be free; :meth:`Triggers.wait` picks them up
(and never sleeps longer than its ``timeout``, so a wake-up that could not be delivered is late by at most
that).

:meth:`Triggers.wait` hands over one :class:`Burst`: what asked for the pass, the paths that changed (so
the pass re-reads only those files), its number (API tickets wait for it) and when its first event came.
Any trigger without paths (start, resync, retry, a Caddy restart, a watch that moved) -- or a burst of
more than ``max_paths`` paths -- asks for a full read instead.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum


class Trigger(StrEnum):
    """What asked for a pass."""

    START = "start"
    WATCH = "watch"  # a file event
    API = "api"  # an API write
    RESYNC = "resync"  # the periodic timer
    RETRY = "retry"  # a retry after a failed pass
    CADDY_RESTART = "caddy-restart"  # Caddy was (re)started
    SIGHUP = "sighup"
    APPLY = "apply"  # ``hypeman-ingress apply``: one pass, then exit
    HEALTH = "health"  # what Caddy says of health-checked targets changed, or a cutover's probe answered


#: triggers that change nothing on disk: a pass they ask for reads no file again (unless others ask)
NO_READ = frozenset({Trigger.HEALTH})


@dataclass(frozen=True, slots=True)
class Burst:
    """One pass's worth of triggers, as :meth:`Triggers.wait` hands it over."""

    triggers: frozenset[Trigger]
    #: the paths that changed; None: read everything
    paths: frozenset[str] | None = None
    #: its number: an API ticket is satisfied once the pass of this burst has finished
    number: int = 0
    #: clock time of its first event (None: a timer fired)
    first_event: float | None = None

    @classmethod
    def of(cls, *triggers: Trigger | str, paths: Iterable[str] | None = None) -> Burst:
        """A burst made by hand (offline commands, tests)."""
        return cls(frozenset(Trigger(t) for t in triggers), frozenset(paths) if paths is not None else None)

    @property
    def name(self) -> str:
        """``"api+watch"``: how logs and status name the trigger."""
        return "+".join(sorted(self.triggers))

    @property
    def trusted(self) -> bool:
        """Only file events and API writes: Caddy still runs what this process loaded (no read back)."""
        return bool(self.triggers) and self.triggers <= {Trigger.WATCH, Trigger.API, Trigger.HEALTH}

    @property
    def resync(self) -> bool:
        """A full resync (the timer or SIGHUP): rejected ingresses are tried again."""
        return bool(self.triggers & {Trigger.RESYNC, Trigger.SIGHUP})


@dataclass(slots=True)
class _Pending:
    """The burst being gathered."""

    reasons: set[Trigger] = field(default_factory=set)
    #: paths changed; None = something without a path asked: read everything
    paths: set[str] | None = field(default_factory=set)
    first: float = 0.0  # when it is due at the latest is ``first + debounce_max``
    first_event: float = 0.0  # when its first event came (for the pass's ``queued_ms``)
    last: float = 0.0  # its last event (the quiet period counts from it)

    def add(self, reason: Trigger, now: float, path: str | None, max_paths: int) -> None:
        if not self.reasons:
            self.first = self.first_event = now
            self.paths = set()
        self.reasons.add(Trigger(reason))
        if path is None and reason in NO_READ:
            pass
        elif path is None or self.paths is None or (path not in self.paths and len(self.paths) >= max_paths):
            self.paths = None
        else:
            self.paths.add(path)
        self.last = now


class Triggers:
    def __init__(self, *, debounce: float, debounce_max: float, resync_interval: float,
                 clock: Callable[[], float] = time.monotonic, jitter: float = 0.1,
                 rng: random.Random | None = None, max_paths: int = 1024, quick: float | None = None,
                 quick_paths: int = 3) -> None:
        self.debounce = debounce
        self.debounce_max = max(debounce_max, debounce)
        #: the quiet period of a burst that so far touched at most ``quick_paths`` paths (one file saved)
        self.quick = debounce if quick is None else min(quick, debounce)
        self.quick_paths = quick_paths
        self.max_paths = max_paths
        self._resync = (resync_interval, resync_interval * jitter, rng or random.Random())
        self._clock = clock
        self._cond = threading.Condition()
        self._pending = _Pending()
        #: bursts handed out by :meth:`wait` so far (a notification belongs to burst ``bursts + 1``)
        self.bursts = 0
        self._retry_at: float | None = None
        self._resync_at = self._clock() + self._next_resync()
        self._stopped = False
        #: reasons raised by signal handlers, not yet merged (appended without the lock), and whether a
        #: handler only asked to be looked at
        self._signalled: list[Trigger] = []
        self._woken = False

    def _next_resync(self) -> float:
        interval, spread, rng = self._resync
        return interval + rng.uniform(-spread, spread)

    def notify(self, reason: Trigger, *, immediate: bool = False, path: str | None = None) -> int:
        """Ask for a pass. ``immediate`` skips the quiet period (API writes, Caddy restarts); ``path`` is
        what changed (a pass asked for without one reads every input). Returns the number of the burst
        this belongs to: the pass that :meth:`wait` returns with :attr:`bursts` equal to it handles it."""
        with self._cond:
            self._add(reason, path, immediate)
            self._cond.notify_all()
            return self.bursts + 1

    def _add(self, reason: Trigger, path: str | None, immediate: bool) -> None:
        now = self._clock()
        pending = self._pending
        pending.add(reason, now, path, self.max_paths)
        if immediate:
            pending.last = now - self.debounce
            pending.first = min(pending.first, now - self.debounce_max)

    def notify_from_signal(self, reason: Trigger) -> None:
        """:meth:`notify` (immediate, no path) for a signal handler: takes no lock that could be held."""
        self._signalled.append(reason)
        self._wake()

    def wake_from_signal(self) -> None:
        """Make :meth:`wait` return None soon (no pass: the loop only looks at what the handler noted)."""
        self._woken = True
        self._wake()

    def stop_from_signal(self) -> None:
        """:meth:`stop` for a signal handler."""
        self._stopped = True
        self._wake()

    def _wake(self) -> None:
        if self._cond.acquire(blocking=False):
            try:
                self._cond.notify_all()
            finally:
                self._cond.release()

    def retry_in(self, delay: float) -> None:
        with self._cond:
            self._retry_at = self._clock() + delay
            self._cond.notify_all()

    def cancel_retry(self) -> None:
        with self._cond:
            self._retry_at = None

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def wait(self, timeout: float | None = None) -> Burst | None:
        """Block until a pass is due and return its :class:`Burst`; None on stop, when ``timeout`` passed
        with nothing due, or when a signal handler only woke the loop (the caller uses that tick)."""
        with self._cond:
            give_up = None if timeout is None else self._clock() + timeout
            while not self._stopped:
                while self._signalled:  # a signal handler's reasons join the burst, due at once
                    self._add(self._signalled.pop(0), None, True)
                if self._woken:
                    self._woken = False
                    return None
                now = self._clock()
                burst, due = self._due(now)
                if burst is not None:
                    return burst
                if give_up is not None:
                    if now >= give_up:
                        return None
                    due = min(due, give_up)
                self._cond.wait(max(0.0, due - now))
            return None

    def _due(self, now: float) -> tuple[Burst | None, float]:
        """The burst due now, if any, and else when the next one is."""
        pending = self._pending
        if pending.reasons:
            small = pending.paths is not None and len(pending.paths) <= self.quick_paths
            due = min(pending.last + (self.quick if small else self.debounce), pending.first + self.debounce_max)
            return (self._take() if now >= due else None), due
        if now >= self._resync_at:
            self._resync_at = now + self._next_resync()
            self._retry_at = None
            return self._timer(Trigger.RESYNC), now
        if self._retry_at is not None and now >= self._retry_at:
            self._retry_at = None
            return self._timer(Trigger.RETRY), now
        return None, min(self._resync_at, self._retry_at if self._retry_at is not None else self._resync_at)

    def _timer(self, trigger: Trigger) -> Burst:
        self.bursts += 1
        return Burst(frozenset({trigger}), None, self.bursts, None)

    def _take(self) -> Burst:
        self.bursts += 1
        pending = self._pending
        burst = Burst(frozenset(pending.reasons), frozenset(pending.paths) if pending.paths is not None else None,
                      self.bursts, pending.first_event)
        self._pending = _Pending()
        self._retry_at = None
        self._resync_at = self._clock() + self._next_resync()
        return burst
