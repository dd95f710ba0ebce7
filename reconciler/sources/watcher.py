"""Watch manifest and instance directories with watchdog (inotify on Linux) and call back on changes.

Each source is watched twice: its resolved target recursively (file changes), and its parent folder
non-recursively for events on the source's own name (a git-sync or Kubernetes symlink swap, a
directory that appears). :meth:`Watcher.refresh` re-resolves every source and moves the recursive
watch when a link now points somewhere else, or when the folder at that path was replaced by another
one (deleted and re-created: watchdog stops that watch; a new folder renamed into place: the old watch
follows the old inode) -- either way the new folder would go unwatched. The loop calls it after every pass.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable, Iterable

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

from reconciler.sources.loader import is_ignored

#: What a watch subscribes to. Not opens and no-write closes: every pass opens every file it re-reads,
#: and at 10k files those events (read and dispatched by the watchdog thread, holding the GIL) doubled the
#: time of a pass.
EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent, FileDeletedEvent, FileModifiedEvent, FileMovedEvent, FileClosedEvent,
    DirCreatedEvent, DirDeletedEvent, DirMovedEvent,
]


def _names(event: FileSystemEvent) -> list[str]:
    paths = [event.src_path, getattr(event, "dest_path", "")]
    return [os.fsdecode(p) for p in paths if p]


def _dir_identity(path: str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the directory at ``path``; None when it is missing or not a directory."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class _Recursive(FileSystemEventHandler):
    def __init__(self, root: str, callback: Callable[[str], None]) -> None:
        self.root = root
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        hidden_link = False
        for path in _names(event):
            rel = os.path.relpath(path, self.root)
            if rel == "." or not any(is_ignored(part) for part in rel.split(os.sep)):
                self.callback(path)  # both ends of a rename: the old name is gone, the new one appeared
            elif event.event_type in ("created", "moved") and os.path.islink(path):
                hidden_link = True
        if hidden_link:
            # a hidden symlink swapped (Kubernetes' ``..data``): visible files may now read other content
            self.callback(self.root)


class _Parent(FileSystemEventHandler):
    def __init__(self, name: str, callback: Callable[[str], None]) -> None:
        self.name = name
        self.callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for path in _names(event):
            if os.path.basename(path.rstrip(os.sep)) == self.name:
                self.callback(path)
                return


class Watcher:
    def __init__(self, paths: Iterable[str], callback: Callable[[str], None]) -> None:
        self.paths = list(dict.fromkeys(os.path.abspath(p) for p in paths))
        self.callback = callback
        self._observer = Observer()
        self._lock = threading.Lock()
        self._roots: dict[str, tuple[str, tuple[int, int], ObservedWatch] | None] = {}
        self._parents: dict[str, ObservedWatch | None] = {}

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()
        self.refresh()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._observer.stop()
            self._observer.join(timeout=5)

    def refresh(self) -> bool:
        """(Re)establish watches; True when some watch moved (a symlink now points elsewhere, or the folder
        was replaced)."""
        moved = False
        with self._lock:
            for path in self.paths:
                if self._parents.get(path) is None:
                    parent = os.path.dirname(path)
                    self._parents[path] = self._schedule(_Parent(os.path.basename(path), self.callback),
                                                         parent, recursive=False)
                try:
                    real = os.path.realpath(path, strict=True)
                except OSError:
                    real = None
                ident = _dir_identity(real) if real is not None else None
                current = self._roots.get(path)
                if current is not None and (real is None or current[0] != real or current[1] != ident
                                            or not self._alive(current[2])):
                    with contextlib.suppress(Exception):
                        self._observer.unschedule(current[2])
                    self._roots[path] = current = None
                    moved = True
                if current is None and real is not None and ident is not None:
                    watch = self._schedule(_Recursive(real, self.callback), real, recursive=True)
                    self._roots[path] = (real, ident, watch) if watch is not None else None
                    moved = moved or watch is not None
        return moved

    def _alive(self, watch: ObservedWatch) -> bool:
        """False once watchdog stopped the watch's emitter (it does when the watched folder is deleted)."""
        return any(e.watch == watch and e.is_alive() for e in self._observer.emitters)

    def _schedule(self, handler: FileSystemEventHandler, path: str, *, recursive: bool) -> ObservedWatch | None:
        if not os.path.isdir(path):
            return None
        try:
            return self._observer.schedule(handler, path, recursive=recursive, event_filter=EVENTS)
        except OSError:
            return None
