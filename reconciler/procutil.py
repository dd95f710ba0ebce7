"""What every supervisor of a detached data-plane process shares (Caddy's, the DNS responder's): the
process it watches, its PID file, how it ended, how it is stopped. Not pure: processes and files.

A subclass says where its PID file and log are (``pid_path``, ``log_path``), names its log events
(``event``), and decides what "ours" and "up" mean; the keeper (:mod:`reconciler.loop.keeper`) drives it
from one thread.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from reconciler.errors import StorageError
from reconciler.fsutil import StorageHealth, atomic_write, pid_alive


class Detached:
    event = "process"

    def __init__(self, *, log: Callable[..., Any] | None, health: StorageHealth | None) -> None:
        self._log = log or (lambda *a, **k: None)
        self.health = health
        self._popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.adopted = False
        #: the process answered (its admin API, its control socket) since it started or was adopted
        self.answered = False
        #: monotonic time the current process answered first
        self.started_at: float | None = None
        #: how the last process we watched ended: {"pid", "code", "uptime_seconds"} (code None: not our child)
        self.last_exit: dict[str, Any] | None = None
        #: set to give up a start that is still waiting for the process to answer (the daemon is stopping)
        self.cancel = threading.Event()

    @property
    def pid_path(self) -> str:
        raise NotImplementedError

    @property
    def log_path(self) -> str:
        raise NotImplementedError

    # -- the PID file ------------------------------------------------------------------------------
    def _read_pid(self) -> int | None:
        try:
            with open(self.pid_path, encoding="ascii") as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def _write_pid(self, pid: int) -> None:
        try:
            atomic_write(self.pid_path, f"{pid}\n".encode(), 0o644, health=self.health)
        except StorageError as exc:  # retried by the health registry; adoption needs it after our restart
            self._log(f"{self.event}.pid_file_failed", file=self.pid_path, pid=pid, error=exc.reason)

    # -- the process -------------------------------------------------------------------------------
    def process_alive(self) -> bool:
        """The current process exists and is not a zombie (any thread; never reaps)."""
        return self.pid is not None and pid_alive(self.pid)

    def alive(self) -> bool:
        """The process is alive (the keeper's thread: reaps our child when it exited)."""
        if self._popen is not None and self._popen.pid == self.pid:
            return self._popen.poll() is None
        return self.process_alive()

    def _exited(self, pid: int) -> bool:
        """``pid`` is gone (our child: reaped)."""
        if self._popen is not None and self._popen.pid == pid:
            return self._popen.poll() is not None
        return not pid_alive(pid)

    def note_exit(self, now: float) -> dict[str, Any]:
        """Record how the current process ended (after :meth:`alive` said it did) and forget it."""
        code = self._popen.returncode if self._popen is not None and self._popen.pid == self.pid else None
        uptime = now - self.started_at if self.started_at is not None else None
        self.last_exit = {"pid": self.pid, "code": code,
                          "uptime_seconds": round(uptime, 3) if uptime is not None else None}
        self.pid, self._popen, self.answered, self.started_at = None, None, False, None
        return self.last_exit

    def _kill(self, pid: int, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self._exited(pid):
                    return
                time.sleep(0.02)

    def _tail(self, lines: int) -> str:
        """The last lines of the process's log, joined with `` | ``."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _launch(self, args: list[str], *, stdin: int, env: dict[str, str] | None = None,
                cwd: str = "/") -> subprocess.Popen[bytes]:
        """Start ``args`` detached (a session of its own: it outlives us), its output appended to the log;
        it becomes the current process and its PID is written. Raises ``OSError`` when it cannot start."""
        logf = self._open_log()
        try:
            popen = subprocess.Popen(args, stdin=stdin, stdout=logf, stderr=logf, env=env,
                                     start_new_session=True, close_fds=True, cwd=cwd)
        finally:
            os.close(logf)
        self._popen = popen
        self.pid, self.adopted, self.answered, self.started_at = popen.pid, False, False, None
        self._write_pid(popen.pid)
        return popen

    def _open_log(self) -> int:
        """A descriptor of the log to hand the process (``/dev/null`` when it cannot be opened)."""
        try:
            return os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:  # a read-only or vanished dir: the process runs anyway, its output is lost
            self._log(f"{self.event}.log_unavailable", file=self.log_path, error=exc.strerror or str(exc))
            return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
