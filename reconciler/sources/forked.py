"""A forked helper process that shares a list of jobs with the caller, on the second core. I/O edge.

Parsing YAML holds the interpreter lock, so threads cannot share it; a process can. The daemon forks the
helper *before it starts any thread* (a fork with threads running could copy a lock one of them holds),
so the child is a copy of a quiet process: the same modules, the same readers, the same settings.

:meth:`ForkedHelper.share` splits a list of items between the caller and the helper without deciding the
split in advance: the caller takes items from the front, the helper from the back, a few at a time, each
announcing how far it got in a small shared array, until they meet. Whoever is faster (the caller may be
sharing its core with Caddy starting up) simply does more. Around the meeting point both may do the same
few items; the caller keeps its own result then. The helper sends its results (pickled) once done.

The helper is only ever a head start: if it fails, dies or cannot be forked, the caller does what is
missing itself, so nothing depends on it. :meth:`ForkedHelper.close` ends it (the daemon closes it after
the first read); a helper whose parent dies sees the pipe close and exits.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

#: longest wait for the helper's results once the caller is done with its side
RESULT_TIMEOUT = 120.0
#: items taken at a time from either end (at most this many are done twice where the two meet)
CHUNK = 16

# the shared array: [0] the caller's front (items below it are the caller's), [1] the helper's back
# (items from it on are the helper's)
_FRONT, _BACK = 0, 1

Handler = Callable[[Any, Any], Any]  # (key, item) -> result


def _serve(conn: Connection, other: Connection, bounds: Any, handler: Handler) -> None:
    other.close()
    # the parent's Python handlers (its stop, resync...) mean nothing here: back to the defaults; Ctrl-C
    # reaches the whole process group: the parent decides when the helper ends (it closes the pipe)
    for sig in signal.valid_signals():
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
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
        key, items = job
        done: list[tuple[int, Any]] = []
        try:
            back = len(items)
            while True:
                front = bounds[_FRONT]
                if back <= front:
                    break
                start = max(front, back - CHUNK)
                bounds[_BACK] = start
                done.extend((i, handler(key, items[i])) for i in range(start, back))
                back = start
            reply: tuple[bool, Any] = (True, done)
        except Exception as exc:  # reported to the parent, which then does the items itself
            reply = (False, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(reply)
        except (OSError, ValueError):
            return


class ForkedHelper:
    """One forked worker process sharing lists of items with its parent (see :meth:`share`)."""

    def __init__(self, handler: Handler) -> None:
        ctx = multiprocessing.get_context("fork")
        self._conn, child = ctx.Pipe()
        self._bounds = ctx.RawArray("q", 2)  # shared memory: made before the fork, so both see it
        self._proc = ctx.Process(target=_serve, args=(child, self._conn, self._bounds, handler),
                                 name="hypeman-parse", daemon=True)
        self._proc.start()
        child.close()
        #: why the last share did not get the helper's results (for logs and tests)
        self.last_error: str | None = None
        #: its peak resident memory in MB, taken when it is closed (None where unknown)
        self.peak_rss_mb: float | None = None

    @classmethod
    def fork(cls, handler: Handler) -> ForkedHelper | None:
        """A helper, or None where there is no second core to use or forking fails."""
        try:
            cpus = len(os.sched_getaffinity(0))  # the CPUs this process may run on, not the machine's
        except (AttributeError, OSError):
            cpus = os.cpu_count() or 1
        if cpus < 2:
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

    def share(self, key: Any, items: Sequence[Any], mine: Callable[[int], None], *,
              timeout: float = RESULT_TIMEOUT) -> dict[int, Any]:
        """Work through ``items`` together: ``mine(i)`` is called here for the items this side takes (from
        the front, in order), the helper runs ``handler(key, item)`` on the others (from the back). Returns
        the helper's results by index; an index in neither (the helper failed) is the caller's to do."""
        n = len(items)
        self._bounds[_FRONT], self._bounds[_BACK] = 0, n
        sent = False
        if self._proc.is_alive():
            try:
                self._conn.send((key, list(items)))
                sent = True
            except (OSError, ValueError) as exc:
                self.last_error = f"cannot send the job: {exc}"
        if not sent:
            self._bounds[_BACK] = n
        i = 0
        try:
            while i < n and i < self._bounds[_BACK]:
                end = min(i + CHUNK, n)
                self._bounds[_FRONT] = end  # taken: the helper stops before it
                for k in range(i, end):
                    mine(k)
                i = end
        except BaseException:
            if sent:  # its answer to this job must never be read as the next one's
                self.last_error = "the caller failed during the share"
                self.close(timeout=0)
            raise
        if not sent:
            return {}
        try:
            ok, value = self._result(timeout)
        except BaseException:  # interrupted while its answer is due: it must never pass for the next job's
            self.close(timeout=0)
            raise
        if not ok:
            return {}
        return {k: v for k, v in value if k >= i}  # below i: done here already

    def _result(self, timeout: float) -> tuple[bool, Any]:
        deadline = time.monotonic() + timeout
        try:
            while not self._conn.poll(0.2):
                if not self._proc.is_alive():
                    self.last_error = f"the helper exited (code {self._proc.exitcode})"
                    return False, self.last_error
                if time.monotonic() >= deadline:
                    self.last_error = f"no result within {timeout:g}s"
                    self.close(timeout=0)  # its late answer must not be read as the next job's
                    return False, self.last_error
            ok, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(1.0)
            self.last_error = f"the helper exited (code {self._proc.exitcode})"
            return False, self.last_error
        if not ok:
            self.last_error = str(value)
        return bool(ok), value

    def _peak_rss(self) -> float | None:
        """The helper's peak resident memory in MB (Linux ``VmHWM``), while it still runs."""
        try:
            with open(f"/proc/{self._proc.pid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return round(int(line.split()[1]) / 1024, 1)
        except (OSError, ValueError, IndexError):
            pass
        return None

    def release(self) -> None:
        """Ask the helper to exit, without waiting for it (:meth:`close` reaps it)."""
        if self.peak_rss_mb is None and self._proc.is_alive():
            self.peak_rss_mb = self._peak_rss()
        with contextlib.suppress(OSError, ValueError):
            self._conn.send(None)
        with contextlib.suppress(OSError):
            self._conn.close()

    def close(self, timeout: float = 5.0) -> None:
        """Ask the helper to exit and reap it (killed if it does not exit within ``timeout``)."""
        self.release()
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5.0)
