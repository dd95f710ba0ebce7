"""reconciler.sources.forked (the forked helper) and the reader's use of it for a big first read.

The helper only ever gives a head start: a read with it must give exactly what a read without it gives,
whatever the files hold (broken, oversized, binary, several documents, ignored names), and a helper that
fails, dies or hangs must only mean the reader parses those files itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.model import Source
from reconciler.sources import inputs
from reconciler.sources.forked import ForkedHelper
from reconciler.sources.inputs import IncrementalReader, ReadResult, drop_helper, fork_helper, ingress_reader
from tests.helpers import ingress_yaml, wait_for, write

pytestmark = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the helper is only used with 2+ cores")


def _square(key: Any, item: Any) -> Any:
    if key == "boom":
        raise ValueError("no good")
    if key == "hang":
        time.sleep(60)
    if key == "exit":
        os._exit(3)
    if key == "slow":
        time.sleep(0.005)
    if key == "steady":
        time.sleep(0.0005)
    return item * item


@pytest.fixture()
def helper() -> Any:
    h = ForkedHelper.fork(_square)
    assert h is not None
    yield h
    h.close()


def _share(helper: ForkedHelper, key: str, n: int, *, delay: float = 0.0,
           timeout: float = 30.0) -> tuple[list[int], dict[int, Any]]:
    mine: list[int] = []

    def take(i: int) -> None:
        mine.append(i)
        if delay:
            time.sleep(delay)

    theirs = helper.share(key, list(range(n)), take, timeout=timeout)
    return mine, theirs


def test_both_ends_meet_in_the_middle(helper: ForkedHelper) -> None:
    assert helper.pid not in (None, os.getpid())
    for _ in range(3):  # the helper serves one share after another
        mine, theirs = _share(helper, "steady", 2000, delay=0.0005)
        assert mine == list(range(len(mine))), "this side works from the front, in order"
        assert sorted(theirs) == list(range(len(mine), 2000)), "the helper did the rest, nothing twice"
        assert all(v == k * k for k, v in theirs.items())
        assert mine and theirs
    assert helper.last_error is None


def test_the_faster_side_does_more(helper: ForkedHelper) -> None:
    mine, theirs = _share(helper, "plain", 600, delay=0.005)  # this side is slow
    assert len(theirs) > 3 * len(mine)
    mine, theirs = _share(helper, "slow", 600)  # the helper is slow
    assert len(mine) > 3 * len(theirs)


def test_a_failing_helper_leaves_the_rest_to_the_caller(helper: ForkedHelper) -> None:
    mine, theirs = _share(helper, "boom", 50, delay=0.01)
    assert theirs == {} and helper.last_error == "ValueError: no good"
    assert mine == list(range(len(mine))) and len(mine) < 50  # the rest is the caller's to do
    mine, theirs = _share(helper, "plain", 50)  # the helper goes on
    assert len(mine) + len(theirs) == 50


def test_a_helper_that_exits_or_is_killed_gives_no_result(helper: ForkedHelper) -> None:
    _mine, theirs = _share(helper, "exit", 100, delay=0.01)
    assert theirs == {} and "exited (code 3)" in str(helper.last_error)
    mine, theirs = _share(helper, "plain", 100)  # a dead helper: the caller does everything
    assert (mine, theirs) == (list(range(100)), {})
    other = ForkedHelper.fork(_square)
    assert other is not None and other.pid is not None
    try:
        os.kill(other.pid, signal.SIGKILL)
        wait_for(lambda: not other.alive(), timeout=10)
        mine, theirs = _share(other, "plain", 100)
        assert (mine, theirs) == (list(range(100)), {})
    finally:
        other.close()


def test_a_hanging_helper_is_stopped_after_the_timeout(helper: ForkedHelper) -> None:
    _mine, theirs = _share(helper, "hang", 100, delay=0.01, timeout=0.5)
    assert theirs == {} and "no result within 0.5s" in str(helper.last_error)
    wait_for(lambda: not helper.alive(), timeout=10)


def test_close_reaps_the_helper() -> None:
    h = ForkedHelper.fork(_square)
    assert h is not None and h.pid is not None
    pid = h.pid
    h.close()
    assert h.peak_rss_mb is not None and 1 < h.peak_rss_mb < 1000
    assert not h.alive()
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # already reaped: no zombie left behind


# --- the reader with a helper -------------------------------------------------------------------------


def _tree(root: Path, n: int) -> Path:
    m = root / "m"
    for i in range(n):
        write(m / f"team-{i % 7}" / f"ing-{i:05d}.yaml", ingress_yaml(f"ing-{i}", f"h{i}.test", 80, "vm", 8080))
    write(m / "team-1" / "two.yaml", ingress_yaml("two-a", "two-a.test", 80, "vm", 1) + "---\n"
          + ingress_yaml("two-b", "two-b.test", 80, "vm", 2))
    write(m / "team-2" / "broken.yaml", "name: x\nrules:\n  - match: {hostname: [oops\n")
    write(m / "team-3" / "schema.yaml", "name: bad\nrules: []\n")
    write(m / "team-4" / "conflict.yaml", ingress_yaml("ing-3", "other.test", 80, "vm", 1))
    (m / "team-5" / "binary.yaml").write_bytes(b"name: \x00\x01\x02")
    (m / "team-6" / "huge.yaml").write_text("x" * 5000)
    write(m / "team-6" / ".hidden.yaml", ingress_yaml("hidden", "hidden.test", 80, "vm", 1))
    return m


def _view(res: ReadResult[Any]) -> tuple[Any, ...]:
    return (res.items, [(p.file, p.line, p.message, p.reason) for p in res.problems], res.stale,
            res.sources, res.digests, res.parsed_files)


def _count_own_reads(reader: IncrementalReader[Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Files this process reads itself (patched after the fork: the helper runs the original)."""
    seen: list[str] = []
    original = reader._read_entry

    def counting(entry: Any, source: Source) -> Any:
        seen.append(entry.relpath)
        time.sleep(0.0005)  # this side a little slower: the helper surely gets a share, even on a busy machine
        return original(entry, source)

    monkeypatch.setattr(reader, "_read_entry", counting)
    return seen


def test_a_read_with_the_helper_equals_one_without(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = inputs.HELPER_MIN_FILES + 100
    m = _tree(tmp_path, n)
    sources = [Source(str(m), 0)]
    alone = ingress_reader(max_bytes=4096).read(sources)
    reader = ingress_reader(max_bytes=4096)
    helper = fork_helper(reader)
    assert helper is not None and reader.helper is helper
    own = _count_own_reads(reader, monkeypatch)
    try:
        shared = reader.read(sources)
    finally:
        drop_helper(reader)
    assert reader.helper is None and not helper.alive()
    assert helper.last_error is None
    files = n + 6  # the hidden file is never read
    assert 0 < len(own) < files, "both parsed"
    assert _view(shared) == _view(alone)
    assert alone.helped_files == 0 and shared.helped_files > 0
    assert {p.message for p in shared.problems} >= {"file is 5000 bytes, larger than the limit of 4096 bytes"}
    # what the helper parsed is cached here as if this process had parsed it: nothing is parsed again
    again = reader.read(sources)
    assert again.parsed_files == 0 and _view(again)[:-1] == _view(alone)[:-1]


def test_a_dead_helper_means_the_reader_parses_everything_itself(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    n = inputs.HELPER_MIN_FILES + 10
    m = _tree(tmp_path, n)
    sources = [Source(str(m), 0)]
    alone = ingress_reader(max_bytes=4096).read(sources)
    reader = ingress_reader(max_bytes=4096)
    helper = fork_helper(reader)
    assert helper is not None and helper.pid is not None
    os.kill(helper.pid, signal.SIGKILL)
    wait_for(lambda: not helper.alive(), timeout=10)
    own = _count_own_reads(reader, monkeypatch)
    try:
        res = reader.read(sources)
    finally:
        drop_helper(reader)
    assert len(own) == n + 6
    assert _view(res) == _view(alone)


def test_a_failing_helper_job_is_done_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _tree(tmp_path, inputs.HELPER_MIN_FILES)
    sources = [Source(str(m), 0)]
    alone = ingress_reader(max_bytes=4096).read(sources)
    reader = ingress_reader(max_bytes=4096)
    # the forked copy parses with a parse_doc that fails: its job fails as a whole
    monkeypatch.setattr(reader, "_parse_doc", lambda doc: 1 / 0)
    helper = fork_helper(reader)
    monkeypatch.undo()
    assert helper is not None
    try:
        res = reader.read(sources)
    finally:
        drop_helper(reader)
    assert helper.last_error is not None and "ZeroDivisionError" in helper.last_error
    assert _view(res) == _view(alone)


def test_small_and_cached_reads_do_not_use_the_helper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = _tree(tmp_path, inputs.HELPER_MIN_FILES - 10)
    sources = [Source(str(m), 0)]
    reader = ingress_reader()
    helper = fork_helper(reader)
    assert helper is not None
    try:
        shared: list[Any] = []
        real_share = helper.share
        monkeypatch.setattr(helper, "share", lambda *a, **k: shared.append(a) or real_share(*a, **k))
        reader.read(sources)  # ~400 files, some of them not manifests: under the threshold
        for i in range(20):
            write(m / "more" / f"x{i}.yaml", ingress_yaml(f"x{i}", f"x{i}.test", 80, "vm", 1))
        reader.read(sources)  # over the threshold in all, but only 20 files are new
        assert shared == []
    finally:
        drop_helper(reader)


def test_a_caller_failing_mid_share_ends_the_helper(helper: ForkedHelper) -> None:
    """The helper's answer to an abandoned share must never be taken for the next share's."""

    def boom(i: int) -> None:
        time.sleep(0.002)
        if i == 20:
            raise OSError("disk gone")

    with pytest.raises(OSError):
        helper.share("slow", list(range(200)), boom)
    assert helper.last_error == "the caller failed during the share"
    wait_for(lambda: not helper.alive(), timeout=10)
    mine, theirs = _share(helper, "plain", 50)  # a closed helper: the caller does everything
    assert (mine, theirs) == (list(range(50)), {})
