"""`python -m bench` — run every scenario, print a table (figure, value, target, met?), write JSON."""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from bench import churn, loadcost, scenarios, traffic
from bench.figures import Figure
from reconciler.caddy.admin import AdminClient
from reconciler.loop.reconcile import Reconciler
from reconciler.render import ConfigEncoder
from reconciler.settings import Settings
from reconciler.sources.inputs import drop_helper, fork_helper


def make_tree(root: Path, n: int, *, per_file: int = 1, vms: int = 500) -> tuple[Path, Path]:
    manifests, instances = root / "manifests", root / "instances"
    manifests.mkdir(parents=True)
    instances.mkdir(parents=True)
    for f in range(0, n, per_file):
        docs = []
        for i in range(f, min(n, f + per_file)):
            docs.append(f"name: ing-{i}\nrules:\n  - match: {{hostname: h{i}.example.com, port: 8080}}\n"
                        f"    target: {{instance: vm-{i % vms}, port: 80}}\n")
        sub = manifests / f"team-{f % 20:02d}"
        sub.mkdir(exist_ok=True)
        (sub / f"ing-{f:06d}.yaml").write_text("---\n".join(docs))
    (instances / "vms.yaml").write_text("".join(
        f"---\nname: vm-{i}\nip: 10.0.{i // 250}.{i % 250 + 1}\n" for i in range(vms)))
    return manifests, instances


def bench_pipeline(n: int, repeats: int) -> list[Figure]:
    """What the daemon's first pass does before Caddy: read + validate every file (a fresh reader: nothing
    cached) -- on one core, and shared with a forked parse helper as the daemon does --, resolve, render and
    encode the body; in-process, the cyclic GC paused as in a pass."""
    with tempfile.TemporaryDirectory() as tmp:
        manifests, instances = make_tree(Path(tmp), n)
        settings = Settings(data_dir=os.path.join(tmp, "data"), manifest_dirs=(str(manifests),),
                            instances_dir=str(instances))
        alone_t, load_t, render_t, total_t, cpu_t = [], [], [], [], []
        size = 0
        inputs = body = None
        for _ in range(repeats):
            for helped in (False, True):
                # as at daemon start: nothing of an earlier read in memory (a fork copies the page tables,
                # and both processes then pay a copy-on-write fault per page of it they touch)
                inputs = body = reconciler = readers = None
                gc.collect()
                reconciler = Reconciler(settings=settings, client=AdminClient("http://127.0.0.1:9"),
                                        include_api=False)
                readers = (reconciler.reader.manifests, reconciler.reader.instances)
                if helped:
                    fork_helper(*readers)  # at daemon start, before any thread: not part of the pass
                gc.disable()
                try:
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    inputs = reconciler.reader.read()
                    t1 = time.perf_counter()
                    body = ConfigEncoder()(reconciler.render(inputs.desired))
                    t2 = time.perf_counter()
                    cpu = time.process_time() - c0
                finally:
                    gc.enable()
                    drop_helper(*readers)
                assert len(inputs.desired.ingresses) == n, "every ingress must be accepted"
                if not helped:
                    alone_t.append(t1 - t0)
                    continue
                assert inputs.manifests.helped_files > 0, "the helper took part"
                size = len(body)
                load_t.append(t1 - t0)
                render_t.append(t2 - t1)
                total_t.append(t2 - t0)
                cpu_t.append(cpu)
        return [
            Figure(f"read+validate {n} ingresses in {n} files, nothing cached, one core (median of {repeats})",
                   statistics.median(alone_t), "s"),
            Figure(f"the same shared with the forked parse helper, as the daemon's first read (median of {repeats})",
                   statistics.median(load_t), "s"),
            Figure(f"render + encode {n} ingresses ({size // 1024} KiB JSON)", statistics.median(render_t), "s"),
            Figure(f"read + validate + render {n} ingresses in {n} files (the daemon's first pass)",
                   statistics.median(total_t), "s", target=2.0),
            Figure("  the same, CPU time of this process (the helper's not counted)", statistics.median(cpu_t), "s"),
        ]


def steal_seconds() -> float | None:
    """CPU time stolen from this VM so far (``/proc/stat``), None where unknown."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


SCENARIOS: dict[str, Callable[[argparse.Namespace], list[Figure]]] = {
    "pipeline": lambda a: bench_pipeline(a.n, a.repeats),
    "change-100": lambda a: scenarios.scenario_change_100(),
    "change-10k": lambda a: scenarios.scenario_change_10k(a.n),
    "weights-10k": lambda a: scenarios.scenario_weights_10k(a.n),
    "api-100": lambda a: scenarios.scenario_api_100(),
    "burst-idle": lambda a: scenarios.scenario_burst_and_idle(),
    "request-50k": lambda a: scenarios.scenario_request_latency(a.big),
    "request-paths-50k": lambda a: scenarios.scenario_request_latency_paths(a.big),
    "vs-caddyfile": lambda a: scenarios.scenario_vs_caddyfile(),
    "churn": lambda a: churn.scenario_churn(a.big),
    "restarts": lambda a: churn.scenario_restarts(),
    "load-cost": lambda a: loadcost.scenario_load_cost(),
    "traffic": lambda a: traffic.scenario_traffic(a.n),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", type=int, default=50_000, help="ingresses for the request-latency scenario")
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--output", default="bench-results.json")
    args = parser.parse_args(argv)
    figures: list[Figure] = []
    for name in args.only or list(SCENARIOS):
        print(f"running {name}...", file=sys.stderr, flush=True)
        stolen = steal_seconds()
        figures.extend(SCENARIOS[name](args))
        if stolen is not None and (after := steal_seconds()) is not None:
            # a shared VM: CPU time the hypervisor gave to others while this scenario ran
            figures.append(Figure(f"  CPU steal during {name} (noise indicator)", after - stolen, "s"))
    width = max(len(f.name) for f in figures)
    print(f"{'figure':<{width}}  {'value':>10}  {'target':>8}  met")
    for f in figures:
        target = "" if f.target is None else f"{f.target:g}{f.unit}"
        met = "" if f.met is None else ("yes" if f.met else "NO")
        print(f"{f.name:<{width}}  {f.value:>9.3f}{f.unit}  {target:>8}  {met}")
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}
    Path(args.output).write_text(json.dumps({"machine": machine, "figures": [
        {**asdict(f), "met": f.met} for f in figures]}, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0 if all(f.met is not False for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
