"""Incremental machinery against its from-scratch reference.

Every memory between passes must be invisible: a read told which paths changed equals a full read; the
trigger queue hands over the burst's paths (or None when a full read is needed); Resolver equals
``resolve``; the status memo equals plain ``ingress_statuses``; the state store's reused JSON fragments
give the document ``json.dumps`` would; the watcher reports both ends of a rename and a hidden symlink swap.
The ``*_regression`` tests reproduce bugs these checks found (symlinks that produced no file entry,
instances remembered by id only, a last-good file under another path, a repeated path at ``max_paths``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, precondition, rule, run_state_machine_as_test

from reconciler.loop.triggers import Triggers
from reconciler.model import (
    Desired,
    GoodFile,
    Ingress,
    Instance,
    Origin,
    Problem,
    Rule,
    Source,
    derive_ingress_id,
)
from reconciler.settings import Settings, TLSSettings
from reconciler.sources.inputs import IncrementalReader, ReadResult, ingress_reader, instance_reader
from reconciler.sources.watcher import Watcher
from reconciler.state.store import LASTGOOD, STATUS, StateStore
from reconciler.status import IngressStatus, StatusMemo, ingress_statuses, with_certificates
from reconciler.validate import Resolver, resolve
from tests.helpers import FakeClock, ingress_yaml, instance_yaml, paths, poll, wait_for, write

# =====================================================================================================
# helpers: files
# =====================================================================================================


def wall_clock() -> FakeClock:
    """Injected wall clock shared by the readers being compared (same ``since`` values on both sides)."""
    return FakeClock(time.time())


def manifest_for(rel: str, variant: int = 0) -> str:
    """A valid manifest whose ingress name derives from the file's relative path (unique per file)."""
    name = "i-" + "".join(c if c.isalnum() else "-" for c in rel.lower()).strip("-")
    return ingress_yaml(name[:63].rstrip("-"), f"{name[:40].rstrip('-')}.test", 8080 + variant, "vm", 80)


BROKEN_YAML = "name: web\nrules:\n  - match: {hostname: [oops\n"
BROKEN_SCHEMA = "name: web\nrules: []\n"


def content(kind: str, rel: str) -> bytes:
    if kind == "valid":
        return manifest_for(rel).encode()
    if kind == "valid2":
        return manifest_for(rel, 1).encode()
    if kind == "broken_yaml":
        return BROKEN_YAML.encode()
    if kind == "broken_schema":
        return BROKEN_SCHEMA.encode()
    if kind == "multi":  # one valid document and one invalid one
        return (manifest_for(rel, 2) + "---\n" + BROKEN_SCHEMA).encode()
    if kind == "binary":
        return b"\x00\xff\xfe binary"
    if kind == "empty":
        return b""
    raise AssertionError(kind)


CONTENT_KINDS = ["valid", "valid2", "broken_yaml", "broken_schema", "multi", "binary", "empty"]


def src(path: Path | str, index: int = 0) -> Source:
    return Source(str(path), index)


def summary(result: ReadResult[Any]) -> dict[str, Any]:
    """Everything a read returns that must not depend on how it was read (``parsed_files`` aside)."""
    return {
        "items": [(i.name, i.id, i.origin) for i in result.items],
        "objects": list(result.items),
        "problems": list(result.problems),
        "stale": dict(result.stale),
        "stale_since": dict(result.stale_since),
        "digests": list(result.digests),
        "sources": list(result.sources),
    }


def assert_same(got: ReadResult[Any], want: ReadResult[Any], context: str = "") -> None:
    a, b = summary(got), summary(want)
    for key in a:
        assert a[key] == b[key], f"{context}: {key} differs\n incremental: {a[key]}\n reference:   {b[key]}"


def reference(reader: IncrementalReader[Any], sources: list[Source], clock: FakeClock,
              make: Callable[..., IncrementalReader[Any]] = ingress_reader) -> ReadResult[Any]:
    """A fresh reader's full read, starting from the long-lived reader's last-good memory (as after a restart
    with ``lastgood.json``): without it a file that turned invalid would not be stale, by design."""
    return make(good=copy.deepcopy(reader.good), wall=clock).read(sources)


def incremental_matches(reader: IncrementalReader[Any], sources: list[Source], changed: set[str] | frozenset[str],
                        clock: FakeClock, make: Callable[..., IncrementalReader[Any]] = ingress_reader
                        ) -> ReadResult[Any]:
    """Read with ``changed`` and check it against a fresh full read; returns the incremental result."""
    want = reference(reader, sources, clock, make)
    got = reader.read(sources, changed=frozenset(changed))
    assert_same(got, want, f"changed={sorted(changed)}")
    if not got.stale:  # nothing was ever valid-then-broken: a reader with no memory at all agrees too
        assert_same(got, make(wall=clock).read(sources), "memoryless reference")
    return got


# =====================================================================================================
# IncrementalReader: randomized file operations (hypothesis stateful)
# =====================================================================================================

DIRS = ["", "sub", "sub/deep", "other", "new", "new/inner"]
NAMES = ["a.yaml", "b.yml", "c.json", "zz.yaml"]
IGNORED = [".hidden.yaml", "x.yaml~", "x.tmp", ".x.yaml.swp", "#x.yaml#"]
NON_MANIFEST = ["README.md", "notes.txt"]


class ReaderMachine(RuleBasedStateMachine):
    """A long-lived reader told which paths each burst touched vs a fresh reader's full read.

    Symlinks here are all named ``0link.yaml`` at the root, so the walk meets the link before its target
    and the scan is never "plain" while it exists (see the regression tests below for links that produce no entry).
    """

    modes: ClassVar[dict[str, int]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="incr-"))
        self.root = self.tmp / "src"
        self.outside = self.tmp / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        self.sources = [src(self.root)]
        self.clock = wall_clock()
        self.reader = ingress_reader(wall=self.clock)
        self.touched: set[str] = set()
        for rel, kind in (("a.yaml", "valid"), ("sub/b.yml", "valid"), ("sub/deep/c.json", "broken_yaml")):
            p = self.root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content(kind, rel))
        self.reader.read(self.sources)

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------------
    def _entries(self) -> tuple[list[Path], list[Path]]:
        """(files and symlinks, real folders) under the root, without following links."""
        files: list[Path] = []
        dirs: list[Path] = []

        def walk(d: Path) -> None:
            for e in sorted(os.scandir(d), key=lambda e: e.name):
                p = Path(e.path)
                if e.is_dir(follow_symlinks=False):
                    dirs.append(p)
                    walk(p)
                else:
                    files.append(p)

        walk(self.root)
        return files, dirs

    def _mkdirs(self, d: Path) -> None:
        missing = []
        while not d.exists() and not d.is_symlink():
            missing.append(d)
            d = d.parent
        for m in reversed(missing):
            self.touched.add(str(m))
            m.mkdir()

    def _target_dir(self, rel: str) -> Path | None:
        d = self.root / rel if rel else self.root
        if d.is_symlink() or (d.exists() and not d.is_dir()):
            return None
        self._mkdirs(d)
        return d

    def check(self) -> None:
        self.clock.now = time.time()
        changed = frozenset(self.touched)
        self.touched = set()
        incremental_matches(self.reader, self.sources, changed, self.clock)
        mode = self.reader.last_mode[str(self.root)]
        ReaderMachine.modes[mode] = ReaderMachine.modes.get(mode, 0) + 1
        if str(self.root) in changed:
            assert mode == "full"

    def _maybe_check(self, now: bool) -> None:
        if now:
            self.check()

    # -- operations -----------------------------------------------------------------------------
    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(NAMES), kind=st.sampled_from(CONTENT_KINDS),
          atomic=st.booleans(), now=st.booleans())
    def write_file(self, d: str, name: str, kind: str, atomic: bool, now: bool) -> None:
        """Create or modify (in place, or an editor's atomic save via a hidden temp file)."""
        target = self._target_dir(d)
        if target is None:
            return
        path = target / name
        if path.is_dir() or path.is_symlink():
            return
        rel = os.path.relpath(path, self.root)
        self.touched.add(str(path))
        if atomic:
            tmp = target / f".{name}.tmp"
            self.touched.add(str(tmp))
            tmp.write_bytes(content(kind, rel))
            os.replace(tmp, path)
        else:
            with open(path, "wb") as fh:
                fh.write(content(kind, rel))
        self._maybe_check(now)

    @rule(data=st.data(), now=st.booleans())
    def delete_file(self, data: st.DataObject, now: bool) -> None:
        files, _ = self._entries()
        if not files:
            return
        path = data.draw(st.sampled_from(files))
        self.touched.add(str(path))
        path.unlink()
        self._maybe_check(now)

    @rule(data=st.data(), d=st.sampled_from(DIRS), name=st.sampled_from(NAMES + IGNORED + NON_MANIFEST),
          now=st.booleans())
    def rename_file(self, data: st.DataObject, d: str, name: str, now: bool) -> None:
        # regular files only: a moved relative symlink could become a deduplicated second name (regression tests below)
        files = [f for f in self._entries()[0] if not f.is_symlink()]
        if not files:
            return
        old = data.draw(st.sampled_from(files))
        target = self._target_dir(d)
        if target is None:
            return
        new = target / name
        if new.is_dir() and not new.is_symlink():
            return
        self.touched.update((str(old), str(new)))
        os.replace(old, new)
        self._maybe_check(now)

    @rule(data=st.data(), now=st.booleans())
    def delete_folder(self, data: st.DataObject, now: bool) -> None:
        files, dirs = self._entries()
        if not dirs:
            return
        d = data.draw(st.sampled_from(dirs))
        self.touched.add(str(d))
        self.touched.update(str(p) for p in [*files, *dirs] if str(p).startswith(str(d) + os.sep))
        shutil.rmtree(d)
        self._maybe_check(now)

    @rule(data=st.data(), name=st.sampled_from(["moved", "sub", "zeta", ".hidden-dir"]), now=st.booleans())
    def rename_folder(self, data: st.DataObject, name: str, now: bool) -> None:
        _, dirs = self._entries()
        if not dirs:
            return
        d = data.draw(st.sampled_from(dirs))
        new = self.root / name
        if new.exists() or new.is_symlink() or str(new).startswith(str(d) + os.sep):
            return
        self.touched.update((str(d), str(new)))
        os.rename(d, new)
        self._maybe_check(now)

    @rule(d=st.sampled_from(["fresh", "sub/fresh", "other/x/y"]), name=st.sampled_from(NAMES),
          kind=st.sampled_from(CONTENT_KINDS), now=st.booleans())
    def new_folder_with_file(self, d: str, name: str, kind: str, now: bool) -> None:
        target = self._target_dir(d)
        if target is None:
            return
        path = target / name
        if path.exists() or path.is_symlink():
            return
        self.touched.add(str(path))
        path.write_bytes(content(kind, os.path.relpath(path, self.root)))
        self._maybe_check(now)

    @rule(d=st.sampled_from(DIRS), name=st.sampled_from(IGNORED + NON_MANIFEST), now=st.booleans())
    def ignored_or_non_manifest(self, d: str, name: str, now: bool) -> None:
        target = self._target_dir(d)
        if target is None:
            return
        path = target / name
        if path.is_dir() or path.is_symlink():
            return
        self.touched.add(str(path))
        path.write_bytes(content("valid", os.path.relpath(path, self.root)))
        self._maybe_check(now)

    @rule(data=st.data(), dangling=st.booleans(), now=st.booleans())
    def symlink(self, data: st.DataObject, dangling: bool, now: bool) -> None:
        link = self.root / "0link.yaml"
        if link.exists() or link.is_symlink():
            return
        files, _ = self._entries()
        if dangling or not files:
            target = "missing.yaml"
        else:
            target = os.path.relpath(data.draw(st.sampled_from(files)), self.root)
        self.touched.add(str(link))
        os.symlink(target, link)
        self._maybe_check(now)

    @rule(name=st.sampled_from(["a.yaml", "README.md"]), now=st.booleans())
    def outside_the_source(self, name: str, now: bool) -> None:
        path = self.outside / name
        self.touched.add(str(path))
        path.write_text(manifest_for("outside"))
        self._maybe_check(now)

    @rule()
    def resync(self) -> None:
        """A full read of the long-lived reader (resync/retry) in between incremental ones."""
        self.clock.now = time.time()
        want = reference(self.reader, self.sources, self.clock)
        got = self.reader.read(self.sources)
        assert self.reader.last_mode[str(self.root)] == "full"
        assert_same(got, want, "full read")
        self.touched = set()

    @precondition(lambda self: bool(self.touched))
    @rule()
    def read(self) -> None:
        self.check()


def test_incremental_reads_equal_full_reads_for_any_file_operations() -> None:
    ReaderMachine.modes = {}
    run_state_machine_as_test(ReaderMachine, settings=settings(
        max_examples=100, stateful_step_count=30, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    # the comparison is only worth something if both paths were actually taken
    assert ReaderMachine.modes.get("partial", 0) >= 20, ReaderMachine.modes
    assert ReaderMachine.modes.get("full", 0) >= 20, ReaderMachine.modes


def test_random_bursts_seeded_walk() -> None:
    """Same property, plain seeded random walk: several operations per burst, two sources, instances."""
    rng = random.Random(20240611)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        roots = [tmp / "one", tmp / "two"]
        for r in roots:
            (r / "sub").mkdir(parents=True)
        sources = [src(r, i) for i, r in enumerate(roots)]
        clock = wall_clock()
        reader = ingress_reader(wall=clock)
        reader.read(sources)
        partial = 0
        for _ in range(120):
            touched: set[str] = set()
            for _ in range(rng.randint(1, 4)):
                root = rng.choice(roots)
                d = root / rng.choice(["", "sub", "sub"])
                path = d / rng.choice(NAMES)
                op = rng.random()
                if op < 0.6:
                    if not d.is_dir():
                        continue
                    touched.add(str(path))
                    path.write_bytes(content(rng.choice(CONTENT_KINDS), os.path.relpath(path, root)))
                elif op < 0.8 and path.exists():
                    touched.add(str(path))
                    path.unlink()
                elif path.exists():
                    other = root / rng.choice(["", "sub"]) / rng.choice(NAMES)
                    touched.update((str(path), str(other)))
                    os.replace(path, other)
            clock.now = time.time()
            incremental_matches(reader, sources, touched, clock)
            partial += all(reader.last_mode[str(r)] == "partial" for r in roots)
        assert partial > 60


# =====================================================================================================
# IncrementalReader: unit tests
# =====================================================================================================


@pytest.fixture
def clock() -> FakeClock:
    return wall_clock()


def test_one_file_edit_is_partial_and_parses_that_file_only(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    for rel in ("a.yaml", "b.yaml", "sub/c.yaml", "sub/d.yaml"):
        write(root / rel, manifest_for(rel))
    reader = ingress_reader(wall=clock)
    first = reader.read([src(root)])
    assert reader.last_mode[str(root)] == "full" and first.parsed_files == 4
    write(root / "sub/c.yaml", manifest_for("sub/c.yaml", 3))
    got = incremental_matches(reader, [src(root)], {str(root / "sub/c.yaml")}, clock)
    assert reader.last_mode[str(root)] == "partial"
    assert got.parsed_files == 1
    assert [i.rules[0].port for i in got.items] == [8080, 8080, 8083, 8080]


def test_first_read_with_paths_is_full(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    got = reader.read([src(root)], changed=frozenset({str(root / "a.yaml")}))
    assert reader.last_mode[str(root)] == "full"
    assert [i.name for i in got.items] == ["i-a-yaml"]


def test_new_directory_is_a_full_read(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    write(root / "newdir/b.yaml", manifest_for("newdir/b.yaml"))
    got = incremental_matches(reader, [src(root)], {str(root / "newdir"), str(root / "newdir/b.yaml")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert [i.origin.relpath for i in got.items] == ["a.yaml", "newdir/b.yaml"]


def test_populated_folder_moved_in_and_out_is_a_full_read(tmp_path: Path, clock: FakeClock) -> None:
    """A folder moved in from outside the source is one event (the folder's); its files are not reported."""
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    write(tmp_path / "staging/team/b.yaml", manifest_for("team/b.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    os.rename(tmp_path / "staging/team", root / "team")
    got = incremental_matches(reader, [src(root)], {str(tmp_path / "staging/team"), str(root / "team")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert [i.origin.relpath for i in got.items] == ["a.yaml", "team/b.yaml"]
    os.rename(root / "team", tmp_path / "staging/team")
    got = incremental_matches(reader, [src(root)], {str(tmp_path / "staging/team"), str(root / "team")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert [i.origin.relpath for i in got.items] == ["a.yaml"]


def test_new_file_in_a_folder_without_manifests_is_a_full_read(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    write(root / "docs/README.md", "# docs\n")
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    write(root / "docs/b.yaml", manifest_for("docs/b.yaml"))
    # only the file's own event (the folder existed already)
    got = incremental_matches(reader, [src(root)], {str(root / "docs/b.yaml")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert [i.origin.relpath for i in got.items] == ["a.yaml", "docs/b.yaml"]


def test_deleted_folder_is_a_full_read(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    write(root / "sub/b.yaml", manifest_for("sub/b.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    shutil.rmtree(root / "sub")
    got = incremental_matches(reader, [src(root)], {str(root / "sub"), str(root / "sub/b.yaml")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert [i.origin.relpath for i in got.items] == ["a.yaml"]


def test_changed_root_is_a_full_read(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    write(root / "b.yaml", manifest_for("b.yaml"))
    incremental_matches(reader, [src(root)], {str(root)}, clock)
    assert reader.last_mode[str(root)] == "full"


def test_source_with_a_symlink_inside_is_always_read_in_full(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    write(root / "b.yaml", manifest_for("b.yaml"))
    os.symlink("b.yaml", root / "0alias.yaml")  # the walk meets the link first: its entry is a link
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    for _ in range(2):
        write(root / "a.yaml", manifest_for("a.yaml", 1))
        incremental_matches(reader, [src(root)], {str(root / "a.yaml")}, clock)
        assert reader.last_mode[str(root)] == "full"
    os.unlink(root / "0alias.yaml")  # link gone: the next scan is plain again
    incremental_matches(reader, [src(root)], {str(root / "0alias.yaml")}, clock)
    assert reader.last_mode[str(root)] == "full"
    write(root / "a.yaml", manifest_for("a.yaml", 2))
    incremental_matches(reader, [src(root)], {str(root / "a.yaml")}, clock)
    assert reader.last_mode[str(root)] == "partial"


def test_new_symlink_is_a_full_read(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "sub/a.yaml", manifest_for("sub/a.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    os.symlink("sub", root / "alias")
    got = incremental_matches(reader, [src(root)], {str(root / "alias")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert got.problems == []


def test_paths_outside_the_source_are_ignored(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    before = reader.read([src(root)])
    # a sibling whose name starts with the source's name is outside too
    write(tmp_path / "m2/a.yaml", manifest_for("m2/a.yaml"))
    write(tmp_path / "elsewhere.yaml", manifest_for("elsewhere.yaml"))
    got = incremental_matches(reader, [src(root)],
                              {str(tmp_path / "m2/a.yaml"), str(tmp_path / "elsewhere.yaml"), str(tmp_path)}, clock)
    assert reader.last_mode[str(root)] == "partial"
    assert got.parsed_files == 0
    assert summary(got) == summary(before)


def test_ignored_and_non_manifest_paths_parse_nothing(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    touched = set()
    for name in [*IGNORED, *NON_MANIFEST]:
        (root / name).write_text(manifest_for(name))
        touched.add(str(root / name))
    got = incremental_matches(reader, [src(root)], touched, clock)
    assert reader.last_mode[str(root)] == "partial"
    assert got.parsed_files == 0
    assert [i.origin.relpath for i in got.items] == ["a.yaml"]


def test_added_files_take_the_scan_order(tmp_path: Path, clock: FakeClock) -> None:
    """The walk sorts each folder by name, so ``a/x.yaml`` < ``a-b.yaml`` < ``a.yaml`` < ``b.yaml``."""
    root = tmp_path / "m"
    for rel in ("a/x.yaml", "a.yaml", "c.yaml"):
        write(root / rel, manifest_for(rel))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    for rel in ("a-b.yaml", "b.yaml", "a/0.yaml"):
        write(root / rel, manifest_for(rel))
    got = incremental_matches(reader, [src(root)], {str(root / r) for r in ("a-b.yaml", "b.yaml", "a/0.yaml")},
                              clock)
    assert reader.last_mode[str(root)] == "partial"
    assert got.parsed_files == 3
    assert [i.origin.relpath for i in got.items] == ["a/0.yaml", "a/x.yaml", "a-b.yaml", "a.yaml", "b.yaml",
                                                     "c.yaml"]


def test_file_turning_invalid_then_deleted_partially(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    write(root / "b.yaml", manifest_for("b.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    a = str(root / "a.yaml")
    write(root / "a.yaml", BROKEN_YAML)
    got = incremental_matches(reader, [src(root)], {a}, clock)
    assert reader.last_mode[str(root)] == "partial"
    assert list(got.stale) == [a] and [i.name for i in got.items] == ["i-a-yaml", "i-b-yaml"]
    os.unlink(a)
    got = incremental_matches(reader, [src(root)], {a}, clock)
    assert reader.last_mode[str(root)] == "partial"
    assert got.stale == {} and [i.name for i in got.items] == ["i-b-yaml"]
    assert "a.yaml" not in reader.good[str(root)]


def test_rename_reported_by_both_names(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "sub/a.yaml", manifest_for("sub/a.yaml"))
    write(root / "z.yaml", manifest_for("z.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    os.rename(root / "sub/a.yaml", root / "b.yaml")
    got = incremental_matches(reader, [src(root)], {str(root / "sub/a.yaml"), str(root / "b.yaml")}, clock)
    assert reader.last_mode[str(root)] == "partial"
    assert [i.origin.relpath for i in got.items] == ["b.yaml", "z.yaml"]


def test_empty_change_set_reuses_everything(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    before = reader.read([src(root)])
    got = reader.read([src(root)], changed=frozenset())
    assert reader.last_mode[str(root)] == "partial" and got.parsed_files == 0
    assert summary(got) == summary(before)


def test_unavailable_source_then_back_is_read_in_full(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    reader = ingress_reader(wall=clock)
    reader.read([src(root)])
    shutil.move(str(root), str(tmp_path / "away"))
    gone = incremental_matches(reader, [src(root)], {str(root / "a.yaml")}, clock)
    assert not gone.sources[0].ok and [i.name for i in gone.items] == ["i-a-yaml"]  # kept
    shutil.move(str(tmp_path / "away"), str(root))
    write(root / "a.yaml", manifest_for("a.yaml", 1))
    back = incremental_matches(reader, [src(root)], {str(root / "a.yaml")}, clock)
    assert reader.last_mode[str(root)] == "full"
    assert back.sources[0].ok and back.items[0].rules[0].port == 8081


def test_two_sources_each_partial(tmp_path: Path, clock: FakeClock) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    write(one / "a.yaml", manifest_for("one-a"))
    write(two / "a.yaml", manifest_for("two-a"))
    sources = [src(one, 0), src(two, 1)]
    reader = ingress_reader(wall=clock)
    reader.read(sources)
    write(two / "a.yaml", manifest_for("two-a", 4))
    got = incremental_matches(reader, sources, {str(two / "a.yaml")}, clock)
    assert reader.last_mode == {str(one): "partial", str(two): "partial"}
    assert got.parsed_files == 1
    assert [(i.origin.source_index, i.rules[0].port) for i in got.items] == [(0, 8080), (1, 8084)]


def test_instance_reader_partial(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "instances"
    write(root / "vm1.yaml", instance_yaml("vm1"))
    write(root / "vm2.yaml", instance_yaml("vm2"))
    reader = instance_reader(wall=clock)
    reader.read([src(root)])
    write(root / "vm2.yaml", instance_yaml("vm2", state="Stopped"))
    got = incremental_matches(reader, [src(root)], {str(root / "vm2.yaml")}, clock, instance_reader)
    assert reader.last_mode[str(root)] == "partial" and got.parsed_files == 1
    assert [(i.name, i.state) for i in got.items] == [("vm1", "Running"), ("vm2", "Stopped")]


def test_symlinked_source_root_partial_via_the_link_path(tmp_path: Path, clock: FakeClock) -> None:
    """A git-sync style source: events may name the link path or the resolved folder."""
    real = tmp_path / "rev-1"
    write(real / "a.yaml", manifest_for("a.yaml"))
    write(real / "b.yaml", manifest_for("b.yaml"))
    link = tmp_path / "current"
    os.symlink(real, link)
    reader = ingress_reader(wall=clock)
    reader.read([src(link)])
    write(real / "a.yaml", manifest_for("a.yaml", 1))
    got = incremental_matches(reader, [src(link)], {str(link / "a.yaml")}, clock)
    assert reader.last_mode[str(link)] == "partial" and got.parsed_files == 1
    write(real / "b.yaml", manifest_for("b.yaml", 1))
    got = incremental_matches(reader, [src(link)], {str(real / "b.yaml")}, clock)
    assert reader.last_mode[str(link)] == "partial" and got.parsed_files == 1
    # the link swapped to another folder: full
    other = tmp_path / "rev-2"
    write(other / "c.yaml", manifest_for("c.yaml"))
    os.symlink(other, tmp_path / "tmp-link")
    os.replace(tmp_path / "tmp-link", link)
    got = incremental_matches(reader, [src(link)], {str(link / "c.yaml")}, clock)
    assert reader.last_mode[str(link)] == "full"
    assert [i.origin.relpath for i in got.items] == ["c.yaml"]


# --- regression: any symlink inside a source makes it read in full ----------------------------------
# (a link that gave no file entry -- a second name for a listed file, a link to a non-manifest file or to
# a folder already walked or without manifests -- once left the scan "plain", and a later change to its
# target was read partially, differently from a full read)


def test_second_name_of_a_manifest_dangles_after_its_target_is_deleted_regression(tmp_path: Path,
                                                                                   clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    os.symlink("a.yaml", root / "z.yaml")  # walked after a.yaml: deduplicated, no entry of its own
    reader = ingress_reader(wall=clock)
    assert reader.read([src(root)]).problems == []
    os.unlink(root / "a.yaml")
    # full read: "z.yaml: refused: broken symlink"; partial read: no problem at all
    incremental_matches(reader, [src(root)], {str(root / "a.yaml")}, clock)


def test_link_to_a_folder_without_manifests_dangles_after_it_is_deleted_regression(tmp_path: Path,
                                                                            clock: FakeClock) -> None:
    root = tmp_path / "m"
    write(root / "a.yaml", manifest_for("a.yaml"))
    write(root / "docs/README.md", "# docs\n")
    os.symlink("docs", root / "zlink")
    reader = ingress_reader(wall=clock)
    assert reader.read([src(root)]).problems == []
    shutil.rmtree(root / "docs")
    incremental_matches(reader, [src(root)], {str(root / "docs"), str(root / "docs/README.md")}, clock)


def test_visible_link_to_a_hidden_folder_sees_a_new_manifest_regression(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "m"
    (root / ".hidden").mkdir(parents=True)
    os.symlink(".hidden", root / "data")
    reader = ingress_reader(wall=clock)
    assert reader.read([src(root)]).items == []
    write(root / ".hidden/x.yaml", manifest_for("x.yaml"))
    # full read serves data/x.yaml; the partial read skips the hidden path and serves nothing
    incremental_matches(reader, [src(root)], {str(root / ".hidden/x.yaml")}, clock)


# =====================================================================================================
# Triggers: paths of a burst, quick quiet period
# =====================================================================================================


def triggers(clock: FakeClock, *, debounce: float = 0.125, debounce_max: float = 1.0, quick: float | None = 0.03125,
             quick_paths: int = 3, max_paths: int = 1024, resync: float = 30.0) -> Triggers:
    return Triggers(debounce=debounce, debounce_max=debounce_max, resync_interval=resync, clock=clock,
                    jitter=0.0, rng=random.Random(3), max_paths=max_paths, quick=quick, quick_paths=quick_paths)


def test_take_paths_is_the_burst_paths() -> None:
    clock = FakeClock()
    t = triggers(clock)
    t.notify("watch", path="/m/a.yaml")
    t.notify("watch", path="/m/b.yaml")
    t.notify("watch", path="/m/a.yaml")
    clock.advance(0.03125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/a.yaml", "/m/b.yaml"})
    # the next burst starts empty
    t.notify("watch", path="/m/c.yaml")
    clock.advance(0.03125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/c.yaml"})


def test_a_notify_without_path_means_a_full_read() -> None:
    clock = FakeClock()
    t = triggers(clock)
    t.notify("watch", path="/m/a.yaml")
    t.notify("api")
    t.notify("watch", path="/m/b.yaml")
    clock.advance(0.125)
    assert poll(t) == "api+watch"
    assert paths(t) is None
    t.notify("watch", path="/m/c.yaml")  # the next burst has paths again
    clock.advance(0.03125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/c.yaml"})


def test_burst_larger_than_max_paths_means_a_full_read() -> None:
    clock = FakeClock()
    t = triggers(clock, max_paths=4)
    for i in range(4):
        t.notify("watch", path=f"/m/{i}.yaml")
    clock.advance(0.125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset(f"/m/{i}.yaml" for i in range(4))
    for i in range(5):
        t.notify("watch", path=f"/m/{i}.yaml")
    clock.advance(0.125)
    assert poll(t) == "watch"
    assert paths(t) is None


def test_repeated_path_at_max_paths_keeps_the_paths() -> None:
    clock = FakeClock()
    t = triggers(clock, max_paths=2)
    t.notify("watch", path="/m/a.yaml")
    t.notify("watch", path="/m/b.yaml")
    t.notify("watch", path="/m/b.yaml")  # e.g. "modified" then "closed" of the same file
    clock.advance(0.125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/a.yaml", "/m/b.yaml"})


def test_resync_and_retry_take_no_paths() -> None:
    clock = FakeClock()
    t = triggers(clock, resync=30.0)
    t.notify("watch", path="/m/a.yaml")
    clock.advance(0.03125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/a.yaml"})
    t.retry_in(2.0)
    clock.advance(2.0)
    assert poll(t) == "retry"
    assert paths(t) is None
    t.notify("watch", path="/m/b.yaml")
    clock.advance(0.03125)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/b.yaml"})
    clock.advance(30.0)
    assert poll(t) == "resync"
    assert paths(t) is None


def test_immediate_notify_with_a_path_keeps_it() -> None:
    clock = FakeClock()
    t = triggers(clock)
    t.notify("api", immediate=True, path="/data/ingresses/x.yaml")
    assert poll(t) == "api"
    assert paths(t) == frozenset({"/data/ingresses/x.yaml"})


def test_small_burst_is_due_after_the_quick_quiet_period() -> None:
    clock = FakeClock()
    t = triggers(clock, quick=0.03125, debounce=0.125, quick_paths=3)
    for name in ("a", "b", "c"):
        t.notify("watch", path=f"/m/{name}.yaml")
    clock.advance(0.03125 - 1 / 1024)
    assert poll(t) is None
    clock.advance(1 / 1024)
    assert poll(t) == "watch"
    assert paths(t) == frozenset({"/m/a.yaml", "/m/b.yaml", "/m/c.yaml"})


def test_bigger_burst_waits_for_the_full_debounce() -> None:
    clock = FakeClock()
    t = triggers(clock, quick=0.03125, debounce=0.125, quick_paths=3)
    for name in ("a", "b", "c", "d"):
        t.notify("watch", path=f"/m/{name}.yaml")
    clock.advance(0.03125)
    assert poll(t) is None
    clock.advance(0.125 - 0.03125 - 1 / 1024)
    assert poll(t) is None
    clock.advance(1 / 1024)
    assert poll(t) == "watch"
    assert paths(t) == frozenset(f"/m/{n}.yaml" for n in "abcd")


def test_burst_growing_past_quick_paths_before_it_is_due_waits_for_the_debounce() -> None:
    clock = FakeClock()
    t = triggers(clock, quick=0.03125, debounce=0.125, quick_paths=1)
    t.notify("watch", path="/m/a.yaml")
    clock.advance(1 / 64)
    assert poll(t) is None
    t.notify("watch", path="/m/b.yaml")  # two paths now: the long quiet period from this event
    clock.advance(0.03125)
    assert poll(t) is None
    clock.advance(0.125 - 0.03125)
    assert poll(t) == "watch"


def test_pathless_burst_uses_the_full_debounce() -> None:
    clock = FakeClock()
    t = triggers(clock, quick=0.03125, debounce=0.125)
    t.notify("watch")
    clock.advance(0.0625)
    assert poll(t) is None
    clock.advance(0.0625)
    assert poll(t) == "watch"
    assert paths(t) is None


def test_quick_defaults_to_debounce_and_is_capped_by_it() -> None:
    clock = FakeClock()
    for quick in (None, 1.0):
        t = triggers(clock, quick=quick, debounce=0.125)
        assert t.quick == 0.125
        t.notify("watch", path="/m/a.yaml")
        clock.advance(0.0625)
        assert poll(t) is None
        clock.advance(0.0625)
        assert poll(t) == "watch"


def test_max_wait_still_bounds_a_trickle_of_small_bursts() -> None:
    clock = FakeClock()
    t = triggers(clock, quick=0.0625, debounce=0.125, debounce_max=0.5, quick_paths=100)
    fired_at = None
    for i in range(64):
        t.notify("watch", path=f"/m/{i % 2}.yaml")
        if poll(t) is not None:
            fired_at = i
            break
        clock.advance(1 / 32)
    assert fired_at == 16  # 16 * 1/32 s = debounce_max after the first event
    assert paths(t) == frozenset({"/m/0.yaml", "/m/1.yaml"})


# =====================================================================================================
# Resolver (memo) vs resolve (from scratch)
# =====================================================================================================

HOSTS = [f"h{i}.test" for i in range(14)]
INSTANCE_NAMES = [f"vm{i}" for i in range(6)]


def origin(rel: str, source: int = 0, doc: int = 0, line: int = 1) -> Origin:
    return Origin(source, rel, doc, f"/m{source}/{rel}", line)


def random_ingress(rng: random.Random, rel: str, with_tls: bool) -> Ingress:
    name = f"ing-{rng.randrange(40)}"  # small pool: name conflicts happen
    rules = []
    for _ in range(rng.randint(1, 3)):
        tls = with_tls and rng.random() < 0.3
        port = rng.choice([443, 8443, 8080] if tls else [80, 8080, 8080, 2019 if rng.random() < 0.05 else 80])
        redirect = tls and rng.random() < 0.5
        target = rng.choice([*INSTANCE_NAMES, "inst-id-2", "ghost"])
        rules.append(Rule(rng.choice(HOSTS), port, target, rng.choice([80, 8080]), tls, redirect))
    # unique (hostname, port) inside one ingress, as ingress_from_document guarantees
    seen: set[tuple[str, int]] = set()
    uniq = []
    for r in rules:
        if (r.hostname, r.port) not in seen:
            seen.add((r.hostname, r.port))
            uniq.append(r)
    explicit_id = f"id-{rng.randrange(40)}" if rng.random() < 0.1 else None
    return Ingress(name, explicit_id or derive_ingress_id(name), tuple(uniq), origin(rel, rng.choice([0, 0, 1])))


def random_instance(rng: random.Random, name: str) -> Instance:
    return Instance(name, "inst-id-2" if name == "vm2" else None, f"10.0.0.{rng.randrange(1, 9)}",
                    rng.choice(["Running", "Running", "Stopped"]), origin(f"{name}.yaml", -1))


class World:
    """Ingress and instance objects that change between passes the way the reader changes them: an
    unchanged file keeps its very objects, a changed one gets new objects (sometimes equal to the old)."""

    def __init__(self, rng: random.Random, n: int, with_tls: bool) -> None:
        self.rng = rng
        self.with_tls = with_tls
        self.ingresses: dict[str, Ingress] = {f"f{i:03}.yaml": random_ingress(rng, f"f{i:03}.yaml", with_tls)
                                              for i in range(n)}
        self.instances: dict[str, Instance] = {n: random_instance(rng, n) for n in INSTANCE_NAMES}
        #: every instance object ever made stays referenced (see test_bug_resolver_instances_by_id)
        self.keepalive: list[Instance] = list(self.instances.values())

    def step(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(0, 4)):
            rel = rng.choice([*sorted(self.ingresses), "new-a.yaml", "new-b.yaml"])
            roll = rng.random()
            if roll < 0.15 and rel in self.ingresses:
                del self.ingresses[rel]
            elif roll < 0.3 and rel in self.ingresses:  # re-parsed, same content, new object
                self.ingresses[rel] = copy.copy(self.ingresses[rel])
            else:
                self.ingresses[rel] = random_ingress(rng, rel, self.with_tls)
        if rng.random() < 0.4:
            name = rng.choice(INSTANCE_NAMES)
            roll = rng.random()
            if roll < 0.25:
                self.instances.pop(name, None)
            elif roll < 0.4 and name in self.instances:
                self.instances[name] = copy.copy(self.instances[name])
            else:
                self.instances[name] = random_instance(rng, name)
            if rng.random() < 0.1:  # a duplicate instance name (first by origin wins)
                dup = Instance("vm1", None, "10.9.9.9", "Running", origin("zz-dup.yaml", -1))
                self.instances["dup"] = dup
            self.keepalive.extend(self.instances.values())

    def ingress_list(self) -> list[Ingress]:
        items = list(self.ingresses.values())
        self.rng.shuffle(items)  # the resolver orders by origin itself
        return items


SETTINGS_CASES = {
    "plain": Settings(),
    "tls-internal": Settings(tls=TLSSettings(issuer="internal")),
    "tls-restricted": Settings(tls=TLSSettings(issuer="internal", allowed_domains=("h1.test", "*.test"))),
    "tls-none-allowed": Settings(tls=TLSSettings(issuer="internal", allowed_domains=("h1.test",))),
}


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_resolver_equals_resolve_across_changes(case: str) -> None:
    s = SETTINGS_CASES[case]
    rng = random.Random(zlib.crc32(case.encode()))
    world = World(rng, 30, with_tls=True)
    resolver = Resolver(s)
    seen_reasons: set[str] = set()
    for _ in range(150):
        world.step()
        ings, insts = world.ingress_list(), list(world.instances.values())
        extra = [Problem("/m0/bad.yaml", 3, "earlier problem")]
        got = resolver(ings, insts, extra)
        want = resolve(ings, insts, s, extra)
        assert got.ingresses == want.ingresses
        assert got.problems == want.problems
        assert dict(got.instances) == dict(want.instances)
        seen_reasons.update(p.reason for p in got.problems)
        seen_reasons.update(r.backend.reason for ri in got.ingresses for r in ri.rules
                            if hasattr(r.backend, "reason"))
    # the walk met conflicts and unavailable instances, not only the happy path
    assert {"NameConflict", "HostnameConflict", "InstanceNotFound", "InstanceNotRunning"} <= seen_reasons


def retarget(rng: random.Random, ing: Ingress) -> Ingress:
    """The same ingress pointed elsewhere (what an edit of a backend does): same names, claims, place."""
    rules = tuple(replace(r, instance=rng.choice([*INSTANCE_NAMES, "ghost"]), target_port=rng.choice([1, 2, 3]))
                  for r in ing.rules)
    return replace(ing, rules=rules)


@pytest.mark.parametrize("case", sorted(SETTINGS_CASES))
def test_resolver_reusing_verdicts_equals_resolve(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingresses in the reader's stable order, mostly retargeted between passes (the verdicts of the last
    pass are reused), sometimes changed in what they claim or where they are (the rules are walked)."""
    s = SETTINGS_CASES[case]
    rng = random.Random(zlib.crc32(b"verdicts-" + case.encode()))
    world = World(rng, 40, with_tls=True)
    resolver = Resolver(s)
    walks = [0]
    walk = resolver._walk

    def counting(given: list[Ingress]) -> Any:
        walks[0] += 1
        return walk(given)

    monkeypatch.setattr(resolver, "_walk", counting)
    rejected = 0
    for step in range(200):
        roll = rng.random()
        if roll < 0.6:
            for rel in rng.sample(sorted(world.ingresses), rng.randint(1, 3)):
                world.ingresses[rel] = retarget(rng, world.ingresses[rel])
        elif roll < 0.7:
            rel = rng.choice(sorted(world.ingresses))  # moved down a line: messages naming it change
            ing = world.ingresses[rel]
            world.ingresses[rel] = replace(ing, origin=replace(ing.origin, line=ing.origin.line + 1))
        elif roll < 0.85:
            world.step()
        # else: nothing changed at all
        ings = [world.ingresses[rel] for rel in sorted(world.ingresses)]
        insts = list(world.instances.values())
        got = resolver(ings, insts)
        want = resolve(ings, insts, s)
        assert got.ingresses == want.ingresses, step
        assert got.problems == want.problems, step
        rejected += len([p for p in got.problems if p.ingress])
    assert rejected > 0, "conflicts were part of the walk"
    assert 20 < walks[0] < 120, walks  # both ways were taken, the verdicts reused most of the time


def test_resolver_keeps_unchanged_results_and_follows_a_stopped_instance() -> None:
    s = Settings()
    web = Ingress("web", derive_ingress_id("web"), (Rule("web.test", 80, "vm", 8080),), origin("a.yaml"))
    api = Ingress("api", derive_ingress_id("api"), (Rule("api.test", 80, "vm", 9090),), origin("b.yaml"))
    vm = Instance("vm", None, "10.0.0.5", "Running", origin("vm.yaml", -1))
    resolver = Resolver(s)
    first = resolver([web, api], [vm])
    again = resolver([web, api], [vm])
    assert again.ingresses[0] is first.ingresses[0]  # memo used
    stopped = Instance("vm", None, "10.0.0.5", "Stopped", origin("vm.yaml", -1))
    after = resolver([web, api], [stopped])
    assert after.ingresses == resolve([web, api], [stopped], s).ingresses
    assert [r.rules[0].backend.reason for r in after.ingresses] == ["InstanceNotRunning"] * 2  # type: ignore[union-attr]
    gone = resolver([web, api], [])
    assert [r.rules[0].backend.reason for r in gone.ingresses] == ["InstanceNotFound"] * 2  # type: ignore[union-attr]
    # a conflict appears (same hostname:port, earlier file) and goes away again
    early = Ingress("early", derive_ingress_id("early"), (Rule("web.test", 80, "vm", 1),), origin("0.yaml"))
    with_conflict = resolver([web, api, early], [vm])
    assert with_conflict == resolve([web, api, early], [vm], s)
    assert [p.reason for p in with_conflict.problems] == ["HostnameConflict"]
    assert resolver([web, api], [vm]) == resolve([web, api], [vm], s)
    # same name in two files
    twin = Ingress("web", derive_ingress_id("web"), (Rule("other.test", 80, "vm", 1),), origin("c.yaml"))
    named = resolver([web, api, twin], [vm])
    assert named == resolve([web, api, twin], [vm], s)
    assert [p.reason for p in named.problems] == ["NameConflict"]


def test_resolver_instances_kept_by_object_regression() -> None:
    s = Settings()
    web = Ingress("web", derive_ingress_id("web"), (Rule("web.test", 80, "vm", 8080),), origin("a.yaml"))
    vm_origin = origin("vm.yaml", -1)
    ips = [f"10.0.0.{i + 1}" for i in range(50)]
    resolver = Resolver(s)
    wrong = []
    for i in range(50):
        # the caller keeps nothing between passes: the next Instance may land where the freed one was
        insts = [Instance("vm", None, ips[i], "Running", vm_origin)]
        got = resolver([web], insts).ingresses
        want = resolve([web], insts, s).ingresses
        if got != want:
            wrong.append((i, got[0].rules[0].backend, want[0].rules[0].backend))
        del insts, got, want
    assert wrong == []


# =====================================================================================================
# Status memo vs plain ingress_statuses, and the state store's JSON fragments
# =====================================================================================================


def random_status_inputs(rng: random.Random, desired: Desired) -> dict[str, Any]:
    files = sorted({ri.ingress.origin.file for ri in desired.ingresses})
    names = [ri.ingress.name for ri in desired.ingresses]
    stale: dict[str, tuple[Problem, ...]] = {}
    since: dict[str, float] = {}
    for f in files:
        if rng.random() < 0.1:
            stale[f] = (Problem(f, rng.randint(1, 3), rng.choice(["bad yaml", "bad schema"])),)
            since[f] = float(rng.choice([100, 200]))
    rejected = {n: rng.choice(["bind: address already in use", "other"]) for n in names if rng.random() < 0.05}
    applied = rng.random() < 0.8
    error = None if applied or rng.random() < 0.5 else rng.choice(["connection refused", "timeout"])
    return {"stale": stale, "stale_since": since, "applied": applied, "pass_error": error, "rejected": rejected}


def test_status_memo_equals_plain_statuses() -> None:
    rng = random.Random(11)
    s = Settings(tls=TLSSettings(issuer="internal"))
    world = World(rng, 40, with_tls=True)
    resolver = Resolver(s)
    memo = StatusMemo()
    hits = 0
    previous: dict[str, IngressStatus] = {}
    for _ in range(120):
        world.step()
        desired = resolver(world.ingress_list(), list(world.instances.values()))
        kw = random_status_inputs(rng, desired) if rng.random() < 0.5 else {}
        got = ingress_statuses(desired, memo=memo, **kw)
        want = ingress_statuses(desired, **kw)
        assert got == want
        assert [st.to_dict() for st in got] == [st.to_dict() for st in want]
        hits += sum(previous.get(st.name) is st for st in got)
        previous = {st.name: st for st in got}
    assert hits > 0  # the memo was actually used


def test_status_memo_reacts_to_each_input() -> None:
    s = Settings()
    web = Ingress("web", derive_ingress_id("web"), (Rule("web.test", 80, "vm", 8080),), origin("a.yaml"))
    vm = Instance("vm", None, "10.0.0.5", "Running", origin("vm.yaml", -1))
    desired = Resolver(s)([web], [vm])
    memo = StatusMemo()
    f = web.origin.file
    passes: list[dict[str, Any]] = [
        {}, {"applied": False}, {"applied": False, "pass_error": "boom"}, {"applied": False, "pass_error": "x"},
        {"rejected": {"web": "bind"}}, {"rejected": {"web": "other"}}, {},
        {"stale": {f: (Problem(f, 2, "bad"),)}, "stale_since": {f: 5.0}},
        {"stale": {f: (Problem(f, 2, "bad"),)}, "stale_since": {f: 6.0}},
        {"stale": {f: (Problem(f, 3, "worse"),)}, "stale_since": {f: 6.0}}, {},
    ]
    reasons, messages = [], []
    for kw in passes:
        got = ingress_statuses(desired, memo=memo, **kw)
        assert got == ingress_statuses(desired, **kw), kw
        reasons.append(got[0].reason)
        messages.append(got[0].message)
    assert reasons == ["Applied", "Pending", "Pending", "Pending", "CaddyRejected", "CaddyRejected", "Applied",
                       "Stale", "Stale", "Stale", "Applied"]
    assert len(set(messages)) == 8  # every input change that shows was shown


def json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def load_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def status_document(status: dict[str, Any], statuses: list[IngressStatus]) -> Any:
    """What ``status.json`` must hold, built the plain way."""
    return json_roundtrip({**{k: v for k, v in status.items() if k != "ingresses"},
                           "ingresses": [st.to_dict() for st in statuses]})


def test_save_status_writes_what_it_is_given_across_writes(tmp_path: Path) -> None:
    rng = random.Random(5)
    store = StateStore(str(tmp_path / "state"))
    world = World(rng, 30, with_tls=True)
    resolver = Resolver(Settings(tls=TLSSettings(issuer="internal")))
    memo = StatusMemo()
    changed = 0
    for n in range(40):
        world.step()
        desired = resolver(world.ingress_list(), list(world.instances.values()))
        statuses = ingress_statuses(desired, memo=memo, **random_status_inputs(rng, desired))
        if statuses and rng.random() < 0.5:  # a changed entry is a new object (statuses are immutable)
            k = rng.randrange(len(statuses))
            statuses[k] = dataclasses.replace(statuses[k], message=f"changed {n}", ready=not statuses[k].ready)
            changed += 1
        if statuses and rng.random() < 0.3:
            tls_hosts = {st.name: [h.split(":")[0] for h in st.hosts[:1]] for st in statuses[:3]}
            certs = {h: {"state": rng.choice(["issued", "pending", "failing"]), "error": "e"}
                     for hosts in tls_hosts.values() for h in hosts}
            statuses = with_certificates(statuses, tls_hosts, certs)
        status: dict[str, Any] = {"revision": {"last_attempted": f"r{n}", "last_applied": None},
                                  "last_error": None, "history": [{"n": i} for i in range(n % 3)],
                                  "counts": {"ingresses": len(statuses)}}
        if n % 7 == 3:
            status = {}
        if n % 11 == 5:
            status["ingresses"] = ["ignored: replaced by the statuses given"]
        store.save_status(status, statuses)
        assert load_json(tmp_path / "state" / STATUS) == status_document(status, statuses)
        assert store.load_status() == status_document(status, statuses)
    assert changed > 5


@pytest.mark.parametrize("status", [{}, {"ingresses": []}, {"a": 1}, {"a": [1, {"b": None}]},
                                    {"ingresses": [{"name": "x"}], "z": "last"}, {"é": "☃"}])
def test_save_status_edge_shapes(tmp_path: Path, status: dict[str, Any]) -> None:
    store = StateStore(str(tmp_path / "state"))
    store.save_status(status)
    assert load_json(tmp_path / "state" / STATUS) == status
    st = IngressStatus("web", True, "Applied", "routes are live", "/m/a.yaml", 1, hosts=("web.test:80",))
    for _ in range(2):  # the second write reuses the entry's fragment
        store.save_status(status, [st])
        assert load_json(tmp_path / "state" / STATUS) == status_document(status, [st])
    store.save_status(status, [])
    assert load_json(tmp_path / "state" / STATUS) == status_document(status, [])


def test_save_status_rewrites_an_entry_replaced_by_a_new_object(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    a = IngressStatus("a", True, "Applied", "routes are live", "/m/a.yaml")
    b = IngressStatus("b", True, "Applied", "routes are live", "/m/b.yaml")
    head = {"revision": "r1"}
    store.save_status(head, [a, b])
    b2 = dataclasses.replace(b, ready=False, reason="Stale", message="stale", stale_since=3.5)
    store.save_status(head, [a, b2])
    assert load_json(tmp_path / "state" / STATUS) == status_document(head, [a, b2])
    store.save_status(head, [b2])
    store.save_status(head, [a, b2, a])
    assert load_json(tmp_path / "state" / STATUS) == status_document(head, [a, b2, a])
    b3 = dataclasses.replace(b2)  # equal, another object
    store.save_status(head, [b3, a])
    assert load_json(tmp_path / "state" / STATUS) == status_document(head, [b3, a])


def good_map(rng: random.Random, previous: dict[str, dict[str, GoodFile]]) -> dict[str, dict[str, GoodFile]]:
    """The next last-good map: most GoodFile objects kept, a few replaced, added or removed."""
    out = {s: dict(files) for s, files in previous.items()}
    for _ in range(rng.randint(0, 3)):
        source = rng.choice(["/m/one", "/m/two", "/data/ingresses"])
        rel = rng.choice(["a.yaml", "b.yaml", "sub/c.yaml", "ünï.yaml", 'q"uote.yaml'])
        files = out.setdefault(source, {})
        if rel in files and rng.random() < 0.3:
            del files[rel]
        else:
            text = f"name: x{rng.randrange(100)}\n# \u00e9\u2603 \"quoted\"\n"
            files[rel] = GoodFile(f"{source}/{rel}", f"{rng.randrange(1 << 32):08x}", text,
                                  rng.choice([1.5, 1700000000.25, 2.0]))
    return out


def test_save_lastgood_round_trips_across_writes(tmp_path: Path) -> None:
    rng = random.Random(9)
    state = tmp_path / "state"
    store = StateStore(str(state))
    manifests: dict[str, dict[str, GoodFile]] = {}
    instances: dict[str, dict[str, GoodFile]] = {}
    writes = 0
    for _ in range(60):
        manifests = good_map(rng, manifests)
        if rng.random() < 0.3:
            instances = good_map(rng, instances)
        written = store.save_lastgood(manifests, instances)
        writes += written
        non_empty = ({s: f for s, f in manifests.items() if f}, {s: f for s, f in instances.items() if f})
        doc = load_json(state / LASTGOOD)
        assert doc == {"version": 1,
                       "manifests": {s: {r: {"display": g.display, "digest": g.digest, "text": g.text,
                                             "since": g.since} for r, g in f.items()}
                                     for s, f in non_empty[0].items()},
                       "instances": {s: {r: {"display": g.display, "digest": g.digest, "text": g.text,
                                             "since": g.since} for r, g in f.items()}
                                     for s, f in non_empty[1].items()}}
        assert StateStore(str(state)).load_lastgood() == non_empty
    assert writes > 20


def test_save_lastgood_skips_an_unchanged_map_and_load_round_trips(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = StateStore(str(state))
    g = GoodFile("/m/a.yaml", "d1", "name: a\n", 12.5)
    assert store.save_lastgood({"/m": {"a.yaml": g}}, {})
    assert not store.save_lastgood({"/m": {"a.yaml": g}}, {})
    fresh = StateStore(str(state))
    assert fresh.load_lastgood() == ({"/m": {"a.yaml": g}}, {})
    assert not fresh.save_lastgood({"/m": {"a.yaml": g}}, {})  # same as what was loaded
    g2 = GoodFile("/m/a.yaml", "d2", "name: a2\n", 13.0)
    assert fresh.save_lastgood({"/m": {"a.yaml": g2}}, {})
    assert StateStore(str(state)).load_lastgood() == ({"/m": {"a.yaml": g2}}, {})


def test_same_goodfile_under_another_path_regression(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    g = GoodFile("/m/a.yaml", "d1", "text", 1.0)
    store.save_lastgood({"/m": {"a.yaml": g}}, {})
    store.save_lastgood({"/m": {"b.yaml": g}}, {})
    assert StateStore(str(tmp_path / "state")).load_lastgood() == ({"/m": {"b.yaml": g}}, {})


# =====================================================================================================
# Watcher: both ends of a rename, hidden symlink swap
# =====================================================================================================


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    root = Path(os.path.realpath(tmp_path / "w"))
    root.mkdir()
    calls: list[str] = []
    lock = threading.Lock()

    def callback(path: str) -> None:
        with lock:
            calls.append(path)

    (root / "a.yaml").write_text(manifest_for("a.yaml"))
    watcher = Watcher([str(root)], callback)
    watcher.start()
    try:
        yield root, calls
    finally:
        watcher.stop()


def test_watcher_rename_calls_back_with_both_paths(watched: tuple[Path, list[str]]) -> None:
    root, calls = watched
    os.rename(root / "a.yaml", root / "b.yaml")
    wanted = {str(root / "a.yaml"), str(root / "b.yaml")}
    wait_for(lambda: wanted <= set(calls), timeout=10, message=f"callbacks for {wanted} (got {calls})")


def test_watcher_hidden_symlink_swap_calls_back_with_the_root(watched: tuple[Path, list[str]]) -> None:
    root, calls = watched
    first = root / "..2024_01_01"
    first.mkdir()
    (first / "web.yaml").write_text(manifest_for("web.yaml"))
    os.symlink(first.name, root / "..data_tmp")
    os.rename(root / "..data_tmp", root / "..data")
    wait_for(lambda: str(root) in calls, timeout=10, message=f"a callback with the root (got {calls})")
    # hidden paths themselves are never reported one by one
    assert not [c for c in calls if "..2024" in c or c.endswith("..data_tmp")]
    # and a second swap (the Kubernetes update) is reported again
    calls.clear()
    second = root / "..2024_01_02"
    second.mkdir()
    (second / "web.yaml").write_text(manifest_for("web.yaml", 1))
    os.symlink(second.name, root / "..data_tmp")
    os.rename(root / "..data_tmp", root / "..data")
    wait_for(lambda: str(root) in calls, timeout=10, message=f"a callback with the root (got {calls})")


def test_watcher_ignores_a_plain_hidden_file(watched: tuple[Path, list[str]]) -> None:
    root, calls = watched
    (root / ".hidden.yaml").write_text("x")
    (root / "visible.yaml").write_text(manifest_for("visible.yaml"))  # a marker event after the hidden one
    wait_for(lambda: str(root / "visible.yaml") in calls, timeout=10, message="the visible file's event")
    assert str(root / ".hidden.yaml") not in calls and str(root) not in calls


def test_an_instance_change_resolves_only_the_ingresses_that_name_it() -> None:
    s = Settings()
    ings = [Ingress(f"i{k}", derive_ingress_id(f"i{k}"), (Rule(f"h{k}.test", 80, f"vm{k % 3}", 80),),
                    origin(f"{k}.yaml")) for k in range(9)]
    by_id = Ingress("byid", derive_ingress_id("byid"), (Rule("id.test", 80, "inst-2", 80),), origin("z.yaml"))
    pattern = Ingress("pat", derive_ingress_id("pat"), (Rule("{instance}.p.test", 80, "{instance}", 80),),
                      origin("zz.yaml"))
    vms = [Instance(f"vm{k}", f"inst-{k}", f"10.0.0.{k + 1}", "Running", origin(f"vm{k}.yaml", -1)) for k in range(3)]
    resolver = Resolver(s)
    first = resolver([*ings, by_id, pattern], vms)
    for change in (
        [vms[0], vms[1], Instance("vm2", "inst-2", "10.0.0.9", "Running", origin("vm2.yaml", -1))],  # moved
        [vms[0], vms[1], Instance("vm2", "inst-2", "10.0.0.3", "Stopped", origin("vm2.yaml", -1))],  # stopped
        [vms[0], vms[1]],  # gone
        [Instance("vm0", "inst-0", "10.0.0.1", "Running", origin("vm0.yaml", -1)), vms[1], vms[2]],  # same, new object
    ):
        got = resolver([*ings, by_id, pattern], change)
        assert got == resolve([*ings, by_id, pattern], change, s)  # the same result as from scratch
        for before, after in zip(first.ingresses, got.ingresses, strict=True):
            if {r.instance for r in before.ingress.rules} & {"vm2", "inst-2"}:
                continue  # (vm2 changed in each step but the last: resolved again, checked above)
            assert after is before, "an ingress naming no changed instance keeps its resolved object"
        first = got
