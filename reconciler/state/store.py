"""Persist status and last-known-good inputs under ``{data}/state/`` (never inside a watched dir).

Files are written atomically (temp file, fsync, rename) with mode 0600; a corrupt or unreadable file is
ignored (logged by the caller), never fatal: the next pass rewrites it.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

from reconciler.fsutil import atomic_write
from reconciler.model import GoodFile

LASTGOOD = "lastgood.json"
STATUS = "status.json"
_VERSION = 1


GoodMap = dict[str, dict[str, GoodFile]]


class StateStore:
    def __init__(self, state_dir: str) -> None:
        self.dir = state_dir
        self._saved_good: Any = None

    def ensure(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def _read(self, name: str) -> Any:
        try:
            with open(os.path.join(self.dir, name), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    # -- last known good ----------------------------------------------------------------------
    def load_lastgood(self) -> tuple[GoodMap, GoodMap]:
        data = self._read(LASTGOOD)
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            return {}, {}

        def conv(section: Any) -> GoodMap:
            out: GoodMap = {}
            if not isinstance(section, dict):
                return out
            for source, files in section.items():
                if not isinstance(files, dict):
                    continue
                for rel, g in files.items():
                    with contextlib.suppress(KeyError, TypeError, ValueError):
                        out.setdefault(source, {})[rel] = GoodFile(str(g["display"]), str(g["digest"]),
                                                                   str(g["text"]), float(g["since"]))
            return out

        good = conv(data.get("manifests")), conv(data.get("instances"))
        self._saved_good = self._fingerprint(*good)
        return good

    @staticmethod
    def _fingerprint(manifests: GoodMap, instances: GoodMap) -> Any:
        return ({s: {r: g.digest for r, g in f.items()} for s, f in manifests.items()},
                {s: {r: g.digest for r, g in f.items()} for s, f in instances.items()})

    def save_lastgood(self, manifests: GoodMap, instances: GoodMap) -> bool:
        """Write only when some last-good file changed. Returns True when written."""
        fp = self._fingerprint(manifests, instances)
        if fp == self._saved_good:
            return False

        def conv(section: GoodMap) -> Any:
            return {s: {r: {"display": g.display, "digest": g.digest, "text": g.text, "since": g.since}
                        for r, g in files.items()} for s, files in section.items() if files}

        self.ensure()
        body = {"version": _VERSION, "manifests": conv(manifests), "instances": conv(instances)}
        atomic_write(os.path.join(self.dir, LASTGOOD), json.dumps(body, separators=(",", ":")).encode())
        self._saved_good = fp
        return True

    # -- status -------------------------------------------------------------------------------
    def load_status(self) -> dict[str, Any] | None:
        data = self._read(STATUS)
        return data if isinstance(data, dict) else None

    def save_status(self, status: dict[str, Any]) -> None:
        self.ensure()
        # compact: json's C encoder (indent would fall back to the pure-Python one, ~10x slower at 10k)
        atomic_write(os.path.join(self.dir, STATUS), (json.dumps(status, separators=(",", ":")) + "\n").encode())
