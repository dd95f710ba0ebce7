"""An ordered job runner on one thread: what a pass has to report (status files, log lines, metrics) is
done while the next pass already reads its inputs and Caddy loads -- not before the loop may look for the
next change. Jobs run in the order they were submitted, each exactly once; :meth:`Background.flush` waits
for all of them (shutdown, tests)."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

Job = Callable[[], None]


class Background:
    def __init__(self, *, on_error: Callable[[BaseException], None] | None = None, name: str = "report",
                 gate: threading.Event | None = None) -> None:
        """``gate``: when given, a job starts only while it is set (the daemon clears it while a pass reads
        and renders, so reports do not compete with the pass for the interpreter)."""
        self._gate = gate
        self._cond = threading.Condition()
        self._jobs: collections.deque[Job] = collections.deque()
        self._busy = False
        self._closed = False
        self._on_error = on_error
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Jobs not yet started wait until :meth:`resume` (a pass is reading and rendering)."""
        if self._gate is not None:
            self._gate.clear()

    def resume(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def submit(self, job: Job) -> None:
        """Run ``job`` after every job submitted before it (at once, in the caller, once closed)."""
        with self._cond:
            if not self._closed:
                self._jobs.append(job)
                self._cond.notify_all()
                return
        self._call(job)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run; False when ``timeout`` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Run what is queued, then stop the thread (later jobs run in their caller)."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _call(self, job: Job) -> None:
        try:
            job()
        except Exception as exc:  # a failed report must not stop the ones after it
            if self._on_error is not None:
                self._on_error(exc)

    def _run(self) -> None:
        while True:
            if self._gate is not None:
                self._gate.wait()
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                self._busy = True
            try:
                self._call(job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
