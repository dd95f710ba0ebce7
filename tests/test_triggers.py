"""Unit tests of the trigger queue (debounce, max wait, resync, retry, immediate, stop).

Most tests drive :class:`Triggers` with a fake clock and poll it with ``wait(timeout=0)``, which checks
what is due at the fake "now" and returns at once. The blocking behaviour (a waiter woken by
``notify``/``stop`` from another thread) is tested with the real clock and short deadlines.
"""

from __future__ import annotations

import random
import threading
import time

from reconciler.loop.triggers import Triggers
from tests.helpers import FakeClock, last_burst, paths, poll, wait_for


def make(clock: FakeClock, *, debounce: float = 0.1, debounce_max: float = 1.0,
         resync: float = 30.0, jitter: float = 0.0) -> Triggers:
    return Triggers(debounce=debounce, debounce_max=debounce_max, resync_interval=resync,
                    clock=clock, jitter=jitter, rng=random.Random(7))


def test_nothing_due_returns_none() -> None:
    clock = FakeClock()
    t = make(clock)
    assert poll(t) is None
    clock.advance(29.9)
    assert poll(t) is None


def test_debounce_coalesces_a_burst_into_one_trigger() -> None:
    # binary fractions keep the fake clock exact
    clock = FakeClock()
    t = make(clock, debounce=0.125, debounce_max=1.0)
    for _ in range(20):  # 20 events, 1/32 s apart: never quiet for debounce
        t.notify("watch")
        assert poll(t) is None
        clock.advance(1 / 32)
    # 1/32 s after the last event: still inside the quiet period
    assert poll(t) is None
    clock.advance(0.125 - 1 / 32 - 1 / 1024)
    assert poll(t) is None
    clock.advance(1 / 1024)  # exactly debounce after the last event
    assert poll(t) == "watch"
    # the whole burst was one trigger
    assert poll(t) is None
    clock.advance(0.5)
    assert poll(t) is None


def test_reasons_of_a_burst_are_merged() -> None:
    clock = FakeClock()
    t = make(clock, debounce=0.125)
    t.notify("watch")
    t.notify("api")
    t.notify("watch")
    clock.advance(0.125)
    assert poll(t) == "api+watch"
    assert poll(t) is None


def test_max_wait_bounds_a_never_ending_trickle() -> None:
    clock = FakeClock()
    t = make(clock, debounce=0.125, debounce_max=1.0)
    for _round in range(3):
        start = clock()
        fired_at = None
        for _ in range(500):  # an event every 1/16 s, forever (30 s worth): never quiet
            t.notify("watch")
            if poll(t) is not None:
                fired_at = clock() - start
                break
            clock.advance(1 / 16)
        # the pass comes debounce_max after the first event of the trickle, not never
        assert fired_at == 1.0
        clock.advance(1 / 16)


def test_resync_fires_periodically() -> None:
    clock = FakeClock()
    t = make(clock, resync=10.0, jitter=0.0)
    clock.advance(9.99)
    assert poll(t) is None
    clock.advance(0.01)
    assert poll(t) == "resync"
    assert poll(t) is None
    clock.advance(9.99)
    assert poll(t) is None
    clock.advance(0.01)
    assert poll(t) == "resync"


def test_resync_jitter_stays_within_bounds() -> None:
    for seed in range(20):
        clock = FakeClock()
        t = Triggers(debounce=0.1, debounce_max=1.0, resync_interval=10.0, clock=clock, jitter=0.1,
                     rng=random.Random(seed))
        clock.advance(9.0 - 1e-6)
        assert poll(t) is None
        clock.advance(2.0 + 2e-6)
        assert poll(t) == "resync"


def test_a_pass_postpones_the_resync() -> None:
    clock = FakeClock()
    t = make(clock, resync=10.0)
    clock.advance(8.0)
    t.notify("watch")
    clock.advance(0.1)
    assert poll(t) == "watch"
    clock.advance(9.0)  # 17.1 s since start, 9 s since the pass
    assert poll(t) is None
    clock.advance(1.0)
    assert poll(t) == "resync"


def test_retry_fires_once() -> None:
    clock = FakeClock()
    t = make(clock, resync=30.0)
    t.retry_in(2.0)
    clock.advance(1.99)
    assert poll(t) is None
    clock.advance(0.01)
    assert poll(t) == "retry"
    assert poll(t) is None
    clock.advance(5.0)
    assert poll(t) is None


def test_cancel_retry() -> None:
    clock = FakeClock()
    t = make(clock)
    t.retry_in(1.0)
    t.cancel_retry()
    clock.advance(2.0)
    assert poll(t) is None


def test_a_pass_supersedes_a_pending_retry() -> None:
    clock = FakeClock()
    t = make(clock)
    t.retry_in(1.0)
    t.notify("watch")
    clock.advance(0.1)
    assert poll(t) == "watch"
    clock.advance(2.0)
    assert poll(t) is None


def test_immediate_skips_the_quiet_period() -> None:
    clock = FakeClock()
    t = make(clock, debounce=5.0, debounce_max=50.0)
    t.notify("caddy-restart", immediate=True)
    assert poll(t) == "caddy-restart"
    assert poll(t) is None


def test_immediate_during_a_burst_fires_now_and_later_events_do_not_delay_it() -> None:
    clock = FakeClock()
    t = make(clock, debounce=5.0, debounce_max=50.0)
    t.notify("watch")
    clock.advance(1.0)
    assert poll(t) is None
    t.notify("api", immediate=True)
    t.notify("watch")  # a plain event right after must not push the immediate pass back
    assert poll(t) == "api+watch"


def test_stop_returns_none_even_with_work_pending() -> None:
    clock = FakeClock()
    t = make(clock)
    t.notify("watch", immediate=True)
    t.stop()
    assert t.stopped
    assert poll(t) is None
    assert t.wait() is None  # no timeout: must not block once stopped


def test_stop_wakes_a_blocked_waiter() -> None:
    t = Triggers(debounce=0.1, debounce_max=1.0, resync_interval=3600.0)
    result: list[str | None] = []
    waiter = threading.Thread(target=lambda: result.append(t.wait()), daemon=True)
    waiter.start()
    # the waiter is parked on the condition (CPython keeps its waiters in ``_waiters``)
    wait_for(lambda: len(t._cond._waiters) > 0, timeout=2.0, message="waiter blocked in wait()")
    assert waiter.is_alive()
    start = time.monotonic()
    t.stop()
    waiter.join(timeout=2.0)
    assert not waiter.is_alive(), "wait() did not return after stop()"
    assert result == [None]
    assert time.monotonic() - start < 1.0


def test_notify_wakes_a_blocked_waiter_after_the_debounce() -> None:
    t = Triggers(debounce=0.05, debounce_max=1.0, resync_interval=3600.0)
    result: list[tuple[str | None, float]] = []

    def run() -> None:
        burst = t.wait()
        result.append((burst.name if burst else None, time.monotonic()))

    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    sent = time.monotonic()
    t.notify("watch")
    waiter.join(timeout=5.0)
    assert not waiter.is_alive()
    reason, at = result[0]
    assert reason == "watch"
    assert 0.04 <= at - sent < 1.0


def test_wait_timeout_returns_none_with_the_real_clock() -> None:
    t = Triggers(debounce=0.1, debounce_max=1.0, resync_interval=3600.0)
    start = time.monotonic()
    assert t.wait(timeout=0.05) is None
    assert 0.04 <= time.monotonic() - start < 1.0


def test_notify_names_the_burst_whose_pass_handles_it() -> None:
    """An API write waits for the pass of the burst its notification joined: a notification that arrives
    after :meth:`wait` handed out a burst (its pass is starting) belongs to the next burst."""
    clock = FakeClock()
    t = make(clock, debounce=0.125)
    assert t.bursts == 0
    assert t.notify("watch", path="/m/a.yaml") == 1
    assert t.notify("api", immediate=True, path="/m/b.yaml") == 1
    assert poll(t) == "api+watch"
    assert t.bursts == 1
    assert paths(t) == {"/m/a.yaml", "/m/b.yaml"}
    # the pass of burst 1 has started; this write is not in its paths, so it must wait for burst 2
    assert t.notify("api", immediate=True, path="/m/c.yaml") == 2
    assert paths(t) == {"/m/a.yaml", "/m/b.yaml"}
    assert poll(t) == "api"
    assert (t.bursts, paths(t)) == (2, {"/m/c.yaml"})
    clock.advance(40)  # a timer pass has a number too (no ticket waits for it)
    assert poll(t) == "resync"
    assert t.bursts == 3 and last_burst(t).number == 3 and paths(t) is None
