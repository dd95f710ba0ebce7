"""The report thread: jobs run once each, in order, off the caller's thread; errors do not stop it."""

from __future__ import annotations

import threading

from reconciler.loop.background import Background


def test_jobs_run_in_order_on_another_thread_and_flush_waits_for_them() -> None:
    gate = threading.Event()
    ran: list[tuple[int, str]] = []
    bg = Background()
    try:
        bg.submit(lambda: (gate.wait(5), ran.append((0, threading.current_thread().name)))[-1])
        for i in range(1, 50):
            bg.submit(lambda i=i: ran.append((i, threading.current_thread().name)))
        assert ran == []  # the first job holds the thread: nothing ran in the caller
        assert not bg.flush(timeout=0.05)
        gate.set()
        assert bg.flush(timeout=5)
        assert [i for i, _ in ran] == list(range(50))
        assert {name for _, name in ran} == {"report"}
    finally:
        bg.close()


def test_a_failing_job_is_reported_and_the_next_ones_still_run() -> None:
    errors: list[BaseException] = []
    ran: list[int] = []
    bg = Background(on_error=errors.append)
    try:
        bg.submit(lambda: ran.append(1))
        bg.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
        bg.submit(lambda: ran.append(3))
        assert bg.flush(timeout=5)
    finally:
        bg.close()
    assert ran == [1, 3]
    assert [str(e) for e in errors] == ["disk full"]


def test_close_runs_what_is_queued_and_later_jobs_run_in_the_caller() -> None:
    ran: list[str] = []
    bg = Background()
    bg.submit(lambda: ran.append(threading.current_thread().name))
    bg.close()
    assert ran == ["report"]
    bg.submit(lambda: ran.append(threading.current_thread().name))
    assert ran == ["report", threading.current_thread().name]


def test_jobs_wait_while_the_gate_is_closed() -> None:
    gate = threading.Event()
    ran: list[int] = []
    bg = Background(gate=gate)
    try:
        bg.submit(lambda: ran.append(1))
        assert not bg.flush(timeout=0.1) and ran == []  # a pass is reading: the report waits
        gate.set()
        assert bg.flush(timeout=5) and ran == [1]
    finally:
        gate.set()
        bg.close()
