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


def _double(job: Any) -> Any:
    if job == "boom":
        raise ValueError("no good")
    if job == "hang":
        time.sleep(60)
    if job == "exit":
        os._exit(3)
    return [job, job]


@pytest.fixture()
def helper() -> Any:
    h = ForkedHelper.fork(_double)
    assert h is not None
    yield h
    h.close()


def test_jobs_run_in_another_process(helper: ForkedHelper) -> None:
    assert helper.pid not in (None, os.getpid())
    assert helper.submit(21)
    assert not helper.submit(22), "one job at a time"
    assert helper.result() == (True, [21, 21])
    assert helper.submit({"a": (1, 2)})
    assert helper.result() == (True, [{"a": (1, 2)}, {"a": (1, 2)}])
    assert helper.last_error is None


def test_a_failing_job_is_reported_and_the_helper_goes_on(helper: ForkedHelper) -> None:
    assert helper.submit("boom")
    ok, why = helper.result()
    assert not ok and why == "ValueError: no good" and helper.last_error == why
    assert helper.submit(1) and helper.result() == (True, [1, 1])


def test_a_helper_that_exits_or_is_killed_gives_no_result(helper: ForkedHelper) -> None:
    assert helper.submit("exit")
    ok, why = helper.result()
    assert not ok and "exited (code 3)" in why
    assert not helper.submit(1), "a dead helper takes no job"
    other = ForkedHelper.fork(_double)
    assert other is not None and other.pid is not None
    try:
        assert other.submit("hang")
        os.kill(other.pid, signal.SIGKILL)
        ok, why = other.result()
        assert not ok and "exited" in why
    finally:
        other.close()


def test_a_hanging_helper_is_stopped_after_the_timeout(helper: ForkedHelper) -> None:
    assert helper.submit("hang")
    ok, why = helper.result(timeout=0.5)
    assert not ok and "no result within 0.5s" in why
    wait_for(lambda: not helper.alive(), timeout=10)


def test_close_reaps_the_helper() -> None:
    h = ForkedHelper.fork(_double)
    assert h is not None and h.pid is not None
    pid = h.pid
    h.close()
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
    assert 0.4 * files < files - len(own) < 0.5 * files, "the helper parsed a little under half"
    assert _view(shared) == _view(alone)
    assert alone.helped_files == 0 and 0.4 * files - 2 < shared.helped_files <= files - len(own)
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
        submitted: list[Any] = []
        real_submit = helper.submit
        monkeypatch.setattr(helper, "submit", lambda job: submitted.append(job) or real_submit(job))
        reader.read(sources)  # ~400 files, some of them not manifests: under the threshold
        for i in range(20):
            write(m / "more" / f"x{i}.yaml", ingress_yaml(f"x{i}", f"x{i}.test", 80, "vm", 1))
        reader.read(sources)  # over the threshold in all, but only 20 files are new
        assert submitted == []
    finally:
        drop_helper(reader)
