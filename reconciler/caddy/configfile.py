"""``{data}/caddy/config.json``: the last config Caddy accepted, kept on disk so that a restarted Caddy
starts with it (I/O edge).

A save that fails (a full disk, a read-only mount, a vanished directory) keeps the body it tried to save
in memory: the file's retries run through :class:`reconciler.fsutil.StorageHealth`, and until one lands a
restart of Caddy uses that body instead of the older file. A file that does not parse (damaged by hand,
a restore gone wrong) is reported and marked *dirty*, so the next pass saves what Caddy runs even when
the config itself did not change; so is a file that changed on disk since this process last wrote or
read it (a stat per pass tells).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from typing import Any

from reconciler.fsutil import StorageHealth, atomic_write
from reconciler.jsonutil import compact_bytes

#: where a startup body came from (logged with ``caddy.started``)
FROM_PENDING = "unsaved"  # the last applied config, not yet on disk
FROM_FILE = "file"
FROM_MEMORY = "memory"  # the config the running reconciler last applied
FROM_BOOTSTRAP = "admin-only"


encode = compact_bytes  # (the body Caddy gets)


class ConfigFile:
    def __init__(self, path: str, *, health: StorageHealth | None = None,
                 log: Callable[..., Any] | None = None) -> None:
        self.path = path
        self.health = health
        self._log = log or (lambda *a, **k: None)
        self._lock = threading.Lock()
        self._pending: bytes | None = None
        self._dirty = False
        #: stat signature of the file as this process last wrote or read it (None: not known yet)
        self._signature: tuple[int, ...] | None = None
        #: the config this process last applied (replaced whole by the pass; a restart may start with it)
        self.applied: dict[str, Any] | None = None

    def save(self, body: bytes) -> None:
        """Write ``body`` atomically; raises :class:`StorageError` (the body is kept for restarts, and the
        write is retried by the health registry)."""
        with self._lock:
            self._pending = body
        atomic_write(self.path, body, health=self.health, make_dir=True)  # the dir is ours: made again
        signature = _signature(self.path)
        with self._lock:
            if self._pending is body:
                self._pending = None
            self._dirty = False
            self._signature = signature

    def mark_dirty(self) -> None:
        """The file is known not to hold what Caddy runs: the next pass saves even an unchanged config."""
        with self._lock:
            self._dirty = True

    def in_sync(self) -> bool:
        """False when the file is known to differ from the last applied config (a failed save, a damaged
        file): the pass then saves it again."""
        with self._lock:
            dirty = self._dirty or self._pending is not None
            known = self._signature
        if dirty or (self.health is not None and self.health.failing(self.path)):
            return False
        if known is not None and _signature(self.path) != known:
            self._log("caddy.config_changed_on_disk", file=self.path,
                      message="not what this process wrote: it is written again")
            self.mark_dirty()
            return False
        return True

    def unsaved(self) -> bytes | None:
        """The last body whose save has not landed yet (None when the file is up to date)."""
        with self._lock:
            pending = self._pending
        if pending is not None and self.health is not None and not self.health.failing(self.path):
            return None  # a retry landed it since
        return pending

    def read(self) -> dict[str, Any] | None:
        """The file's config; None when it is missing, unreadable or damaged (a damaged one is logged and
        marked dirty)."""
        try:
            with open(self.path, "rb") as fh:
                signature = _stat_signature(os.fstat(fh.fileno()))
                raw = fh.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            self._log("caddy.config_unreadable", file=self.path, error=exc.strerror or str(exc))
            self.mark_dirty()
            return None
        try:
            config = json.loads(raw)
        except ValueError as exc:
            config, problem = None, f"not JSON: {exc}"
        else:
            problem = "not a JSON object"
        if not isinstance(config, dict):
            self._log("caddy.config_corrupt", file=self.path, error=problem, size=len(raw))
            self.mark_dirty()
            return None
        with self._lock:
            self._signature = signature
        return config

    def check(self) -> None:
        """Read the file once (say, after adopting a running Caddy) so that damage is reported and repaired
        by the next pass, and later changes on disk are noticed."""
        self.read()

    def startup_body(self, admin: dict[str, Any]) -> tuple[bytes, str]:
        """The config to start Caddy with, and where it came from: the last applied config not yet saved,
        else the file (when it is in sync), else the config this process last applied (:attr:`applied`),
        else the file as it is, else the admin block alone. Its admin block is always ``admin`` (the current
        settings). Nothing is written: a start never depends on the disk."""
        pending = self.unsaved()
        if pending is not None:  # made by this process, with the current admin block
            return pending, FROM_PENDING
        config = self.read()
        if config is not None and self.in_sync():
            return _with_admin_config(config, admin), FROM_FILE
        applied = self.applied
        if applied is not None:
            return encode({**applied, "admin": admin}), FROM_MEMORY
        if config is not None:
            return _with_admin_config(config, admin), FROM_FILE
        return encode({"admin": admin}), FROM_BOOTSTRAP


def _with_admin_config(config: dict[str, Any], admin: dict[str, Any]) -> bytes:
    return encode({**config, "admin": admin})


def _stat_signature(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


def _signature(path: str) -> tuple[int, ...] | None:
    try:
        return _stat_signature(os.stat(path))
    except OSError:
        return None
