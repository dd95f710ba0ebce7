"""Error tree of the reconciler. PURE: no I/O.

Third-party errors are mapped onto this tree in exactly one place per edge
(``reconciler.caddy.admin`` for httpx, ``reconciler.sources.loader`` for YAML/OS errors)::

    ReconcilerError
    ├── ConfigError                 bad settings / flags (terminal)
    ├── CaddyError                  anything while talking to Caddy
    │   ├── CaddyUnavailable        unreachable, timeout, 5xx   -> transient, retried with backoff
    │   ├── CaddyRejected           400 from /load: the old config keeps serving
    │   └── CaddyBinaryError        binary missing / not executable / wrong
    └── SourceError                 a manifest source could not be read as a whole
"""

from __future__ import annotations


class ReconcilerError(Exception):
    """Base of every error raised on purpose by the reconciler."""


class ConfigError(ReconcilerError):
    """Invalid settings: a flag or environment variable has a bad value."""


class CaddyError(ReconcilerError):
    """Talking to Caddy failed."""


class CaddyUnavailable(CaddyError):
    """Caddy's admin API is unreachable, timed out or answered 5xx. Transient."""


class CaddyRejected(CaddyError):
    """Caddy refused a config (HTTP 400 from ``/load``); the previous config keeps serving."""

    def __init__(self, message: str, *, status_code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class CaddyBinaryError(CaddyError):
    """The Caddy binary could not be found, copied or executed."""


class SourceError(ReconcilerError):
    """A whole manifest source (directory) could not be read."""
