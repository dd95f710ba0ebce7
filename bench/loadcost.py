"""What a full Caddy config reload costs *other* traffic (``python -m bench.loadcost [loads] [rate]``).

Caddy (2.11) restarts every HTTP server on every config load, even when only an unused route changed. Each
variant runs a bare Caddy, a real loopback backend and a paced client to a host no load touches, while
``POST /load`` runs ``loads`` times spread over the run, each after the previous one returned (forced with
``Cache-Control: must-revalidate`` and differing from the last by one unused route's ``@id``). It counts failed
requests (an exception or a non-200 answer) and those still failed after one immediate retry of the
idempotent GET. Variants: HTTP/1.1 keep-alive, a new connection per request, HTTP/2 over TLS (HTTP/1.1 over TLS
when ``h2`` is not installed), the two HTTP/1.1 ones on a listening socket the benchmark owns and hands to Caddy
as ``fd/N``, and long-lived upgraded streams through ``reverse_proxy`` with and without ``stream_close_delay``.
Every Caddy listens on 127.0.0.1 only; TLS uses Caddy's internal CA, never a public one.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx

from bench.figures import Figure
from reconciler.caddy.binary import find_caddy
from tests.helpers import Backend, CaddyProcess, free_port, scrubbed_environ, wait_for

HOST = "untouched.bench.test"
SECONDS = 8.0  # length of an HTTP run; its loads are spread evenly over it
Build = Callable[[int, int], dict[str, Any]]  # (admin port, load number) -> the config to load


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    after_retry: int = 0  # still failed after one immediate retry


@dataclass(frozen=True)
class Variant:
    label: str
    tls: bool = False
    fd: bool = False  # listen on a socket the benchmark made, as ``fd/N``
    keepalive: bool = True
    http2: bool = False


class Caddy(CaddyProcess):
    """:class:`CaddyProcess` (its guarded ``load`` and checked ``stop``), spawned with ``fds`` inherited."""

    def __init__(self, workdir: Path, fds: tuple[int, ...] = ()) -> None:
        self.workdir, self.admin_port = workdir, free_port()
        cfg = workdir / "initial.json"
        cfg.write_text(json.dumps({"admin": admin(self.admin_port)}))
        env = {**scrubbed_environ(), "XDG_DATA_HOME": str(workdir / "xdg-data"),
               "XDG_CONFIG_HOME": str(workdir / "xdg-config"), "HOME": str(workdir)}
        self.log_path = workdir / "caddy.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([find_caddy(), "run", "--config", str(cfg)], stdout=self._log,
                                     stderr=self._log, env=env, start_new_session=True, pass_fds=fds)
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        wait_for(lambda: httpx.get(self.admin_url + "/config/", timeout=1).status_code == 200,
                 timeout=15, message="caddy admin API")


def admin(port: int) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port}", "config": {"persist": False}}


def caddy_config(admin_port: int, churn: int, *, listen: str, upstream: int, ports: tuple[int, int],
                 tls: bool = False, stream_close_delay: str | None = None) -> dict[str, Any]:
    """One server proxying :data:`HOST` to ``upstream``, plus an unused route whose ``@id`` is ``churn``."""
    proxy: dict[str, Any] = {"handler": "reverse_proxy", "upstreams": [{"dial": f"127.0.0.1:{upstream}"}]}
    if stream_close_delay:
        proxy["stream_close_delay"] = stream_close_delay
    unused = {"@id": f"churn-{churn}", "match": [{"path": [f"/churn-{churn}"]}],
              "handle": [{"handler": "static_response", "status_code": 204}]}
    server = {"listen": [listen], "routes": [{"match": [{"host": [HOST]}], "handle": [proxy]}, unused],
              "automatic_https": {"disable_redirects": True} if tls else {"disable": True}}
    apps: dict[str, Any] = {"http": {"http_port": ports[0], "https_port": ports[1], "servers": {"bench": server}}}
    if tls:
        apps["tls"] = {"automation": {"policies": [{"issuers": [{"module": "internal"}]}]}}
        apps["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
    return {"admin": admin(admin_port), "apps": apps}


def listening_socket(port: int) -> socket.socket:
    """A TCP socket listening on 127.0.0.1:``port`` (SO_REUSEPORT off), for Caddy to inherit as ``fd/N``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    return sock


@contextmanager
def serving(build: Build, fd: socket.socket | None = None) -> Iterator[Caddy]:
    """A Caddy serving ``build(admin, 0)``; ``fd`` is handed to it, and our copy closed once it runs."""
    with tempfile.TemporaryDirectory(prefix="hypeman-bench-loadcost-") as tmp:
        caddy = Caddy(Path(tmp), (fd.fileno(),) if fd else ())
        try:
            if fd:
                fd.close()
            r = caddy.load(build(caddy.admin_port, 0))
            if r.status_code != 200:
                raise RuntimeError(f"Caddy refused the config: {r.status_code} {r.text[:300]}")
            yield caddy
        finally:
            if fd:
                fd.close()
            caddy.stop()


def post_load(admin_port: int, config: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=60)
    try:
        conn.request("POST", "/load", body=json.dumps(config).encode(),
                     headers={"Content-Type": "application/json", "Cache-Control": "must-revalidate"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"POST /load: {r.status} {body[:300]!r}")
    finally:
        conn.close()


def spread_loads(admin_port: int, build: Build, loads: int, start: float, seconds: float,
                 errors: list[BaseException]) -> None:
    """Load ``loads`` configs, the k-th at ``start + (k - 1/2) * seconds / loads`` or when the last returned."""
    try:
        for k in range(1, loads + 1):
            pause = start + seconds * (k - 0.5) / loads - time.perf_counter()
            if pause > 0:
                time.sleep(pause)  # pacing, not waiting for readiness
            post_load(admin_port, build(admin_port, k))
    except BaseException as exc:
        errors.append(exc)


@contextmanager
def reloading(admin_port: int, build: Build, loads: int, seconds: float) -> Iterator[threading.Thread]:
    """Loads running in a thread while the body runs (it gets the thread: alive until the last returned)."""
    errors: list[BaseException] = []
    loader = threading.Thread(target=spread_loads, daemon=True,
                              args=(admin_port, build, loads, time.perf_counter(), seconds, errors))
    loader.start()
    try:
        yield loader
    finally:
        loader.join(timeout=120)
    if errors:
        raise errors[0]


def answered(client: httpx.Client, url: str, ext: dict[str, Any]) -> bool:
    try:
        return client.get(url, headers={"Host": HOST}, extensions=ext).status_code == 200
    except Exception:
        return False


def drive(client: httpx.Client, url: str, ext: dict[str, Any], rate: float, seconds: float,
          loader: threading.Thread) -> Tally:
    """GETs at ``rate``/s for ``seconds`` (and until the loads are done), each failure retried once."""
    tally, start = Tally(), time.perf_counter()
    while time.perf_counter() - start < seconds or loader.is_alive():
        pause = start + tally.sent / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        tally.sent += 1
        if not answered(client, url, ext):
            tally.failed += 1
            tally.after_retry += not answered(client, url, ext)
    return tally


def run_http(v: Variant, loads: int, rate: float, seconds: float = SECONDS) -> Tally:
    backend = Backend("untouched")
    http_port, https_port = free_port(), free_port()
    port = https_port if v.tls else http_port
    sock = listening_socket(port) if v.fd else None
    build = partial(caddy_config, listen=f"fd/{sock.fileno()}" if sock else f"127.0.0.1:{port}",
                    upstream=backend.port, ports=(http_port, https_port), tls=v.tls)
    url = f"{'https' if v.tls else 'http'}://127.0.0.1:{port}/"
    ext = {"sni_hostname": HOST} if v.tls else {}  # connect to 127.0.0.1, SNI and Host the name (--resolve)
    limits = httpx.Limits() if v.keepalive else httpx.Limits(max_keepalive_connections=0)
    try:
        with serving(build, sock) as caddy, \
                httpx.Client(timeout=5, limits=limits, http2=v.http2, verify=False) as client:
            wait_for(lambda: answered(client, url, ext), timeout=30, message=f"{HOST} answering via Caddy")
            with reloading(caddy.admin_port, build, loads, seconds) as loader:
                return drive(client, url, ext, rate, seconds, loader)
    finally:
        backend.close()


class UpgradeEcho(BaseHTTPRequestHandler):
    """Any GET: ``101 Switching Protocols`` to ``Upgrade: echo``, then every byte read is written back."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(101)
        self.send_header("Upgrade", "echo")
        self.send_header("Connection", "Upgrade")
        self.end_headers()
        with contextlib.suppress(OSError):
            while chunk := self.rfile.read1(4096):
                self.wfile.write(chunk)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:
        pass


def open_stream(port: int) -> socket.socket:
    """An upgraded (``Upgrade: echo``) connection to :data:`HOST` through Caddy on ``port``."""
    s = socket.create_connection(("127.0.0.1", port), timeout=3)
    try:
        s.sendall(f"GET /stream HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the upgrade answer")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(f"not upgraded: {head[:80]!r}")
        return s
    except BaseException:
        s.close()
        raise


def echoes(s: socket.socket, n: int) -> bool:
    msg, got = f"ping {n}\n".encode(), b""
    try:
        s.sendall(msg)
        while len(got) < len(msg):
            chunk = s.recv(len(msg) - len(got))
            if not chunk:
                return False
            got += chunk
    except OSError:
        return False
    return got == msg


def check_streams(streams: list[socket.socket | None], port: int, n: int) -> tuple[int, int]:
    """Ping every stream; replace the cut (or missing) ones. Returns (cut, opened)."""
    cut = opened = 0
    for i, s in enumerate(streams):
        if s is not None and echoes(s, n):
            continue
        if s is not None:
            cut += 1
            s.close()
        try:
            streams[i] = open_stream(port)
            opened += 1
        except OSError:
            streams[i] = None
    return cut, opened


def run_streams(loads: int, delay: str | None, count: int = 4, seconds: float = 5.0) -> tuple[int, int]:
    """``count`` upgraded streams pinged every 0.1 s across ``loads`` loads; returns (cut, opened)."""
    backend = Backend("stream")
    backend.server.RequestHandlerClass = UpgradeEcho
    ports = (free_port(), free_port())
    build = partial(caddy_config, listen=f"127.0.0.1:{ports[0]}", upstream=backend.port, ports=ports,
                    stream_close_delay=delay)
    streams: list[socket.socket | None] = []
    try:
        with serving(build) as caddy:
            streams.append(wait_for(lambda: open_stream(ports[0]), timeout=30, message="an upgraded stream"))
            streams += [open_stream(ports[0]) for _ in range(count - 1)]
            cut, opened, n = 0, count, 0
            with reloading(caddy.admin_port, build, loads, seconds) as loader:
                start = time.perf_counter()
                while time.perf_counter() - start < seconds or loader.is_alive():
                    time.sleep(0.1)  # pacing of the pings
                    n += 1
                    c, o = check_streams(streams, ports[0], n)
                    cut, opened = cut + c, opened + o
            c, o = check_streams(streams, ports[0], n + 1)  # after the last load returned
            return cut + c, opened + o
    finally:
        for s in streams:
            if s is not None:
                s.close()
        backend.close()


def http_figures(v: Variant, loads: int, rate: float) -> list[Figure]:
    t = run_http(v, loads, rate)
    name = f"{v.label}, {loads} loads, {t.sent} GETs at {rate:g}/s"
    return [Figure(f"{name}: failed", t.failed, ""), Figure(f"{name}: still failed after one retry", t.after_retry, "")]


def stream_figures(loads: int, delay: str | None) -> list[Figure]:
    cut, opened = run_streams(loads, delay)
    how = f"stream_close_delay {delay}" if delay else "no stream_close_delay"
    return [Figure(f"upgraded streams via reverse_proxy, {loads} loads, {how}: cut (of {opened} opened)", cut, "")]


def scenario_load_cost(loads: int = 100, rate: float = 200.0) -> list[Figure]:
    keepalive, fresh = Variant("HTTP/1.1 keep-alive"), Variant("HTTP/1.1 new connection per request",
                                                              keepalive=False)
    figures = http_figures(Variant("control: " + keepalive.label), 0, rate)
    figures += http_figures(Variant("control: " + fresh.label, keepalive=False), 0, rate)
    figures += http_figures(keepalive, loads, rate) + http_figures(fresh, loads, rate)
    if importlib.util.find_spec("h2") is not None:
        figures += http_figures(Variant("HTTP/2 over TLS", tls=True, http2=True), loads, rate)
    else:
        figures.append(Figure("HTTP/2 over TLS: SKIPPED, h2 is not installed in the venv", float("nan"), ""))
        figures += http_figures(Variant("HTTP/1.1 keep-alive over TLS (instead of HTTP/2)", tls=True), loads, rate)
    figures += http_figures(Variant("fd/N socket: " + keepalive.label, fd=True), loads, rate)
    figures += http_figures(Variant("fd/N socket: " + fresh.label, fd=True, keepalive=False), loads, rate)
    stream_loads = min(loads, 10)
    return figures + stream_figures(stream_loads, None) + stream_figures(stream_loads, "5m")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadcost", description=__doc__)
    parser.add_argument("loads", type=int, nargs="?", default=100)
    parser.add_argument("rate", type=float, nargs="?", default=200.0)
    args = parser.parse_args(argv)
    figures = scenario_load_cost(args.loads, args.rate)
    width = max(len(f.name) for f in figures)
    print(f"{'figure':<{width}}  {'value':>6}")
    for f in figures:
        print(f"{f.name:<{width}}  {f.value:>6g}{f.unit}")


if __name__ == "__main__":
    main()
