"""Shared test helpers: free ports, real loopback backends, real Caddy and daemon processes, polling."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import httpx

from reconciler.caddy.binary import find_caddy
from reconciler.loop.triggers import Burst, Triggers
from tests.caddy_guard import check_config, check_config_file, check_env, check_log

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


_HANDED_OUT: set[int] = set()


def free_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 right now (bind to 0, read, close; TCP unless ``kind`` says UDP), never one
    this process handed out before: the kernel may give a just-released port again, and two roles on one
    port (say the admin port and a rule's port) make a test fail for the wrong reason."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 right now (see :func:`free_port`)."""
    return free_port(socket.SOCK_DGRAM)


class FakeClock:
    """An injectable clock (monotonic or wall) that moves only when told to."""

    def __init__(self, start: float = 1024.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def wait_for(check: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> T:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}"
                                 + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


_LAST_BURST: dict[int, Burst] = {}


def poll(t: Triggers) -> str | None:
    """What ``t`` has due right now, by its name (never blocks: the timeout is 0); :func:`paths` is its
    paths."""
    burst = t.wait(timeout=0)
    if burst is None:
        return None
    _LAST_BURST[id(t)] = burst
    return burst.name


def paths(t: Triggers) -> frozenset[str] | None:
    """The paths of the burst :func:`poll` last took from ``t``."""
    return _LAST_BURST[id(t)].paths


def last_burst(t: Triggers) -> Burst:
    return _LAST_BURST[id(t)]


class Backend:
    """A real HTTP server answering ``backend=<name> host=<Host> path=<path>``, on 127.0.0.1 and a free
    port unless given (a second loopback address lets an instance's IP change alone re-route a rule)."""

    def __init__(self, name: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms ACK delay

            def do_POST(self) -> None:
                sent = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer(f" posted={sent.decode(errors='replace')}")

            def do_GET(self) -> None:
                self._answer("")

            def _answer(self, extra: str) -> None:
                body = f"backend={backend.name} host={self.headers.get('Host')} path={self.path}{extra}".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        # a port free_port() hands out (never bind 0: the kernel may give a port a test already took from
        # free_port() for another role, say the rule's port, and only released for now)
        self.server = ThreadingHTTPServer((host, port or free_port()), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Service:
    """A real HTTP backend whose ``/healthz`` answers 200 or 500 as the test says, and ``/slow?s=N``
    takes N seconds; anything else answers ``backend=<name> path=<path>``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = True
        self.checks = 0
        self.requests = 0
        self.slow_started = threading.Event()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                if self.path.startswith("/healthz"):
                    service.checks += 1
                    self._answer(200 if service.healthy else 500, f"health {service.name}")
                    return
                service.requests += 1
                if self.path.startswith("/slow"):
                    service.slow_started.set()
                    time.sleep(float(self.path.partition("s=")[2] or 1))
                self._answer(200, f"backend={service.name} path={self.path}")

            def _answer(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Flow:
    """~200 requests a second on one keep-alive connection, counting answers per backend. A request is
    failed when it gets no 200; a connection closed under it by a config load is retried once (what any
    HTTP client does for an idempotent request on a reused connection) and counted in ``retried``."""

    def __init__(self, port: int, host: str, rate: float = 200.0) -> None:
        self.port, self.host, self.period = port, host, 1.0 / rate
        self.seen: Counter[str] = Counter()
        self.failures: list[str] = []
        self.retried = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        url = f"http://127.0.0.1:{self.port}/"
        with httpx.Client(timeout=10) as client:
            next_at = time.monotonic()
            while not self._stop.is_set():
                for attempt in (0, 1):
                    try:
                        r = client.get(url, headers={"Host": self.host})
                    except httpx.TransportError as exc:
                        if attempt == 0:
                            self.retried += 1
                            continue
                        self.failures.append(repr(exc))
                        break
                    if r.status_code == 200:
                        self.seen[r.text.split()[0]] += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text.strip()}")
                    break
                next_at += self.period
                time.sleep(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Flow:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)


def get(port: int, host: str, path: str = "/", timeout: float = 5.0) -> httpx.Response:
    """A real request to Caddy on 127.0.0.1:port with the given Host header."""
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers={"Host": host}, timeout=timeout)


def routed_to(port: int, host: str, backend: str) -> bool:
    try:
        r = get(port, host)
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.text.startswith(f"backend={backend} ")


def status_of(port: int, host: str) -> int | None:
    try:
        return get(port, host).status_code
    except httpx.HTTPError:
        return None


def validate_cli(path: Path) -> tuple[int, str]:
    """``hypeman-ingress validate PATH`` in process: its exit code and everything it printed."""
    import io

    from reconciler.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(["validate", str(path)])
    return rc, buf.getvalue()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def ingress_yaml(name: str, host: str, port: int, instance: str, target_port: int) -> str:
    return (f"name: {name}\nrules:\n  - match: {{hostname: {host}, port: {port}}}\n"
            f"    target: {{instance: {instance}, port: {target_port}}}\n")


def instance_yaml(name: str, ip: str = "127.0.0.1", state: str = "Running", id: str | None = None) -> str:
    return f"name: {name}\nip: {ip}\nstate: {state}\n" + (f"id: {id}\n" if id else "")


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] == "Z":
                    return
            time.sleep(0.02)


#: inherited variables a test Caddy or daemon must not pick up from the caller's environment (an exported
#: ACME_EMAIL, CADDY_BINARY, INGRESS_API_TOKEN... would change what the test runs); tests pass them explicitly
SCRUBBED_ENV_PREFIXES = ("ACME_", "CLOUDFLARE_", "AWS_", "TLS_", "CADDY_", "HYPEMAN_")
SCRUBBED_ENV_NAMES = frozenset({"INGRESS_API_TOKEN"})


def scrubbed_environ() -> dict[str, str]:
    """``os.environ`` without the variables of :data:`SCRUBBED_ENV_PREFIXES` / :data:`SCRUBBED_ENV_NAMES`."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(SCRUBBED_ENV_PREFIXES) and k not in SCRUBBED_ENV_NAMES}


class CaddyProcess:
    """A bare Caddy (no reconciler) with its admin API on a free loopback port.

    Every config pushed with :meth:`load` passes the public-CA guard first (:mod:`tests.caddy_guard`), and
    :meth:`stop` checks the live config and Caddy's log too (configs pushed by other clients)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.admin_port = free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / "initial.json"
        cfg.write_text(json.dumps({"admin": {"listen": f"127.0.0.1:{self.admin_port}",
                                             "config": {"persist": False}}}))
        env = {**scrubbed_environ(), "XDG_DATA_HOME": str(workdir / "xdg-data"),
               "XDG_CONFIG_HOME": str(workdir / "xdg-config"), "HOME": str(workdir)}
        self.log_path = workdir / "caddy.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([find_caddy(), "run", "--config", str(cfg)], stdout=self._log,
                                     stderr=self._log, env=env, start_new_session=True)
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        wait_for(lambda: httpx.get(self.admin_url + "/config/", timeout=1).status_code == 200,
                 timeout=15, message="caddy admin API")

    def load(self, config: dict[str, Any]) -> httpx.Response:
        check_config(config, "CaddyProcess.load")
        return httpx.post(self.admin_url + "/load", json=config, timeout=60)

    def stop(self) -> None:
        live: Any = None
        if self.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                live = httpx.get(self.admin_url + "/config/", timeout=2).json()
        kill_pid(self.proc.pid)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        self._log.close()
        if isinstance(live, dict):
            check_config(live, "CaddyProcess.stop: live config")
        check_log(self.log_path, "CaddyProcess.stop")


class Responder:
    """The DNS responder process (``python -m reconciler.responder``) on a free loopback UDP port, fed
    through its control socket like the daemon feeds it; for tests that load rendered configs into a bare
    Caddy (their upstreams dial instance names through it)."""

    def __init__(self, workdir: Path, zone: str = "hypeman.internal") -> None:
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_udp_port()
        self.log = open(workdir / "responder.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "reconciler.responder", "--dir", str(workdir),
                                      "--listen", f"127.0.0.1:{self.port}", "--zone", zone],
                                     stdout=self.log, stderr=self.log, cwd=str(ROOT), start_new_session=True)
        from reconciler.responder.client import Publisher

        self.publisher = Publisher(str(workdir))
        wait_for(lambda: self.publisher.ping() is not None, timeout=10, message="responder control socket")

    def publish(self, records: dict[str, str]) -> None:
        assert self.publisher.publish(records), self.publisher.error

    def publish_instances(self, instances: Any) -> None:
        """The records of ``instances`` (model Instances), as the daemon computes them."""
        from reconciler.validate import zone_records

        self.publish(zone_records(instances))

    def stop(self) -> None:
        self.publisher.forget()
        kill_pid(self.proc.pid)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        self.log.close()


def count_loads(log_path: Path) -> int:
    """Number of ``POST /load`` requests Caddy's admin API received, from its log."""
    if not log_path.exists():
        return 0
    n = 0
    for line in log_path.read_text(errors="replace").splitlines():
        if '"uri":"/load"' in line and '"method":"POST"' in line:
            n += 1
    return n


class Daemon:
    """``hypeman-ingress run`` as a real subprocess with its own data dir, admin port and sources.

    Its environment is the caller's minus the variables that configure the daemon, Caddy or TLS
    (:func:`scrubbed_environ`), plus its own ports and ``env``: a test gets exactly the settings it asks for.
    :meth:`cleanup` runs the public-CA guard over ``{data}/caddy/config.json`` and Caddy's log."""

    def __init__(self, tmp: Path, *, manifests: list[Path] | None = None, instances: Path | None = None,
                 resync: int = 30, env: dict[str, str] | None = None, data_dir: Path | None = None,
                 admin_port: int | None = None) -> None:
        self.tmp = tmp
        self.data_dir = data_dir or tmp / "data"
        self.manifests = manifests if manifests is not None else [tmp / "manifests"]
        self.instances = instances or tmp / "instances"
        for d in [*self.manifests, self.instances]:
            d.mkdir(parents=True, exist_ok=True)
        self.admin_port = admin_port or free_port()
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {**scrubbed_environ(), "CADDY_ADMIN_PORT": str(self.admin_port),
                    "CADDY_LISTEN_ADDRESS": "127.0.0.1",
                    "CADDY_HTTP_PORT": str(free_port()), "CADDY_HTTPS_PORT": str(free_port()),
                    "HYPEMAN_RESYNC_SECONDS": str(resync), "HYPEMAN_DNS_PORT": str(free_udp_port()),
                    # requests to an unreachable instance answer at once unless a test asks for a hold
                    "HYPEMAN_HOLD": "0s",
                    "HYPEMAN_API_LISTEN": f"127.0.0.1:{self.api_port}", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / "daemon.log"
        self.caddy_pids: set[int] = set()

    @property
    def caddy_log(self) -> Path:
        return self.data_dir / "caddy" / "caddy.log"

    def caddy_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "caddy" / "caddy.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        self.caddy_pids.add(pid)
        return pid

    def responder_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "dns" / "responder.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        self.caddy_pids.add(pid)
        return pid

    def start(self, *, wait_ready: bool = True) -> Daemon:
        check_env(self.env, "Daemon.start")
        args = [sys.executable, "-m", "reconciler.cli", "--log-format", "json", "run",
                "--data-dir", str(self.data_dir), "--instances", str(self.instances)]
        for m in self.manifests:
            args += ["--manifests", str(m)]
        before = self.passes()  # a restarted daemon appends to the same log
        log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, env=self.env, cwd=str(ROOT))
        log.close()
        if wait_ready:
            wait_for(lambda: self.passes() > before, timeout=30, message="first reconcile pass")
        self.caddy_pid()
        self.responder_pid()
        return self

    def log_events(self, event: str | None = None) -> list[dict[str, Any]]:
        out = []
        if not self.log_path.exists():
            return out
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if event is None or rec.get("event") == event:
                    out.append(rec)
        return out

    def passes(self) -> int:
        return len(self.log_events("reconcile.finished"))

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def cleanup(self) -> None:
        self.stop()
        self.caddy_pid()
        self.responder_pid()
        for pid in self.caddy_pids:
            kill_pid(pid)
        check_config_file(self.data_dir / "caddy" / "config.json", "Daemon.cleanup")
        check_log(self.caddy_log, "Daemon.cleanup")
