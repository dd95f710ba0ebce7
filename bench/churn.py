"""VM churn without config loads: instances reach Caddy through the DNS responder (issue 13's targets).

Scenarios (each cleans up every process it started):

* ``churn-50k``: at 50k ingresses, an instance's IP change / stop / start -> live (and the Caddy loads it
  took); a new VM under a hostname pattern -> reachable; the per-request cost of dialling by name through
  the responder next to today's IP dial (a bare Caddy serving copies of the live config), at 1k and 50k.
* ``restarts``: 100 VM restarts (a new IP each) while a keep-alive client and a new-connection client hit
  another host at 200 req/s each, and a third client hits the restarting host (its requests are held);
  then ``kill -9`` of the reconciler during churn, and of the responder.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench.figures import Figure
from bench.scenarios import atomic, write_tree
from tests.helpers import Backend, CaddyProcess, Daemon, count_loads, free_port, wait_for

ZONE = ".hypeman.internal.:"


def instance(name: str, ip: str, state: str = "Running") -> str:
    return f"name: {name}\nip: {ip}\nstate: {state}\n"


def answer(client: httpx.Client, port: int, host: str) -> tuple[int, str]:
    try:
        r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
    except httpx.HTTPError as exc:
        return 0, type(exc).__name__
    return r.status_code, r.text


def until(check: Callable[[], bool], timeout: float = 30) -> float:
    """Seconds until ``check()`` holds (polled every ~1 ms)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if check():
            return time.perf_counter() - start
        time.sleep(0.001)
    raise AssertionError(f"not within {timeout}s")


@contextmanager
def daemon(n: int, env: dict[str, str] | None = None) -> Iterator[tuple[Daemon, Backend, Backend, int]]:
    """A daemon with ``n`` ingresses on instance ``vm`` (backend a on 127.0.0.1), backend b on the same port of
    127.0.0.2 (an IP change moves ``vm`` to it), and a pattern ``{instance}.vm.test`` on the same port."""
    tmp = Path(tempfile.mkdtemp(prefix="hypeman-bench-churn-"))
    a = Backend("a")
    b = Backend("b", host="127.0.0.2", port=a.port)
    port = free_port()
    manifests = tmp / "manifests"
    write_tree(manifests, n, port, a.port)
    (manifests / "pattern.yaml").write_text(
        f"name: vms\nrules:\n  - match: {{hostname: '{{instance}}.vm.test', port: {port}}}\n"
        f"    target: {{instance: '{{instance}}', port: {a.port}}}\n")
    (tmp / "instances").mkdir()
    (tmp / "instances" / "vm.yaml").write_text(instance("vm", "127.0.0.1"))
    d = Daemon(tmp, manifests=[manifests], instances=tmp / "instances", resync=3600,
               env={"HYPEMAN_LOG_LEVEL": "info", **(env or {})})
    try:
        yield d, a, b, port
    finally:
        d.cleanup()
        a.close()
        b.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def instance_changes(d: Daemon, port: int, host: str, repeats: int = 5) -> list[Figure]:
    """IP change / stop / start of ``vm`` -> the first request that shows it, and the loads they cost."""
    vm = d.instances / "vm.yaml"
    moved: list[float] = []
    stopped: list[float] = []
    started: list[float] = []
    loads = count_loads(d.caddy_log)
    with httpx.Client(timeout=10) as client:
        for _ in range(repeats):
            for ip, name, into in (("127.0.0.2", "b", moved), ("127.0.0.1", "a", moved)):
                t = time.perf_counter()
                atomic(vm, instance("vm", ip))
                until(lambda name=name: answer(client, port, host)[1].startswith(f"backend={name} "))  # type: ignore[misc]
                into.append(time.perf_counter() - t)
            t = time.perf_counter()
            atomic(vm, instance("vm", "127.0.0.1", "Stopped"))
            until(lambda: answer(client, port, host)[0] == 503)
            stopped.append(time.perf_counter() - t)
            t = time.perf_counter()
            atomic(vm, instance("vm", "127.0.0.1"))
            until(lambda: answer(client, port, host)[0] == 200)
            started.append(time.perf_counter() - t)
    loads = count_loads(d.caddy_log) - loads
    n = repeats * 4
    return [
        Figure(f"instance IP change -> live (median of {len(moved)})", statistics.median(moved) * 1000, "ms",
               target=30),
        Figure(f"instance stop -> 503 naming it (median of {repeats})", statistics.median(stopped) * 1000, "ms",
               target=30),
        Figure(f"instance start -> live (median of {repeats})", statistics.median(started) * 1000, "ms", target=30),
        Figure(f"Caddy loads for {n} instance changes", loads, "", target=0),
    ]


def new_vm(d: Daemon, port: int) -> list[Figure]:
    took = []
    loads = count_loads(d.caddy_log)
    with httpx.Client(timeout=10) as client:
        for k in range(5):
            name = f"fresh{k}"
            t = time.perf_counter()
            atomic(d.instances / f"{name}.yaml", instance(name, "127.0.0.1"))
            until(lambda name=name: answer(client, port, f"{name}.vm.test")[0] == 200)  # type: ignore[misc]
            took.append(time.perf_counter() - t)
    return [Figure("new VM under a pattern: instance file -> reachable (median of 5)",
                   statistics.median(took) * 1000, "ms", target=50),
            Figure("  Caddy loads for 5 new VMs under a pattern", count_loads(d.caddy_log) - loads, "", target=0)]


def by_ip(config: dict[str, Any], keepalive: bool) -> dict[str, Any]:
    """``config`` with every name dial replaced by the IP the responder gives (127.0.0.1: the bench's
    instances) -- today's way; ``keepalive``: with Caddy's default pooled upstream connections."""
    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            if out.get("handler") == "reverse_proxy":
                out.pop("transport", None)
                if not keepalive:
                    out["transport"] = {"protocol": "http", "keep_alive": {"enabled": False}}
            if "dial" in out and isinstance(out["dial"], str) and ZONE in out["dial"]:
                out["dial"] = "127.0.0.1:" + out["dial"].rsplit(":", 1)[1]
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, str) and ZONE in node and "{" not in node:
            return "127.0.0.1:" + node.rsplit(":", 1)[1]
        return node
    result: dict[str, Any] = walk(config)
    return result


def latency(port: int, host: str, samples: int = 600) -> tuple[float, float]:
    out = []
    with httpx.Client(timeout=10) as client:
        for _ in range(samples + 50):
            t = time.perf_counter()
            r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    out = sorted(out[50:])
    return statistics.median(out) * 1000, out[int(0.99 * (len(out) - 1))] * 1000


def dial_cost(d: Daemon, n: int) -> list[Figure]:
    """p50/p99 of one request to the last host, three ways, on one bare Caddy (copies of the live config):
    by name through the responder (ours), by IP without pooling (what pooling costs), by IP pooled (before)."""
    live = httpx.get(f"http://127.0.0.1:{d.admin_port}/config/", timeout=60).json()
    tmp = tempfile.TemporaryDirectory(prefix="hypeman-bench-dial-")
    caddy = CaddyProcess(Path(tmp.name))
    figures = []
    host = f"h{n - 1}.example.com"
    try:
        for label, config in (("by name via the responder (ours)", live),
                              ("by IP, no pooling", by_ip(live, keepalive=False)),
                              ("by IP, pooled (before)", by_ip(live, keepalive=True))):
            cfg = json.loads(json.dumps(config))
            cfg["admin"]["listen"] = f"127.0.0.1:{caddy.admin_port}"
            port = free_port()
            for srv in cfg["apps"]["http"]["servers"].values():
                srv["listen"] = [f"127.0.0.1:{port}"]
            assert caddy.load(cfg).status_code == 200
            with httpx.Client(timeout=5) as probe:
                wait_for(lambda port=port, probe=probe: answer(probe, port, host)[0] == 200,  # type: ignore[misc]
                         timeout=60)
            p50, p99 = latency(port, host)
            figures += [Figure(f"request p50 at {n // 1000}k hosts, dial {label}", p50, "ms"),
                        Figure(f"request p99 at {n // 1000}k hosts, dial {label}", p99, "ms")]
    finally:
        caddy.stop()
        tmp.cleanup()
    return figures


def scenario_churn(big: int = 50_000, small: int = 1000) -> list[Figure]:
    figures: list[Figure] = []
    with daemon(small) as (d, _a, _b, port):
        d.start()
        wait_for(lambda: answer(httpx.Client(timeout=5), port, f"h{small - 1}.example.com")[0] == 200, timeout=60)
        figures += dial_cost(d, small)
    with daemon(big) as (d, _a, _b, port):
        d.start(wait_ready=False)
        wait_for(lambda: answer(httpx.Client(timeout=5), port, f"h{big - 1}.example.com")[0] == 200, timeout=600)
        wait_for(lambda: d.passes() >= 1, timeout=60)
        figures += instance_changes(d, port, f"h{big // 2}.example.com")
        figures += new_vm(d, port)
        figures += dial_cost(d, big)
    return figures


class Traffic:
    """A client thread at ``rate`` req/s to ``host``: keep-alive or a new connection per request. Counts
    failures (no answer, or a status other than 200) and how many requests took over 100 ms (held)."""

    def __init__(self, port: int, host: str, rate: float, *, keepalive: bool) -> None:
        self.port, self.host, self.rate, self.keepalive = port, host, rate, keepalive
        self.sent = self.failed = self.held = 0
        self.longest = 0.0
        self.errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _get(self, conn: http.client.HTTPConnection) -> tuple[int, str]:
        try:
            conn.request("GET", "/", headers={"Host": self.host})
            r = conn.getresponse()
            return r.status, r.read().decode(errors="replace")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()  # (a keep-alive client opens a new connection for its next request)
            return 0, type(exc).__name__

    def _run(self) -> None:
        """The plain stdlib client: cheap enough for 200 new connections a second from one thread."""
        interval = 1.0 / self.rate
        pooled = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        nxt = time.perf_counter()
        while not self._stop.is_set():
            t = time.perf_counter()
            if self.keepalive:
                status, text = self._get(pooled)
            else:
                fresh = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                status, text = self._get(fresh)
                fresh.close()
            took = time.perf_counter() - t
            self.sent += 1
            self.longest = max(self.longest, took)
            if took > 0.1:
                self.held += 1
            if status != 200:
                self.failed += 1
                key = f"{status} {text[:60]}"
                self.errors[key] = self.errors.get(key, 0) + 1
            nxt += interval
            self._stop.wait(max(0.0, nxt - time.perf_counter()))
        pooled.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def scenario_restarts(restarts: int = 100, rate: float = 200.0) -> list[Figure]:
    """100 VM restarts (new IP each) next to steady traffic; kill -9 of the reconciler and the responder."""
    figures: list[Figure] = []
    with daemon(100, env={"HYPEMAN_HOLD": "10s", "HYPEMAN_HOLD_INTERVAL": "50ms"}) as (d, a, _b, port):
        other = d.manifests[0] / "other.yaml"
        other.write_text(f"name: other\nrules:\n  - match: {{hostname: other.test, port: {port}}}\n"
                         f"    target: {{instance: other, port: {a.port}}}\n")
        (d.instances / "other.yaml").write_text(instance("other", "127.0.0.1"))
        (d.instances / "vm.yaml").write_text(instance("vm", "127.0.1.1"))
        vm_backend = Backend("vm", host="127.0.1.1", port=a.port)
        d.start()
        wait_for(lambda: answer(httpx.Client(timeout=5), port, "other.test")[0] == 200, timeout=30)
        wait_for(lambda: answer(httpx.Client(timeout=5), port, "h1.example.com")[0] == 200, timeout=30)
        loads = count_loads(d.caddy_log)
        pooled = Traffic(port, "other.test", rate, keepalive=True)
        fresh = Traffic(port, "other.test", rate, keepalive=False)
        restarting = Traffic(port, "h1.example.com", 50, keepalive=True)
        try:
            for k in range(restarts):
                # the VM goes down: its backend stops, hypeman marks it stopped; it comes back on a new IP
                vm_backend.close()
                atomic(d.instances / "vm.yaml", instance("vm", f"127.0.1.{k + 1}", "Stopped"))
                time.sleep(0.05)  # (the VM's downtime: requests to it meanwhile are held)
                ip = f"127.0.{(k + 2) // 250 + 1}.{(k + 2) % 250 + 1}"
                vm_backend = Backend("vm", host=ip, port=a.port)
                atomic(d.instances / "vm.yaml", instance("vm", ip))
                time.sleep(0.05)
        finally:
            for t in (pooled, fresh, restarting):
                t.stop()
        vm_backend.close()
        figures += [
            Figure(f"{restarts} VM restarts: failed requests to another host, keep-alive client "
                   f"({pooled.sent} at {rate:g}/s)", pooled.failed, "", target=0),
            Figure(f"{restarts} VM restarts: failed requests to another host, new connection each "
                   f"({fresh.sent} at {rate:g}/s)", fresh.failed, "", target=0),
            Figure(f"  Caddy loads during {restarts} VM restarts", count_loads(d.caddy_log) - loads, "", target=0),
            Figure(f"{restarts} VM restarts: requests to the restarting host ({restarting.sent}) that failed",
                   restarting.failed, "", target=0),
            Figure("  of them held (>100 ms) and then delivered", restarting.held - restarting.failed, ""),
            Figure("  the longest wait of a held request", restarting.longest * 1000, "ms"),
        ]
        figures += kills(d, port, a)
    return figures


def kills(d: Daemon, port: int, a: Backend) -> list[Figure]:
    """kill -9 of the reconciler during VM churn, then of the responder, with traffic flowing."""
    vm = d.instances / "vm.yaml"
    atomic(vm, instance("vm", "127.0.0.1"))
    wait_for(lambda: answer(httpx.Client(timeout=5), port, "h1.example.com")[1].startswith("backend=a "), timeout=10)
    pooled = Traffic(port, "other.test", 200, keepalive=True)
    fresh = Traffic(port, "other.test", 200, keepalive=False)
    vm_traffic = Traffic(port, "h1.example.com", 50, keepalive=True)
    try:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(timeout=10)
        d.proc = None
        time.sleep(1.0)  # (traffic without a reconciler: the point of the measure)
        first = d.responder_pid()
        assert first is not None
        d.start()  # adopts Caddy and the responder
        assert d.responder_pid() == first
        os.kill(first, signal.SIGKILL)
        back = until(lambda: d.responder_pid() not in (None, first), timeout=30)
        time.sleep(1.0)
    finally:
        for t in (pooled, fresh, vm_traffic):
            t.stop()
    return [
        Figure("kill -9 reconciler, then of the responder: failed requests, keep-alive client "
               f"({pooled.sent})", pooled.failed, "", target=0),
        Figure(f"  the same, new connection each ({fresh.sent})", fresh.failed, ""),
        Figure(f"  the same, requests to a VM host ({vm_traffic.sent}) failed", vm_traffic.failed, ""),
        Figure("  responder kill -9 -> a new responder (seconds)", back, "s"),
        Figure("  the longest request meanwhile (held while the responder was down)",
               max(pooled.longest, fresh.longest) * 1000, "ms"),
    ]
