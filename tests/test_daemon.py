"""The convergence loop end to end: ``hypeman-ingress run`` drives a real Caddy; real backends and requests.

Every test starts its own daemon (own data dir, free admin/HTTP ports) and polls for the outcome with a
deadline; nothing sleeps "long enough".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import (
    ROOT,
    Backend,
    CaddyProcess,
    Daemon,
    count_loads,
    free_port,
    free_udp_port,
    get,
    ingress_yaml,
    instance_yaml,
    kill_pid,
    routed_to,
    status_of,
    wait_for,
    write,
)

pytestmark = pytest.mark.caddy

DaemonFactory = Callable[..., Daemon]
BackendFactory = Callable[[str], Backend]


# -- local helpers -------------------------------------------------------------------------------------

@pytest.fixture
def addr_backends() -> Iterator[Callable[[str, str, int], Backend]]:
    """Backends bound to a chosen loopback address and port (e.g. ``127.0.0.2:<port of another>``)."""
    started: list[Backend] = []

    def make(name: str, host: str, port: int) -> Backend:
        b = Backend(name, host=host, port=port)
        started.append(b)
        return b

    yield make
    for b in started:
        b.close()


def pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def admin_url(d: Daemon) -> str:
    return f"http://127.0.0.1:{d.admin_port}"


def live_config(d: Daemon) -> Any:
    return httpx.get(admin_url(d) + "/config/", timeout=5).json()


def passes_since(d: Daemon, n: int) -> list[dict[str, Any]]:
    return d.log_events("reconcile.finished")[n:]


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def setup_sources(tmp: Path, instance_ip: str = "127.0.0.1") -> tuple[Path, Path]:
    manifests, instances = tmp / "manifests", tmp / "instances"
    write(instances / "vms.yaml", instance_yaml("vm", instance_ip))
    manifests.mkdir(parents=True, exist_ok=True)
    return manifests, instances


def serve_web(tmp: Path, daemon_factory: DaemonFactory, backend: Backend,
              **kwargs: Any) -> tuple[Daemon, Path, Path, int]:
    """The common start: ``web.test`` on a fresh port -> ``backend``, the daemon running, the route live."""
    manifests, instances = setup_sources(tmp)
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", backend.port))
    d = daemon_factory(manifests=[manifests], instances=instances, **kwargs).start()
    wait_for(lambda: routed_to(port, "web.test", backend.name), timeout=10, message="routed")
    return d, manifests, instances, port


# -- file -> route --------------------------------------------------------------------------------------

def test_manifest_drop_edit_delete_and_instance_ip_change(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory,
        addr_backends: Callable[[str, str, int], Backend]) -> None:
    a, b = backends("a"), backends("b")
    c = addr_backends("c", "127.0.0.2", b.port)  # same port as b, other loopback address
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    # a second ingress on the same port keeps the server up, so a deleted host answers 404
    write(manifests / "keep.yaml", ingress_yaml("keep", "keep.test", port, "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances).start()
    wait_for(lambda: routed_to(port, "keep.test", "a"), timeout=10, message="keep.test routed")
    assert status_of(port, "web.test") == 404

    # dropped in: served within 2 s
    t0 = time.monotonic()
    web = write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=2.0, message="new manifest served")
    assert time.monotonic() - t0 <= 2.0

    # edited: re-routed to another backend
    write(web, ingress_yaml("web", "web.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=2.0, message="edited manifest re-routed")
    assert routed_to(port, "keep.test", "a")

    # instance IP changed in the instances dir: re-routed, manifests untouched
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in manifests.iterdir()}
    write(instances / "vms.yaml", instance_yaml("vm", "127.0.0.2"))
    wait_for(lambda: routed_to(port, "web.test", "c"), timeout=2.0, message="re-routed by instance IP")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in manifests.iterdir()} == before
    refused = get(port, "keep.test")  # keep -> 127.0.0.2:<a.port>: nothing listens there
    assert refused.status_code == 503 and '"vm" does not accept connections' in refused.text, refused.text
    assert c.port == b.port

    # deleted: 404 (the fallback names the unmatched host); the other ingress is still routed
    write(instances / "vms.yaml", instance_yaml("vm", "127.0.0.1"))
    wait_for(lambda: routed_to(port, "keep.test", "a"), timeout=2.0, message="instance IP back")
    web.unlink()
    wait_for(lambda: status_of(port, "web.test") == 404, timeout=2.0, message="deleted manifest -> 404")
    assert "no ingress for host web.test" in get(port, "web.test").text
    assert routed_to(port, "keep.test", "a")
    assert not [e for e in d.log_events("reconcile.finished") if e.get("outcome") not in ("applied",
                                                                                          "unchanged")]


def test_git_sync_symlink_swap(tmp_path: Path, daemon_factory: DaemonFactory,
                               backends: BackendFactory) -> None:
    """git-sync layout: ``repo/current -> .worktrees/<rev>``; a new revision is checked out next to the
    old one, a new link is renamed over ``current`` (atomic), and the old worktree is deleted."""
    a, b = backends("a"), backends("b")
    _, instances = setup_sources(tmp_path)
    port = free_port()
    repo = tmp_path / "repo"
    link = repo / "current"

    def checkout(rev: str, files: dict[str, str]) -> Path:
        tree = repo / ".worktrees" / rev
        for name, text in files.items():
            write(tree / name, text)
        return tree

    def swap(rev: str) -> None:
        tmp_link = repo / f".current-{rev}.tmp"
        os.symlink(os.path.join(".worktrees", rev), tmp_link)
        os.rename(tmp_link, link)

    checkout("rev1", {"apps/app.yaml": ingress_yaml("app", "app.test", port, "vm", a.port)})
    swap("rev1")
    d = daemon_factory(manifests=[link], instances=instances).start()
    wait_for(lambda: routed_to(port, "app.test", "a"), timeout=10, message="rev1 served")

    # rev2: app re-targeted, a new ingress added; swap the link, delete rev1
    checkout("rev2", {"apps/app.yaml": ingress_yaml("app", "app.test", port, "vm", b.port),
                      "apps/new.yaml": ingress_yaml("new", "new.test", port, "vm", a.port)})
    swap("rev2")
    shutil.rmtree(repo / ".worktrees" / "rev1")
    wait_for(lambda: routed_to(port, "app.test", "b") and routed_to(port, "new.test", "a"),
             timeout=3.0, message="rev2 served after the swap")

    # the watch followed the link: a change inside the new target is seen too
    write(repo / ".worktrees" / "rev2" / "apps" / "more.yaml",
          ingress_yaml("more", "more.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "more.test", "b"), timeout=3.0, message="change inside rev2 seen")

    # and a second swap (rev3 drops 'new') is picked up as well
    checkout("rev3", {"apps/app.yaml": ingress_yaml("app", "app.test", port, "vm", a.port)})
    swap("rev3")
    shutil.rmtree(repo / ".worktrees" / "rev2")
    wait_for(lambda: routed_to(port, "app.test", "a") and status_of(port, "new.test") == 404
             and status_of(port, "more.test") == 404, timeout=3.0, message="rev3 served")
    assert not d.log_events("input.problem")


def test_replaced_folders_are_watched_again(tmp_path: Path, daemon_factory: DaemonFactory,
                                            backends: BackendFactory) -> None:
    """A watched folder replaced by another one at the same path -- a new folder renamed into place (the
    old one kept aside), or the folder deleted and re-created -- must be watched again: changes written
    into the new folder afterwards are seen (resync is 30 s, far beyond the deadlines)."""
    a, b = backends("a"), backends("b")
    _d, manifests, instances, port = serve_web(tmp_path, daemon_factory, a)

    # manifests: a new folder renamed into place, the old one moved aside (still exists)
    staging = tmp_path / "manifests.new"
    write(staging / "web.yaml", ingress_yaml("web", "web.test", port, "vm", b.port))
    os.rename(manifests, tmp_path / "manifests.bak")
    os.rename(staging, manifests)
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=3, message="replaced manifests dir read")
    write(manifests / "two.yaml", ingress_yaml("two", "two.test", port, "vm", a.port))
    wait_for(lambda: routed_to(port, "two.test", "a"), timeout=3, message="file added to the new dir")

    # instances: deleted and re-created empty (every rule -> 503), then an instance file appears in it
    shutil.rmtree(instances)
    instances.mkdir()
    wait_for(lambda: status_of(port, "web.test") == 503 and status_of(port, "two.test") == 503,
             timeout=3, message="instances gone -> 503")
    write(instances / "vms.yaml", instance_yaml("vm", "127.0.0.1"))
    wait_for(lambda: routed_to(port, "web.test", "b") and routed_to(port, "two.test", "a"),
             timeout=3, message="instance file in the re-created dir seen")


def test_invalid_file_is_reported_and_everything_else_keeps_serving(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    write(manifests / "one.yaml", ingress_yaml("one", "one.test", port, "vm", a.port))
    write(manifests / "team" / "two.yaml", ingress_yaml("two", "two.test", port, "vm", b.port))
    d = daemon_factory(manifests=[manifests], instances=instances).start()
    wait_for(lambda: routed_to(port, "one.test", "a") and routed_to(port, "two.test", "b"),
             timeout=10, message="initial routes")
    loads = count_loads(d.caddy_log)
    assert not d.log_events("input.problem")

    bad = write(manifests / "team" / "broken.yaml", "name: broken\nrules:\n  - match: {hostname: [oops\n")
    wait_for(lambda: any("broken.yaml" in str(e.get("file")) for e in d.log_events("input.problem")),
             timeout=3.0, message="input.problem naming broken.yaml")
    [problem] = [e for e in d.log_events("input.problem") if "broken.yaml" in str(e.get("file"))]
    assert problem["file"] == str(bad)
    assert problem["level"] == "warning"
    assert routed_to(port, "one.test", "a") and routed_to(port, "two.test", "b")
    # the broken file changed nothing that is live
    assert count_loads(d.caddy_log) == loads

    # a valid file added while the broken one is still there is applied; the rest keeps serving
    write(manifests / "three.yaml", ingress_yaml("three", "three.test", port, "vm", a.port))
    wait_for(lambda: routed_to(port, "three.test", "a"), timeout=3.0, message="valid file next to a bad one")
    assert routed_to(port, "one.test", "a") and routed_to(port, "two.test", "b")
    # reported once, not on every pass
    assert len([e for e in d.log_events("input.problem") if "broken.yaml" in str(e.get("file"))]) == 1

    # fixing it resolves the problem
    write(bad, ingress_yaml("broken", "fixed.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "fixed.test", "b"), timeout=3.0, message="fixed file served")
    wait_for(lambda: d.log_events("input.problem_resolved"), timeout=3.0, message="problem resolved")


# -- Caddy and reconciler failures -------------------------------------------------------------------

def test_caddy_sigkill_is_restarted(tmp_path: Path, daemon_factory: DaemonFactory,
                                    backends: BackendFactory) -> None:
    a = backends("a")
    d, manifests, _instances, port = serve_web(tmp_path, daemon_factory, a)
    old = d.caddy_pid()
    assert old is not None and pid_running(old)

    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_running(old), timeout=5, message="old Caddy gone")
    new = wait_for(lambda: (pid := d.caddy_pid()) != old and pid is not None and pid_running(pid) and pid,
                   timeout=10, message="new Caddy PID in caddy.pid")
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed again after restart")
    assert d.log_events("caddy.died")
    assert any(e.get("pid") == new for e in d.log_events("caddy.started"))
    # the daemon keeps converging on the new Caddy
    b = backends("b")
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=3, message="edits applied to the new Caddy")
    assert d.proc is not None and d.proc.poll() is None


def test_caddy_restart_when_its_last_config_cannot_start(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """Caddy is gone (killed while the reconciler was down, or a reboot) and another process took a port
    of the last applied config, so Caddy cannot start with that config. The reconciler must bring Caddy up
    anyway, report the rejected load, and converge once the offending manifest is fixed -- not crash-loop
    with every route down."""
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port, taken = free_port(), free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    write(manifests / "other.yaml", ingress_yaml("other", "other.test", taken, "vm", a.port))
    d1 = daemon_factory(manifests=[manifests], instances=instances).start()
    wait_for(lambda: routed_to(port, "web.test", "a") and routed_to(taken, "other.test", "a"),
             timeout=10, message="routed")
    old = d1.caddy_pid()
    assert old is not None
    assert d1.stop() == 0
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_running(old), timeout=5, message="Caddy gone")

    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: our earlier requests may leave TIME_WAIT entries on the port; without SO_REUSEPORT
    # this listener still keeps Caddy's out
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def take_port() -> bool:  # the killed Caddy's other threads may still hold the port for a moment
        try:
            squatter.bind(("127.0.0.1", taken))
        except OSError:
            return False
        return True

    try:
        wait_for(take_port, timeout=5, message=f"port {taken} free to take")
        squatter.listen()
        n = d1.passes()
        d2 = daemon_factory(manifests=[manifests], instances=instances, data_dir=d1.data_dir,
                            admin_port=d1.admin_port,
                            env={"CADDY_HTTP_PORT": d1.env["CADDY_HTTP_PORT"],
                                 "CADDY_HTTPS_PORT": d1.env["CADDY_HTTPS_PORT"],
                                 "HYPEMAN_DNS_PORT": d1.env["HYPEMAN_DNS_PORT"]})
        d2.start(wait_ready=False)
        wait_for(lambda: d2.passes() > n, timeout=30, message="first pass of the new reconciler")
        new = d2.caddy_pid()
        assert new is not None and new != old and pid_running(new)
        assert httpx.get(admin_url(d2) + "/config/", timeout=5).status_code == 200
        assert d2.log_events("caddy.start_fallback")
        [first] = passes_since(d2, n)[:1]
        # rejection isolation: only the ingress on the taken port is left out, the rest is served at once
        assert first["outcome"] == "partial" and first.get("rejected") == ["other"], first
        assert str(taken) in first["error"], first
        wait_for(lambda: routed_to(port, "web.test", "a"), timeout=5, message="the innocent ingress served")
        # the operator removes the ingress on the taken port: the pass converges fully
        n = d2.passes()
        (manifests / "other.yaml").unlink()
        wait_for(lambda: any(p["outcome"] in ("applied", "unchanged") for p in passes_since(d2, n)),
                 timeout=5, message="a clean pass after the fix")
        assert routed_to(port, "web.test", "a")
        assert d2.caddy_pid() == new
        assert d2.stop() == 0
    finally:
        squatter.close()


def test_out_of_band_load_is_corrected_at_next_resync(tmp_path: Path, daemon_factory: DaemonFactory,
                                                      backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    d, _manifests, _instances, port = serve_web(tmp_path, daemon_factory, a, resync=1)
    desired = live_config(d)

    # somebody loads another config by hand: web.test -> b, plus a rogue host
    drift = json.loads(json.dumps(desired))
    routes = drift["apps"]["http"]["servers"][f"ingress-{port}"]["routes"]
    routes[0]["handle"][0]["upstreams"] = [{"dial": f"127.0.0.1:{b.port}"}]
    routes.insert(0, {"match": [{"host": ["rogue.test"]}],
                      "handle": [{"handler": "static_response", "body": "rogue"}], "terminal": True})
    n = d.passes()
    r = httpx.post(admin_url(d) + "/load", json=drift, timeout=10)
    assert r.status_code == 200, r.text
    assert live_config(d) != desired or d.passes() > n  # the drift landed (or was already corrected)

    wait_for(lambda: routed_to(port, "web.test", "a") and status_of(port, "rogue.test") == 404,
             timeout=5, message="drift corrected")
    wait_for(lambda: live_config(d) == desired, timeout=5, message="live config back to desired")
    fixes = [e for e in passes_since(d, n) if e.get("outcome") == "applied"]
    assert fixes and fixes[0]["trigger"] == "resync"


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_restarted_reconciler_adopts_running_caddy_without_reloading(
        how: str, tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    d1 = daemon_factory(manifests=[manifests], instances=instances)
    d1.start()
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed")
    pid = d1.caddy_pid()
    loads = count_loads(d1.caddy_log)
    assert loads >= 1

    if how == "SIGTERM":
        assert d1.stop() == 0
    else:  # the reconciler crashes
        assert d1.proc is not None
        d1.proc.kill()
        assert d1.proc.wait(timeout=10) == -signal.SIGKILL
        d1.proc = None
    assert pid is not None and pid_running(pid)
    assert routed_to(port, "web.test", "a")  # Caddy outlives the reconciler

    n = d1.passes()
    d2 = daemon_factory(manifests=[manifests], instances=instances, data_dir=d1.data_dir,
                        admin_port=d1.admin_port, resync=1,
                        env={"CADDY_HTTP_PORT": d1.env["CADDY_HTTP_PORT"],
                             "CADDY_HTTPS_PORT": d1.env["CADDY_HTTPS_PORT"],
                             "HYPEMAN_DNS_PORT": d1.env["HYPEMAN_DNS_PORT"]})
    d2.start(wait_ready=False)
    # the first pass of the new daemon plus two resyncs
    wait_for(lambda: d2.passes() >= n + 3, timeout=15, message="passes of the restarted reconciler")
    assert d2.caddy_pid() == pid
    assert [e["pid"] for e in d2.log_events("caddy.adopted")] == [pid]
    assert not [e for e in d2.log_events("caddy.started") if e.get("pid") != pid]
    assert [e["outcome"] for e in passes_since(d2, n)][:3] == ["unchanged"] * 3
    assert count_loads(d2.caddy_log) == loads
    assert routed_to(port, "web.test", "a")

    # still in charge: a change is applied to the adopted Caddy
    b = backends("b")
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=3, message="change applied after adoption")
    assert d2.caddy_pid() == pid
    assert d2.stop() == 0


def test_idle_resyncs_do_not_reload(tmp_path: Path, daemon_factory: DaemonFactory,
                                    backends: BackendFactory) -> None:
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    write(manifests / "other.yaml", ingress_yaml("other", "other.test", free_port(), "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances, resync=1).start()
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed")
    n = d.passes()
    loads = count_loads(d.caddy_log)
    wait_for(lambda: len([e for e in passes_since(d, n) if e.get("trigger") == "resync"]) >= 4,
             timeout=15, message=">= 4 resync passes")
    assert count_loads(d.caddy_log) == loads
    assert {e["outcome"] for e in passes_since(d, n)} == {"unchanged"}
    assert routed_to(port, "web.test", "a")


def test_burst_of_1000_manifests(tmp_path: Path, daemon_factory: DaemonFactory,
                                 backends: BackendFactory) -> None:
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    d = daemon_factory(manifests=[manifests], instances=instances).start()
    n = d.passes()
    loads = count_loads(d.caddy_log)
    hosts = [f"h{i:04d}.burst.test" for i in range(1000)]
    for i, host in enumerate(hosts):
        write(manifests / f"{i % 10}" / f"ing-{i:04d}.yaml", ingress_yaml(f"ing-{i:04d}", host, port, "vm",
                                                                          a.port))
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5, trust_env=False) as client:

        def routed(host: str) -> bool:
            try:
                r = client.get("/", headers={"Host": host})
            except httpx.HTTPError:
                return False
            return r.status_code == 200 and r.text.startswith("backend=a ")

        # A pass may scan one sub-folder before the burst reached it and another after: the watch events
        # of the late files bring a next pass. Poll until every host is routed (each checked until it is).
        missing = list(hosts)

        def all_routed() -> bool:
            missing[:] = [h for h in missing if not routed(h)]
            return not missing

        wait_for(all_routed, timeout=30, message="burst applied")
    # every pass since reads the same files: no further load can happen
    assert count_loads(d.caddy_log) - loads <= 3
    assert len([e for e in passes_since(d, n) if e.get("outcome") == "applied"]) <= 3
    assert not d.log_events("input.problem")
    # each ingress went live once: a line each, or (over 200 in one pass) counted in one summary per pass
    summaries = d.log_events("ingress.states")
    singles = [e for e in d.log_events("ingress.state") if e.get("ingress", "").startswith("ing-")]
    assert all(e["changed"] > 200 and e["reasons"] == {"Applied": e["changed"]} for e in summaries)
    assert sum(e["changed"] for e in summaries) + len(singles) == 1000


def _children(pid: int) -> list[str]:
    """Command lines of the live processes whose parent is ``pid``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    return out


def test_cold_start_shares_parsing_with_a_helper_that_then_exits(tmp_path: Path, daemon_factory: DaemonFactory,
                                                                backends: BackendFactory) -> None:
    from reconciler.sources.inputs import HELPER_MIN_FILES

    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    n = max(2000, HELPER_MIN_FILES + 100)  # a read long enough for the helper to take part on a busy machine
    for i in range(n):
        write(manifests / f"{i % 10}" / f"ing-{i:04d}.yaml", ingress_yaml(f"ing-{i:04d}", f"h{i}.cold.test", port,
                                                                          "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances).start()
    [first] = d.log_events("reconcile.finished")[:1]
    assert first["outcome"] == "applied"
    [prefetched] = d.log_events("inputs.prefetched")
    assert prefetched["files"] == n + 1  # and the instances file
    assert 0 < prefetched["by_helper"] < n
    assert not d.log_events("parse_helper.failed")
    [done] = wait_for(lambda: d.log_events("parse_helper.done"), timeout=10, message="helper reaped")
    assert done["peak_rss_mb"] > 1
    assert all(routed_to(port, f"h{i}.cold.test", "a") for i in (0, n // 2, n - 1))
    assert d.proc is not None
    # the helper is gone once the first read is done: only Caddy and the DNS responder are left as children
    wait_for(lambda: all("caddy" in c or "reconciler.responder" in c for c in _children(d.proc.pid)), timeout=10,
             message="helper exited")
    assert d.caddy_pid() is not None


# -- CLI ------------------------------------------------------------------------------------------------

def test_diff_exit_codes_and_apply_converges_bare_caddy(tmp_path: Path, caddy: CaddyProcess,
                                                        backends: BackendFactory) -> None:
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    env = {**os.environ, "CADDY_ADMIN_PORT": str(caddy.admin_port), "CADDY_LISTEN_ADDRESS": "127.0.0.1",
           "CADDY_HTTP_PORT": str(free_port()), "CADDY_HTTPS_PORT": str(free_port()),
           "HYPEMAN_DNS_PORT": str(free_udp_port())}
    args = ["--data-dir", str(tmp_path / "data"), "--manifests", str(manifests),
            "--instances", str(instances)]
    try:
        _diff_and_apply(env, args, caddy, port, manifests, a)
    finally:  # apply starts the DNS responder (detached, as the daemon does): stopped here
        with contextlib.suppress(OSError, ValueError):
            kill_pid(int((tmp_path / "data" / "dns" / "responder.pid").read_text()))


def _diff_and_apply(env: dict[str, str], args: list[str], caddy: CaddyProcess, port: int, manifests: Path,
                    a: Backend) -> None:

    r = cli("diff", *args, env=env)
    assert r.returncode == 1, r.stderr
    assert "ingress.web.rule-0" in r.stdout
    assert count_loads(caddy.log_path) == 0  # diff only reads

    r = cli("apply", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("applied")
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=5, message="routed after apply")  # (through the
    # responder apply started)
    assert status_of(port, "nope.test") == 404
    loads = count_loads(caddy.log_path)
    assert loads == 1

    r = cli("diff", *args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout == ""

    r = cli("apply", *args, env=env)  # converged already: no second load
    assert r.returncode == 0 and r.stdout.startswith("unchanged"), r.stdout + r.stderr
    assert count_loads(caddy.log_path) == loads

    write(manifests / "more.yaml", ingress_yaml("more", "more.test", port, "vm", a.port))
    r = cli("diff", *args, env=env)
    assert r.returncode == 1
    assert "ingress.more.rule-0" in r.stdout and "ingress.web" not in r.stdout

    dead = {**env, "CADDY_ADMIN_PORT": str(free_port())}
    r = cli("diff", *args, env=dead)
    assert r.returncode == 2
    assert "error" in r.stderr and "unreachable" in r.stderr
    r = cli("apply", *args, env=dead)
    assert r.returncode == 1


def test_diff_against_a_running_daemon(tmp_path: Path, daemon_factory: DaemonFactory,
                                       backends: BackendFactory) -> None:
    a = backends("a")
    d, manifests, instances, port = serve_web(tmp_path, daemon_factory, a)
    args = ["--data-dir", str(d.data_dir), "--manifests", str(manifests), "--instances", str(instances)]
    r = cli("diff", *args, env=d.env)
    assert r.returncode == 0, r.stdout + r.stderr
    extra = tmp_path / "extra"
    write(extra / "x.yaml", ingress_yaml("x", "x.test", port, "vm", a.port))
    r = cli("diff", *args, "--manifests", str(extra), env=d.env)
    assert r.returncode == 1
    assert "ingress.x.rule-0" in r.stdout


# -- shutdown -------------------------------------------------------------------------------------------

def test_sigterm_leaves_caddy_serving_by_default(tmp_path: Path, daemon_factory: DaemonFactory,
                                                 backends: BackendFactory) -> None:
    a = backends("a")
    d, _manifests, _instances, port = serve_web(tmp_path, daemon_factory, a)
    pid = d.caddy_pid()
    assert d.stop() == 0
    [stopped] = d.log_events("daemon.stopped")
    assert stopped["caddy_stopped"] is False
    assert pid is not None and pid_running(pid)
    assert routed_to(port, "web.test", "a")


def test_sigterm_with_stop_on_shutdown_stops_caddy(tmp_path: Path, daemon_factory: DaemonFactory,
                                                   backends: BackendFactory) -> None:
    a = backends("a")
    d, _manifests, _instances, port = serve_web(tmp_path, daemon_factory, a,
                                                 env={"CADDY_STOP_ON_SHUTDOWN": "true"})
    pid = d.caddy_pid()
    assert pid is not None
    assert d.stop() == 0
    wait_for(lambda: not pid_running(pid), timeout=5, message="Caddy stopped")
    wait_for(lambda: status_of(port, "web.test") is None, timeout=5, message="nothing listens any more")
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(admin_url(d) + "/config/", timeout=1)
        pytest.fail("Caddy's admin API still answers")
    assert not (d.data_dir / "caddy" / "caddy.pid").exists()
    [stopped] = d.log_events("daemon.stopped")
    assert stopped["caddy_stopped"] is True


def test_api_address_in_use_stops_the_daemon_clearly(tmp_path: Path, daemon_factory: DaemonFactory) -> None:
    """The API starts while the first read runs: an API address someone else holds ends the daemon at
    start with a configuration error naming the address (exit 2), after a clean shutdown."""
    manifests, instances = setup_sources(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = f"127.0.0.1:{holder.getsockname()[1]}"
        d = daemon_factory(manifests=[manifests], instances=instances, env={"HYPEMAN_API_LISTEN": taken})
        d.start(wait_ready=False)
        assert d.proc is not None
        rc = d.proc.wait(timeout=60)
        assert rc == 2
        log = d.log_path.read_text()
        assert f"configuration error: the API could not listen on {taken}" in log
        assert d.log_events("daemon.stopped") and not d.log_events("reconcile.finished")
