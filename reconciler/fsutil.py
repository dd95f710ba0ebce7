"""File-system helpers shared by the I/O edges (not pure: it writes files).

:func:`atomic_write` is the one place where an ``OSError`` of a write becomes a
:class:`~reconciler.errors.StorageError` naming the file. :class:`StorageHealth` remembers which files
fail to be written (a full disk, a read-only mount, a vanished directory), since when and why, and
retries each with backoff until it lands -- for status, readiness and the operator's log.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from reconciler.errors import StorageError

#: files modified this recently are read again even when their stat signature is unchanged: a rewrite of the
#: same size within the file system's timestamp granularity could hide behind an unchanged signature
RACY_SECONDS = 2.0

#: first and longest delay between two retries of a file that failed to be written
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


def racy(st: os.stat_result, now: float) -> bool:
    """``st`` is of a file modified so recently that its stat signature cannot be trusted (see
    :data:`RACY_SECONDS`); ``now``: wall-clock time."""
    return now - st.st_mtime_ns / 1e9 < RACY_SECONDS


def pid_alive(pid: int) -> bool:
    """A process ``pid`` exists and is not a zombie (someone else's counts; an impossible pid does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def storage_error(path: str, exc: OSError) -> StorageError:
    """``exc`` (raised while writing ``path``) as the error the reconciler reports."""
    return StorageError(path, exc.errno, exc.strerror or str(exc))


def atomic_write(path: str, data: bytes | Sequence[bytes] | Iterable[bytes], mode: int = 0o600, *,
                 durable: bool = True, health: StorageHealth | None = None, make_dir: bool = False) -> None:
    """Write ``data`` (bytes, or the pieces of one document) to ``path`` via a temp file in the same dir,
    fsync, rename, fsync the dir.

    Readers see either the old or the new content, never a partial file, even after a crash. The temp
    name starts with a dot and ends in ``.tmp`` so directory watchers and loaders ignore it.
    ``durable=False`` skips the fsyncs: still never a partial file for readers, but a power loss may
    bring back an older version (for files rewritten at every pass anyway, like the status).

    ``make_dir``: create the file's directory (0700) when it is missing (a dir of ours someone removed).
    Any ``OSError`` is raised as :class:`StorageError` naming ``path``. With ``health``, the outcome is
    recorded there; a failed write of bytes or a list of pieces is retried by it later (see
    :meth:`StorageHealth.due`) unless a newer write of the same file comes first.
    """
    with health.lock(path) if health is not None else contextlib.nullcontext():
        ticket = health.attempt(path) if health is not None else 0
        try:
            if make_dir:
                os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            _write(path, data, mode, durable)
        except OSError as exc:
            error = storage_error(path, exc)
            if health is not None:
                retry = None
                if isinstance(data, (bytes, list, tuple)):
                    def retry() -> None:
                        atomic_write(path, data, mode, durable=durable, health=health, make_dir=make_dir)
                health.failed(path, ticket, error, retry)
            raise error from exc
        if health is not None:
            health.succeeded(path, ticket)


def _write(path: str, data: bytes | Iterable[bytes], mode: int, durable: bool) -> None:
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                fh.writelines(data)  # pieces of one document: never joined into one copy in memory
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    # the new content is in place (readers see it); the dir's fsync only makes the rename durable, and a
    # failure of it must not be reported as "nothing was written"
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


@dataclass(slots=True)
class _Failing:
    error: StorageError
    since: float  # wall clock
    attempts: int
    ticket: int  # the write that failed last
    retry: Callable[[], None] | None
    retry_at: float  # monotonic


class StorageHealth:
    """Which files fail to be written, and their retries. Thread-safe.

    Every write through :func:`atomic_write` holds the file's lock and takes a ticket; a file fails when
    its latest write failed and is healthy again once a later write succeeds. A failed write leaves a
    retry, handed out by :meth:`due` with a doubling delay (1 s up to 30 s); a retry checks, under the
    file's lock, that its file was not written since (else it is dropped), so an old retry never
    overwrites newer content, whichever threads write. ``on_change(path, error)`` is called when a file starts
    failing (``error`` set) or recovers (``None``): the daemon logs it once, not at every attempt.
    """

    def __init__(self, *, on_change: Callable[[str, StorageError | None], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self._path_locks: dict[str, threading.RLock] = {}
        self._tickets: dict[str, int] = {}
        self._failing: dict[str, _Failing] = {}
        self._on_change = on_change
        self._clock = clock
        self._wall = wall

    def lock(self, path: str) -> threading.RLock:
        """The lock every write of ``path`` holds (re-entrant: a retry holds it around its write)."""
        with self._lock:
            found = self._path_locks.get(path)
            if found is None:
                found = self._path_locks[path] = threading.RLock()
            return found

    def attempt(self, path: str) -> int:
        with self._lock:
            ticket = self._tickets.get(path, 0) + 1
            self._tickets[path] = ticket
            return ticket

    def succeeded(self, path: str, ticket: int) -> None:
        with self._lock:
            if self._tickets.get(path) != ticket:
                return  # a newer write of the file decides
            was = self._failing.pop(path, None)
        if was is not None:
            self._changed(path, None)

    def failed(self, path: str, ticket: int, error: StorageError, retry: Callable[[], None] | None) -> None:
        with self._lock:
            if self._tickets.get(path) != ticket:
                return
            was = self._failing.get(path)
            attempts = was.attempts + 1 if was is not None else 1
            delay = min(RETRY_MAX, RETRY_FIRST * 2 ** min(attempts - 1, 16))
            since = was.since if was is not None else self._wall()
            self._failing[path] = _Failing(error, since, attempts, ticket, retry, self._clock() + delay)
            changed = was is None or was.error.errno != error.errno
        if changed:
            self._changed(path, error)

    def _changed(self, path: str, error: StorageError | None) -> None:
        if self._on_change is not None:
            with contextlib.suppress(Exception):  # reporting must never turn into another failure
                self._on_change(path, error)

    def due(self) -> list[Callable[[], None]]:
        """The retries whose time has come (each handed out once per failure)."""
        now = self._clock()
        jobs: list[Callable[[], None]] = []
        with self._lock:
            for path, f in self._failing.items():
                if f.retry is not None and now >= f.retry_at:
                    jobs.append(self._guarded(path, f.ticket, f.retry))
                    f.retry = None  # the retry's own failure registers the next one
        return jobs

    def _guarded(self, path: str, ticket: int, retry: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with self.lock(path):  # no other write of the file between this check and the retry's write
                with self._lock:
                    if self._tickets.get(path) != ticket:
                        return  # written again since: the retry's content is older
                with contextlib.suppress(StorageError):  # recorded by atomic_write; retried again later
                    retry()
        return run

    def failing(self, path: str | None = None) -> bool:
        """Whether ``path`` (or any file) fails to be written now."""
        with self._lock:
            return bool(self._failing) if path is None else path in self._failing

    def snapshot(self) -> list[dict[str, Any]]:
        """The failing files, for status: file, error, since (wall clock), attempts, whether the disk is full."""
        with self._lock:
            items = sorted(self._failing.items())
        return [{"file": path, "error": f.error.reason, "no_space": f.error.no_space, "since": round(f.since, 3),
                 "attempts": f.attempts} for path, f in items]
