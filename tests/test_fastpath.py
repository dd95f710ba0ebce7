"""reconciler.loop.fastpath: an instance file's change is published ahead of the pass, the pass stays the
authority (real files in a temp dir; the publisher is a recorder)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.loop.fastpath import InstanceFastPath
from reconciler.model import Source
from reconciler.sources.inputs import instance_reader
from tests.helpers import instance_yaml, wait_for, write


@pytest.fixture
def fast(tmp_path: Path) -> Iterator[tuple[InstanceFastPath, list[dict[str, str]], Path]]:
    published: list[dict[str, str]] = []
    root = tmp_path / "instances"
    root.mkdir()
    f = InstanceFastPath(str(root), published.append, max_bytes=1 << 20)
    f.start()
    yield f, published, root
    f.stop()


def pass_read(root: Path, f: InstanceFastPath) -> dict[str, str]:
    """What a pass does: read the dir with the daemon's reader, hand it over."""
    items = instance_reader(max_bytes=1 << 20).read([Source(str(root), 0)]).items
    return f.baseline(items)


def test_a_change_is_published_before_any_pass(fast: tuple[InstanceFastPath, list[dict[str, str]], Path]) -> None:
    f, published, root = fast
    write(root / "vm.yaml", instance_yaml("vm", "10.0.0.1"))
    write(root / "other.yaml", instance_yaml("other", "10.0.0.9"))
    assert pass_read(root, f) == {"vm": "10.0.0.1", "other": "10.0.0.9"}
    write(root / "vm.yaml", instance_yaml("vm", "10.0.0.2"))
    f.changed(str(root / "vm.yaml"))
    wait_for(lambda: published[-1] == {"vm": "10.0.0.2", "other": "10.0.0.9"}, timeout=5, message="fast publish")
    # a pass that read before the change hands over the old version: the newer one read here stays
    items_before = [i for i in instance_reader(max_bytes=1 << 20).read([Source(str(root), 0)]).items
                    if i.name == "other"]
    assert f.baseline(items_before) == {"vm": "10.0.0.2", "other": "10.0.0.9"}
    write(root / "vm.yaml", instance_yaml("vm", "10.0.0.2", state="Stopped"))
    f.changed(str(root / "vm.yaml"))
    wait_for(lambda: published[-1] == {"other": "10.0.0.9"}, timeout=5, message="stopped: no address")
    (root / "other.yaml").unlink()
    f.changed(str(root / "other.yaml"))
    wait_for(lambda: published[-1] == {}, timeout=5, message="removed")


def test_what_the_pass_must_decide_is_left_to_it(fast: tuple[InstanceFastPath, list[dict[str, str]], Path],
                                                 tmp_path: Path) -> None:
    f, published, root = fast
    write(root / "vm.yaml", instance_yaml("vm", "10.0.0.1"))
    pass_read(root, f)
    n = len(published)
    write(root / "vm.yaml", "name: vm\nip: not-an-ip\n")  # invalid: the pass keeps its last good version
    f.changed(str(root / "vm.yaml"))
    write(root / ".hidden.yaml", instance_yaml("x", "10.0.0.5"))  # ignored names
    f.changed(str(root / ".hidden.yaml"))
    write(tmp_path / "elsewhere.yaml", instance_yaml("y", "10.0.0.6"))  # not in the dir
    f.changed(str(tmp_path / "elsewhere.yaml"))
    write(root / "sub" / "deep.yaml", instance_yaml("z", "10.0.0.7"))  # nested: the pass reads it
    f.changed(str(root / "sub" / "deep.yaml"))
    write(root / "ok.yaml", instance_yaml("ok", "10.0.0.8"))  # (a valid one last: everything before is done)
    f.changed(str(root / "ok.yaml"))
    wait_for(lambda: len(published) > n and "ok" in published[-1], timeout=5, message="the valid change")
    assert published[-1] == {"vm": "10.0.0.1", "ok": "10.0.0.8"}


def test_the_status_table_shows_the_responder() -> None:
    from reconciler.statustable import caddy_lines

    up = {"running": True, "pid": 7, "restarts": 1, "records": 3, "listen": "127.0.0.1:5354", "in_sync": True}
    assert caddy_lines({"responder": up}) == ["responder:      running, pid 7, restarts 1, 3 names on 127.0.0.1:5354"]
    down = {**up, "running": False, "state": "down", "in_sync": False, "last_error": "DNS responder exited"}
    assert caddy_lines({"responder": down}) == [
        "responder:      NOT RUNNING (down), pid 7, restarts 1, 3 names on 127.0.0.1:5354, NOT IN SYNC",
        "responder error: DNS responder exited"]


def test_nothing_is_published_before_the_first_pass(fast: tuple[InstanceFastPath, list[dict[str, str]], Path]
                                                     ) -> None:
    """A restarted reconciler: the responder answers from its snapshot; one changed file is not the zone."""
    f, published, root = fast
    write(root / "other.yaml", instance_yaml("other", "10.0.0.9"))
    write(root / "vm.yaml", instance_yaml("vm", "10.0.0.2"))
    f.changed(str(root / "vm.yaml"))
    write(root / "marker.yaml", instance_yaml("marker", "10.0.0.3"))
    f.changed(str(root / "marker.yaml"))
    wait_for(lambda: not f._pending, timeout=5, message="events taken")
    f.stop()  # (joins the thread: whatever it was doing with them is done)
    assert published == []
    assert pass_read(root, f) == {"vm": "10.0.0.2", "other": "10.0.0.9", "marker": "10.0.0.3"}
