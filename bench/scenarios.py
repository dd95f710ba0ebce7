"""End-to-end benchmark scenarios against the real daemon, the real Caddy and real loopback backends.

Every timing that depends on the machine is also given as a ratio to a baseline measured in the same
run (Caddy's own bare ``POST /load`` or ``caddy reload``), since absolute times on a shared machine are
noisy. Each scenario cleans up every process it started.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from bench.figures import Figure
from reconciler.caddy.binary import find_caddy
from tests.helpers import Backend, CaddyProcess, Daemon, free_port, kill_pid, wait_for


def manifest(i: int, port: int, target: int) -> str:
    return (f"name: ing-{i}\nrules:\n  - match: {{hostname: h{i}.example.com, port: {port}}}\n"
            f"    target: {{instance: vm, port: {target}}}\n")


#: the paths of every host in the paths scenario: a catch-all, a prefix, a longer prefix
PATHS = ("", "/api", "/api/v2")


def manifest_with_paths(i: int, port: int, target: int) -> str:
    rules = "".join(f"  - match: {{hostname: h{i}.example.com, port: {port}{', path: ' + p if p else ''}}}\n"
                    f"    target: {{instance: vm, port: {target}}}\n" for p in PATHS)
    return f"name: ing-{i}\nrules:\n{rules}"


def write_tree(manifests: Path, n: int, port: int, target: int, *, paths: bool = False) -> None:
    make = manifest_with_paths if paths else manifest
    for i in range(n):
        sub = manifests / f"team-{i % 20:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"ing-{i:06d}.yaml").write_text(make(i, port, target))


def path_of(manifests: Path, i: int) -> Path:
    return manifests / f"team-{i % 20:02d}" / f"ing-{i:06d}.yaml"


def atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def routed(client: httpx.Client, port: int, host: str, backend: str) -> bool:
    try:
        r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
    except httpx.HTTPError:
        return False
    return r.status_code == 200 and r.text.startswith(f"backend={backend} ")


def wait_routed(client: httpx.Client, port: int, host: str, backend: str, timeout: float = 60) -> float:
    """Seconds until ``host`` answers from ``backend`` (polled every ~2 ms)."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        if routed(client, port, host, backend):
            return time.perf_counter() - start
        time.sleep(0.002)
    raise AssertionError(f"{host} not routed to {backend} within {timeout}s")


@contextmanager
def daemon_with(n: int, *, resync: int = 3600, paths: bool = False
                ) -> Iterator[tuple[Daemon, Backend, Backend, int, Path]]:
    tmp = Path(tempfile.mkdtemp(prefix="hypeman-bench-"))
    a, b = Backend("a"), Backend("b")
    port = free_port()
    manifests = tmp / "manifests"
    write_tree(manifests, n, port, a.port, paths=paths)
    (tmp / "instances").mkdir()
    (tmp / "instances" / "vm.yaml").write_text("name: vm\nip: 127.0.0.1\n")
    d = Daemon(tmp, manifests=[manifests], instances=tmp / "instances", resync=resync,
               env={"HYPEMAN_LOG_LEVEL": "info"})
    try:
        yield d, a, b, port, manifests
    finally:
        d.cleanup()
        a.close()
        b.close()
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


class BareCaddy:
    """Caddy on its own, serving a copy of ``config`` on its own admin and listen ports: the baseline our
    change->live is compared with, measured next to ours (alternating with our changes, so both see the
    same machine). Its steps retarget ``host`` between the two backends, as our changes do."""

    def __init__(self, config: dict[str, Any], host: str, backends: tuple[Backend, Backend]) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="hypeman-bench-bare-")
        self.caddy = CaddyProcess(Path(self._tmp.name))
        cfg = json.loads(json.dumps(config))
        cfg["admin"]["listen"] = f"127.0.0.1:{self.caddy.admin_port}"
        self.ports = []
        for srv in cfg["apps"]["http"]["servers"].values():
            self.ports.append(free_port())
            srv["listen"] = [f"127.0.0.1:{self.ports[-1]}"]
        assert self.caddy.load(cfg).status_code == 200
        self.config, self.host, self.backends = cfg, host, backends
        self.on = 0  # index of the backend ``host`` goes to now
        self._client = httpx.Client(timeout=5)

    def _next(self) -> tuple[bytes, Backend]:
        self.on = 1 - self.on
        target = self.backends[self.on]
        self.config = _retarget(self.config, self.host, f"127.0.0.1:{target.port}")
        return json.dumps(self.config).encode(), target

    def _post(self, body: bytes) -> None:
        # the plain stdlib client: no per-call TLS context or other set-up of ours inside the timed load
        # (an httpx.post builds an SSL context first), and its send and wait release the GIL
        conn = http.client.HTTPConnection("127.0.0.1", self.caddy.admin_port, timeout=120)
        try:
            conn.request("POST", "/load", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            assert r.status == 200, r.read()
        finally:
            conn.close()

    def quiet(self) -> float:
        """Seconds of one ``POST /load`` with no other traffic."""
        body, _ = self._next()
        t = time.perf_counter()
        self._post(body)
        return time.perf_counter() - t

    def polled(self) -> float:
        """Seconds from a ``POST /load`` to the first request routed to the new backend, polled exactly as
        :func:`change_to_live` polls (every ~2 ms; polling costs Caddy CPU while it loads)."""
        body, target = self._next()
        poster = threading.Thread(target=self._post, args=(body,))
        t = time.perf_counter()
        poster.start()
        wait_routed(self._client, self.ports[0], self.host, target.name)
        took = time.perf_counter() - t
        poster.join()
        return took

    def close(self) -> None:
        self._client.close()
        self.caddy.stop()
        self._tmp.cleanup()


def _retarget(config: dict[str, Any], host: str, dial: str) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(json.dumps(config))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            text = json.dumps(node.get("match", ""))
            if host in text and "handle" in node:
                for h in node["handle"]:
                    if h.get("handler") == "reverse_proxy":
                        h["upstreams"] = [{"dial": dial}]
            if node.get("handler") == "map":
                for m in node.get("mappings", []):
                    if m.get("input") == host:
                        m["outputs"] = [dial, *m["outputs"][1:]]  # (the instance's name stays)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(cfg)
    return cfg


def change_to_live(manifests: Path, port: int, backends: tuple[Backend, Backend], indices: list[int],
                   client: httpx.Client, current: dict[int, int] | None = None) -> list[float]:
    """Edit one manifest at a time, moving its host to the other backend, and time file write -> first
    request routed to that backend. ``current``: index -> backend (0/1) now, every host on the first by
    default (a write trees start with); updated in place."""
    out = []
    current = current if current is not None else {}
    for i in indices:
        to = 1 - current.get(i, 0)
        current[i] = to
        target = backends[to]
        text = manifest(i, port, target.port)
        start = time.perf_counter()
        atomic(path_of(manifests, i), text)
        wait_routed(client, port, f"h{i}.example.com", target.name)
        out.append(time.perf_counter() - start)
    return out


def cold_start(n: int) -> float:
    """Seconds from starting a daemon on a fresh data dir to the first and last of ``n`` hosts routed."""
    with daemon_with(n) as (d, _a, _b, port, _manifests), httpx.Client(timeout=5) as client:
        t0 = time.perf_counter()
        d.start(wait_ready=False)
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=120)
        wait_routed(client, port, "h0.example.com", "a", timeout=10)
        return time.perf_counter() - t0


def scenario_change_10k(n: int = 10_000, changes: int = 7, starts: int = 3) -> list[Figure]:
    colds = [cold_start(n) for _ in range(starts - 1)]
    with daemon_with(n) as (d, a, b, port, manifests), httpx.Client(timeout=5) as client:
        t0 = time.perf_counter()
        d.start(wait_ready=False)
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=120)
        wait_routed(client, port, "h0.example.com", "a", timeout=10)
        colds.append(time.perf_counter() - t0)
        cold = statistics.median(colds)
        # The bare baseline next to ours, on a copy of the config now live: our changes and its loads
        # alternate, so a machine that speeds up or slows down meanwhile weighs on both alike. Each side
        # starts idle: one edit on a converged daemon (its report thread done with the last pass), one load
        # on a Caddy that is not loading.
        live = httpx.get(f"http://127.0.0.1:{d.admin_port}/config/", timeout=30).json()
        bare = BareCaddy(live, f"h{n // 2 - 1}.example.com", (a, b))
        try:
            before = len(d.log_events("reconcile.finished"))
            lat, polled, quiet = [], [], []
            for k in range(changes):
                lat += change_to_live(manifests, port, (a, b), [n // 2 + k], client)
                wait_for(partial(_passes_logged, d, before + k + 1), timeout=30,
                         message="the pass's reports written")
                polled.append(bare.polled())
                quiet.append(bare.quiet())
        finally:
            bare.close()
        phases = pass_phases(d, before)
        rss = peak_rss(d)
        helper_rss = [e["peak_rss_mb"] for e in d.log_events("parse_helper.done")]
    base = statistics.median(polled)
    med = statistics.median(lat)
    return [
        Figure(f"cold start to all routes live at {n // 1000}k ingresses (median of {starts})", cold, "s",
               target=3.0),
        Figure(f"change->live at {n // 1000}k (median of {changes})", med, "s"),
        Figure(f"Caddy bare POST /load of the same config at {n // 1000}k, no other traffic (median)",
               statistics.median(quiet), "s"),
        Figure(f"Caddy bare POST /load -> first routed request at {n // 1000}k (polled as change->live, "
               "alternating with ours, median)", base, "s"),
        Figure(f"change->live / bare POST /load at {n // 1000}k", med / base, "x", target=1.5),
        Figure(f"change->live minus bare POST /load at {n // 1000}k (our overhead)", (med - base) * 1000, "ms",
               target=250),
        Figure(f"reconciler peak RSS at {n // 1000}k ingresses", rss, "MB", target=150),
        *[Figure("  the forked parse helper's peak RSS (it exits after the first read)", v, "MB")
          for v in helper_rss[:1]],
        *[Figure(f"  change at {n // 1000}k, our pass: {name} (median)", value, "ms") for name, value in phases],
    ]


def _passes_logged(d: Daemon, count: int) -> bool:
    """The daemon logged ``count`` passes (its report thread writes a pass's line after its state files)."""
    return len(d.log_events("reconcile.finished")) >= count


def pass_phases(d: Daemon, since: int) -> list[tuple[str, float]]:
    """Medians of the daemon's own account of the passes since the ``since``-th (its pass log): where a
    change's time goes on our side, and what Caddy's load took inside the pass."""
    passes = [e for e in d.log_events("reconcile.finished")[since:] if e.get("loads")]
    if not passes:
        return []
    out = [("queued (first event -> pass start)", statistics.median(e.get("queued_ms") or 0.0 for e in passes))]
    for phase in ("read", "render", "load"):
        out.append((phase, statistics.median(e["phases_ms"].get(phase, 0.0) for e in passes)))
    return out


def peak_rss(d: Daemon) -> float:
    assert d.proc is not None
    for line in Path(f"/proc/{d.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scenario_change_100(n: int = 100, changes: int = 40) -> list[Figure]:
    with daemon_with(n) as (d, a, b, port, manifests), httpx.Client(timeout=5) as client:
        d.start()
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=30)
        lat = change_to_live(manifests, port, (a, b), [k % n for k in range(changes)], client)
    lat.sort()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    return [
        Figure(f"change->live p50 at {n} ingresses ({changes} changes)", p50 * 1000, "ms", target=150),
        Figure(f"change->live p99 at {n} ingresses ({changes} changes)", p99 * 1000, "ms", target=400),
    ]


def scenario_api_100(n: int = 100, creates: int = 30) -> list[Figure]:
    """Change->live through the API: ``POST /ingresses`` -> 201 (answered once the route is live), and
    POST -> first request routed to the new host, for ``creates`` new ingresses next to ``n`` others."""
    with daemon_with(n) as (d, a, _b, port, _manifests), httpx.Client(timeout=5) as client, \
            httpx.Client(base_url=d.api_url, timeout=30) as api:
        d.start()
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=30)
        to_201, to_routed = [], []
        for i in range(creates):
            host = f"api{i}.example.com"
            body = {"name": f"api-{i}", "rules": [{"match": {"hostname": host, "port": port},
                                                   "target": {"instance": "vm", "port": a.port}}]}
            start = time.perf_counter()
            r = api.post("/ingresses", json=body)
            answered = time.perf_counter() - start
            assert r.status_code == 201, r.text
            wait_routed(client, port, host, "a", timeout=10)
            to_201.append(answered)
            to_routed.append(time.perf_counter() - start)

    def p99(values: list[float]) -> float:
        values = sorted(values)
        return values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]

    return [
        Figure(f"API POST -> 201 at {n} ingresses, p50 ({creates} creates)", statistics.median(to_201) * 1000, "ms"),
        Figure(f"API POST -> 201 at {n} ingresses, p99", p99(to_201) * 1000, "ms"),
        Figure(f"API POST -> first routed request at {n}, p50", statistics.median(to_routed) * 1000, "ms"),
        Figure(f"API POST -> first routed request at {n}, p99", p99(to_routed) * 1000, "ms"),
    ]


def scenario_burst_and_idle(n: int = 1000) -> list[Figure]:
    from tests.helpers import count_loads

    with daemon_with(0, resync=1) as (d, a, _b, port, manifests), httpx.Client(timeout=5) as client:
        d.start()
        before = count_loads(d.caddy_log)
        write_tree(manifests, n, port, a.port)
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=60)
        for i in range(0, n, 97):
            wait_routed(client, port, f"h{i}.example.com", "a", timeout=10)
        burst = count_loads(d.caddy_log) - before
        wait_for(lambda: d.log_events("reconcile.finished")[-1]["outcome"] != "applied", timeout=10)
        idle_start = count_loads(d.caddy_log)
        passes = d.passes()
        wait_for(lambda: d.passes() >= passes + 5, timeout=30, message="5 idle resync passes")
        idle = count_loads(d.caddy_log) - idle_start
    return [
        Figure(f"{n} files dropped at once -> Caddy loads", burst, "", target=3),
        Figure("idle (5 resyncs, nothing changed) -> Caddy loads", idle, "", target=0),
    ]


def scenario_request_latency(n: int = 50_000, samples: int = 400) -> list[Figure]:
    with daemon_with(n) as (d, _a, _b, port, _manifests), httpx.Client(timeout=10) as client:
        d.start(wait_ready=False)
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=600)

        def timing(host: str) -> float:
            out = []
            for _ in range(samples):
                t = time.perf_counter()
                r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
                out.append(time.perf_counter() - t)
                assert r.status_code == 200
            return statistics.median(out)

        timing("h0.example.com")  # warm up
        first, last = timing("h0.example.com"), timing(f"h{n - 1}.example.com")
    return [
        Figure(f"request latency, first-defined host at {n // 1000}k", first * 1000, "ms"),
        Figure(f"request latency, last-defined host at {n // 1000}k", last * 1000, "ms"),
        Figure(f"request latency last / first at {n // 1000}k", last / first, "x", target=1.5),
    ]


def scenario_request_latency_paths(n: int = 50_000, samples: int = 400) -> list[Figure]:
    """Request latency with paths: every one of ``n`` hosts has a catch-all, ``/api`` and ``/api/v2``
    (3n rules); the first- and the last-defined host, on the longest prefix and on the catch-all. Also
    how long the start took until the last host answered (what Caddy provisions for 3n rules)."""
    with daemon_with(n, paths=True) as (d, _a, _b, port, _manifests), httpx.Client(timeout=10) as client:
        start = time.perf_counter()
        d.start(wait_ready=False)
        last_host = f"h{n - 1}.example.com"
        wait_routed(client, port, last_host, "a", timeout=900)
        cold = time.perf_counter() - start

        def timing(host: str, path: str) -> float:
            out = []
            for _ in range(samples):
                t = time.perf_counter()
                r = client.get(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
                out.append(time.perf_counter() - t)
                assert r.status_code == 200 and r.text.startswith("backend=a "), r.text
            return statistics.median(out)

        timing("h0.example.com", "/api/v2/x")  # warm up
        figures = [Figure(f"cold start to the last host routed, {n // 1000}k hosts x {len(PATHS)} paths", cold, "s")]
        for path in ("/api/v2/x", "/"):
            first, last = timing("h0.example.com", path), timing(last_host, path)
            what = "longest prefix" if path != "/" else "catch-all"
            figures += [
                Figure(f"request latency with paths ({what}), first-defined host at {n // 1000}k", first * 1000, "ms"),
                Figure(f"request latency with paths ({what}), last-defined host at {n // 1000}k", last * 1000, "ms"),
                Figure(f"request latency with paths ({what}) last / first at {n // 1000}k", last / first, "x",
                       target=1.5),
            ]
        pid = d.caddy_pid()
        rss = rss_mb(pid) if pid is not None else None
    return figures + ([Figure(f"Caddy RSS, {n // 1000}k hosts x {len(PATHS)} paths", rss, "MB")] if rss else [])


def rss_mb(pid: int) -> float | None:
    """A process's resident memory now (``VmRSS``), in MB."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def caddyfile(n: int, port: int, targets: dict[int, int], default: int, admin: int) -> str:
    lines = [f"{{\n\tadmin 127.0.0.1:{admin}\n\tauto_https off\n\tpersist_config off\n}}\n"]
    for i in range(n):
        lines.append(f"http://h{i}.example.com:{port} {{\n\treverse_proxy 127.0.0.1:{targets.get(i, default)}\n}}\n")
    return "".join(lines)


def caddy_reload_time(n: int, changes: int = 3) -> float:
    """Median time for a plain Caddy + Caddyfile: edit one site, `caddy reload`, until routed."""
    with tempfile.TemporaryDirectory(prefix="hypeman-bench-caddyfile-") as tmp:
        a, b = Backend("a"), Backend("b")
        admin, port = free_port(), free_port()
        path = Path(tmp) / "Caddyfile"
        path.write_text(caddyfile(n, port, {}, a.port, admin))
        env = {**os.environ, "XDG_DATA_HOME": tmp, "XDG_CONFIG_HOME": tmp, "HOME": tmp}
        log = open(Path(tmp) / "caddy.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen([find_caddy(), "run", "--config", str(path), "--adapter", "caddyfile"],
                                stdout=log, stderr=log, env=env, start_new_session=True)
        try:
            with httpx.Client(timeout=5) as client:
                wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=120)
                times = []
                for k in range(changes):
                    i = n // 2 + k
                    path.write_text(caddyfile(n, port, {i: b.port}, a.port, admin))
                    t = time.perf_counter()
                    subprocess.run([find_caddy(), "reload", "--config", str(path), "--adapter", "caddyfile",
                                    "--address", f"127.0.0.1:{admin}"], check=True, capture_output=True, env=env)
                    wait_routed(client, port, f"h{i}.example.com", "b", timeout=120)
                    times.append(time.perf_counter() - t)
            return statistics.median(times)
        finally:
            kill_pid(proc.pid)
            log.close()
            a.close()
            b.close()


def scenario_vs_caddyfile(sizes: tuple[int, ...] = (1000, 10_000), changes: int = 5) -> list[Figure]:
    figures = []
    for n in sizes:
        theirs = caddy_reload_time(n, changes)
        with daemon_with(n) as (d, a, b, port, manifests), httpx.Client(timeout=5) as client:
            d.start(wait_ready=False)
            wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=120)
            ours = statistics.median(change_to_live(manifests, port, (a, b),
                                                    [n // 2 + k for k in range(changes)], client))
        label = f"{n // 1000}k"
        figures += [
            Figure(f"caddy reload of an equivalent Caddyfile, {label} sites", theirs, "s"),
            Figure(f"our change->live, {label} ingresses", ours, "s"),
            Figure(f"our change->live / caddy reload at {label}", ours / theirs, "x", target=0.5),
        ]
    return figures


def pool_manifest(port: int, weights: tuple[int, int], a: Backend, b: Backend) -> str:
    return (f"name: canary\nrules:\n  - match: {{hostname: canary.example.com, port: {port}}}\n"
            f"    targets: [{{instance: vm, port: {a.port}, weight: {weights[0]}}}, "
            f"{{instance: vm, port: {b.port}, weight: {weights[1]}}}]\n")


def scenario_weights_10k(n: int = 10_000, changes: int = 7) -> list[Figure]:
    """Change -> live when only a pool's weights change (a canary's step: all of the traffic from one target
    to the other), at ``n`` ingresses, next to an ordinary target change on the same daemon."""
    with daemon_with(n) as (d, a, b, port, manifests), httpx.Client(timeout=5) as client:
        pool = manifests / "canary.yaml"
        atomic(pool, pool_manifest(port, (1, 0), a, b))
        d.start(wait_ready=False)
        wait_routed(client, port, f"h{n - 1}.example.com", "a", timeout=120)
        wait_routed(client, port, "canary.example.com", "a", timeout=30)
        weights, targets = [], []
        current: dict[int, int] = {}
        for k in range(changes):
            to = (0, 1) if k % 2 == 0 else (1, 0)
            before = len(d.log_events("reconcile.finished"))
            start = time.perf_counter()
            atomic(pool, pool_manifest(port, to, a, b))
            wait_routed(client, port, "canary.example.com", "b" if to[1] else "a")
            weights.append(time.perf_counter() - start)
            wait_for(partial(_passes_logged, d, before + 1), timeout=30, message="the pass's reports written")
            before = len(d.log_events("reconcile.finished"))
            targets += change_to_live(manifests, port, (a, b), [n // 2 + k], client, current)
            wait_for(partial(_passes_logged, d, before + 1), timeout=30, message="the pass's reports written")
    return [
        Figure(f"change->live, weights only (a canary step) at {n // 1000}k (median of {changes})",
               statistics.median(weights), "s"),
        Figure(f"change->live, a target changed at {n // 1000}k, same run (median of {changes})",
               statistics.median(targets), "s"),
    ]
