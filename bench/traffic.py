"""What traffic observability costs Caddy per request: our rendered config for ``n`` hosts (bucketed) with
per-host metrics off / on, and access logs for some ingresses, loaded in turn into one bare Caddy; for each,
Caddy's own CPU time per proxied request (``/proc/<pid>/stat``: the client's and backend's work is not in
it) and the median latency seen by a keep-alive client. Variants alternate round by round, so all see the
same machine."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.figures import Figure
from reconciler.model import Ingress, Origin, ResolvedIngress, Rule
from reconciler.render import render
from reconciler.settings import Settings
from reconciler.validate import resolve
from tests.helpers import Backend, CaddyProcess, free_port

_DIAL = re.compile(r'"[^"{}]*\.hypeman\.internal\.:\d+"')


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _config(n: int, logged: int, settings: Settings, port: int, backend: int, admin: int) -> dict[str, Any]:
    ingresses = [Ingress(f"ing-{i}", f"id-{i}", (Rule(f"h{i}.example.com", port, "vm", 80),),
                         Origin(0, f"{i}.yaml", 0, f"{i}.yaml", 1), access_log=i < logged or None)
                 for i in range(n)]
    desired = resolve(ingresses, [], settings, [])
    assert all(isinstance(r, ResolvedIngress) for r in desired.ingresses)
    text = _DIAL.sub(f'"127.0.0.1:{backend}"', json.dumps(render(desired, settings)))
    config: dict[str, Any] = json.loads(text)
    config["admin"]["listen"] = f"127.0.0.1:{admin}"
    return config


def scenario_traffic(n: int = 10_000, requests: int = 2000, rounds: int = 3) -> list[Figure]:
    backend = Backend("a")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="hypeman-bench-traffic-") as tmp:
        caddy = CaddyProcess(Path(tmp) / "caddy")
        base = Settings(data_dir=os.path.join(tmp, "data"), listen_address="127.0.0.1", http_port=free_port(),
                        https_port=free_port(), admin_port=caddy.admin_port)
        variants = {
            "metrics off": (dataclasses.replace(base, traffic_metrics=False), 0),
            "metrics per host": (base, 0),
            "metrics + 100 access logs": (base, 100),
            "metrics + 1000 access logs": (base, 1000),
        }
        configs = {name: _config(n, logged, s, port, backend.port, caddy.admin_port)
                   for name, (s, logged) in variants.items()}
        # requests to logged and unlogged hosts alike (every request pays for the logger_names walk)
        hosts = [f"h{i}.example.com" for i in random.Random(7).sample(range(n), 64)]
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        latency: dict[str, list[float]] = {name: [] for name in variants}
        try:
            for _ in range(rounds):
                for name, config in configs.items():
                    assert caddy.load(config).status_code == 200
                    # a fresh client: a load closes the idle keep-alive connections of the last one
                    with httpx.Client(timeout=10) as client:
                        for host in hosts:  # warm: connections, map lookups
                            assert client.get(f"http://127.0.0.1:{port}/", headers={"Host": host}).status_code == 200
                        before, times = _cpu_seconds(caddy.proc.pid), []
                        for i in range(requests):
                            t = time.perf_counter()
                            r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": hosts[i % len(hosts)]})
                            times.append(time.perf_counter() - t)
                            assert r.status_code == 200
                        cpu[name].append((_cpu_seconds(caddy.proc.pid) - before) / requests)
                        latency[name].append(statistics.median(times))
        finally:
            caddy.stop()
            backend.close()
    figures: list[Figure] = []
    for name in variants:
        figures.append(Figure(f"traffic {n // 1000}k hosts, {name}: Caddy CPU per request",
                              statistics.median(cpu[name]) * 1e6, "us"))
        figures.append(Figure(f"traffic {n // 1000}k hosts, {name}: median latency",
                              statistics.median(latency[name]) * 1000, "ms"))
    return figures
