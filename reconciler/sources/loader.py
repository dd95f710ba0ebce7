"""Read manifest and instance directories into documents, one file at a time. I/O edge.

* Recursive, in sorted order; hidden files/folders and editor/temp files are skipped.
* A top-level source that is a symlink (git-sync ``--link``) is resolved once and read from its target.
* Symlinks inside a source may point anywhere *inside* it (Kubernetes' ``..data`` layout); links that
  escape the source, dangle or loop are refused with an error naming the link.
* Per-file isolation: a file that cannot be read or parsed yields a :class:`Problem` naming the file
  (and line) and every other file loads normally.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from reconciler.model import Document, Origin, Problem, Reason, Record, Source
from reconciler.parse import ParseError, parse_documents

EXTENSIONS = (".yaml", ".yml", ".json")
DEFAULT_MAX_BYTES = 1024 * 1024


def is_ignored(name: str) -> bool:
    """Hidden files, editor backups/swap files and temp files are never read."""
    return (
        name.startswith(".")
        or name.endswith("~")
        or name.endswith((".swp", ".swo", ".swx", ".tmp"))
        or (name.startswith("#") and name.endswith("#"))
    )


def is_manifest_name(name: str) -> bool:
    return not is_ignored(name) and name.lower().endswith(EXTENSIONS)


@dataclass(frozen=True, slots=True)
class FileEntry(Record):
    display: str  # path shown to users: source path as given + relative path
    relpath: str
    real: str  # resolved path that is actually read


@dataclass(slots=True)
class SourceScan:
    """The manifest files of one source, or why the source could not be read at all."""

    source: Source
    root: str | None = None
    files: list[FileEntry] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    error: str | None = None
    #: symlinks met inside the source (followed or not): such a source is always read in full
    links: int = 0


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_source(source: Source) -> SourceScan:
    """List the manifest files of ``source`` (no reading yet)."""
    scan = SourceScan(source)
    try:
        root = os.path.realpath(source.path, strict=True)
    except OSError as exc:
        scan.error = _os_message(exc, source.path)
        return scan
    if not os.path.isdir(root):
        scan.error = f"{source.path}: not a directory"
        return scan
    scan.root = root
    seen_files: set[str] = set()
    try:
        for entry in _walk(source.path, root, "", root, {root}, scan, {root}):
            if entry.real in seen_files:
                continue
            seen_files.add(entry.real)
            scan.files.append(entry)
    except OSError as exc:
        scan.error = _os_message(exc, source.path)
    return scan


def _walk(display_dir: str, real_dir: str, rel_dir: str, root: str, ancestors: set[str],
          scan: SourceScan, visited: set[str]) -> Iterator[FileEntry]:
    try:
        entries = sorted(os.scandir(real_dir), key=lambda e: e.name)
    except OSError as exc:
        if real_dir == root:
            raise
        scan.problems.append(Problem(display_dir, None, f"cannot read directory: {_os_message(exc)}"))
        return
    for entry in entries:
        name = entry.name
        if is_ignored(name):
            continue
        display = os.path.join(display_dir, name)
        rel = f"{rel_dir}/{name}" if rel_dir else name
        real = entry.path
        try:
            if entry.is_symlink():
                scan.links += 1
                try:
                    real = os.path.realpath(entry.path, strict=True)
                except OSError as exc:
                    if exc.errno == errno.ELOOP or isinstance(exc, RuntimeError):
                        msg = "symlink loop"
                    else:
                        msg = f"broken symlink ({_os_message(exc)})"
                    if name.lower().endswith(EXTENSIONS) or os.path.lexists(entry.path):
                        scan.problems.append(Problem(display, None, f"refused: {msg}"))
                    continue
                if not _within(real, root):
                    scan.problems.append(Problem(display, None, f"refused: symlink points outside the source "
                                                 f"({os.readlink(entry.path)!r})"))
                    continue
                mode = os.stat(real).st_mode
                is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
            else:
                # the file type from the directory listing itself: no stat call per file
                is_dir, is_file = entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False)
        except OSError as exc:
            scan.problems.append(Problem(display, None, f"cannot stat: {_os_message(exc)}"))
            continue
        if is_dir:
            if real in ancestors:
                scan.problems.append(Problem(display, None, "refused: symlink loop (points to a parent folder)"))
                continue
            if real in visited:  # already walked via another path: its files are all seen already
                continue
            visited.add(real)
            yield from _walk(display, real, rel, root, ancestors | {real}, scan, visited)
        elif name.lower().endswith(EXTENSIONS):
            if not is_file:
                scan.problems.append(Problem(display, None, "refused: not a regular file"))
                continue
            yield FileEntry(display, rel, real)


def _os_message(exc: OSError, path: str | None = None) -> str:
    text = exc.strerror or str(exc)
    return f"{path}: {text}" if path else text


def read_file_stat(entry: FileEntry, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, os.stat_result]:
    """The file's bytes (at most ``max_bytes``: :class:`ParseError` when it is larger) and the stat of the
    file that was read (of the open file: no race)."""
    fd = os.open(entry.real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ParseError("not a regular file")
        if st.st_size > max_bytes:
            raise ParseError(f"file is {st.st_size} bytes, larger than the limit of {max_bytes} bytes")
        # one read of the size fstat gave, plus a byte: a regular file that returns less is at its end
        # (a file growing meanwhile reads on, up to the limit); small files then cost one read call
        first = os.read(fd, min(st.st_size + 1, max_bytes + 1))
        chunks = [first]
        remaining = max_bytes + 1 - len(first)
        while len(first) > st.st_size and remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        raw = b"".join(chunks) if len(chunks) > 1 else first
        if len(raw) > max_bytes:
            raise ParseError(f"file is larger than the limit of {max_bytes} bytes")
        return raw, st
    finally:
        os.close(fd)


def documents_from_text(text: str, entry: FileEntry, source_index: int, reason: str = Reason.INVALID_MANIFEST
                        ) -> tuple[list[Document], list[Problem]]:
    """The mapping documents of one file's text, tagged with their origin; anything else is a problem."""
    try:
        parsed = parse_documents(text)
    except ParseError as exc:
        return [], [Problem(entry.display, exc.line, exc.message, reason)]
    docs: list[Document] = []
    problems: list[Problem] = []
    for d in parsed:
        if isinstance(d.data, dict):
            docs.append(Document(Origin(source_index, entry.relpath, d.index, entry.display, d.line), d))
        else:
            problems.append(Problem(entry.display, d.line,
                                    f"expected a mapping (an object), got {type(d.data).__name__}", reason))
    return docs, problems
