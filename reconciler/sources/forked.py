"""A forked helper process that runs jobs on the second core: the first, big read's parsing. I/O edge.

Parsing YAML holds the interpreter lock, so threads cannot share it; a process can. The daemon forks the
helper *before it starts any thread* (a fork with threads running could copy a lock one of them holds),
so the child is a copy of a quiet process: the same modules, the same readers, the same settings. A job
is sent to it through a pipe, run there by the handler given at fork time, and its result (pickled) sent
back.

The helper is only ever a head start: if it fails, dies or cannot be forked, the caller does the work
itself, so nothing depends on it. :meth:`ForkedHelper.close` ends it (the daemon closes it after the first
read); a helper whose parent dies sees the pipe close and exits.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

#: longest wait for one job's result before the caller gives up and does the work itself
RESULT_TIMEOUT = 120.0


def _serve(conn: Connection, other: Connection, handler: Callable[[Any], Any]) -> None:
    other.close()
    # Ctrl-C reaches the whole process group: the parent decides when the helper ends (it closes the pipe)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    gc.disable()  # short-lived: its garbage is acyclic, and collections cost ~20 % of a 10k-file parse
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        try:
            reply: tuple[bool, Any] = (True, handler(job))
        except Exception as exc:  # reported to the parent, which then does the job itself
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


class ForkedHelper:
    """One forked worker process running ``handler(job)`` for each job sent to it, one at a time."""

    def __init__(self, handler: Callable[[Any], Any]) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, self._conn, handler), name="hypeman-parse",
                                 daemon=True)
        self._proc.start()
        child.close()
        self._busy = False
        #: why the last job was not done by the helper (for logs and tests)
        self.last_error: str | None = None

    @classmethod
    def fork(cls, handler: Callable[[Any], Any]) -> ForkedHelper | None:
        """A helper, or None where there is no second core to use or forking fails."""
        if (os.cpu_count() or 1) < 2:
            return None
        try:
            return cls(handler)
        except (OSError, ValueError):
            return None

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.is_alive()

    def submit(self, job: Any) -> bool:
        """Send ``job``; False when the helper cannot take it (busy, gone): do it yourself then."""
        if self._busy or not self._proc.is_alive():
            return False
        try:
            self._conn.send(job)
        except (OSError, ValueError) as exc:
            self.last_error = f"cannot send the job: {exc}"
            return False
        self._busy = True
        return True

    def result(self, timeout: float = RESULT_TIMEOUT) -> tuple[bool, Any]:
        """The submitted job's result: (True, value), or (False, why) when the helper failed, died or
        took longer than ``timeout`` (then it is stopped: its late answer must not be read as the next
        job's)."""
        if not self._busy:
            return False, "no job submitted"
        deadline = time.monotonic() + timeout
        try:
            while not self._conn.poll(0.2):
                if not self._proc.is_alive():
                    self.last_error = f"the helper exited (code {self._proc.exitcode})"
                    return False, self.last_error
                if time.monotonic() >= deadline:
                    self.last_error = f"no result within {timeout:g}s"
                    self.close(timeout=0)
                    return False, self.last_error
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(1.0)
            self.last_error = f"the helper exited (code {self._proc.exitcode})"
            return False, self.last_error
        finally:
            self._busy = False
        if not ok:
            self.last_error = str(value)
        return bool(ok), value

    def close(self, timeout: float = 5.0) -> None:
        """Ask the helper to exit and reap it (killed if it does not exit within ``timeout``)."""
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        with contextlib.suppress(OSError):
            self._conn.close()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
