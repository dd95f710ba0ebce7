"""Persist status and last-known-good inputs under ``{data}/state/`` (never inside a watched dir).

Files are written atomically (temp file, fsync, rename) with mode 0600; a corrupt or unreadable file is
ignored (logged by the caller), never fatal: the next pass rewrites it. A write that fails (a full disk, a
read-only or removed dir) raises :class:`reconciler.errors.StorageError` naming the file; with a
:class:`reconciler.fsutil.StorageHealth` it is also recorded there and retried until it lands.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from reconciler.fsutil import StorageHealth, atomic_write, racy, storage_error
from reconciler.jsonutil import compact
from reconciler.memo import IdentityMemo
from reconciler.model import GoodFile

LASTGOOD = "lastgood.json"
STATUS = "status.json"
_VERSION = 1


GoodMap = dict[str, dict[str, GoodFile]]


def copy_good(good: GoodMap) -> GoodMap:
    """A copy a reader may update (it records the files it finds valid) without touching ``good``."""
    return {source: dict(files) for source, files in good.items()}


class _Fragments(IdentityMemo[Any, bytes]):
    """Encoded JSON of objects that are immutable once made (per-ingress statuses, last-good files), kept
    by identity from one write to the next: rewriting a 10k-entry file serialises only what changed."""

    __slots__ = ()

    def text(self, item: Any, make: Callable[..., str], *args: Any) -> bytes:
        """``make(*args)`` encoded, reused from the last write while ``item`` is the same object and
        ``args`` are equal (they hold what the text says besides ``item``, e.g. the path it is filed under)."""
        return self.get(item, lambda: make(*args).encode(), args)

    def done(self) -> None:
        """End of one write: forget what it did not use."""
        self.round()


_dumps = compact


class _ToDict(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


def _dumps_status(st: _ToDict) -> str:
    return _dumps(st.to_dict())


def _good_entry(rel: str, g: GoodFile) -> str:
    return _dumps(rel) + ":" + _dumps({"display": g.display, "digest": g.digest, "text": g.text, "since": g.since})


def lastgood_from(data: Any) -> tuple[GoodMap, GoodMap]:
    """The (manifests, instances) last good maps of a parsed ``lastgood.json``; ({}, {}) when it is not one
    (corrupt, foreign, another version). Entries that do not have the expected shape are skipped."""
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

    return conv(data.get("manifests")), conv(data.get("instances"))


class LastGoodFollower:
    """Follows ``lastgood.json`` as another process (the daemon) rewrites it: :meth:`current` re-reads the
    file only when its stat signature changed -- or when it was modified so recently that a same-size
    rewrite within the file system's timestamp granularity could hide behind an unchanged signature; then
    the bytes are hashed and parsed only if they differ."""

    def __init__(self, state_dir: str, *, wall: Callable[[], float] = time.time) -> None:
        self.path = os.path.join(state_dir, LASTGOOD)
        self._wall = wall
        self._signature: tuple[int, ...] | None = None
        self._digest: bytes | None = None
        self._good: tuple[GoodMap, GoodMap] | None = None
        #: how many times the file was parsed (for tests)
        self.loads = 0

    def current(self) -> tuple[GoodMap, GoodMap] | None:
        """The last good maps the file holds now; None while there is no such file (no pass yet)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return self._good  # gone or unreadable for a moment: what it held last (the daemon never deletes it)
        signature = _signature_of(st)
        if signature == self._signature and not racy(st, self._wall()):
            return self._good
        try:
            with open(self.path, "rb") as fh:
                signature = _signature_of(os.fstat(fh.fileno()))
                raw = fh.read()
        except OSError:
            return self._good
        digest = hashlib.sha256(raw).digest()
        if digest != self._digest:
            try:
                data = json.loads(raw)
            except ValueError:  # never written half (atomic rename): damaged; keep what it held last
                self._signature = signature
                return self._good
            self._good = lastgood_from(data)
            self._digest = digest
            self.loads += 1
        self._signature = signature
        return self._good


def _signature_of(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class StateStore:
    def __init__(self, state_dir: str, *, health: StorageHealth | None = None) -> None:
        self.dir = state_dir
        self.health = health
        self._saved_good: Any = None
        self._status_parts = _Fragments()
        self._good_parts = _Fragments()

    def _read(self, name: str) -> Any:
        try:
            with open(os.path.join(self.dir, name), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    # -- last known good ----------------------------------------------------------------------
    def load_lastgood(self) -> tuple[GoodMap, GoodMap]:
        good = lastgood_from(self._read(LASTGOOD))
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

        parts = self._good_parts
        chunks = [b'{"version":%d' % _VERSION]
        for key, good in (("manifests", manifests), ("instances", instances)):
            chunks.append(b',"%s":{' % key.encode())
            first_source = True
            for src, files in good.items():
                if not files:
                    continue
                chunks.append((b"" if first_source else b",") + _dumps(src).encode() + b":{")
                first_source = False
                for i, (rel, g) in enumerate(files.items()):
                    if i:
                        chunks.append(b",")
                    chunks.append(parts.text(g, _good_entry, rel, g))
                chunks.append(b"}")
            chunks.append(b"}")
        chunks.append(b"}")
        parts.done()
        # the same document as json.dumps of {"version", "manifests": {src: {rel: file}}, "instances": ...},
        # each unchanged file's text reused, written piece by piece (never one whole copy in memory)
        atomic_write(os.path.join(self.dir, LASTGOOD), chunks, health=self.health, make_dir=True)
        self._saved_good = fp
        return True

    # -- status -------------------------------------------------------------------------------
    def load_status(self) -> dict[str, Any] | None:
        data = self._read(STATUS)
        return data if isinstance(data, dict) else None

    def save_status(self, status: dict[str, Any], ingresses: Sequence[_ToDict] | None = None) -> None:
        """Write ``status`` (plus an ``"ingresses"`` list made of ``ingresses``' ``to_dict()``, when given).

        Per-ingress statuses are immutable objects, reused between passes while unchanged: the JSON text
        of each is kept by identity, so a pass that changed one ingress of 10k serialises one entry."""
        # compact: json's C encoder (indent would fall back to the pure-Python one, ~10x slower at 10k)
        if ingresses is None:
            chunks = [_dumps(status).encode(), b"\n"]
        else:
            head = _dumps({k: v for k, v in status.items() if k != "ingresses"}).encode()
            parts = self._status_parts
            chunks = [head[:-1], b',"ingresses":[' if head != b"{}" else b'"ingresses":[']
            for i, st in enumerate(ingresses):
                if i:
                    chunks.append(b",")
                chunks.append(parts.text(st, _dumps_status, st))
            chunks.append(b"]}\n")
            parts.done()
        # not fsync'ed: rewritten at every pass, and a lost one is rebuilt by the next
        atomic_write(os.path.join(self.dir, STATUS), chunks, durable=False, health=self.health,
                     make_dir=True)


def restore_files(directory: str, texts: dict[str, str], *, owner_of: str | None = None) -> list[str]:
    """Write ``texts`` (relative path -> content) into ``directory``, mode 0600 (dirs 0700), owned like
    ``owner_of`` when run as root. When ``directory`` is missing the files are written into a sibling temp
    dir first, which is then renamed into place: a reader sees no dir or all of it, never a part (a
    reconcile pass would take a part for the whole). Raises :class:`StorageError`; returns the paths."""
    owner = None
    if owner_of is not None and os.geteuid() == 0:
        with contextlib.suppress(OSError):
            st = os.stat(owner_of)
            owner = (st.st_uid, st.st_gid)
    fresh = not os.path.isdir(directory)
    target = f"{directory}.restore.{os.getpid()}" if fresh else directory
    written: list[str] = []
    try:
        for rel, text in sorted(texts.items()):
            path = os.path.join(target, *rel.split("/"))
            atomic_write(path, text.encode(), 0o600, make_dir=True)
            written.append(os.path.join(directory, *rel.split("/")))
        if owner is not None:
            for root, dirs, files in os.walk(target):
                for name in (*dirs, *files):
                    with contextlib.suppress(OSError):
                        os.chown(os.path.join(root, name), *owner)
            with contextlib.suppress(OSError):
                os.chown(target, *owner)
        if fresh:
            try:
                os.rename(target, directory)
            except OSError as exc:
                raise storage_error(directory, exc) from exc
    except BaseException:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        raise
    return written
