"""reconciler.sources.loader: reading manifest and instance directories safely, one file at a time."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.model import Ingress, Instance, Problem, Reason, Source
from reconciler.settings import Settings
from reconciler.sources.inputs import ingress_reader, instance_reader
from reconciler.sources.loader import SourceScan, is_ignored, is_manifest_name, scan_source
from reconciler.validate import resolve

SETTINGS = Settings(data_dir="/srv/hypeman", admin_port=2019, http_port=18080, https_port=18443)


def manifest(name: str, host: str | None = None, port: int = 80, instance: str = "vm") -> str:
    host = host or f"{name}.example.com"
    return (f"name: {name}\nrules:\n  - match: {{hostname: {host}, port: {port}}}\n"
            f"    target: {{instance: {instance}, port: 8080}}\n")


def put(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@dataclass
class LoadResult:
    """What a fresh reader (the daemon's, with no last good version) makes of some dirs."""

    ingresses: list[Ingress]
    problems: list[Problem]
    digests: list[str]
    scans: list[SourceScan]


def load(*dirs: Path, max_bytes: int = 1024 * 1024) -> LoadResult:
    sources = [Source(str(d), i) for i, d in enumerate(dirs)]
    got = ingress_reader(max_bytes=max_bytes).read(sources)
    return LoadResult(got.items, got.problems, got.digests, [scan_source(src) for src in sources])


def load_instances(path: str) -> tuple[list[Instance], list[Problem], str | None]:
    got = instance_reader().read([Source(path, 0)])
    return got.items, [p for p in got.problems if p.reason != Reason.SOURCE_UNAVAILABLE], got.sources[0].error


def names(result: LoadResult) -> list[str]:
    return [i.name for i in result.ingresses]


def messages(result: LoadResult) -> dict[str, str]:
    """``{file: message}`` of every problem (one per file in these tests)."""
    out: dict[str, str] = {}
    for p in result.problems:
        assert p.file not in out, f"two problems for {p.file}: {out[p.file]!r}, {p.message!r}"
        out[p.file] = p.message
    return out


# --- which files are read --------------------------------------------------------------------------


def test_nested_folders_are_read_in_sorted_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "b.yaml", manifest("b"))
    put(src / "a" / "z.yml", manifest("az"))
    put(src / "a" / "deeper" / "still" / "c.json", '{"name": "c", "rules": [{"match": {"hostname": "c.test"},'
        ' "target": {"instance": "vm", "port": 80}}]}')
    put(src / "UPPER.YAML", manifest("upper"))
    result = load(src)
    assert result.problems == []
    by_name = {i.name: i for i in result.ingresses}
    assert set(by_name) == {"b", "az", "c", "upper"}
    assert by_name["c"].origin.relpath == "a/deeper/still/c.json"
    assert by_name["c"].origin.file == os.path.join(str(src), "a", "deeper", "still", "c.json")
    assert by_name["az"].origin.source_index == 0
    rels = [e.relpath for e in result.scans[0].files]
    assert rels == ["UPPER.YAML", "a/deeper/still/c.json", "a/z.yml", "b.yaml"]


@pytest.mark.parametrize("name", [
    ".hidden.yaml", ".x.yaml.swp", "x.yaml.swp", "x.yaml.swo", "x.yaml.swx", "x.yaml~", "x.yaml.tmp",
    "#x.yaml#", ".#x.yaml", "4913.tmp", ".x.yaml.tmp",
])
def test_hidden_and_editor_temp_files_are_ignored(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    put(src / name, "name: [broken\n")
    assert is_ignored(name)
    result = load(src)
    assert names(result) == ["good"]
    assert result.problems == []


def test_emacs_lock_symlink_is_ignored(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    os.symlink("user@host.1234:1700000000", src / ".#good.yaml")  # dangling, as emacs makes it
    result = load(src)
    assert names(result) == ["good"]
    assert result.problems == []


@pytest.mark.parametrize("dirname", [".git", ".github", "..2024_01_01_00_00_00.1", ".worktrees"])
def test_hidden_folders_are_ignored(tmp_path: Path, dirname: str) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    put(src / dirname / "x.yaml", manifest("hidden"))
    put(src / dirname / "bad.yaml", "{{{{")
    result = load(src)
    assert names(result) == ["good"]
    assert result.problems == []


@pytest.mark.parametrize("name", ["README.md", "notes.txt", "x.yaml.bak", "x.yaml.orig", "x.toml", "Makefile",
                                  "x.yamlx", "yaml", "x.jsonl"])
def test_non_manifest_extensions_are_ignored(tmp_path: Path, name: str) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    put(src / name, "name: [broken\n")
    assert not is_manifest_name(name)
    result = load(src)
    assert names(result) == ["good"]
    assert result.problems == []


def test_manifest_names() -> None:
    for name in ("a.yaml", "a.yml", "a.json", "A.YML", "a.b.yaml"):
        assert is_manifest_name(name)


def test_empty_file_and_empty_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "empty.yaml", "")
    put(src / "comments.yaml", "# nothing yet\n---\n")
    (tmp_path / "none").mkdir()
    result = load(src, tmp_path / "none")
    assert result.ingresses == []
    assert result.problems == []


# --- symlinks --------------------------------------------------------------------------------------


def test_symlinked_top_level_root_git_sync_style(tmp_path: Path) -> None:
    base = tmp_path / "git"
    put(base / ".worktrees" / "abc" / "apps" / "one.yaml", manifest("one"))
    put(base / ".worktrees" / "def" / "apps" / "two.yaml", manifest("two"))
    os.symlink(".worktrees/abc", base / "root")
    result = load(base / "root")
    assert names(result) == ["one"]
    assert result.problems == []
    assert result.ingresses[0].origin.file == os.path.join(str(base / "root"), "apps", "one.yaml")
    assert result.ingresses[0].origin.relpath == "apps/one.yaml"
    # git-sync swaps the link atomically to a new worktree
    os.symlink(".worktrees/def", base / "root.new")
    os.replace(base / "root.new", base / "root")
    assert names(load(base / "root")) == ["two"]


def test_parent_of_a_git_sync_link_reads_the_checkout_once(tmp_path: Path) -> None:
    base = tmp_path / "git"
    put(base / ".worktrees" / "abc" / "one.yaml", manifest("one"))
    os.symlink(".worktrees/abc", base / "root")
    result = load(base)
    assert names(result) == ["one"]
    assert result.ingresses[0].origin.relpath == "root/one.yaml"
    assert result.problems == []


def test_kubernetes_configmap_data_layout(tmp_path: Path) -> None:
    src = tmp_path / "cm"
    stamp = src / "..2026_01_01_00_00_00.123456789"
    put(stamp / "ingresses.yaml", manifest("one") + "---\n" + manifest("two"))
    put(stamp / "vm.json", '{"name": "three", "rules": [{"match": {"hostname": "t.test"}, "target":'
        ' {"instance": "vm", "port": 80}}]}')
    os.symlink(stamp.name, src / "..data")
    os.symlink("..data/ingresses.yaml", src / "ingresses.yaml")
    os.symlink("..data/vm.json", src / "vm.json")
    result = load(src)
    assert result.problems == []
    assert sorted(names(result)) == ["one", "three", "two"]
    assert {i.origin.relpath for i in result.ingresses} == {"ingresses.yaml", "vm.json"}
    assert all("..data" not in i.origin.file and ".." not in i.origin.relpath for i in result.ingresses)


def test_a_file_reachable_twice_is_read_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "a.yaml", manifest("one"))
    put(src / "sub" / "b.yaml", manifest("two"))
    os.symlink("a.yaml", src / "c.yaml")
    os.symlink("sub", src / "z-alias")
    os.symlink("../a.yaml", src / "sub" / "again.yaml")
    result = load(src)
    assert sorted(names(result)) == ["one", "two"]
    assert result.problems == []
    assert len(result.digests) == 2
    desired = resolve(result.ingresses, [], SETTINGS, result.problems)
    assert desired.problems == ()  # no self-conflict from reading a file twice


@pytest.mark.parametrize("make", [
    lambda src: os.symlink(".", src / "loop"),
    lambda src: os.symlink("..", src / "sub" / "up"),
    lambda src: os.symlink(str(src), src / "sub" / "abs-root"),
    lambda src: os.symlink("loop.yaml", src / "loop.yaml"),
    lambda src: (os.symlink("b.yaml", src / "a.yaml"), os.symlink("a.yaml", src / "b.yaml")),
    lambda src: (os.symlink("d2", src / "d1"), os.symlink("d1", src / "d2")),
])
def test_symlink_loops_are_refused_naming_the_link(tmp_path: Path, make: object) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    put(src / "sub" / "also.yaml", manifest("also"))
    before = {p for p in src.rglob("*")}
    make(src)  # type: ignore[operator]
    links = {p for p in (set(src.iterdir()) | set((src / "sub").iterdir())) - before if p.is_symlink()}
    result = load(src)
    assert sorted(names(result)) == ["also", "good"]
    assert result.problems
    for p in result.problems:
        assert p.file in {str(link) for link in links}
        assert "loop" in p.message
        assert p.message.startswith("refused")


@pytest.mark.timeout(20)
def test_many_cross_linked_folders_are_walked_once(tmp_path: Path) -> None:
    # every folder links to every other one: a naive walk visits n! paths (minutes for n = 9)
    src = tmp_path / "src"
    n = 9
    for i in range(n):
        put(src / f"d{i}" / "m.yaml", manifest(f"n{i}"))
    for i in range(n):
        for j in range(n):
            if i != j:
                os.symlink(f"../d{j}", src / f"d{i}" / f"l{j}")
    start = time.monotonic()
    result = load(src)
    assert time.monotonic() - start < 10
    assert sorted(names(result)) == sorted(f"n{i}" for i in range(n))
    assert all("loop" in p.message for p in result.problems)
    relpaths = [i.origin.relpath for i in result.ingresses]
    assert len(set(relpaths)) == n
    assert relpaths == [i.origin.relpath for i in load(src).ingresses]  # and deterministically so


def test_links_escaping_the_source_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    put(outside / "secret.yaml", manifest("secret"))
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    os.symlink("../outside/secret.yaml", src / "rel.yaml")
    os.symlink(str(outside / "secret.yaml"), src / "abs.yaml")
    os.symlink("../outside", src / "dir")
    os.symlink("/etc", src / "etc")
    result = load(src)
    assert names(result) == ["good"]
    got = messages(result)
    assert set(got) == {str(src / n) for n in ("rel.yaml", "abs.yaml", "dir", "etc")}
    for msg in got.values():
        assert "outside the source" in msg
    assert "'../outside/secret.yaml'" in got[str(src / "rel.yaml")]


def test_sibling_prefix_is_outside_too(tmp_path: Path) -> None:
    # /x/src-evil starts with "/x/src" but is not inside it
    put(tmp_path / "src-evil" / "e.yaml", manifest("evil"))
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    os.symlink("../src-evil/e.yaml", src / "e.yaml")
    result = load(src)
    assert names(result) == ["good"]
    assert "outside the source" in messages(result)[str(src / "e.yaml")]


def test_broken_symlink_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    os.symlink("gone.yaml", src / "dangling.yaml")
    result = load(src)
    assert names(result) == ["good"]
    assert "broken symlink" in messages(result)[str(src / "dangling.yaml")]


# --- bad files -------------------------------------------------------------------------------------


def test_broken_file_beside_good_ones(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "a.yaml", manifest("a"))
    put(src / "b.yaml", "name: b\nrules:\n  - match: {hostname: b.test\n    target: x\n")
    put(src / "c.yaml", manifest("c"))
    result = load(src)
    assert names(result) == ["a", "c"]
    (p,) = result.problems
    assert p.file == str(src / "b.yaml")
    assert p.line is not None and 3 <= p.line <= 5
    assert p.message.startswith("YAML syntax error")
    assert p.reason == Reason.INVALID_MANIFEST


def test_invalid_document_beside_good_documents_in_one_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "multi.yaml", manifest("a") + "---\nname: b\nrules: []\n---\n" + manifest("c") + "---\n- 1\n")
    result = load(src)
    assert names(result) == ["a", "c"]
    by_line = {p.line: p.message for p in result.problems}
    assert set(by_line) == {7, 14}
    assert "rules" in by_line[7]
    assert by_line[14] == "expected a mapping (an object), got int"
    assert all(p.file == str(src / "multi.yaml") for p in result.problems)


def test_top_level_list_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "list.json", '[{"name": "a", "rules": [{"match": {"hostname": "a.test"}, "target": '
        '{"instance": "vm", "port": 80}}]},\n {"name": "b", "rules": [{"match": {"hostname": "b.test"}, '
        '"target": {"instance": "vm", "port": 80}}]}]\n')
    result = load(src)
    assert names(result) == ["a", "b"]
    assert [i.origin.doc_index for i in result.ingresses] == [0, 1]
    assert [i.origin.line for i in result.ingresses] == [1, 2]


def test_oversized_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    small = manifest("small")
    put(src / "small.yaml", small)
    put(src / "big.yaml", manifest("big") + "#" * 200 + "\n")
    result = load(src, max_bytes=len(small.encode()))
    assert names(result) == ["small"]  # exactly max_bytes is fine
    msg = messages(result)[str(src / "big.yaml")]
    assert "larger than the limit" in msg
    assert str(len(small.encode())) in msg


@pytest.mark.timeout(10)
def test_fifo_named_yaml_does_not_hang(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    os.mkfifo(src / "x.yaml")
    os.symlink("x.yaml", src / "y.yaml")
    result = load(src)
    assert names(result) == ["good"]
    got = messages(result)
    assert "not a regular file" in got[str(src / "x.yaml")]
    assert "not a regular file" in got[str(src / "y.yaml")]


def test_binary_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    put(src / "bin.yaml", b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)))
    put(src / "latin1.yaml", "name: café\n".encode("latin-1"))
    result = load(src)
    assert names(result) == ["good"]
    got = messages(result)
    assert "binary file" in got[str(src / "bin.yaml")]
    assert "UTF-8" in got[str(src / "latin1.yaml")]


def test_alias_bomb_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "good.yaml", manifest("good"))
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 10)]
    put(src / "bomb.yaml", "\n".join(lines) + "\n")
    start = time.monotonic()
    result = load(src)
    assert time.monotonic() - start < 5
    assert names(result) == ["good"]
    assert "alias bomb" in messages(result)[str(src / "bomb.yaml")]


def test_unsafe_tag_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "evil.yaml", f"name: !!python/object/apply:os.mkdir ['{tmp_path / 'pwned'}']\n")
    result = load(src)
    assert "unsupported tag" in messages(result)[str(src / "evil.yaml")]
    assert not (tmp_path / "pwned").exists()


# --- sources ---------------------------------------------------------------------------------------


def test_missing_source_is_source_unavailable_and_others_still_load(tmp_path: Path) -> None:
    good = tmp_path / "good"
    put(good / "a.yaml", manifest("a"))
    result = load(tmp_path / "missing", good)
    assert names(result) == ["a"]
    assert result.ingresses[0].origin.source_index == 1
    (p,) = result.problems
    assert p.reason == Reason.SOURCE_UNAVAILABLE
    assert p.file == str(tmp_path / "missing")
    assert "source unavailable" in p.message
    assert result.scans[0].error is not None


def test_source_that_is_a_file(tmp_path: Path) -> None:
    f = put(tmp_path / "file.yaml", manifest("a"))
    result = load(f)
    (p,) = result.problems
    assert p.reason == Reason.SOURCE_UNAVAILABLE
    assert "not a directory" in p.message


def test_dangling_top_level_link_is_source_unavailable(tmp_path: Path) -> None:
    os.symlink(tmp_path / "gone", tmp_path / "root")
    result = load(tmp_path / "root")
    assert [p.reason for p in result.problems] == [Reason.SOURCE_UNAVAILABLE]


def test_conflict_winner_does_not_depend_on_file_creation_order(tmp_path: Path) -> None:
    outcomes = set()
    for run, order in enumerate((("a.yaml", "b.yaml"), ("b.yaml", "a.yaml"))):
        src = tmp_path / f"run{run}"
        for name in order:
            put(src / name, "# pad\n" * (name == "b.yaml") + manifest("same", f"{name[0]}.example.com"))
        result = load(src)
        desired = resolve(result.ingresses, [], SETTINGS, result.problems)
        (winner,) = desired.ingresses
        (loser,) = desired.problems
        outcomes.add((winner.ingress.origin.relpath, loser.file.rsplit("/", 1)[1], loser.line,
                      loser.message.replace(str(src), "SRC")))
    assert outcomes == {("a.yaml", "b.yaml", 2, "name 'same' is already used by the ingress in SRC/a.yaml:1")}


def test_digests_follow_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "a.yaml", manifest("a"))
    first = load(src).digests
    assert first == load(src).digests
    put(src / "a.yaml", manifest("a", port=81))
    assert load(src).digests != first


# --- instances -------------------------------------------------------------------------------------


def test_load_instances(tmp_path: Path) -> None:
    d = tmp_path / "instances"
    put(d / "vms.yaml", "name: web\nip: 10.0.0.5\n---\nname: db\nip: 10.0.0.6\nstate: Stopped\n")
    put(d / "more" / "v6.json", '{"name": "v6", "id": "i-6", "ip": "fd00::6"}')
    put(d / "bad.yaml", "name: nope\nip: 999.1.1.1\n")
    put(d / "broken.yaml", "name: [\n")
    put(d / ".hidden.yaml", "name: hidden\nip: 10.0.0.9\n")
    instances, problems, error = load_instances(str(d))
    assert error is None
    assert sorted(i.name for i in instances) == ["db", "v6", "web"]
    assert {p.file: p.reason for p in problems} == {str(d / "bad.yaml"): Reason.INVALID_INSTANCE,
                                                     str(d / "broken.yaml"): Reason.INVALID_INSTANCE}


def test_load_instances_missing_dir(tmp_path: Path) -> None:
    instances, problems, error = load_instances(str(tmp_path / "nope"))
    assert (instances, problems) == ([], [])
    assert error is not None and "nope" in error


def test_scan_source_reports_problems_without_reading(tmp_path: Path) -> None:
    src = tmp_path / "src"
    put(src / "a.yaml", "{{{ not even parsed by scan")
    os.symlink("/etc/passwd", src / "p.yaml")
    scan = scan_source(Source(str(src), 0))
    assert [e.relpath for e in scan.files] == ["a.yaml"]
    assert scan.problems == [Problem(str(src / "p.yaml"), None,
                                     "refused: symlink points outside the source ('/etc/passwd')")]
