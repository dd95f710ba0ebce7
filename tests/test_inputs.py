"""reconciler.sources.inputs (incremental reader, last-known-good per file) and reconciler.state.store.

Fast: real files in tmp_path, no Caddy. The wall clock is injected so "since" values are predictable and
the racy-file re-hash can be switched on (fresh files) or off (clock far ahead of every mtime).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.model import GoodFile, Ingress, Instance, Reason, Source
from reconciler.sources import inputs
from reconciler.sources.inputs import IncrementalReader, ReadResult, git_commit, ingress_reader, instance_reader
from reconciler.state.store import LASTGOOD, STATUS, StateStore
from tests.helpers import ingress_yaml, instance_yaml, write

SHA1 = "0123456789abcdef0123456789abcdef01234567"
SHA2 = "89abcdef0123456789abcdef0123456789abcdef"


class Clock:
    """Injected wall clock: far ahead of every mtime by default, so no file counts as "racy"."""

    def __init__(self, start: float | None = None) -> None:
        self.now = start if start is not None else time.time() + 3600.0

    def __call__(self) -> float:
        return self.now


def manifest(name: str, port: int = 80, target: int = 8080) -> str:
    return ingress_yaml(name, f"{name}.test", port, "vm", target)


BROKEN_YAML = "name: web\nrules:\n  - match: {hostname: [oops\n"
BROKEN_SCHEMA = "name: web\nrules: []\n"


def src(path: Path, index: int = 0) -> Source:
    return Source(str(path), index)


def names(result: ReadResult[Any]) -> list[str]:
    return sorted(i.name for i in result.items)


def read(reader: IncrementalReader[Any], *paths: Path) -> ReadResult[Any]:
    return reader.read([src(p, i) for i, p in enumerate(paths)])


def by_name(result: ReadResult[Ingress]) -> dict[str, Ingress]:
    return {i.name: i for i in result.items}


# --- valid / invalid / deleted -----------------------------------------------------------------------


def test_valid_file_is_used_and_becomes_its_last_good_version(tmp_path: Path) -> None:
    m = tmp_path / "m"
    f = write(m / "web.yaml", manifest("web"))
    clock = Clock()
    reader = ingress_reader(wall=clock)
    res = read(reader, m)
    assert names(res) == ["web"]
    assert res.problems == [] and res.stale == {} and res.stale_since == {}
    assert res.parsed_files == 1
    [health] = res.sources
    assert health.ok and health.path == str(m) and health.files == 1 and health.error is None
    good = reader.good[str(m)]["web.yaml"]
    assert good.display == str(f)
    assert good.text == manifest("web")
    assert good.since == clock.now


@pytest.mark.parametrize("broken", [BROKEN_YAML, BROKEN_SCHEMA], ids=["yaml-syntax", "schema"])
def test_valid_then_invalid_keeps_last_good_and_reports_stale(tmp_path: Path, broken: str) -> None:
    m = tmp_path / "m"
    f = write(m / "web.yaml", manifest("web", target=8080))
    write(m / "other.yaml", manifest("other"))
    clock = Clock()
    reader = ingress_reader(wall=clock)
    first = read(reader, m)
    since = clock.now

    clock.now += 60
    write(f, broken)
    res = read(reader, m)
    # the last good version keeps being used, with its own origin
    assert names(res) == ["other", "web"]
    web = by_name(res)["web"]
    assert web.rules[0].target_port == 8080 and web.origin.file == str(f)
    # and the file is reported stale, with the error, since the time its good version was first seen
    assert list(res.stale) == [str(f)]
    [problem] = res.stale[str(f)]
    assert problem.file == str(f) and problem.reason == Reason.INVALID_MANIFEST
    assert problem in res.problems
    assert res.stale_since == {str(f): since}
    # the revision inputs change (the broken content is part of the input)
    assert res.digests != first.digests
    # the last good version is not replaced by the broken one
    assert reader.good[str(m)]["web.yaml"].text == manifest("web", target=8080)

    # still broken on the next pass: same answer, nothing parsed again
    again = read(reader, m)
    assert names(again) == ["other", "web"] and list(again.stale) == [str(f)]
    assert again.stale_since == {str(f): since}
    assert again.parsed_files == 0
    assert again.digests == res.digests


def test_invalid_then_fixed_uses_the_fix_and_clears_stale(tmp_path: Path) -> None:
    m = tmp_path / "m"
    f = write(m / "web.yaml", manifest("web", target=8080))
    clock = Clock()
    reader = ingress_reader(wall=clock)
    read(reader, m)
    write(f, BROKEN_YAML)
    read(reader, m)
    clock.now += 10
    write(f, manifest("web", target=9090))
    res = read(reader, m)
    assert by_name(res)["web"].rules[0].target_port == 9090
    assert res.stale == {} and res.problems == []
    good = reader.good[str(m)]["web.yaml"]
    assert good.text == manifest("web", target=9090) and good.since == clock.now


def test_invalid_from_the_start_gives_nothing(tmp_path: Path) -> None:
    m = tmp_path / "m"
    f = write(m / "web.yaml", BROKEN_SCHEMA)
    write(m / "ok.yaml", manifest("ok"))
    reader = ingress_reader(wall=Clock())
    res = read(reader, m)
    assert names(res) == ["ok"]
    assert res.stale == {}  # nothing to be stale about: there never was a good version
    assert [p.file for p in res.problems] == [str(f)]
    assert "web.yaml" not in reader.good[str(m)]
    # a different broken version later is still not served
    write(f, BROKEN_YAML)
    res = read(reader, m)
    assert names(res) == ["ok"] and res.stale == {}


def test_partly_invalid_multi_document_file_falls_back_as_a_whole(tmp_path: Path) -> None:
    m = tmp_path / "m"
    f = write(m / "multi.yaml", manifest("a", target=1) + "---\n" + manifest("b", target=1))
    reader = ingress_reader(wall=Clock())
    read(reader, m)
    write(f, manifest("a", target=2) + "---\n" + BROKEN_SCHEMA.replace("web", "b"))
    res = read(reader, m)
    # the file is the unit of last-known-good: both documents come from the last good version
    assert {n: i.rules[0].target_port for n, i in by_name(res).items()} == {"a": 1, "b": 1}
    assert list(res.stale) == [str(f)]
    assert [i.origin.doc_index for i in sorted(res.items, key=lambda i: i.name)] == [0, 1]


def test_deleted_file_drops_its_items_and_its_last_good_version(tmp_path: Path) -> None:
    m = tmp_path / "m"
    f = write(m / "web.yaml", manifest("web"))
    write(m / "keep.yaml", manifest("keep"))
    reader = ingress_reader(wall=Clock())
    read(reader, m)
    f.unlink()
    res = read(reader, m)
    assert names(res) == ["keep"] and res.stale == {} and res.problems == []
    assert set(reader.good[str(m)]) == {"keep.yaml"}
    # re-created broken: there is no last good version to fall back to any more
    write(f, BROKEN_YAML)
    res = read(reader, m)
    assert names(res) == ["keep"] and res.stale == {}


def test_deleted_while_stale_drops_it_too(tmp_path: Path) -> None:
    m = tmp_path / "m"
    f = write(m / "web.yaml", manifest("web"))
    reader = ingress_reader(wall=Clock())
    read(reader, m)
    write(f, BROKEN_YAML)
    assert names(read(reader, m)) == ["web"]
    f.unlink()
    res = read(reader, m)
    assert res.items == [] and res.stale == {} and res.problems == []
    assert reader.good[str(m)] == {}


# --- whole sources -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["removed", "renamed-away", "replaced-by-a-file"])
def test_unavailable_source_keeps_last_good_and_reports_it(tmp_path: Path, how: str) -> None:
    m, other = tmp_path / "m", tmp_path / "other"
    f = write(m / "team" / "web.yaml", manifest("web"))
    write(other / "o.yaml", manifest("o"))
    clock = Clock()
    reader = ingress_reader(wall=clock)
    first = read(reader, m, other)
    since = clock.now
    clock.now += 5
    if how == "removed":
        shutil.rmtree(m)
    elif how == "renamed-away":
        os.rename(m, tmp_path / "m.away")
    else:
        shutil.rmtree(m)
        m.write_text("not a dir\n")
    res = read(reader, m, other)
    assert names(res) == ["o", "web"]
    assert by_name(res)["web"].origin.file == str(f)
    health = {h.path: h for h in res.sources}
    assert not health[str(m)].ok and health[str(m)].error
    assert health[str(other)].ok
    [problem] = [p for p in res.problems if p.reason == Reason.SOURCE_UNAVAILABLE]
    assert problem.file == str(m) and "unavailable" in problem.message
    assert res.stale == {str(f): (problem,)}
    assert res.stale_since == {str(f): since}
    assert res.digests == first.digests  # the same content is served: the inputs did not change
    assert set(reader.good[str(m)]) == {"team/web.yaml"}  # kept, not forgotten

    # back again: normal service, nothing stale
    if m.is_file():
        m.unlink()
    if how == "renamed-away":
        os.rename(tmp_path / "m.away", m)
    else:
        write(f, manifest("web"))
    res = read(reader, m, other)
    assert names(res) == ["o", "web"] and res.stale == {} and res.problems == []
    assert all(h.ok for h in res.sources)


def test_source_that_never_existed_gives_nothing(tmp_path: Path) -> None:
    reader = ingress_reader(wall=Clock())
    res = read(reader, tmp_path / "nope")
    assert res.items == [] and res.stale == {}
    [problem] = res.problems
    assert problem.reason == Reason.SOURCE_UNAVAILABLE
    assert not res.sources[0].ok


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 directory anyway")
def test_unreadable_source_keeps_last_good(tmp_path: Path) -> None:
    m = tmp_path / "m"
    write(m / "web.yaml", manifest("web"))
    reader = ingress_reader(wall=Clock())
    read(reader, m)
    m.chmod(0)
    try:
        res = read(reader, m)
    finally:
        m.chmod(stat.S_IRWXU)
    assert names(res) == ["web"]
    assert not res.sources[0].ok


def test_unreadable_sub_folder_is_not_a_deletion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder inside a source that cannot be listed (permissions, an I/O error) keeps the last good
    versions of the files under it; only a folder that can be read and lacks them means they are gone."""
    m = tmp_path / "m"
    f = write(m / "team" / "deep" / "a.yaml", manifest("a"))
    write(m / "b.yaml", manifest("b"))
    write(m / "teammate.yaml", manifest("mate"))  # shares the prefix "team" but is not under team/
    clock = Clock()
    reader = ingress_reader(wall=clock)
    first = read(reader, m)
    assert names(first) == ["a", "b", "mate"]
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if os.fspath(path) == str(m / "team"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    res = read(reader, m)
    assert names(res) == ["a", "b", "mate"]
    [problem] = res.problems
    assert problem.file == str(m / "team") and "Permission denied" in problem.message
    assert res.stale == {str(f): (problem,)} and res.stale_since == {str(f): clock.now}
    assert res.sources[0].ok
    assert res.digests != first.digests
    assert set(reader.good[str(m)]) == {"team/deep/a.yaml", "b.yaml", "teammate.yaml"}

    monkeypatch.setattr(os, "scandir", real_scandir)
    res = read(reader, m)
    assert names(res) == ["a", "b", "mate"] and res.stale == {} and res.digests == first.digests
    shutil.rmtree(m / "team")  # readable and gone: now it is a deletion
    assert names(read(reader, m)) == ["b", "mate"]


def test_emptied_source_is_honoured(tmp_path: Path) -> None:
    m = tmp_path / "m"
    write(m / "a.yaml", manifest("a"))
    write(m / "sub" / "b.yaml", manifest("b"))
    reader = ingress_reader(wall=Clock())
    assert names(read(reader, m)) == ["a", "b"]
    for child in list(m.iterdir()):
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    res = read(reader, m)
    assert res.items == [] and res.problems == [] and res.stale == {}
    [health] = res.sources
    assert health.ok and health.files == 0
    assert reader.good[str(m)] == {}
    # removing it afterwards brings nothing back: the emptied state is what was last read
    shutil.rmtree(m)
    res = read(reader, m)
    assert res.items == [] and not res.sources[0].ok


def test_git_sync_link_whose_target_vanishes_keeps_last_good(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    tree = repo / ".worktrees" / SHA1
    f = write(tree / "apps" / "app.yaml", manifest("app"))
    link = repo / "current"
    os.symlink(os.path.join(".worktrees", SHA1), link)
    reader = ingress_reader(wall=Clock())
    res = read(reader, link)
    assert names(res) == ["app"]
    [health] = res.sources
    assert health.ok and health.root == str(tree.resolve()) and health.commit == SHA1
    assert by_name(res)["app"].origin.file == str(link / "apps" / "app.yaml")
    assert f.exists()

    shutil.rmtree(tree)  # the link dangles now
    res = read(reader, link)
    assert names(res) == ["app"]
    [health] = res.sources
    assert not health.ok and health.commit is None
    assert [p.reason for p in res.problems] == [Reason.SOURCE_UNAVAILABLE]


def test_git_sync_swap_to_a_broken_revision_keeps_the_previous_revisions_file(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo / ".worktrees" / SHA1 / "app.yaml", manifest("app", target=1))
    write(repo / ".worktrees" / SHA2 / "app.yaml", BROKEN_YAML)
    link = repo / "current"
    os.symlink(os.path.join(".worktrees", SHA1), link)
    reader = ingress_reader(wall=Clock())
    read(reader, link)
    tmp_link = repo / ".current.tmp"
    os.symlink(os.path.join(".worktrees", SHA2), tmp_link)
    os.rename(tmp_link, link)
    shutil.rmtree(repo / ".worktrees" / SHA1)
    res = read(reader, link)
    assert by_name(res)["app"].rules[0].target_port == 1
    assert list(res.stale) == [str(link / "app.yaml")]
    assert res.sources[0].ok and res.sources[0].commit == SHA2


# --- the cache ---------------------------------------------------------------------------------------


@pytest.fixture
def count_reads(monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    calls: list[str] = []
    real = inputs.read_file_stat

    def counting(entry: Any, max_bytes: int = inputs.DEFAULT_MAX_BYTES) -> tuple[bytes, os.stat_result]:
        calls.append(entry.relpath)
        return real(entry, max_bytes)

    monkeypatch.setattr(inputs, "read_file_stat", counting)
    return lambda: len(calls)


def test_unchanged_files_are_not_parsed_or_read_again(tmp_path: Path, count_reads: Callable[[], int]) -> None:
    m = tmp_path / "m"
    for i in range(5):
        write(m / f"f{i}.yaml", manifest(f"f{i}"))
    reader = ingress_reader(wall=Clock())
    first = read(reader, m)
    assert first.parsed_files == 5 and count_reads() == 5
    res = read(reader, m)
    assert res.parsed_files == 0 and count_reads() == 5  # stat signature unchanged: not even read
    assert names(res) == names(first) and res.digests == first.digests

    write(m / "f3.yaml", manifest("f3", target=1234))
    res = read(reader, m)
    assert res.parsed_files == 1 and count_reads() == 6
    assert by_name(res)["f3"].rules[0].target_port == 1234

    # rewritten with identical content (new inode, new mtime): read and hashed, but not parsed
    write(m / "f1.yaml", manifest("f1"))
    res = read(reader, m)
    assert res.parsed_files == 0 and count_reads() == 7
    assert names(res) == names(first)


def test_racy_files_are_rehashed_but_not_reparsed(tmp_path: Path, count_reads: Callable[[], int]) -> None:
    m = tmp_path / "m"
    write(m / "a.yaml", manifest("a"))
    reader = ingress_reader(wall=time.time)  # the file was modified just now: racy
    assert read(reader, m).parsed_files == 1
    res = read(reader, m)
    assert res.parsed_files == 0 and count_reads() == 2
    assert names(res) == ["a"]


def test_racy_same_size_same_mtime_change_is_seen(tmp_path: Path) -> None:
    """A change within the file system's timestamp granularity (same size, same mtime) is still seen."""
    m = tmp_path / "m"
    f = m / "a.yaml"
    write(f, manifest("a", target=1111))
    st = f.stat()
    reader = ingress_reader(wall=time.time)
    assert by_name(read(reader, m))["a"].rules[0].target_port == 1111
    with open(f, "r+") as fh:  # same inode, same size
        fh.write(manifest("a", target=2222))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    res = read(reader, m)
    assert by_name(res)["a"].rules[0].target_port == 2222
    assert res.parsed_files == 1


# --- persisted last good: StateStore round trip and a "restart" --------------------------------------


def test_state_store_lastgood_round_trip(tmp_path: Path) -> None:
    m, inst = tmp_path / "m", tmp_path / "instances"
    write(m / "web.yaml", manifest("web"))
    write(m / "sub" / "x.json", json.dumps({"name": "x", "rules": [
        {"match": {"hostname": "x.test"}, "target": {"instance": "vm", "port": 1}}]}))
    write(inst / "vms.yaml", instance_yaml("vm"))
    manifests = ingress_reader(wall=Clock())
    instances = instance_reader(wall=Clock())
    read(manifests, m)
    read(instances, inst)

    store = StateStore(str(tmp_path / "data" / "state"))
    assert store.save_lastgood(manifests.good, instances.good) is True
    path = tmp_path / "data" / "state" / LASTGOOD
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # nothing changed: not written again
    mtime = path.stat().st_mtime_ns
    assert store.save_lastgood(manifests.good, instances.good) is False
    assert path.stat().st_mtime_ns == mtime

    loaded_m, loaded_i = StateStore(str(tmp_path / "data" / "state")).load_lastgood()
    assert loaded_m == manifests.good
    assert loaded_i == instances.good
    assert set(loaded_m[str(m)]) == {"web.yaml", "sub/x.json"}
    assert all(isinstance(g, GoodFile) for g in loaded_m[str(m)].values())

    # a new store that loaded the file knows it is up to date
    again = StateStore(str(tmp_path / "data" / "state"))
    again.load_lastgood()
    assert again.save_lastgood(loaded_m, loaded_i) is False
    # a changed good version is written
    write(m / "web.yaml", manifest("web", target=4242))
    read(manifests, m)
    assert again.save_lastgood(manifests.good, instances.good) is True
    assert StateStore(str(tmp_path / "data" / "state")).load_lastgood()[0] == manifests.good


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "manifests": {}}),
                                     json.dumps([1, 2]),
                                     json.dumps({"version": 1, "manifests": {"/m": {"a.yaml": {"text": 1}}}})])
def test_state_store_ignores_corrupt_or_foreign_lastgood(tmp_path: Path, content: str) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / LASTGOOD).write_text(content)
    manifests, instances = StateStore(str(state)).load_lastgood()
    assert manifests.get("/m", {}) == {} and instances == {}


def test_state_store_status_round_trip(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path / "state"))
    assert store.load_status() is None
    status = {"revision": {"last_attempted": "abc", "last_applied": None}, "ingresses": [{"name": "web"}]}
    store.save_status(status)
    assert StateStore(str(tmp_path / "state")).load_status() == status
    assert stat.S_IMODE((tmp_path / "state" / STATUS).stat().st_mode) == 0o600
    (tmp_path / "state" / STATUS).write_text("[]")
    assert store.load_status() is None


def restart(tmp_path: Path, manifests: IncrementalReader[Ingress], instances: IncrementalReader[Instance],
            clock: Clock) -> tuple[IncrementalReader[Ingress], IncrementalReader[Instance]]:
    """Persist what the readers know, then build new readers from the store, as a restarted daemon does."""
    StateStore(str(tmp_path / "state")).save_lastgood(manifests.good, instances.good)
    good_m, good_i = StateStore(str(tmp_path / "state")).load_lastgood()
    return ingress_reader(wall=clock, good=good_m), instance_reader(wall=clock, good=good_i)


def test_persisted_good_is_used_after_a_restart_with_a_broken_file(tmp_path: Path) -> None:
    m, inst = tmp_path / "m", tmp_path / "instances"
    f = write(m / "web.yaml", manifest("web", target=8080))
    write(m / "ok.yaml", manifest("ok"))
    i = write(inst / "vms.yaml", instance_yaml("vm", "10.0.0.1"))
    clock = Clock()
    manifests, instances = ingress_reader(wall=clock), instance_reader(wall=clock)
    read(manifests, m)
    read(instances, inst)
    since = clock.now

    # broken while the reconciler is down
    write(f, BROKEN_YAML)
    write(i, "name: vm\nip: not-an-ip\n")
    clock.now += 100
    manifests2, instances2 = restart(tmp_path, manifests, instances, clock)
    res = read(manifests2, m)
    assert names(res) == ["ok", "web"]
    assert by_name(res)["web"].rules[0].target_port == 8080
    assert list(res.stale) == [str(f)] and res.stale_since == {str(f): since}
    assert res.parsed_files == 2  # a new reader: both files are new to it
    inst_res = read(instances2, inst)
    assert [(x.name, x.ip) for x in inst_res.items] == [("vm", "10.0.0.1")]
    assert [p.reason for p in inst_res.problems] == [Reason.INVALID_INSTANCE]
    assert list(inst_res.stale) == [str(i)]


def test_persisted_good_after_a_restart_with_an_unavailable_source(tmp_path: Path) -> None:
    m, inst = tmp_path / "m", tmp_path / "instances"
    write(m / "web.yaml", manifest("web"))
    inst.mkdir()
    clock = Clock()
    manifests, instances = ingress_reader(wall=clock), instance_reader(wall=clock)
    read(manifests, m)
    os.rename(m, tmp_path / "away")
    manifests2, _ = restart(tmp_path, manifests, instances, clock)
    res = read(manifests2, m)
    assert names(res) == ["web"]
    assert not res.sources[0].ok


def test_persisted_good_after_a_restart_with_a_deleted_file(tmp_path: Path) -> None:
    m, inst = tmp_path / "m", tmp_path / "instances"
    f = write(m / "web.yaml", manifest("web"))
    inst.mkdir()
    clock = Clock()
    manifests, instances = ingress_reader(wall=clock), instance_reader(wall=clock)
    read(manifests, m)
    f.unlink()
    manifests2, instances2 = restart(tmp_path, manifests, instances, clock)
    res = read(manifests2, m)
    assert res.items == [] and res.stale == {}
    # and the deletion is persisted: a later restart with the file back broken serves nothing
    write(f, BROKEN_YAML)
    manifests3, _ = restart(tmp_path, manifests2, instances2, clock)
    assert read(manifests3, m).items == []


def test_persisted_good_follows_the_source_position(tmp_path: Path) -> None:
    """After a restart with the sources in another order, the last good items carry the new position
    (which decides conflicts)."""
    a, b = tmp_path / "a", tmp_path / "b"
    f = write(b / "web.yaml", manifest("web"))
    a.mkdir()
    clock = Clock()
    manifests, instances = ingress_reader(wall=clock), instance_reader(wall=clock)
    assert [i.origin.source_index for i in read(manifests, a, b).items] == [1]
    write(f, BROKEN_YAML)
    manifests2, _ = restart(tmp_path, manifests, instances, clock)
    res = manifests2.read([Source(str(b), 0), Source(str(a), 1)])
    assert [(i.name, i.origin.source_index) for i in res.items] == [("web", 0)]


# --- git commits --------------------------------------------------------------------------------------


def test_git_commit_from_the_path() -> None:
    assert git_commit(f"/srv/repo/.worktrees/{SHA1}") == SHA1
    assert git_commit(f"/srv/{SHA2}/sub/{SHA1}/x") == SHA1  # the innermost one
    assert git_commit(f"/srv/repo/rev-{SHA1}") == SHA1
    assert git_commit(f"/srv/repo/{SHA1}0") is None  # 41 hex digits: not a commit
    assert git_commit("/srv/repo/current") is None


def test_git_commit_from_a_git_dir(tmp_path: Path) -> None:
    detached = tmp_path / "detached"
    write(detached / ".git" / "HEAD", SHA1 + "\n")
    assert git_commit(str(detached)) == SHA1

    branch = tmp_path / "branch"
    write(branch / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(branch / ".git" / "refs" / "heads" / "main", SHA2 + "\n")
    assert git_commit(str(branch)) == SHA2

    worktree = tmp_path / "worktree"
    write(tmp_path / "main.git" / "worktrees" / "wt" / "HEAD", SHA1 + "\n")
    write(worktree / ".git", "gitdir: ../main.git/worktrees/wt\n")
    assert git_commit(str(worktree)) == SHA1
    absolute = tmp_path / "absolute"
    write(absolute / ".git", f"gitdir: {tmp_path / 'main.git' / 'worktrees' / 'wt'}\n")
    assert git_commit(str(absolute)) == SHA1

    packed = tmp_path / "packed"  # after git gc / pack-refs, branch refs live in packed-refs only
    write(packed / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(packed / ".git" / "packed-refs", f"# pack-refs with: peeled fully-peeled sorted\n{SHA1} refs/heads/dev\n"
          f"{SHA2} refs/heads/main\n^{SHA1}\n")
    assert git_commit(str(packed)) == SHA2

    branch_wt = tmp_path / "branch-wt"  # a linked worktree on a branch: the ref is in the common dir
    write(tmp_path / "main.git" / "worktrees" / "bw" / "HEAD", "ref: refs/heads/feature\n")
    write(tmp_path / "main.git" / "worktrees" / "bw" / "commondir", "../..\n")
    write(tmp_path / "main.git" / "refs" / "heads" / "feature", SHA2 + "\n")
    write(branch_wt / ".git", f"gitdir: {tmp_path / 'main.git' / 'worktrees' / 'bw'}\n")
    assert git_commit(str(branch_wt)) == SHA2

    unborn = tmp_path / "unborn"
    write(unborn / ".git" / "HEAD", "ref: refs/heads/nothing-yet\n")
    assert git_commit(str(unborn)) is None
    garbage = tmp_path / "garbage"
    write(garbage / ".git" / "HEAD", "hello\n")
    assert git_commit(str(garbage)) is None
    assert git_commit(str(tmp_path / "plain")) is None


def test_source_link_to_a_git_checkout_reports_its_head(tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    write(checkout / ".git" / "HEAD", SHA2 + "\n")
    write(checkout / "web.yaml", manifest("web"))
    link = tmp_path / "current"
    os.symlink(checkout, link)
    res = read(ingress_reader(wall=Clock()), link)
    assert names(res) == ["web"]
    assert res.sources[0].commit == SHA2
    # a plain directory that is not a link reports no commit
    assert read(ingress_reader(wall=Clock()), tmp_path / "checkout").sources[0].commit is None


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_commit_of_real_checkouts(tmp_path: Path) -> None:
    def git(*args: str, cwd: Path) -> str:
        env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path), "GIT_AUTHOR_NAME": "t",
               "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@example.com"}
        return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()

    repo = tmp_path / "repo"
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    write(repo / "web.yaml", manifest("web"))
    git("add", ".", cwd=repo)
    git("commit", "-q", "-m", "one", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo)
    assert git_commit(str(repo)) == head
    git("worktree", "add", "-q", str(tmp_path / "on-branch"), "-b", "feature", cwd=repo)
    git("worktree", "add", "-q", "--detach", str(tmp_path / "detached"), cwd=repo)
    git("pack-refs", "--all", cwd=repo)
    assert git_commit(str(repo)) == head
    assert git_commit(str(tmp_path / "on-branch")) == head
    assert git_commit(str(tmp_path / "detached")) == head


# --- a git-sync link swapped while the source is read ------------------------------------------------

SHA3 = "fedcba9876543210fedcba9876543210fedcba98"
SHA4 = "76543210fedcba9876543210fedcba9876543210"


def _worktrees(repo: Path, revisions: dict[str, dict[str, str]]) -> None:
    for sha, files in revisions.items():
        for name, text in files.items():
            write(repo / ".worktrees" / sha / name, text)


def _swap(link: Path, sha: str, *, remove_old: bool = True) -> None:
    """git-sync's update: a new link renamed over the old one, then the old worktree removed."""
    old = os.path.realpath(link)
    tmp = link.with_name(".current.swap")
    os.symlink(os.path.join(".worktrees", sha), tmp)
    os.rename(tmp, link)
    if remove_old and os.path.basename(old) != sha:
        shutil.rmtree(old)


def _swap_after_reads(reader: IncrementalReader[Any], swaps: list[str], link: Path, *,
                      remove_old: bool = True) -> list[str]:
    """Make the reader's file reads swap ``link`` to the next of ``swaps`` right after one file was read
    (the scan hook: ``_read_entry`` runs once per file of a full read). Returns the log of swaps done."""
    done: list[str] = []
    original = reader._read_entry

    def hooked(entry: Any, source: Source) -> Any:
        got = original(entry, source)
        if len(done) < len(swaps):
            done.append(swaps[len(done)])
            _swap(link, done[-1], remove_old=remove_old)
        return got

    reader._read_entry = hooked  # type: ignore[method-assign]
    return done


def test_swap_in_the_middle_of_a_read_is_retried_never_half(tmp_path: Path) -> None:
    """The link moves from rev1 to rev2 (rev1 removed) after the first file of rev1 was read: without the
    retry the result would be rev1's first file alone (its other file vanished), i.e. half of rev1 --
    or, had rev1 stayed, rev1 read through a link that now says rev2. The read is retried and the result
    is exactly rev2."""
    repo = tmp_path / "repo"
    rev1 = {"a.yaml": manifest("a", target=1), "b.yaml": manifest("b", target=1)}
    rev2 = {"a.yaml": manifest("a", target=2), "b.yaml": manifest("b", target=2), "c.yaml": manifest("c", target=2)}
    _worktrees(repo, {SHA1: rev1, SHA2: rev2})
    link = repo / "current"
    os.symlink(os.path.join(".worktrees", SHA1), link)
    reader = ingress_reader(wall=Clock())
    swaps = _swap_after_reads(reader, [SHA2], link)

    res = read(reader, link)
    assert swaps == [SHA2]  # the swap did happen mid-read
    assert {i.name: i.rules[0].target_port for i in res.items} == {"a": 2, "b": 2, "c": 2}
    assert res.problems == [] and res.stale == {}
    [health] = res.sources
    assert health.ok and health.commit == SHA2 and health.root == str((repo / ".worktrees" / SHA2).resolve())
    assert health.files == 3
    # the revision's parts and the last good versions are rev2's alone
    import hashlib

    want = {name: hashlib.sha256(text.encode()).hexdigest() for name, text in rev2.items()}
    assert sorted(res.digests) == sorted(f"{link}:{name}:{digest}" for name, digest in want.items())
    assert {rel: g.digest for rel, g in reader.good[str(link)].items()} == want


def test_source_that_keeps_moving_during_reads_is_unavailable_and_keeps_its_last_good(tmp_path: Path) -> None:
    """A link that moves during every attempt (three in a row): the source is reported unavailable and
    serves its last good version (rev1) as a whole -- nothing of rev2 or rev3 leaks in."""
    repo = tmp_path / "repo"
    rev = {sha: {"a.yaml": manifest("a", target=n), "b.yaml": manifest("b", target=n)}
           for n, sha in enumerate((SHA1, SHA2, SHA3, SHA4), start=1)}
    _worktrees(repo, rev)
    link = repo / "current"
    os.symlink(os.path.join(".worktrees", SHA1), link)
    reader = ingress_reader(wall=Clock())
    assert {i.name: i.rules[0].target_port for i in read(reader, link).items} == {"a": 1, "b": 1}

    # every file read moves the link on (rev2 -> rev3 -> rev4 -> rev2..., worktrees kept): each of the three
    # attempts ends on another folder than the one it started reading
    swaps = _swap_after_reads(reader, [SHA2, SHA3, SHA4] * 2, link, remove_old=False)
    res = read(reader, link)
    assert len(swaps) == 6
    assert {i.name: i.rules[0].target_port for i in res.items} == {"a": 1, "b": 1}
    [health] = res.sources
    assert not health.ok and "moved while it was read" in (health.error or ""), health
    assert [p.reason for p in res.problems] == [Reason.SOURCE_UNAVAILABLE]
    assert sorted(res.stale) == [str(link / "a.yaml"), str(link / "b.yaml")]

    # once the link holds still, the next read uses what it points to now
    reader._read_entry = IncrementalReader._read_entry.__get__(reader)  # type: ignore[method-assign]
    now = os.path.basename(os.path.realpath(link))
    res = read(reader, link)
    assert res.sources[0].ok and res.sources[0].commit == now
    assert {i.name for i in res.items} == {"a", "b"} and res.stale == {}


# --- following lastgood.json from another process (the API) ------------------------------------------


def test_lastgood_follower_rereads_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.state import store as store_module
    from reconciler.state.store import LastGoodFollower

    # a file system whose signature cannot tell a same-size rewrite within one timestamp tick: no ctime
    monkeypatch.setattr(store_module, "_signature_of",
                        lambda st: (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))

    state = tmp_path / "state"
    clock = Clock()  # far ahead of every mtime: nothing is "racy"
    follower = LastGoodFollower(str(state), wall=clock)
    assert follower.current() is None  # no pass yet
    store = StateStore(str(state))
    g1 = GoodFile("/m/a.yaml", "d1", manifest("a"), 1.0)
    store.save_lastgood({"/m": {"a.yaml": g1}}, {})
    assert follower.current() == ({"/m": {"a.yaml": g1}}, {})
    assert follower.current() is follower.current() and follower.loads == 1  # unchanged: not read again

    g2 = GoodFile("/m/a.yaml", "d2", manifest("a", target=9), 2.0)
    store.save_lastgood({"/m": {"a.yaml": g2}}, {"/i": {"vm.yaml": g1}})
    assert follower.current() == ({"/m": {"a.yaml": g2}}, {"/i": {"vm.yaml": g1}})
    assert follower.loads == 2

    # a same-size rewrite inside the timestamp granularity (the same signature: mtime restored by hand)
    path = state / LASTGOOD
    st = path.stat()
    text = path.read_text()
    assert '"d2"' in text
    path.write_text(text.replace('"d2"', '"d3"'))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert follower.current()[0]["/m"]["a.yaml"].digest == "d2"  # type: ignore[index]  # not racy: unseen
    # ... is caught while the file is "racy" (modified less than 2 s ago), by its content
    clock.now = st.st_mtime_ns / 1e9 + 0.5
    good = follower.current()
    assert good is not None and good[0]["/m"]["a.yaml"].digest == "d3"
    loads = follower.loads
    follower.current()
    assert follower.loads == loads  # racy: hashed again, but the same bytes are not parsed again

    # damaged (never by the daemon's atomic writes) or gone for a moment: what it held last
    held = follower.current()
    path.write_text("{not json")
    assert follower.current() == held
    path.unlink()
    assert follower.current() == held
