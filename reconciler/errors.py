"""Error tree of the reconciler. PURE: no I/O.

Third-party errors are mapped onto this tree in exactly one place per edge
(``reconciler.caddy.admin`` for httpx, ``reconciler.sources.loader`` for YAML/OS errors)::

    ReconcilerError
    ├── ConfigError                 bad settings / flags (terminal)
    ├── CaddyError                  anything while talking to Caddy
    │   ├── CaddyUnavailable        unreachable, timeout, 5xx   -> transient, retried with backoff
    │   │   └── CaddyExited         a started Caddy exited before its admin API answered
    │   ├── CaddyRejected           400 from /load: the old config keeps serving
    │   ├── CaddyBinaryError        binary missing / not executable / wrong
    │   └── CaddyAdminInUse         another process holds Caddy's admin address
    ├── ResponderError              the DNS responder could not be started or did not answer
    │   └── ResponderExited         a started responder exited before its control socket answered
    └── StorageError                a file under the data dir could not be written (full disk,
                                    read-only or vanished directory, permissions): names the file

``StorageError`` is made from an ``OSError`` in exactly one place, :func:`reconciler.fsutil.storage_error`
(by :func:`reconciler.fsutil.atomic_write` and the few other writers of the data dir).
"""

from __future__ import annotations

import errno


class ReconcilerError(Exception):
    """Base of every error raised on purpose by the reconciler."""


class ConfigError(ReconcilerError):
    """Invalid settings: a flag or environment variable has a bad value."""


class CaddyError(ReconcilerError):
    """Talking to Caddy failed."""


class CaddyUnavailable(CaddyError):
    """Caddy's admin API is unreachable, timed out or answered 5xx. Transient."""


class CaddyExited(CaddyUnavailable):
    """A Caddy we started exited (or was killed) before its admin API answered: a crash at start."""


class CaddyRejected(CaddyError):
    """Caddy refused a config (HTTP 400 from ``/load``); the previous config keeps serving."""

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class CaddyBinaryError(CaddyError):
    """The Caddy binary could not be found, copied or executed."""


class CaddyAdminInUse(CaddyError):
    """Something that is not our Caddy accepts connections on Caddy's admin address."""


class StorageError(ReconcilerError):
    """Writing ``path`` failed. ``errno`` is the OS error number (``ENOSPC``, ``EROFS``, ``EACCES``...)."""

    def __init__(self, path: str, errno_: int | None, reason: str) -> None:
        super().__init__(f"cannot write {path}: {reason}")
        self.path = path
        self.errno = errno_
        self.reason = reason

    @property
    def no_space(self) -> bool:
        """The file system is full (or a quota is exhausted)."""
        return self.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class ResponderError(ReconcilerError):
    """The DNS responder could not be started, or its control socket did not answer."""


class ResponderExited(ResponderError):
    """A started DNS responder exited before its control socket answered."""
