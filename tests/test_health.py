"""Health checks (issue 15, part 3): a rule's ``health_check`` (active: Caddy asks each target ``GET
path``; passive: failed requests) rendered into Caddy's ``health_checks``; what Caddy concludes is read
back from its admin API into the status, ``GET /ingresses/{id}`` and the metrics, with ``TargetUnhealthy``
when no target of a rule is healthy.

Unit tests for validation, rendering, the read-back parsing and the status verdict; against the real
Caddy: a target answering 500 on its health path is taken out (no request reaches it) and reported, and
comes back when healthy; a rule whose only target is unhealthy answers 503 saying so.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.caddy.upstreams import join, parse_healthy
from reconciler.model import HealthCheck, Reason
from reconciler.render import Renderer
from reconciler.settings import Settings
from reconciler.status import IngressStatus, with_health
from tests.helpers import Daemon, Service, free_port, instance_yaml, validate_cli, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()


def health_rule(host: str, targets: list[tuple[str, int]], *, listen: int = 80, check: str = "") -> str:
    items = ", ".join(f"{{instance: {i}, port: {p}}}" for i, p in targets)
    return (f"  - match: {{hostname: {host}, port: {listen}}}\n    targets: [{items}]\n"
            f"    health_check: {check or '{active: {path: /healthz, interval: 300ms, timeout: 1s}}'}\n")


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


# -- units --------------------------------------------------------------------------------------------------

def test_health_checks_render_into_caddys_health_checks() -> None:
    check = ("{active: {path: /healthz, interval: 5s, timeout: 1s, expect_status: 204, passes: 2, fails: 3}, "
             "passive: {fails: 5, window: 20s}}")
    desired = desired_of([manifest("web", health_rule("a.test", [("a", 1)], check=check))], SETTINGS)
    (ri,) = desired.ingresses
    assert ri.ingress.rules[0].health == HealthCheck("/healthz", "5s", "1s", 204, 2, 3, 5, "20s")
    proxy = Renderer(SETTINGS)(desired)["apps"]["http"]["servers"]["ingress-80"]["routes"][0]["handle"][-1]
    assert proxy["health_checks"] == {
        "active": {"uri": "/healthz", "interval": "5s", "timeout": "1s", "expect_status": 204, "passes": 2,
                   "fails": 3},
        "passive": {"fail_duration": "20s", "max_fails": 5}}


def test_a_single_target_with_a_health_check_gets_a_route_of_its_own() -> None:
    text = manifest("one", "  - match: {hostname: a.test}\n    target: {instance: a, port: 1}\n"
                           "    health_check: {passive: {fails: 2}}\n")
    desired = desired_of([text], SETTINGS)
    proxy = Renderer(SETTINGS)(desired)["apps"]["http"]["servers"]["ingress-80"]["routes"][0]["handle"][-1]
    assert proxy["health_checks"] == {"passive": {"fail_duration": "30s", "max_fails": 2}}
    assert proxy["upstreams"] == [{"dial": "a.hypeman.internal.:1"}]


@pytest.mark.parametrize(("check", "needle"), [
    ("{}", "rules[0].health_check"),
    ("{active: {interval: 1s}}", "rules[0].health_check.active.path: required field is missing"),
    ("{active: {path: /h, interval: 0s}}", "rules[0].health_check.active.interval: must be more than 0"),
    ("{active: {path: /h, expect_status: 99}}", "rules[0].health_check.active.expect_status"),
    ("{active: {path: '/{env.X}'}}", "rules[0].health_check.active.path"),
    ("{passive: {window: 0ms}}", "rules[0].health_check.passive.window: must be more than 0"),
    ("{active: {path: /h}, extra: 1}", "rules[0].health_check.extra: unknown field"),
])
def test_bad_health_checks_are_refused_naming_the_field(check: str, needle: str, tmp_path: Path) -> None:
    path = write(tmp_path / "m" / "a.yaml", manifest("a", health_rule("a.test", [("x", 1)], check=check)))
    rc, out = validate_cli(path)
    assert rc == 1 and needle in out, out


def test_a_pattern_cannot_have_health_checks(tmp_path: Path) -> None:
    text = manifest("a", "  - match: {hostname: '{vm}.a.test'}\n    target: {instance: '{vm}', port: 1}\n"
                         "    health_check: {active: {path: /h}}\n")
    rc, out = validate_cli(write(tmp_path / "m" / "a.yaml", text))
    assert rc == 1 and "rules[0].health_check: a pattern hostname's targets are per request" in out, out


def test_caddys_answers_are_joined_per_upstream() -> None:
    metrics = ('# HELP caddy_reverse_proxy_upstreams_healthy Health status of reverse proxy upstreams.\n'
               'caddy_reverse_proxy_upstreams_healthy{upstream="a.hypeman.internal.:1"} 1\n'
               'caddy_reverse_proxy_upstreams_healthy{upstream="b.hypeman.internal.:1"} 0\n'
               'caddy_other{upstream="c"} 1\n')
    rows = [{"address": "a.hypeman.internal.:1", "num_requests": 2, "fails": 0},
            {"address": "c.hypeman.internal.:1", "num_requests": 0, "fails": 3}, "junk", {"address": 5}]
    assert join(rows, parse_healthy(metrics)) == {
        "a.hypeman.internal.:1": {"healthy": True, "fails": 0, "requests": 2},
        "b.hypeman.internal.:1": {"healthy": False, "fails": 0, "requests": 0},
        "c.hypeman.internal.:1": {"healthy": None, "fails": 3, "requests": 0}}
    assert join({"not": "a list"}, {}) == {}


def test_the_status_verdict_of_health() -> None:
    desired = desired_of([manifest("web", health_rule("a.test", [("a", 1), ("b", 2)]))], SETTINGS)
    base = IngressStatus(name="web", ready=True, reason=Reason.APPLIED, message="routes are live", file="m0.yaml")
    up = {"a.hypeman.internal.:1": {"healthy": True, "fails": 0, "requests": 0},
          "b.hypeman.internal.:2": {"healthy": False, "fails": 0, "requests": 0}}
    (one,) = with_health([base], desired, up, "hypeman.internal")
    assert one.ready and one.message == "routes are live; b:2 fails its health checks, left out"
    assert [(h["target"], h["healthy"]) for h in one.health] == [("a:1", True), ("b:2", False)]
    down = {k: {**v, "healthy": False} for k, v in up.items()}
    (two,) = with_health([base], desired, down, "hypeman.internal")
    assert not two.ready and two.reason == Reason.TARGET_UNHEALTHY
    assert two.message == "a.test:80: no target passes its health checks (GET /healthz): a:1, b:2 unhealthy"
    (unknown,) = with_health([base], desired, {}, "hypeman.internal")  # not reported yet: not a verdict
    assert unknown.ready and unknown.health[0]["healthy"] is None
    other = IngressStatus(name="web", ready=False, reason=Reason.INSTANCE_NOT_RUNNING, message="x", file="m0.yaml")
    (kept,) = with_health([other], desired, down, "hypeman.internal")
    assert kept.reason == Reason.INSTANCE_NOT_RUNNING  # a reason of its own is not hidden


# -- against the real Caddy ---------------------------------------------------------------------------------

def _ingress(d: Daemon, name: str) -> dict[str, Any]:
    r = httpx.get(f"{d.api_url}/ingresses/{name}", timeout=5)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _count(port: int, host: str, n: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=5) as client:
        for _ in range(n):
            r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
            seen[r.text.split()[0] if r.status_code == 200 else str(r.status_code)] += 1
    return seen


def test_an_unhealthy_target_is_taken_out_and_reported_and_comes_back(
        daemon_factory: Callable[..., Daemon], services: Callable[[str], Service]) -> None:
    a, b = services("a"), services("b")
    port = free_port()
    d = daemon_factory()
    write(d.instances / "vms.yaml", instance_yaml("a") + "---\n" + instance_yaml("b"))
    write(d.manifests[0] / "web.yaml", manifest("web", health_rule("w.test", [("a", a.port), ("b", b.port)],
                                                                   listen=port)))
    d.start()
    wait_for(lambda: _count(port, "w.test", 4) == Counter({"backend=a": 2, "backend=b": 2}), timeout=15,
             message="both targets serve")
    wait_for(lambda: [h["healthy"] for h in _ingress(d, "web")["status"]["health"]] == [True, True], timeout=30,
             message="Caddy's verdicts read back")
    assert b.checks > 0  # Caddy asked the health path

    b.healthy = False
    wait_for(lambda: _count(port, "w.test", 10) == Counter({"backend=a": 10}), timeout=15,
             message="b taken out")
    served = b.requests
    assert _count(port, "w.test", 20) == Counter({"backend=a": 20}) and b.requests == served

    def reported() -> bool:
        st = _ingress(d, "web")["status"]
        return bool(st["ready"]) and str(st["message"]).endswith(f"b:{b.port} fails its health checks, left out")

    wait_for(reported, timeout=30, message="status names b")
    health = {h["target"]: h for h in _ingress(d, "web")["status"]["health"]}
    assert health[f"b:{b.port}"]["healthy"] is False and health[f"a:{a.port}"]["healthy"] is True
    metrics = httpx.get(f"{d.api_url}/metrics", timeout=5).text
    assert f'hypeman_ingress_target_healthy{{ingress="web",rule="0",target="b:{b.port}"}} 0.0' in metrics, metrics

    a.healthy = False  # no target healthy: TargetUnhealthy, and requests answer 503 saying so
    wait_for(lambda: _ingress(d, "web")["status"]["reason"] == Reason.TARGET_UNHEALTHY, timeout=30,
             message="TargetUnhealthy")
    r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"}, timeout=5)
    assert r.status_code == 503 and "no target is running, known and healthy (instances: a, b)" in r.text, r.text

    a.healthy = b.healthy = True
    wait_for(lambda: _count(port, "w.test", 4) == Counter({"backend=a": 2, "backend=b": 2}), timeout=15,
             message="both back")
    wait_for(lambda: _ingress(d, "web")["status"]["message"] == "routes are live", timeout=30,
             message="status healthy again")


def test_a_single_unhealthy_target_answers_503_saying_so(daemon_factory: Callable[..., Daemon],
                                                        services: Callable[[str], Service]) -> None:
    a = services("a")
    a.healthy = False
    port = free_port()
    d = daemon_factory()
    write(d.instances / "vms.yaml", instance_yaml("a"))
    write(d.manifests[0] / "one.yaml", manifest(
        "one", f"  - match: {{hostname: o.test, port: {port}}}\n    target: {{instance: a, port: {a.port}}}\n"
               "    health_check: {active: {path: /healthz, interval: 300ms}}\n"))
    d.start()

    def answer() -> tuple[int, str]:
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "o.test"}, timeout=5)
        return r.status_code, r.text.strip()

    wait_for(lambda: answer()[0] == 503, timeout=15, message="unhealthy target refused")
    assert answer()[1] == ('503 Service Unavailable: instance "a" is unhealthy (failing its health checks) or at its '
                           "limit of concurrent requests")
    wait_for(lambda: _ingress(d, "one")["status"]["reason"] == Reason.TARGET_UNHEALTHY, timeout=30,
             message="TargetUnhealthy")
    a.healthy = True
    wait_for(lambda: answer() == (200, "backend=a path=/"), timeout=15, message="healthy again")
    assert json.dumps(_ingress(d, "one")["rules"][0]["health_check"]) == json.dumps(
        {"active": {"path": "/healthz", "interval": "300ms", "timeout": "2s", "passes": 1, "fails": 1,
                    "cutover_deadline": "5m"}})


def test_the_readme_example_of_health_checks_is_valid() -> None:
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Health checks")) + len("```yaml")
    desired = desired_of([readme[start:readme.index("```", start)]], SETTINGS)
    assert not desired.problems, desired.problems
    (rule,) = desired.ingresses[0].ingress.rules
    assert rule.health == HealthCheck("/healthz", "10s", "2s", 200, 1, 2, 3, "30s", "5m")


def test_the_watch_reads_the_gauge_as_often_as_caddy_refreshes_it_and_asks_for_a_pass_on_a_turn() -> None:
    from reconciler.loop.health import HealthWatch
    from tests.helpers import FakeClock

    desired = desired_of([manifest("web", health_rule("a.test", [("a", 1)]))], SETTINGS)
    clock = FakeClock()
    gauge = {"a.hypeman.internal.:1": True}
    reads: list[bool] = []
    notified: list[int] = []

    def read(metrics: bool) -> tuple[Any, dict[str, bool] | None]:
        reads.append(metrics)
        return [{"address": "a.hypeman.internal.:1", "num_requests": 0, "fails": 0}], dict(gauge) if metrics else None

    watch = HealthWatch(read=read, desired=lambda: desired, notify=lambda: notified.append(1),
                        zone="hypeman.internal", clock=clock)
    assert watch.poll() and reads == [True] and notified == [1]  # a first verdict: a pass
    assert watch.states()["a.hypeman.internal.:1"]["healthy"] is True
    clock.advance(2)
    gauge["a.hypeman.internal.:1"] = False
    assert not watch.poll() and reads == [True, False]  # the gauge is not read again within 10 s
    clock.advance(8)
    assert watch.poll() and reads == [True, False, True] and notified == [1, 1]  # it turned: a pass
    assert watch.states()["a.hypeman.internal.:1"]["healthy"] is False
    empty = HealthWatch(read=read, desired=lambda: desired_of([manifest("x", "  - match: {hostname: b.test}\n"
                                                                          "    target: {instance: a, port: 1}\n")],
                                                              SETTINGS),
                        notify=lambda: notified.append(1), zone="hypeman.internal", clock=clock)
    assert not empty.poll() and len(reads) == 3  # no health checks: Caddy is never asked
