"""Declarative semantics end to end, against a real Caddy: last-known-good, unavailable sources, rejection
isolation, missing instances, conflicts, status, revisions and the ``ingress.state`` events.

Every test runs the real daemon (``hypeman-ingress run``) as a subprocess with its own data dir and free
ports, sends real requests through Caddy to real loopback backends, and polls for outcomes with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    ROOT,
    Backend,
    Daemon,
    count_loads,
    free_port,
    get,
    ingress_yaml,
    instance_yaml,
    routed_to,
    status_of,
    wait_for,
    write,
)

pytestmark = pytest.mark.caddy

DaemonFactory = Callable[..., Daemon]
BackendFactory = Callable[[str], Backend]

SHA1 = "1111111111111111111111111111111111111111"
SHA2 = "2222222222222222222222222222222222222222"
SHA3 = "3333333333333333333333333333333333333333"
BROKEN = "name: web\nrules:\n  - match: {hostname: [oops\n"


# -- local helpers -------------------------------------------------------------------------------------

def status(d: Daemon) -> dict[str, Any]:
    """``{data}/state/status.json`` as the daemon last wrote it ({} before the first pass)."""
    try:
        return dict(json.loads((d.data_dir / "state" / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def ingress_status(d: Daemon, name: str) -> dict[str, Any] | None:
    return next((i for i in status(d).get("ingresses", []) if i.get("name") == name), None)


def reason_of(d: Daemon, name: str) -> str | None:
    st = ingress_status(d, name)
    return None if st is None else st.get("reason")


def source_status(d: Daemon, path: Path) -> dict[str, Any] | None:
    return next((s for s in status(d).get("sources", []) if s.get("path") == str(path)), None)


def revision(d: Daemon) -> tuple[str | None, str | None]:
    rev = status(d).get("revision") or {}
    return rev.get("last_attempted"), rev.get("last_applied")


def state_events(d: Daemon, name: str | None = None) -> list[dict[str, Any]]:
    return [e for e in d.log_events("ingress.state") if name is None or e.get("ingress") == name]


def reasons(d: Daemon, name: str) -> list[str]:
    return [str(e.get("reason")) for e in state_events(d, name)]


def expect_reasons(d: Daemon, name: str, expected: list[str], *, timeout: float = 3.0) -> None:
    """The ``ingress.state`` reasons logged for ``name`` become exactly ``expected``. (A pass loads Caddy,
    writes status.json, then logs its events: a route or status.json can be ahead of the log.)"""
    try:
        wait_for(lambda: reasons(d, name) == expected, timeout=timeout, message=f"ingress.state of {name}")
    except AssertionError:
        assert reasons(d, name) == expected
        raise


def passes_since(d: Daemon, n: int) -> list[dict[str, Any]]:
    return d.log_events("reconcile.finished")[n:]


def wait_resyncs(d: Daemon, count: int, *, timeout: float = 10.0) -> None:
    """Wait for ``count`` more periodic resync passes (nothing else triggers them)."""
    n = d.passes()
    wait_for(lambda: len([e for e in passes_since(d, n) if e.get("trigger") == "resync"]) >= count,
             timeout=timeout, message=f"{count} resync passes")


def cli_status(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", "status", "--data-dir", str(d.data_dir),
                           *args], cwd=str(ROOT), capture_output=True, text=True, timeout=60)


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def restarted(factory: DaemonFactory, d1: Daemon, **kwargs: Any) -> Daemon:
    """A second daemon on the same data dir, admin port and HTTP/HTTPS ports as ``d1``."""
    return factory(data_dir=d1.data_dir, admin_port=d1.admin_port,
                   env={"CADDY_HTTP_PORT": d1.env["CADDY_HTTP_PORT"],
                        "CADDY_HTTPS_PORT": d1.env["CADDY_HTTPS_PORT"],
                        "HYPEMAN_DNS_PORT": d1.env["HYPEMAN_DNS_PORT"]}, **kwargs)


def swap_link(link: Path, target: str) -> None:
    """git-sync's atomic ``--link`` update: a new symlink renamed over the old one."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    os.symlink(target, tmp)
    os.rename(tmp, link)


def setup_sources(tmp: Path) -> tuple[Path, Path]:
    manifests, instances = tmp / "manifests", tmp / "instances"
    write(instances / "vms.yaml", instance_yaml("vm"))
    manifests.mkdir(parents=True, exist_ok=True)
    return manifests, instances


# -- last known good ---------------------------------------------------------------------------------------

def test_broken_live_file_keeps_serving_as_stale_until_fixed_or_deleted(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    web = write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    write(manifests / "keep.yaml", ingress_yaml("keep", "keep.test", port, "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances, resync=1).start()
    wait_for(lambda: routed_to(port, "web.test", "a") and routed_to(port, "keep.test", "a"),
             timeout=10, message="routed")
    wait_for(lambda: reason_of(d, "web") == "Applied", timeout=5, message="web Applied in status.json")
    r0 = revision(d)
    assert r0[0] is not None and r0[0] == r0[1]
    r = cli_status(d)
    assert r.returncode == 0, r.stdout + r.stderr

    # nothing changes: resyncs neither move the revision nor log state changes nor reload
    loads = count_loads(d.caddy_log)
    events = len(state_events(d))
    wait_resyncs(d, 2)
    assert revision(d) == r0
    assert len(state_events(d)) == events
    assert count_loads(d.caddy_log) == loads

    # broken: the live routes keep serving; status says Stale with the error
    write(web, BROKEN)
    wait_for(lambda: reason_of(d, "web") == "Stale", timeout=5, message="web Stale")
    st = ingress_status(d, "web")
    assert st is not None and st["ready"] is False
    assert str(web) in st["message"] and "YAML syntax error" in st["message"]
    assert isinstance(st["stale_since"], float)
    assert st["hosts"] == [f"web.test:{port}"]
    assert routed_to(port, "web.test", "a") and routed_to(port, "keep.test", "a")
    assert count_loads(d.caddy_log) == loads  # the live config was not touched
    assert reason_of(d, "keep") == "Applied"
    r1 = revision(d)
    assert r1[0] != r0[0], "the inputs changed: a new revision was attempted"
    assert any(p["file"] == str(web) for p in status(d)["problems"])

    # the status command: JSON (what status.json says) and the table
    r = cli_status(d, "--output", "json")
    assert r.returncode == 1, r.stdout + r.stderr  # not every ingress is ready
    out = json.loads(r.stdout)
    assert out["ingresses"] == status(d)["ingresses"]
    assert out["revision"] == status(d)["revision"]
    [row] = [i for i in out["ingresses"] if i["name"] == "web"]
    assert row["reason"] == "Stale" and str(web) in row["message"]
    r = cli_status(d)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    [web_row] = [line for line in lines if line.startswith("web ")]
    assert web_row.split()[3:5] == ["no", "Stale"], web_row
    assert str(web) in web_row
    assert any(line.strip().startswith("web: serving the last valid version") and "YAML syntax error" in line
               for line in lines), r.stdout
    [keep_row] = [line for line in lines if line.startswith("keep ")]
    assert keep_row.split()[3:5] == ["yes", "Applied"], keep_row

    # still broken over resyncs: nothing new
    expect_reasons(d, "web", ["Applied", "Stale"])
    events = len(state_events(d))
    wait_resyncs(d, 2)
    assert revision(d) == r1 and len(state_events(d)) == events

    # fixed (to something else): the fix is applied
    write(web, ingress_yaml("web", "web.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=3, message="fix applied")
    wait_for(lambda: reason_of(d, "web") == "Applied", timeout=3, message="web Applied again")
    assert ingress_status(d, "web")["stale_since"] is None  # type: ignore[index]
    r2 = revision(d)
    assert r2[0] not in (r0[0], r1[0]) and r2[0] == r2[1]

    # deleted: its routes go, the rest stays
    web.unlink()
    wait_for(lambda: status_of(port, "web.test") == 404, timeout=3, message="deleted -> 404")
    assert routed_to(port, "keep.test", "a")
    wait_for(lambda: ingress_status(d, "web") is None, timeout=3, message="web gone from status")

    # one ingress.state event per change, none otherwise
    wait_resyncs(d, 1)
    assert reasons(d, "web") == ["Applied", "Stale", "Applied", "Removed"]
    assert [e.get("previous_reason") for e in state_events(d, "web")] == [None, "Applied", "Stale", "Applied"]
    assert reasons(d, "keep") == ["Applied"]
    stale_event = state_events(d, "web")[1]
    assert stale_event["level"] == "warning" and stale_event["file"] == str(web)


def test_restart_with_a_broken_file_and_caddy_gone_loses_no_route(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    good = ingress_yaml("web", "web.test", port, "vm", a.port)
    web = write(manifests / "web.yaml", good)
    write(manifests / "keep.yaml", ingress_yaml("keep", "keep.test", port, "vm", a.port))
    d1 = daemon_factory(manifests=[manifests], instances=instances).start()
    wait_for(lambda: routed_to(port, "web.test", "a") and routed_to(port, "keep.test", "a"),
             timeout=10, message="routed")
    write(web, BROKEN)
    wait_for(lambda: reason_of(d1, "web") == "Stale", timeout=5, message="web Stale")

    # the last good version is persisted under {data}/state
    lastgood = json.loads((d1.data_dir / "state" / "lastgood.json").read_text())
    assert lastgood["manifests"][str(manifests)]["web.yaml"]["text"] == good
    assert oct((d1.data_dir / "state" / "lastgood.json").stat().st_mode & 0o777) == "0o600"

    # the reconciler stops; then Caddy is killed while it is down
    assert d1.stop() == 0
    before = status(d1)
    [web_before] = [i for i in before["ingresses"] if i["name"] == "web"]
    assert web_before["reason"] == "Stale"
    old = d1.caddy_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_running(old), timeout=5, message="Caddy gone")
    wait_for(lambda: status_of(port, "web.test") is None, timeout=5, message="nothing listens")

    events = len(state_events(d1))
    n = d1.passes()
    d2 = restarted(daemon_factory, d1, manifests=[manifests], instances=instances)
    d2.start(wait_ready=False)
    wait_for(lambda: d2.passes() > n, timeout=30, message="first pass after the restart")
    new = d2.caddy_pid()
    assert new is not None and new != old and pid_running(new)
    # the first pass rebuilt everything from the persisted state: web is still served from its last good
    first = passes_since(d2, n)[0]
    assert first["outcome"] in ("applied", "unchanged"), first
    assert routed_to(port, "web.test", "a") and routed_to(port, "keep.test", "a")
    after = status(d2)
    [web_after] = [i for i in after["ingresses"] if i["name"] == "web"]
    assert web_after["reason"] == "Stale" and web_after["stale_since"] == web_before["stale_since"]
    assert web_after["message"] == web_before["message"]
    # status survived the restart: the history goes on from where it was
    assert after["history"][:len(before["history"])] == before["history"]
    assert len(after["history"]) == len(before["history"]) + len(passes_since(d2, n))
    # nothing changed for any ingress across the restart: no ingress.state event, the same revision
    assert len(state_events(d2)) == events
    assert (after["revision"]["last_attempted"], after["revision"]["last_applied"]) == \
        (before["revision"]["last_attempted"], before["revision"]["last_applied"])

    # and the restarted reconciler is in charge: the fix is applied
    write(web, ingress_yaml("web", "web.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=3, message="fix applied after restart")
    wait_for(lambda: reason_of(d2, "web") == "Applied", timeout=3, message="web Applied")
    wait_for(lambda: len(state_events(d2)) > events, timeout=3, message="an ingress.state event")
    assert [e["reason"] for e in state_events(d2)[events:]] == ["Applied"]


# -- Caddy rejection isolation ------------------------------------------------------------------------------

def test_port_held_by_a_foreign_process_rejects_only_its_ingresses(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port, other_port, taken = free_port(), free_port(), free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    write(manifests / "other.yaml", ingress_yaml("other", "other.test", other_port, "vm", a.port))
    write(manifests / "x1.yaml", ingress_yaml("x1", "x1.test", taken, "vm", a.port))
    write(manifests / "x2.yaml", ingress_yaml("x2", "x2.test", taken, "vm", a.port))
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEPORT: Caddy cannot share it
    try:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        d = daemon_factory(manifests=[manifests], instances=instances, resync=1).start()

        # one pass: partial, exactly the ingresses on the taken port rejected, everything else applied
        first = d.log_events("reconcile.finished")[0]
        assert first["trigger"] == "start"
        assert first["outcome"] == "partial", first
        assert first["rejected"] == ["x1", "x2"], first
        assert str(taken) in first["error"], first
        assert routed_to(port, "web.test", "a") and routed_to(other_port, "other.test", "a")
        wait_for(lambda: reason_of(d, "x1") == "CaddyRejected", timeout=5, message="x1 CaddyRejected")
        for name in ("x1", "x2"):
            st = ingress_status(d, name)
            assert st is not None and st["ready"] is False and st["reason"] == "CaddyRejected"
            assert str(taken) in st["message"] and "address already in use" in st["message"], st
        assert reason_of(d, "web") == "Applied" and reason_of(d, "other") == "Applied"
        assert str(taken) in status(d)["last_error"]

        # the port stays taken across resyncs: the same answer, no new state events
        wait_resyncs(d, 2)
        assert reasons(d, "x1") == ["CaddyRejected"] and reasons(d, "x2") == ["CaddyRejected"]
        assert routed_to(port, "web.test", "a")
        n = d.passes()
    finally:
        squatter.close()

    # the port is freed: the next resync applies them
    wait_for(lambda: routed_to(taken, "x1.test", "a") and routed_to(taken, "x2.test", "a"),
             timeout=5, message="x1/x2 served once the port is free")
    applied = wait_for(lambda: [e for e in passes_since(d, n) if e["outcome"] == "applied"], timeout=3,
                       message="the applied pass logged")
    assert applied[0]["trigger"] == "resync", passes_since(d, n)
    assert "rejected" not in applied[0]
    wait_for(lambda: reason_of(d, "x1") == "Applied" and reason_of(d, "x2") == "Applied",
             timeout=3, message="x1/x2 Applied")
    expect_reasons(d, "x1", ["CaddyRejected", "Applied"])
    assert reasons(d, "web") == ["Applied"]
    assert routed_to(port, "web.test", "a") and routed_to(other_port, "other.test", "a")


def test_rejected_ingress_is_retried_when_its_manifest_changes(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """A port held by a foreign process: its ingress is CaddyRejected. Other changes do not retry it (its
    inputs are the same: it stays out without a new rejected load); moving its manifest to a free port
    applies it in the pass of that change -- no resync (one hour away) needed."""
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port, taken, free = free_port(), free_port(), free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    x = write(manifests / "x.yaml", ingress_yaml("x", "x.test", taken, "vm", a.port))
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEPORT: Caddy cannot share it
    try:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        d = daemon_factory(manifests=[manifests], instances=instances, resync=3600).start()
        first = d.log_events("reconcile.finished")[0]
        assert (first["outcome"], first["rejected"]) == ("partial", ["x"]), first
        wait_for(lambda: reason_of(d, "x") == "CaddyRejected", timeout=5, message="x CaddyRejected")
        assert routed_to(port, "web.test", "a")

        # an unrelated change: x's inputs are the same, so it stays out without being tried again
        n = d.passes()
        write(manifests / "more.yaml", ingress_yaml("more", "more.test", port, "vm", a.port))
        wait_for(lambda: routed_to(port, "more.test", "a"), timeout=5, message="more routed")
        wait_for(lambda: any(e.get("loads") for e in passes_since(d, n)), timeout=5, message="the pass logged")
        since = passes_since(d, n)
        assert {(e["trigger"], e["outcome"], tuple(e["rejected"])) for e in since} == {("watch", "partial", ("x",))}
        assert sum(e.get("loads", 0) for e in since) == 1, since  # one load: no rejected try, no bisection
        assert reason_of(d, "x") == "CaddyRejected"

        # its manifest moves to a free port: retried and applied by the pass of that change
        n = d.passes()
        write(x, ingress_yaml("x", "x.test", free, "vm", a.port))
        wait_for(lambda: routed_to(free, "x.test", "a"), timeout=5, message="x routed on the free port")
        applied = wait_for(lambda: [e for e in passes_since(d, n) if e["outcome"] == "applied"], timeout=3,
                           message="the applied pass logged")
        assert {e["trigger"] for e in passes_since(d, n)} == {"watch"}, passes_since(d, n)
        assert "rejected" not in applied[0]
        wait_for(lambda: reason_of(d, "x") == "Applied", timeout=3, message="x Applied")
        expect_reasons(d, "x", ["CaddyRejected", "Applied"])
        assert routed_to(port, "web.test", "a") and routed_to(port, "more.test", "a")
        assert status(d)["last_error"] is None
    finally:
        squatter.close()


# -- instances -------------------------------------------------------------------------------------------

def test_instance_appearing_later_and_stopping(tmp_path: Path, daemon_factory: DaemonFactory,
                                               backends: BackendFactory) -> None:
    a = backends("a")
    manifests, instances = setup_sources(tmp_path)
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "late-vm", a.port))
    write(manifests / "keep.yaml", ingress_yaml("keep", "keep.test", port, "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances).start()
    wait_for(lambda: routed_to(port, "keep.test", "a"), timeout=10, message="keep routed")

    # the instance does not exist yet: 503 naming it
    wait_for(lambda: status_of(port, "web.test") == 503, timeout=5, message="503 for a missing instance")
    assert "late-vm" in get(port, "web.test").text
    wait_for(lambda: reason_of(d, "web") == "InstanceNotFound", timeout=3, message="InstanceNotFound")
    assert "late-vm" in ingress_status(d, "web")["message"]  # type: ignore[index]

    # it appears: routed, without any other action
    write(instances / "late.yaml", instance_yaml("late-vm"))
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=3, message="routed once the instance exists")
    wait_for(lambda: reason_of(d, "web") == "Applied", timeout=3, message="Applied")

    # it stops: 503 again, InstanceNotRunning
    write(instances / "late.yaml", instance_yaml("late-vm", state="Stopped"))
    wait_for(lambda: status_of(port, "web.test") == 503, timeout=3, message="503 for a stopped instance")
    body = get(port, "web.test").text
    assert '"late-vm" is not running' in body
    wait_for(lambda: reason_of(d, "web") == "InstanceNotRunning", timeout=3, message="InstanceNotRunning")
    assert "Stopped" in ingress_status(d, "web")["message"]  # type: ignore[index]  # the status says why
    assert routed_to(port, "keep.test", "a")
    expect_reasons(d, "web", ["InstanceNotFound", "Applied", "InstanceNotRunning"])
    assert reasons(d, "keep") == ["Applied"]


# -- unavailable sources ---------------------------------------------------------------------------------------

def test_unmounted_sources_keep_routes_and_an_emptied_one_is_honoured(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """Resync stays at 30 s: each change here is one burst of file-system events, read after the debounce,
    so a pass never sees a half-removed directory."""
    a = backends("a")
    _, instances = setup_sources(tmp_path)
    port = free_port()
    mnt = tmp_path / "mnt"
    write(mnt / "team" / "a.yaml", ingress_yaml("a", "a.test", port, "vm", a.port))
    repo = tmp_path / "repo"
    write(repo / ".worktrees" / SHA1 / "g.yaml", ingress_yaml("g", "g.test", port, "vm", a.port))
    link = repo / "current"
    os.symlink(os.path.join(".worktrees", SHA1), link)
    d = daemon_factory(manifests=[mnt, link], instances=instances).start()
    wait_for(lambda: routed_to(port, "a.test", "a") and routed_to(port, "g.test", "a"), timeout=10,
             message="routed")
    wait_for(lambda: (source_status(d, mnt) or {}).get("ok") is True, timeout=3, message="mnt ok")
    loads = count_loads(d.caddy_log)

    def unavailable(path: Path) -> bool:
        src = source_status(d, path)
        return src is not None and src["ok"] is False

    def assert_reported(path: Path) -> None:
        src = source_status(d, path)
        assert src is not None and src["ok"] is False and src["error"], src
        assert any(p["reason"] == "SourceUnavailable" and p["file"] == str(path) for p in status(d)["problems"])

    # renamed away: routes stay, the source is reported unavailable
    os.rename(mnt, tmp_path / "mnt.away")
    wait_for(lambda: unavailable(mnt), timeout=3, message="mnt reported unavailable")
    assert_reported(mnt)
    assert routed_to(port, "a.test", "a") and routed_to(port, "g.test", "a")
    st = ingress_status(d, "a")
    assert st is not None and st["reason"] == "Stale" and "unavailable" in st["message"], st
    assert count_loads(d.caddy_log) == loads
    r = cli_status(d)
    assert f"{mnt}: UNAVAILABLE" in r.stdout, r.stdout

    # back: healthy again
    os.rename(tmp_path / "mnt.away", mnt)
    wait_for(lambda: (source_status(d, mnt) or {}).get("ok") is True and reason_of(d, "a") == "Applied",
             timeout=3, message="mnt back")

    # removed: routes stay
    shutil.rmtree(mnt)
    wait_for(lambda: unavailable(mnt), timeout=3, message="removed mnt reported unavailable")
    assert_reported(mnt)
    assert routed_to(port, "a.test", "a")
    assert count_loads(d.caddy_log) == loads

    # re-created empty (exists, readable, no files): honoured, its routes go
    mnt.mkdir()
    wait_for(lambda: status_of(port, "a.test") == 404, timeout=3, message="emptied source -> 404")
    # (Caddy has the new config a moment before status.json is written)
    wait_for(lambda: (source_status(d, mnt) or {}).get("ok") is True, timeout=3, message="mnt ok again")
    src = source_status(d, mnt)
    assert src is not None and src["files"] == 0
    assert ingress_status(d, "a") is None
    assert routed_to(port, "g.test", "a")

    # a git-sync link whose target vanishes: routes stay
    shutil.rmtree(repo / ".worktrees" / SHA1)
    wait_for(lambda: unavailable(link), timeout=3, message="dangling link reported unavailable")
    assert_reported(link)
    assert routed_to(port, "g.test", "a")
    expect_reasons(d, "g", ["Applied", "Stale"])
    assert reasons(d, "a") == ["Applied", "Stale", "Applied", "Stale", "Removed"]


# -- conflicts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["winners-first", "losers-first"])
def test_conflict_winner_does_not_depend_on_arrival_order(
        order: str, tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """Two conflicts: across sources (source position wins over the path: ``first/z.yaml`` beats
    ``second/a.yaml``) and within a source (path order: ``a-team/one.yaml`` beats ``b.yaml``)."""
    w, lo = backends("w"), backends("l")
    _, instances = setup_sources(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    port = free_port()
    winners = {first / "z.yaml": ingress_yaml("pos-w", "pos.test", port, "vm", w.port),
               first / "a-team" / "one.yaml": ingress_yaml("rel-w", "rel.test", port, "vm", w.port)}
    losers = {second / "a.yaml": ingress_yaml("pos-l", "pos.test", port, "vm", lo.port),
              first / "b.yaml": ingress_yaml("rel-l", "rel.test", port, "vm", lo.port)}
    early, late = (winners, losers) if order == "winners-first" else (losers, winners)
    d = daemon_factory(manifests=[first, second], instances=instances).start()
    for path, text in early.items():
        write(path, text)
    who = "w" if early is winners else "l"
    wait_for(lambda: routed_to(port, "pos.test", who) and routed_to(port, "rel.test", who), timeout=5,
             message=f"the early files served ({who})")
    for path, text in late.items():
        write(path, text)
    wait_for(lambda: reason_of(d, "pos-l") == "HostnameConflict" and reason_of(d, "rel-l") == "HostnameConflict"
             and reason_of(d, "pos-w") == "Applied" and reason_of(d, "rel-w") == "Applied",
             timeout=5, message="the documented winners")
    assert routed_to(port, "pos.test", "w") and routed_to(port, "rel.test", "w")
    pos_l, rel_l = ingress_status(d, "pos-l"), ingress_status(d, "rel-l")
    assert pos_l is not None and rel_l is not None
    assert pos_l["ready"] is False and pos_l["file"] == str(second / "a.yaml")
    assert f"{first / 'z.yaml'}:1" in pos_l["message"] and "'pos-w'" in pos_l["message"], pos_l
    assert rel_l["file"] == str(first / "b.yaml")
    assert f"{first / 'a-team' / 'one.yaml'}:1" in rel_l["message"] and "'rel-w'" in rel_l["message"], rel_l
    expect_reasons(d, "pos-l", ["Applied", "HostnameConflict"] if order == "losers-first" else ["HostnameConflict"])
    assert reasons(d, "pos-w") == ["Applied"] and reasons(d, "rel-w") == ["Applied"]

    # the winner's file turns invalid: its last good version keeps the claim (no flip to the loser)
    z = first / "z.yaml"
    write(z, "name: pos-w\nrules: [\n")
    wait_for(lambda: reason_of(d, "pos-w") == "Stale", timeout=3, message="winner Stale")
    assert reason_of(d, "pos-l") == "HostnameConflict" and routed_to(port, "pos.test", "w")
    # the winner's file is deleted: now the other claimant is the first one
    z.unlink()
    wait_for(lambda: routed_to(port, "pos.test", "l"), timeout=3, message="the loser takes over")
    wait_for(lambda: reason_of(d, "pos-l") == "Applied", timeout=3, message="pos-l Applied")
    assert routed_to(port, "rel.test", "w")


# -- revisions, git commits, history ---------------------------------------------------------------------------

def test_revisions_git_commit_and_bounded_history(tmp_path: Path, daemon_factory: DaemonFactory,
                                                  backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    _, instances = setup_sources(tmp_path)
    port = free_port()
    repo = tmp_path / "repo"
    link = repo / "current"
    write(repo / ".worktrees" / SHA1 / "app.yaml", ingress_yaml("app", "app.test", port, "vm", a.port))
    os.symlink(os.path.join(".worktrees", SHA1), link)
    churn = tmp_path / "churn"
    d = daemon_factory(manifests=[link, churn], instances=instances).start()
    wait_for(lambda: routed_to(port, "app.test", "a"), timeout=10, message="routed")
    wait_for(lambda: status(d).get("revision", {}).get("commits") == {str(link): SHA1}, timeout=3,
             message="commit of the checkout in status")
    r1 = revision(d)
    assert r1[0] is not None and r1[0] == r1[1]
    assert status(d)["last_applied"]["commits"] == {str(link): SHA1}
    r = cli_status(d)
    assert f"git commit:     {SHA1} ({link})" in r.stdout, r.stdout

    # a new commit with a change: new revision, attempted and applied, and the new commit
    write(repo / ".worktrees" / SHA2 / "app.yaml", ingress_yaml("app", "app.test", port, "vm", b.port))
    swap_link(link, os.path.join(".worktrees", SHA2))
    shutil.rmtree(repo / ".worktrees" / SHA1)
    wait_for(lambda: routed_to(port, "app.test", "b"), timeout=3, message="SHA2 served")
    wait_for(lambda: status(d)["revision"]["commits"] == {str(link): SHA2}, timeout=3, message="SHA2 in status")
    r2 = revision(d)
    assert r2[0] != r1[0] and r2[0] == r2[1]
    assert status(d)["last_applied"]["commits"] == {str(link): SHA2}

    # a commit whose manifests are broken: attempted, the last good version is served
    write(repo / ".worktrees" / SHA3 / "app.yaml", BROKEN)
    swap_link(link, os.path.join(".worktrees", SHA3))
    wait_for(lambda: status(d)["revision"]["commits"] == {str(link): SHA3} and reason_of(d, "app") == "Stale",
             timeout=3, message="SHA3 attempted")
    assert routed_to(port, "app.test", "b")
    assert revision(d)[0] not in (r1[0], r2[0])

    # history: one entry per pass, the last one is the current revision, at most 20 kept
    previous = revision(d)[0]
    for i in range(22):
        write(churn / "churn.yaml", ingress_yaml("churn", "churn.test", port, "vm", 10000 + i))
        wait_for(lambda prev=previous: revision(d)[0] != prev, timeout=3, message=f"churn pass {i}")
        previous = revision(d)[0]
    st = status(d)
    assert len(st["history"]) == 20
    assert st["history"][-1]["revision"] == st["revision"]["last_attempted"]
    assert len({h["revision"] for h in st["history"]}) == 20  # every one of these passes had new inputs
    assert all(h["outcome"] in ("applied", "unchanged") for h in st["history"])
    assert d.passes() > 20
