"""File-system helpers shared by the I/O edges (not pure: it writes files)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def atomic_write(path: str, data: bytes | Iterable[bytes], mode: int = 0o600, *, durable: bool = True) -> None:
    """Write ``data`` (bytes, or the pieces of one document) to ``path`` via a temp file in the same dir,
    fsync, rename, fsync the dir.

    Readers see either the old or the new content, never a partial file, even after a crash. The temp
    name starts with a dot and ends in ``.tmp`` so directory watchers and loaders ignore it.
    ``durable=False`` skips the fsyncs: still never a partial file for readers, but a power loss may
    bring back an older version (for files rewritten at every pass anyway, like the status).
    """
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
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
