"""Host faults, for real: a data dir on a small tmpfs that fills up, a read-only state dir, the API's dir
removed, a Caddy that dies a second after every start or whose start hangs, a damaged config.json, and
real signals. Each test drives a real ``hypeman-ingress run`` with a real Caddy, real backends and real
requests, and checks what the issue asked: the daemon never dies, nothing is lost, the operator sees it.

Mounting needs root (CI runs as root). ``make test`` sets ``HYPEMAN_REQUIRE_FAULTS=1``: there, a test that
cannot mount fails instead of skipping.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.caddy.binary import find_caddy
from tests.helpers import (
    ROOT,
    Backend,
    Daemon,
    free_port,
    ingress_yaml,
    instance_yaml,
    kill_pid,
    routed_to,
    status_of,
    wait_for,
    write,
)
from tests.test_api import assert_error, body, call, metrics

pytestmark = pytest.mark.caddy

DaemonFactory = Callable[..., Daemon]
BackendFactory = Callable[[str], Backend]


# -- real faults -----------------------------------------------------------------------------------------

def _mount_or_skip(args: list[str], what: str) -> None:
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        message = f"cannot {what} ({' '.join(args)}: {r.stderr.strip()}); these tests need root"
        if os.environ.get("HYPEMAN_REQUIRE_FAULTS") == "1":
            pytest.fail(message)
        pytest.skip(message)


def _umount(path: Path) -> None:
    if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)  # still busy: detach it anyway


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[Path, int], Path]]:
    """Mount a tmpfs of ``size_mb`` on a dir (request it before ``daemon_factory``, so that the daemons and
    their Caddys are stopped before it is unmounted)."""
    mounted: list[Path] = []

    def mount(where: Path, size_mb: int) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        _mount_or_skip(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(where)],
                       "mount a tmpfs")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        _umount(where)


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], Callable[[], None]]]:
    """Make a dir read-only in place (a read-only bind mount over itself); returns the undo."""
    mounted: list[Path] = []

    def make(where: Path) -> Callable[[], None]:
        _mount_or_skip(["mount", "--bind", str(where), str(where)], "bind-mount")
        mounted.append(where)
        _mount_or_skip(["mount", "-o", "remount,bind,ro", str(where)], "remount read-only")

        def undo() -> None:
            if where in mounted:
                mounted.remove(where)
                _umount(where)
        return undo

    yield make
    for where in reversed(mounted):
        _umount(where)


def fill(fs: Path) -> Path:
    """Fill the file system of ``fs`` to the last page; returns the file to delete to free it again."""
    ballast = fs / "ballast"
    chunk = b"\0" * (1 << 20)
    with open(ballast, "wb", buffering=0) as fh:
        for size in (len(chunk), 4096, 1):
            while True:
                try:
                    fh.write(chunk[:size])
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    with pytest.raises(OSError) as info:  # really full: not even a small new file fits
        (fs / "probe").write_bytes(b"x" * 8192)
    assert info.value.errno == errno.ENOSPC
    with contextlib.suppress(OSError):
        (fs / "probe").unlink()
    return ballast


# -- a Caddy that misbehaves on demand --------------------------------------------------------------------

def misbehaving_caddy(directory: Path, admin_port: int) -> Path:
    """A ``CADDY_BINARY`` that runs the real Caddy, except for ``caddy run`` while a marker file exists:
    ``flap`` -- Caddy is killed 2 s after it starts; ``hang`` -- the start never answers (a sleep); ``bare``
    -- Caddy starts with its admin block only, whatever config it is given."""
    directory.mkdir(parents=True, exist_ok=True)
    bare = directory / "bare.json"
    bare.write_text(json.dumps({"admin": {"listen": f"127.0.0.1:{admin_port}", "config": {"persist": False}}}))
    wrapper = directory / "caddy"
    wrapper.write_text(f"""#!/bin/sh
REAL='{find_caddy()}'
if [ "$1" = run ]; then
  [ -e '{directory}/hang' ] && exec sleep 300
  [ -e '{directory}/flap' ] && exec timeout -s KILL 2 "$REAL" "$@"
  [ -e '{directory}/bare' ] && exec "$REAL" run --config '{bare}'
fi
exec "$REAL" "$@"
""")
    wrapper.chmod(0o755)
    return wrapper


# -- helpers -----------------------------------------------------------------------------------------------

def status(d: Daemon) -> dict[str, Any]:
    st: dict[str, Any] = call(d, "GET", "/status").json()
    pid = (st.get("caddy") or {}).get("pid")
    if isinstance(pid, int):
        d.caddy_pids.add(pid)  # cleaned up even when caddy.pid could not be written
    return st


def failing_files(d: Daemon) -> set[str]:
    return {f["file"] for f in status(d)["storage"]["failing"]}


def events_since(d: Daemon, event: str, n: int) -> list[dict[str, Any]]:
    return d.log_events(event)[n:]


def alive(d: Daemon) -> bool:
    return d.proc is not None and d.proc.poll() is None


def serve(tmp: Path, daemon_factory: DaemonFactory, backend: Backend, **kwargs: Any) -> tuple[Daemon, Path, int]:
    manifests, instances = tmp / "manifests", tmp / "instances"
    write(instances / "vms.yaml", instance_yaml("vm"))
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", backend.port))
    d = daemon_factory(manifests=[manifests], instances=instances, **kwargs).start()
    wait_for(lambda: routed_to(port, "web.test", backend.name), timeout=10, message="web.test routed")
    return d, manifests, port


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=60)


# -- 1, 5, 8: a full disk ------------------------------------------------------------------------------------

def test_full_disk_never_ends_the_daemon_and_nothing_applied_is_lost(
        tmp_path: Path, tmpfs: Callable[[Path, int], Path], daemon_factory: DaemonFactory,
        backends: BackendFactory) -> None:
    """``{data}`` on a small tmpfs that fills up. A change is still applied (Caddy gets it) though
    config.json cannot be saved; the API answers 507 naming the file; a ``kill -9`` of Caddy is survived:
    Caddy comes back from the applied-but-unsaved config (not the older file), serving at once; status,
    /readyz and metrics name the files that fail. Once space is freed every file lands by itself."""
    a, b = backends("a"), backends("b")
    data = tmpfs(tmp_path / "data", 96)  # the Caddy binary (~50 MB) is copied in too
    d, manifests, port = serve(tmp_path, daemon_factory, a, data_dir=data)
    config_json = data / "caddy" / "config.json"
    ballast = fill(data)

    # a change while the disk is full: live in Caddy, but config.json cannot hold it
    n = d.passes()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", b.port))
    wait_for(lambda: routed_to(port, "web.test", "b"), timeout=10, message="the edit applied")
    wait_for(lambda: str(config_json) in failing_files(d), timeout=10, message="config.json reported failing")
    assert str(b.port) not in config_json.read_text()  # the old version is still on disk
    st = status(d)
    failing = {f["file"]: f for f in st["storage"]["failing"]}
    assert st["storage"]["ok"] is False and failing[str(config_json)]["no_space"] is True, st["storage"]
    assert "No space left on device" in failing[str(config_json)]["error"]
    logged = [e for e in d.log_events("storage.write_failed") if e["file"] == str(config_json)]
    assert logged and logged[0]["level"] == "error" and "No space left" in logged[0]["error"], logged
    r = call(d, "GET", "/readyz")  # converged, but says which files cannot be written
    assert r.status_code == 200 and str(config_json) in r.json()["message"], r.json()
    assert metrics(d)[("hypeman_ingress_storage_failing_files", ())] >= 1
    assert [p for p in d.log_events("reconcile.finished")[n:] if p["outcome"] == "applied"]

    # the API refuses a create it cannot write: 507, naming the file, nothing half-written
    fresh = data / "ingresses" / "fresh.yaml"
    r = call(d, "POST", "/ingresses", json=body("fresh", "fresh.test", port, a.port))
    assert_error(r, 507, "insufficient_storage", str(fresh), "No space left on device", "nothing was written")
    assert not fresh.exists() and not [p for p in (data / "ingresses").iterdir() if p.name.endswith(".tmp")]

    # Caddy killed while the disk is full: the daemon lives, Caddy comes back with the applied config
    old = d.caddy_pid()
    assert old is not None
    n_started = len(d.log_events("caddy.started"))
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (pid := status(d)["caddy"]["pid"]) not in (None, old) and status(d)["caddy"]["running"]
                   and pid, timeout=15, message="a new Caddy running")
    assert alive(d), d.log_path.read_text()[-3000:]
    started = events_since(d, "caddy.started", n_started)
    assert started and started[-1]["pid"] == new and started[-1]["config"] == "unsaved", started
    assert routed_to(port, "web.test", "b")  # from the unsaved config: no pass needed for the right route
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=10, message="ready after restart")
    pid_file = data / "caddy" / "caddy.pid"
    assert str(pid_file) in failing_files(d) and pid_file.read_text().strip() == str(old)

    # the reconciler restarted while caddy.pid names a dead Caddy: it finds its Caddy by the admin port
    assert d.stop() == 0
    n_found = len(d.log_events("caddy.found_by_admin_port"))
    d.start()
    found = events_since(d, "caddy.found_by_admin_port", n_found)
    assert found and found[0]["pid"] == new and found[0]["recorded"] == old, found
    assert status(d)["caddy"]["pid"] == new and status(d)["caddy"]["adopted"] is True
    assert routed_to(port, "web.test", "b")

    # space comes back: every file lands without any change or restart
    ballast.unlink()
    wait_for(lambda: not failing_files(d), timeout=40, message="every file written once space is back")
    assert pid_file.read_text().strip() == str(new)
    saved = json.loads(config_json.read_text())
    assert str(b.port) in json.dumps(saved) and saved["admin"]["listen"] == f"127.0.0.1:{d.admin_port}"
    wait_for(lambda: json.loads((data / "state" / "status.json").read_text())["storage"]["ok"] is True,
             timeout=10, message="status.json saying the storage is fine again")
    r = call(d, "GET", "/readyz")
    assert r.status_code == 200 and "cannot be written" not in r.json()["message"], r.json()
    assert [e["file"] for e in d.log_events("storage.write_recovered")]
    assert call(d, "POST", "/ingresses", json=body("fresh", "fresh.test", port, a.port)).status_code == 201
    assert routed_to(port, "fresh.test", "a") and alive(d)


# -- 8: a read-only state dir ------------------------------------------------------------------------------

def test_read_only_state_dir_is_shown_and_heals(tmp_path: Path, read_only: Callable[[Path], Callable[[], None]],
                                               daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    d, manifests, port = serve(tmp_path, daemon_factory, a)
    state = d.data_dir / "state"
    undo = read_only(state)
    write(manifests / "more.yaml", ingress_yaml("more", "more.test", port, "vm", a.port))
    wait_for(lambda: routed_to(port, "more.test", "a"), timeout=10, message="more.test routed")
    status_json = str(state / "status.json")
    wait_for(lambda: status_json in failing_files(d), timeout=10, message="status.json reported failing")
    entry = next(f for f in status(d)["storage"]["failing"] if f["file"] == status_json)
    assert "Read-only file system" in entry["error"] and entry["no_space"] is False, entry
    r = call(d, "GET", "/readyz")
    assert r.status_code == 200 and status_json in r.json()["message"], r.json()
    shown = cli("status", "--data-dir", str(d.data_dir), "--api-listen", f"127.0.0.1:{d.api_port}", env=d.env)
    assert "storage:" in shown.stdout and status_json in shown.stdout and "Read-only" in shown.stdout, shown.stdout
    undo()
    wait_for(lambda: not failing_files(d), timeout=40, message="the state files written again")
    saved = wait_for(lambda: (doc := json.loads((state / "status.json").read_text()))["storage"]["ok"] and doc,
                     timeout=10, message="status.json rewritten")
    assert {i["name"] for i in saved["ingresses"]} == {"web", "more"}
    assert alive(d)


# -- 2: the API's dir removed ----------------------------------------------------------------------------

def test_a_removed_api_dir_refuses_writes_instead_of_emptying_it(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """b and c were created through the API; the API's dir is removed behind the daemon's back. They keep
    serving (stale). A POST must not recreate the dir with only its own file -- which would make the loop
    drop b and c -- so it is refused with 503 naming the dir and them, as is a DELETE. ``hypeman-ingress
    restore`` writes their last good versions back; then writes work again and nothing was lost."""
    a = backends("a")
    d, _manifests, port = serve(tmp_path, daemon_factory, a)
    for name in ("b", "c"):
        assert call(d, "POST", "/ingresses", json=body(name, f"{name}.test", port, a.port)).status_code == 201
    api_dir = d.data_dir / "ingresses"
    b_text = (api_dir / "b.yaml").read_text()
    for f in api_dir.iterdir():
        f.unlink()
    api_dir.rmdir()

    def api_source_down() -> bool:
        return any(s["path"] == str(api_dir) and not s["ok"] for s in status(d)["sources"])

    wait_for(api_source_down, timeout=10, message="the API source reported unavailable")
    r = call(d, "POST", "/ingresses", json=body("d", "d.test", port, a.port))
    err = assert_error(r, 503, "source_unavailable", str(api_dir), "b, c", "hypeman-ingress restore")
    assert not api_dir.exists(), err  # not recreated
    assert_error(call(d, "DELETE", "/ingresses/b"), 503, "source_unavailable", str(api_dir))
    for name in ("web", "b", "c"):
        assert routed_to(port, f"{name}.test", "a"), name
    assert status_of(port, "d.test") == 404
    reasons = {i["name"]: i["reason"] for i in status(d)["ingresses"]}
    assert reasons["b"] == reasons["c"] == "Stale", reasons

    # a restart of the daemon (say, to recover) must not make an empty dir in place of the lost one either
    assert d.stop() == 0
    d.start()
    assert not api_dir.exists() and d.log_events("api.dir_missing")
    assert_error(call(d, "POST", "/ingresses", json=body("d", "d.test", port, a.port)), 503, "source_unavailable")
    for name in ("web", "b", "c"):
        assert routed_to(port, f"{name}.test", "a"), name

    shown = cli("restore", "--data-dir", str(d.data_dir), "--dry-run", env=d.env)
    assert shown.returncode == 0 and not api_dir.exists() and "would write" in shown.stdout, shown
    done = cli("restore", "--data-dir", str(d.data_dir), env=d.env)
    assert done.returncode == 0, done.stderr
    assert (api_dir / "b.yaml").read_text() == b_text and (api_dir / "c.yaml").exists()
    assert oct((api_dir / "b.yaml").stat().st_mode & 0o777) == "0o600"
    again = cli("restore", "--data-dir", str(d.data_dir), env=d.env)
    assert again.returncode == 0 and "exists" in again.stdout  # never overwrites

    wait_for(lambda: not api_source_down(), timeout=10, message="the API source back")
    assert call(d, "POST", "/ingresses", json=body("d", "d.test", port, a.port)).status_code == 201
    for name in ("web", "b", "c", "d"):
        assert routed_to(port, f"{name}.test", "a"), name
    reasons = {i["name"]: i["reason"] for i in status(d)["ingresses"]}
    assert set(reasons.values()) == {"Applied"}, reasons


# -- 3: a Caddy that dies a second after every start -------------------------------------------------------

def test_a_flapping_caddy_is_restarted_with_backoff_and_reported(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    admin_port = free_port()
    wrapper = misbehaving_caddy(tmp_path / "wrapper", admin_port)
    d, _manifests, port = serve(tmp_path, daemon_factory, a, admin_port=admin_port,
                                env={"CADDY_BINARY": str(wrapper), "HYPEMAN_CADDY_STABLE_SECONDS": "10"})
    (tmp_path / "wrapper" / "flap").touch()
    n = len(d.log_events())
    old = d.caddy_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    began = time.monotonic()

    def failures() -> list[dict[str, Any]]:  # deaths, and starts that failed (a Caddy too slow to answer)
        return [e for e in d.log_events()[n:] if e.get("event") in ("caddy.died", "caddy.restart_failed")]

    seen = wait_for(lambda: f if len(f := failures()) >= 4 else [], timeout=60, message="four failures")
    spent = time.monotonic() - began
    # each quick death counts: the delay before the next start doubles (with jitter in [d/2, d])
    assert [e["failures"] for e in seen[:4]] == [1, 2, 3, 4], seen
    for e in seen[:4]:
        bound = min(30.0, 0.5 * 2 ** e["failures"])
        assert bound / 2 - 0.01 <= e["retry_in"] <= bound + 0.01, e
    assert seen[0]["flapping"] is False and seen[1]["flapping"] is True, seen
    # the three waits alone take >= 0.5 + 1 + 2 s, each Caddy lives 2 s: not a restart a second
    events = d.log_events()[n:]
    fourth = next(i for i, e in enumerate(events) if e == seen[3])
    starts = [e for e in events[:fourth] if e.get("event") == "caddy.started"]
    assert spent >= 3.5 + 3 * 2 and 3 <= len(starts) <= 6, (spent, starts)
    st = status(d)["caddy"]
    assert st["flapping"] is True and st["failures"] >= 4, st
    r = call(d, "GET", "/readyz")
    assert r.status_code == 503 and r.json()["message"].startswith("Caddy is flapping"), r.json()
    assert metrics(d)[("hypeman_ingress_caddy_flapping", ())] == 1
    assert alive(d)

    # the cause goes away: the next start stays up; after HYPEMAN_CADDY_STABLE_SECONDS it is no longer flapping
    (tmp_path / "wrapper" / "flap").unlink()
    wait_for(lambda: not status(d)["caddy"]["flapping"] and status(d)["caddy"]["running"], timeout=60,
             message="stable again")
    assert status(d)["caddy"]["failures"] == 0 and d.log_events("caddy.stable")
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=10, message="ready")
    assert routed_to(port, "web.test", "a")
    assert metrics(d)[("hypeman_ingress_caddy_flapping", ())] == 0


# -- 4: a Caddy start that hangs -----------------------------------------------------------------------------

def test_a_hanging_caddy_start_does_not_stall_the_loop(tmp_path: Path, daemon_factory: DaemonFactory,
                                                      backends: BackendFactory) -> None:
    a = backends("a")
    admin_port = free_port()
    wrapper = misbehaving_caddy(tmp_path / "wrapper", admin_port)
    d, manifests, port = serve(tmp_path, daemon_factory, a, admin_port=admin_port,
                               env={"CADDY_BINARY": str(wrapper), "HYPEMAN_CADDY_START_TIMEOUT": "12",
                                    "INGRESS_API_WAIT": "3"})
    (tmp_path / "wrapper" / "hang").touch()
    old = d.caddy_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: status(d)["caddy"]["state"] == "starting" and status(d)["caddy"]["pid"] not in (None, old),
             timeout=10, message="a start in progress")
    st = status(d)["caddy"]
    assert st["running"] is False, st  # a process exists, but its admin API never answered
    r = call(d, "GET", "/readyz")
    assert r.status_code == 503 and r.json()["message"].startswith("Caddy is starting"), r.json()

    # the loop keeps turning meanwhile: a file edit is read at once, an API write answers in time
    n = d.passes()
    write(manifests / "more.yaml", ingress_yaml("more", "more.test", port, "vm", a.port))
    seen = wait_for(lambda: [p for p in d.log_events("reconcile.finished")[n:] if "watch" in p["trigger"]],
                    timeout=5, message="a pass for the edit while the start hangs")
    assert seen[0]["outcome"] == "unavailable", seen
    t0 = time.monotonic()
    r = call(d, "POST", "/ingresses", json=body("api", "api.test", port, a.port))
    assert r.status_code == 202 and time.monotonic() - t0 < 8, (r.status_code, r.text)
    assert r.json()["status"]["ready"] is False
    assert status(d)["caddy"]["state"] == "starting"  # still the same hung start

    # the hang ends (the start times out and the next one works): everything converges
    (tmp_path / "wrapper" / "hang").unlink()
    for host in ("web.test", "more.test", "api.test"):
        wait_for(lambda h=host: routed_to(port, h, "a"), timeout=40, message=f"{host} routed")  # type: ignore[misc]
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=10, message="ready")
    fallback = d.log_events("caddy.start_fallback")
    assert fallback and "did not answer on its admin API" in fallback[0]["error"], fallback
    assert "within 12s" in fallback[0]["error"] and alive(d)


# -- 5: a damaged config.json ------------------------------------------------------------------------------

def test_a_damaged_config_json_is_reported_and_repaired(tmp_path: Path, daemon_factory: DaemonFactory,
                                                      backends: BackendFactory) -> None:
    a = backends("a")
    d, _manifests, port = serve(tmp_path, daemon_factory, a, env={"CADDY_STOP_ON_SHUTDOWN": "false"})
    config_json = d.data_dir / "caddy" / "config.json"

    # while running: damaged, then Caddy dies -- it comes back with the routes this process applied
    config_json.write_text('{"apps": {"http": ')
    n_started = len(d.log_events("caddy.started"))
    old = d.caddy_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    started = wait_for(lambda: events_since(d, "caddy.started", n_started), timeout=15, message="restarted")
    assert started[0]["config"] == "memory", started
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed after restart")
    corrupt = d.log_events("caddy.config_corrupt")
    assert corrupt and corrupt[0]["file"] == str(config_json) and corrupt[0]["level"] == "error", corrupt
    # repaired without any change to the manifests
    wait_for(lambda: "web.test" in config_json.read_text(), timeout=10, message="config.json repaired")
    assert json.loads(config_json.read_text())["admin"]["listen"] == f"127.0.0.1:{d.admin_port}"

    # while stopped: the daemon and Caddy gone, config.json damaged; the next start cannot use it, says so,
    # starts Caddy bare and converges with the first pass; the file is repaired again
    assert d.stop() == 0
    pid = d.caddy_pid()
    assert pid is not None
    kill_pid(pid)
    config_json.write_bytes(b"\x00garbage")
    n_corrupt = len(d.log_events("caddy.config_corrupt"))
    n_started = len(d.log_events("caddy.started"))
    d.start()
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed after the new start")
    assert events_since(d, "caddy.started", n_started)[0]["config"] == "admin-only"
    assert events_since(d, "caddy.config_corrupt", n_corrupt)
    wait_for(lambda: "web.test" in config_json.read_text(), timeout=10, message="config.json repaired again")


# -- 6: signals ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGQUIT])
def test_signals_stray_ones_are_survived_sighup_resyncs_stop_ones_stop_cleanly(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory, stop_signal: int) -> None:
    a = backends("a")
    d, _manifests, port = serve(tmp_path, daemon_factory, a, env={"CADDY_STOP_ON_SHUTDOWN": "true"},
                                resync=3600)
    assert d.proc is not None
    # drift behind the daemon's back: the route is loaded away
    admin = f"http://127.0.0.1:{d.admin_port}"
    live = httpx.get(admin + "/config/", timeout=5).json()
    live["apps"]["http"]["servers"] = {}
    assert httpx.post(admin + "/load", json=live, timeout=10).status_code == 200
    assert status_of(port, "web.test") is None

    for stray in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPWR):
        d.proc.send_signal(stray)
    wait_for(lambda: len([e for e in d.log_events("daemon.signal") if e["action"] == "ignored"]) == 4,
             timeout=10, message="stray signals logged")
    assert alive(d) and status_of(port, "web.test") is None  # survived, and no pass was made of them

    n = d.passes()
    d.proc.send_signal(signal.SIGHUP)
    hup = wait_for(lambda: [p for p in d.log_events("reconcile.finished")[n:] if p["trigger"] == "sighup"],
                   timeout=10, message="a resync pass for SIGHUP")
    assert hup[0]["outcome"] == "applied", hup
    assert routed_to(port, "web.test", "a") and alive(d)
    assert [e for e in d.log_events("daemon.signal") if e["signal"] == "SIGHUP" and e["action"] == "resync"]

    caddy = d.caddy_pid()
    assert caddy is not None
    status_json = d.data_dir / "state" / "status.json"
    d.proc.send_signal(stop_signal)
    assert d.proc.wait(timeout=20) == 0
    stopped = d.log_events("daemon.stopped")
    assert stopped and stopped[-1]["caddy_stopped"] is True, stopped
    assert [e for e in d.log_events("daemon.signal") if e["signal"] == signal.Signals(stop_signal).name]
    wait_for(lambda: not _pid_running(caddy), timeout=10, message="Caddy stopped (CADDY_STOP_ON_SHUTDOWN)")
    assert json.loads(status_json.read_text())["last_attempted"]["trigger"] == "sighup"  # the last pass landed
    assert "Traceback" not in d.log_path.read_text()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


# -- 7: readiness after a restart --------------------------------------------------------------------------

def test_readyz_is_never_200_while_a_restarted_caddy_lacks_the_routes(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """The restarted Caddy comes up with its admin block only (the wrapper drops the config it is given):
    /readyz must stay 503 until a pass has loaded the routes into it. Every 200 seen is checked at once
    against the live routes (routes only appear in this test, so a 200 before them is caught)."""
    a = backends("a")
    admin_port = free_port()
    wrapper = misbehaving_caddy(tmp_path / "wrapper", admin_port)
    d, _manifests, port = serve(tmp_path, daemon_factory, a, admin_port=admin_port,
                                env={"CADDY_BINARY": str(wrapper)})
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=10, message="ready")
    (tmp_path / "wrapper" / "bare").touch()
    old = d.caddy_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    unready = ready = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not (unready and ready):
        r = httpx.get(d.api_url + "/readyz", timeout=5)
        if r.status_code == 503:
            unready += 1
            continue
        assert routed_to(port, "web.test", "a"), f"/readyz said ready before the routes were back: {r.json()}"
        if unready:
            ready += 1
    assert unready, "the restart was never seen as not ready"
    assert ready, "never ready again after the restart"
    assert status(d)["caddy"]["pid"] != old


# -- the CLI's status shows it ----------------------------------------------------------------------------

def test_status_command_shows_caddy_state(tmp_path: Path, daemon_factory: DaemonFactory,
                                          backends: BackendFactory) -> None:
    a = backends("a")
    d, _manifests, _port = serve(tmp_path, daemon_factory, a)
    shown = cli("status", "--data-dir", str(d.data_dir), "--api-listen", f"127.0.0.1:{d.api_port}", env=d.env)
    assert shown.returncode == 0, shown.stderr
    assert "caddy:          running" in shown.stdout and "storage:" not in shown.stdout, shown.stdout
