"""Instance changes reach the DNS responder ahead of the pass.

A pass at 50k ingresses takes a while (resolving, statuses, state files) and the next one waits for it;
where an instance is must not. Every file event under the instances dir is also handed to
:class:`InstanceFastPath`, whose thread reads just that file, parses it like the pass does, and publishes
the records of every instance at once (milliseconds). The pass stays the authority: after its read it
hands over what it read (:meth:`InstanceFastPath.baseline`) and publishes that. A file the fast path
cannot take as it is -- invalid (the pass keeps its last good version), behind a symlink, outside the dir
-- is left to the pass. A version the fast path read stays over the pass's while the file is unchanged
since (the pass may have read it just before the change).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from reconciler.model import Instance
from reconciler.parse import ParseError
from reconciler.sources.loader import FileEntry, documents_from_text, is_manifest_name, read_file_stat
from reconciler.validate import instance_from_document, zone_records

Signature = tuple[int, int, int] | None  # (inode, size, mtime ns) of the version read; None: the file is gone


def _signature(path: str) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class InstanceFastPath:
    def __init__(self, instances_dir: str, publish: Callable[[dict[str, str]], object], *,
                 max_bytes: int, log: Callable[..., Any] | None = None) -> None:
        self.root = instances_dir
        self.roots = {os.path.abspath(instances_dir), os.path.realpath(instances_dir)}
        self._publish = publish
        self.max_bytes = max_bytes
        self._log = log or (lambda *a, **k: None)
        self._lock = threading.Lock()  # the views and the publishing (held while publishing: in order)
        self._pending_lock = threading.Lock()  # the watcher's side only: never waits on a publish
        #: display path -> its instances, as the last pass read them (None: no pass yet -- nothing is published
        #: before the first one: the responder answers from its snapshot, and one file is not the zone)
        self._files: dict[str, tuple[Instance, ...]] | None = None
        self._mine: dict[str, tuple[Signature, tuple[Instance, ...]]] = {}  # what this path read since
        self._last: tuple[tuple[Instance, ...], dict[str, str]] | None = None
        self._pending: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.published = 0  # publishes of the fast path (not the pass's)

    # -- the pass's side ---------------------------------------------------------------------------
    def baseline(self, instances: Iterable[Instance]) -> dict[str, str]:
        """What the pass read: publish it (with the fast path's newer versions still current over it);
        returns the records published."""
        files: dict[str, list[Instance]] = {}
        for inst in instances:
            files.setdefault(inst.origin.file, []).append(inst)
        with self._lock:
            self._files = {k: tuple(v) for k, v in files.items()}
            for path, (sig, _) in list(self._mine.items()):
                if _signature(self._real(path)) != sig:  # changed again since: its event brings it back
                    del self._mine[path]
            return self._publish_locked()

    # -- the watcher's side ------------------------------------------------------------------------
    def changed(self, path: str) -> None:
        """A file event (any watched path; only files directly under the instances dir are taken)."""
        parent, name = os.path.split(os.path.abspath(path))
        if parent in self.roots and is_manifest_name(name):
            with self._pending_lock:
                self._pending.add(name)
            self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="instance-fastpath", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            with self._pending_lock:
                names, self._pending = self._pending, set()
            try:
                self._take(names)
            except Exception as exc:  # never let the fast path end: the pass does the work anyway
                self._log("instances.fastpath_failed", error=f"{type(exc).__name__}: {exc}")

    def _real(self, display: str) -> str:
        return os.path.join(self.root, os.path.relpath(display, self.root))

    def _take(self, names: set[str]) -> None:
        read: dict[str, tuple[Signature, tuple[Instance, ...]]] = {}
        for name in sorted(names):
            display = os.path.join(self.root, name)
            got = self._read(display, name)
            if got is not None:
                read[display] = got
        if not read:
            return
        with self._lock:
            self._mine.update(read)
            if self._files is None:
                return
            self._publish_locked()
            self.published += 1

    def _read(self, display: str, name: str) -> tuple[Signature, tuple[Instance, ...]] | None:
        """The file's instances as the pass would read them; None when that is for the pass to decide."""
        if os.path.islink(display):
            return None
        sig = _signature(display)
        if sig is None:
            return None, ()
        try:
            raw, _ = read_file_stat(FileEntry(display, name, display), self.max_bytes)
            text = raw.decode("utf-8")
        except (OSError, ParseError, UnicodeDecodeError):
            return None
        docs, problems = documents_from_text(text, FileEntry(display, name, display), 0)
        out: list[Instance] = []
        for doc in docs:
            inst, found = instance_from_document(doc)
            if inst is None or found:
                return None
            out.append(inst)
        if problems or _signature(display) != sig:  # (changed while read: the next event reads it again)
            return None
        return sig, tuple(out)

    def _publish_locked(self) -> dict[str, str]:
        files = dict(self._files or {})
        for path, (_, insts) in self._mine.items():
            files[path] = insts
        instances = tuple(i for path in sorted(files) for i in files[path])
        last = self._last
        if last is not None and len(last[0]) == len(instances) and all(
                a is b for a, b in zip(last[0], instances, strict=True)):
            records = last[1]
        else:
            records = zone_records(instances)
            self._last = (instances, records)
        self._publish(records)
        return records
