"""Incremental, fault-tolerant reading of every input with last-known-good per file. I/O edge.

Each pass rebuilds the whole picture (level-triggered), but a file whose stat signature and content hash
are unchanged is not parsed again. Per file:

* valid now            -> its items are used and become the file's *last good* version;
* invalid now          -> its last good version (from memory, or persisted under ``{data}/state``) keeps
                          being used and is reported as stale together with the error;
* gone (source fine)   -> its items disappear, and so does its last good version;
* source unavailable   -> (missing or unreadable dir, vanished git-sync link) every file of the source
                          keeps its last good version and the source is reported unhealthy. A source that
                          exists and is readable but empty is honoured.

A symlinked source (git-sync ``--link``) is resolved once per read; if the resolved folder changes or
vanishes while it is being read, the read of that source is retried, never used half.

A read may be told which paths changed (the watch events of the burst that caused the pass). A source
whose last scan was plain -- no problems, no symlinks inside, its root unchanged -- then re-examines only
those paths and reuses everything else from the previous read; a changed path it cannot account for
simply (a folder, a symlink, a path outside the folders it knows) makes it scan in full, as does every
read without paths (start, resync, retry). The result is the same as a full read's, in the same order.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from reconciler.fsutil import racy
from reconciler.model import Document, GoodFile, Ingress, Instance, Problem, Reason, Record, Source
from reconciler.parse import ParseError, decode
from reconciler.sources.forked import ForkedHelper
from reconciler.sources.loader import (
    DEFAULT_MAX_BYTES,
    FileEntry,
    SourceScan,
    documents_from_text,
    is_ignored,
    is_manifest_name,
    read_file_stat,
    scan_source,
)
from reconciler.validate import ingress_from_document, instance_from_document

T = TypeVar("T")

#: Fewest files no cache knows for a read to share them with a forked helper (below that, sending the
#: results back costs about what it saves).
HELPER_MIN_FILES = 400

_HEX40 = re.compile(r"(?<![0-9a-f])[0-9a-f]{40}(?![0-9a-f])")


@dataclass(slots=True)
class _Cached(Record, Generic[T]):
    signature: tuple[int, ...]
    digest: str
    items: tuple[T, ...]
    problems: tuple[Problem, ...]
    text: str | None
    #: this file's part of the revision, made once (``source:relpath:digest``)
    part: str | None = None


@dataclass(frozen=True, slots=True)
class SourceHealth:
    path: str
    ok: bool
    root: str | None = None
    error: str | None = None
    commit: str | None = None
    files: int = 0


@dataclass(slots=True)
class ReadResult(Generic[T]):
    items: list[T] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    #: display path -> the problems that made the file fall back to its last good version
    stale: dict[str, tuple[Problem, ...]] = field(default_factory=dict)
    #: display path -> when its last good version was first seen (for stale files)
    stale_since: dict[str, float] = field(default_factory=dict)
    sources: list[SourceHealth] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)
    parsed_files: int = 0
    #: of those, parsed by a forked helper
    helped_files: int = 0


@dataclass(slots=True)
class _Known:
    """What the last read of a source saw, for reads told which paths changed."""

    root: str
    files: dict[str, FileEntry]  # relpath -> entry, in scan order
    dirs: set[str]  # the root ("") and every folder holding a manifest file


def _signature(st: os.stat_result, source: Source) -> tuple[int, ...]:
    """What says a file is unchanged without reading it (the source index: the same bytes parse to items
    that carry it)."""
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns, st.st_ctime_ns, source.index)


def _order(relpath: str) -> list[str]:
    """Scan order: the walk sorts each folder by name and descends depth first."""
    return relpath.split("/")


class SourceMoved(Exception):
    """The resolved folder of a symlinked source changed or vanished during the read."""


def git_commit(root: str) -> str | None:
    """The commit a git-sync style checkout is at: a 40-hex path component, or the worktree's HEAD."""
    found: list[str] = _HEX40.findall(root)
    if found:
        return found[-1]
    head = os.path.join(root, ".git")
    try:
        if os.path.isfile(head):
            with open(head, encoding="utf-8") as fh:
                gitdir = fh.read().strip().removeprefix("gitdir:").strip()
            head = os.path.join(root, gitdir) if not os.path.isabs(gitdir) else gitdir
        with open(os.path.join(head, "HEAD"), encoding="utf-8") as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if _HEX40.fullmatch(text):
        return str(text)
    if text.startswith("ref:"):
        return _resolve_ref(head, text[4:].strip())
    return None


def _resolve_ref(gitdir: str, ref: str) -> str | None:
    """A branch ref of ``gitdir``: loose or in ``packed-refs``, in the worktree's git dir or, for a linked
    worktree, in the repository's common dir (where branch refs live)."""
    dirs = [gitdir]
    try:
        with open(os.path.join(gitdir, "commondir"), encoding="utf-8") as fh:
            dirs.append(os.path.normpath(os.path.join(gitdir, fh.read().strip())))
    except OSError:
        pass
    for d in dirs:
        try:
            with open(os.path.join(d, ref), encoding="utf-8") as fh:
                sha = fh.read().strip()
            return sha if _HEX40.fullmatch(sha) else None
        except OSError:
            pass
        try:
            with open(os.path.join(d, "packed-refs"), encoding="utf-8") as fh:
                for line in fh:
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref and _HEX40.fullmatch(parts[0]):
                        return parts[0]
        except OSError:
            pass
    return None


class IncrementalReader(Generic[T]):
    """Reads sources of one kind (ingress manifests or instance records) pass after pass."""

    def __init__(self, parse_doc: Callable[[Document], tuple[T | None, list[Problem]]], *,
                 problem_reason: str = Reason.INVALID_MANIFEST, max_bytes: int = DEFAULT_MAX_BYTES,
                 good: dict[str, dict[str, GoodFile]] | None = None,
                 wall: Callable[[], float] = time.time, kind: str = "files") -> None:
        #: names this reader for a :class:`ForkedHelper` shared by several readers
        self.kind = kind
        #: a forked copy of this process that may parse part of a big full read (see :func:`fork_helper`)
        self.helper: ForkedHelper | None = None
        self._parse_doc = parse_doc
        self._reason = problem_reason
        self.max_bytes = max_bytes
        self._wall = wall
        #: source path -> relpath -> last good file
        self.good: dict[str, dict[str, GoodFile]] = good if good is not None else {}
        self._cache: dict[tuple[str, str], _Cached[T]] = {}
        self._good_items: dict[tuple[str, str, int], tuple[str, tuple[T, ...]]] = {}
        self._parsed = 0
        self._helped = 0
        self._known: dict[str, _Known] = {}
        #: how the last read went per source: "full" or "partial" (for logs and tests)
        self.last_mode: dict[str, str] = {}

    # -- one file ---------------------------------------------------------------------------
    def _parse_text(self, text: str, entry: FileEntry, index: int) -> tuple[tuple[T, ...], tuple[Problem, ...]]:
        docs, problems = documents_from_text(text, entry, index, self._reason)
        items: list[T] = []
        for doc in docs:
            item, doc_problems = self._parse_doc(doc)
            problems.extend(doc_problems)
            if item is not None:
                items.append(item)
        return tuple(items), tuple(problems)

    def _read_entry(self, entry: FileEntry, source: Source) -> _Cached[T] | None:
        key = (source.path, entry.relpath)
        cached = self._cache.get(key)
        if cached is not None:  # a file seen before: unchanged when its stat signature says so
            try:
                st = os.stat(entry.real)
            except FileNotFoundError:
                return None
            except OSError as exc:
                problem = Problem(entry.display, None, f"cannot stat: {exc.strerror}", self._reason)
                return _Cached((), "", (), (problem,), None)
            if cached.signature == _signature(st, source) and not racy(st, self._wall()):
                return cached
        try:
            raw, st = read_file_stat(entry, self.max_bytes)
        except FileNotFoundError:
            return None
        except ParseError as exc:
            try:
                signature = _signature(os.stat(entry.real), source)
            except OSError:
                signature = ()
            result: _Cached[T] = _Cached(signature, "", (), (Problem(entry.display, exc.line, exc.message,
                                                                     self._reason),), None)
            self._cache[key] = result
            return result
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            return _Cached((), "", (), (Problem(entry.display, None, f"cannot read: {exc.strerror}",
                                                self._reason),), None)
        signature = _signature(st, source)
        digest = hashlib.sha256(raw).hexdigest()
        if cached is not None and cached.digest == digest and cached.signature[-1:] == (source.index,):
            cached.signature = signature
            return cached
        try:
            text = decode(raw)
        except ParseError as exc:
            result = _Cached(signature, digest, (), (Problem(entry.display, exc.line, exc.message, self._reason),),
                             None)
        else:
            items, problems = self._parse_text(text, entry, source.index)
            result = _Cached(signature, digest, items, problems, text)
        self._cache[key] = result
        self._parsed += 1
        return result

    def parse_one(self, source: Source, entry: FileEntry) -> tuple[_Cached[T] | None, bool]:
        """One file read as :meth:`_read_entry` reads it, and whether this reader would cache that result
        (what a forked helper runs, in its copy of the reader)."""
        got = self._read_entry(entry, source)
        return got, got is not None and self._cache.get((source.path, entry.relpath)) is got

    def _read_entries(self, entries: list[FileEntry], source: Source) -> list[tuple[FileEntry, _Cached[T]]]:
        """Every entry read (a full read). With a helper and enough files no cache knows, this thread and
        the helper work through those files from both ends until they meet; whatever the helper fails to
        deliver is read here."""
        helper = self.helper
        got_of: dict[int, _Cached[T] | None] = {}
        if helper is not None:
            fresh = [i for i, e in enumerate(entries) if (source.path, e.relpath) not in self._cache]
            if len(fresh) >= HELPER_MIN_FILES:
                def mine(k: int) -> None:
                    got_of[fresh[k]] = self._read_entry(entries[fresh[k]], source)

                theirs = helper.share((self.kind, source), [entries[i] for i in fresh], mine)
                for k, (got, cache) in theirs.items():
                    i = fresh[k]
                    got_of[i] = got
                    if got is not None:
                        if cache:
                            self._cache[(source.path, entries[i].relpath)] = got
                        if got.digest:
                            self._parsed += 1
                            self._helped += 1
        files: list[tuple[FileEntry, _Cached[T]]] = []
        for i, entry in enumerate(entries):
            got = got_of[i] if i in got_of else self._read_entry(entry, source)
            if got is not None:
                files.append((entry, got))
        return files

    def _good_version(self, source: Source, relpath: str, display: str) -> tuple[T, ...]:
        good = self.good.get(source.path, {}).get(relpath)
        if good is None:
            return ()
        memo_key = (source.path, relpath, source.index)
        memo = self._good_items.get(memo_key)
        if memo is not None and memo[0] == good.digest:
            return memo[1]
        entry = FileEntry(display, relpath, "")
        items, problems = self._parse_text(good.text, entry, source.index)
        if problems:  # cannot happen for content that was valid, unless the rules got stricter
            items = ()
        self._good_items[memo_key] = (good.digest, items)
        return items

    # -- one source ---------------------------------------------------------------------------
    def _scan(self, source: Source) -> SourceScan:
        for _ in range(3):
            scan = scan_source(source)
            if scan.error is not None or scan.root is None:
                return scan
            try:
                self._check_root(source, scan.root)
            except SourceMoved:
                continue
            return scan
        scan = SourceScan(source)
        scan.error = "the source kept changing while it was read (symlink swapped repeatedly)"
        return scan

    @staticmethod
    def _check_root(source: Source, root: str) -> None:
        try:
            now = os.path.realpath(source.path, strict=True)
        except OSError as exc:
            raise SourceMoved(source.path) from exc
        if now != root or not os.path.isdir(root):
            raise SourceMoved(source.path)

    def _partial(self, source: Source, changed: frozenset[str]) -> tuple[SourceScan, set[str]] | None:
        """The source's files updated from ``changed`` alone, and the relative paths to look at again;
        None when a full scan is needed."""
        known = self._known.get(source.path)
        if known is None:
            return None
        top = os.path.abspath(source.path)
        prefixes = {known.root + os.sep, top + os.sep}
        rels: set[str] = set()
        for path in changed:
            if path in (known.root, top):
                return None
            prefix = next((p for p in prefixes if path.startswith(p)), None)
            if prefix is not None:
                rels.add(path[len(prefix):].replace(os.sep, "/"))
        try:
            if os.path.realpath(source.path, strict=True) != known.root:
                return None
        except OSError:
            return None
        files = dict(known.files)
        added = False
        for rel in sorted(rels):
            parts = rel.split("/")
            if any(is_ignored(part) for part in parts):
                continue
            path = os.path.join(known.root, *parts)
            parent = "/".join(parts[:-1])
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if rel in known.dirs:
                    return None  # a folder went away
                files.pop(rel, None)
                continue
            except OSError:
                return None
            if stat.S_ISDIR(st.st_mode):
                return None  # a folder appeared, moved or was replaced
            if not is_manifest_name(parts[-1]):
                if stat.S_ISLNK(st.st_mode):
                    return None
                continue
            if not stat.S_ISREG(st.st_mode) or parent not in known.dirs:
                return None
            if rel not in files:
                added = True
                files[rel] = FileEntry(os.path.join(source.path, *parts), rel, path)
        if added:
            files = {rel: files[rel] for rel in sorted(files, key=_order)}
        return SourceScan(source, root=known.root, files=list(files.values())), rels

    def _remember(self, source: Source, scan: SourceScan, files: list[tuple[FileEntry, _Cached[T]]]) -> None:
        """Keep the scan for reads told which paths changed, when it is simple enough to update in place."""
        root = scan.root
        # no symlink at all: a link may give a file a second name, or point into a hidden folder whose
        # events are ignored -- only a full scan sees what those mean
        plain = root is not None and not scan.problems and not scan.links
        if not plain or root is None:
            self._known.pop(source.path, None)
            return
        dirs = {""}
        for entry, _ in files:
            parts = entry.relpath.split("/")[:-1]
            dirs.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
        self._known[source.path] = _Known(root, {e.relpath: e for e, _ in files}, dirs)

    def _read_partial(self, source: Source, scan: SourceScan, rels: set[str], out: ReadResult[T]) -> None:
        known = self._known[source.path]
        files: list[tuple[FileEntry, _Cached[T]]] = []
        for entry in scan.files:
            # unchanged files: what the cache holds (a file whose read failed is tried again, as in a full read)
            got = self._cache.get((source.path, entry.relpath)) if entry.relpath not in rels else None
            if got is None:
                got = self._read_entry(entry, source)
            if got is not None:
                files.append((entry, got))
        self.last_mode[source.path] = "partial"
        self._use(source, scan, files, out)
        known.files = {e.relpath: e for e, _ in files}

    def _read_source(self, source: Source, out: ReadResult[T], changed: frozenset[str] | None = None) -> None:
        partial = self._partial(source, changed) if changed is not None else None
        if partial is not None:
            self._read_partial(source, *partial, out)
            return
        self.last_mode[source.path] = "full"
        for attempt in range(3):
            scan = self._scan(source)
            if scan.error is not None or scan.root is None:
                self._unavailable(source, scan.error or "unreadable", out)
                return
            files = self._read_entries(scan.files, source)
            try:
                self._check_root(source, scan.root)
            except SourceMoved:
                if attempt == 2:
                    self._unavailable(source, "the source vanished or moved while it was read", out)
                    return
                continue
            self._use(source, scan, files, out)
            self._remember(source, scan, files)
            return

    def _unavailable(self, source: Source, error: str, out: ReadResult[T]) -> None:
        self._known.pop(source.path, None)
        out.sources.append(SourceHealth(source.path, False, error=error))
        problem = Problem(source.path, None, f"source unavailable: {error}; keeping its last good routes",
                          Reason.SOURCE_UNAVAILABLE)
        out.problems.append(problem)
        for relpath, good in sorted(self.good.get(source.path, {}).items()):
            items = self._good_version(source, relpath, good.display)
            out.items.extend(items)
            out.stale[good.display] = (problem,)
            out.stale_since[good.display] = good.since
            out.digests.append(f"{source.path}:{relpath}:{good.digest}")

    def _use(self, source: Source, scan: SourceScan, files: list[tuple[FileEntry, _Cached[T]]],
             out: ReadResult[T]) -> None:
        scan_problems = [Problem(p.file, p.line, p.message, self._reason) for p in scan.problems]
        out.problems.extend(scan_problems)
        good = self.good.setdefault(source.path, {})
        present: set[str] = set()
        # A path the scan could not look at (an unreadable sub-folder, an entry that cannot be stat'ed...) is
        # not a deletion: what was good at or under it keeps its last good version, reported stale.
        for problem in scan_problems:
            blocked = os.path.relpath(problem.file, source.path).replace(os.sep, "/")
            for relpath, kept in sorted(good.items()):
                if relpath in present or (relpath != blocked and not relpath.startswith(blocked + "/")):
                    continue
                present.add(relpath)
                out.items.extend(self._good_version(source, relpath, kept.display))
                out.stale[kept.display] = (problem,)
                out.stale_since[kept.display] = kept.since
                out.digests.append(f"{source.path}:{relpath}:{kept.digest}:stale:unreadable")
        for entry, got in files:
            present.add(entry.relpath)
            if not got.problems:
                out.items.extend(got.items)
                if got.part is None:
                    got.part = f"{source.path}:{entry.relpath}:{got.digest}"
                out.digests.append(got.part)
                old = good.get(entry.relpath)
                if got.text is not None and (old is None or old.digest != got.digest):
                    good[entry.relpath] = GoodFile(entry.display, got.digest, got.text, self._wall())
                continue
            out.problems.extend(got.problems)
            last = good.get(entry.relpath)
            if last is not None and last.digest != got.digest:
                out.items.extend(self._good_version(source, entry.relpath, entry.display))
                out.stale[entry.display] = got.problems
                out.stale_since[entry.display] = last.since
                out.digests.append(f"{source.path}:{entry.relpath}:{last.digest}:stale:{got.digest}")
            else:
                # never valid: serve the documents that are valid on their own (nothing else was ever live)
                out.items.extend(got.items)
                out.digests.append(f"{source.path}:{entry.relpath}:{got.digest}:invalid")
        for relpath in [r for r in good if r not in present]:
            del good[relpath]
        for key in [k for k in self._cache if k[0] == source.path and k[1] not in present]:
            del self._cache[key]
        root = scan.root or ""
        commit = git_commit(root) if root and root != os.path.abspath(source.path) else None
        out.sources.append(SourceHealth(source.path, True, root, None, commit, len(files)))

    def read(self, sources: Iterable[Source], changed: frozenset[str] | None = None) -> ReadResult[T]:
        """Read every source; ``changed`` (absolute paths) lets plain sources re-read only those paths."""
        out: ReadResult[T] = ReadResult()
        self._parsed = self._helped = 0
        for source in sources:
            self._read_source(source, out, changed)
        out.parsed_files, out.helped_files = self._parsed, self._helped
        return out

    def read_file(self, path: str, index: int = 0) -> tuple[list[T], list[Problem]]:
        """One file, read as a file of a source is (``validate FILE``): its valid documents' items, and the
        problems of the others."""
        entry = FileEntry(path, os.path.basename(path), os.path.realpath(path))
        got = self._read_entry(entry, Source(os.path.dirname(os.path.abspath(path)), index))
        if got is None:
            return [], [Problem(path, None, "cannot read: no such file", self._reason)]
        return list(got.items), list(got.problems)

def ingress_reader(**kwargs: object) -> IncrementalReader[Ingress]:
    return IncrementalReader(ingress_from_document, kind="manifests", **kwargs)  # type: ignore[arg-type]


def instance_reader(**kwargs: object) -> IncrementalReader[Instance]:
    return IncrementalReader(instance_from_document, problem_reason=Reason.INVALID_INSTANCE, kind="instances",
                             **kwargs)  # type: ignore[arg-type]


def fork_helper(*readers: IncrementalReader[Any]) -> ForkedHelper | None:
    """Fork a helper that parses for ``readers`` (attached to them; None where there is no second core).
    Call it before any thread starts; detach and close it with :func:`drop_helper` when the big reads are
    done."""
    by_kind = {r.kind: r for r in readers}

    def handle(key: tuple[str, Source], entry: FileEntry) -> Any:
        kind, source = key
        return by_kind[kind].parse_one(source, entry)

    helper = ForkedHelper.fork(handle)
    for reader in readers:
        reader.helper = helper
    return helper


def detach_helper(*readers: IncrementalReader[Any]) -> ForkedHelper | None:
    """Detach the readers' helper (as :func:`fork_helper` attached it) and return it, still running."""
    helpers = [r.helper for r in readers if r.helper is not None]
    for reader in readers:
        reader.helper = None
    return helpers[0] if helpers else None


def drop_helper(*readers: IncrementalReader[Any]) -> None:
    """Detach the readers' helper and end it."""
    helper = detach_helper(*readers)
    if helper is not None:
        helper.close()
