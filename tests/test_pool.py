"""Several targets per rule (issue 15, part 2): ``targets`` -- a list of ``{instance, port, weight}`` --
load balanced by Caddy (round robin; weighted round robin when the weights differ; by cookie when
``sticky``), each instance resolved through the DNS responder like every other target, so a stopped one
leaves the pool without a config load and without a failed request, and when none is left the 503 names
them.

Unit tests for validation, rendering and the API body; against the real Caddy with real backends: the
weights' proportions, a stopped instance leaving the pool under traffic, the all-stopped 503, sticky
cookies, and a canary as a weight change that disturbs no other ingress.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from reconciler.api.writer import ingress_body
from reconciler.model import Reason, Rule, Target
from reconciler.render import Renderer, selection_policy
from reconciler.settings import Settings
from reconciler.status import target_text
from reconciler.validate import InstanceIndex, Resolver
from tests.helpers import Backend, Daemon, count_loads, free_port, instance_yaml, validate_cli, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()


def pool_rule(host: str, targets: list[tuple[str, int, int | None]], *, listen: int = 80,
              sticky: str | None = None, extra: str = "") -> str:
    items = ", ".join(f"{{instance: {i}, port: {p}" + (f", weight: {w}}}" if w is not None else "}")
                      for i, p, w in targets)
    text = f"  - match: {{hostname: {json.dumps(host)}, port: {listen}}}\n    targets: [{items}]\n"
    if sticky is not None:
        text += f"    sticky: {{cookie: {sticky}}}\n"
    return text + extra


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


# -- validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "needle"), [
    (manifest("a", "  - match: {hostname: a.test}\n    target: {instance: x, port: 1}\n"
                   "    targets: [{instance: y, port: 1}]\n"),
     "rules[0]: exactly one of target or targets is required"),
    (manifest("a", "  - match: {hostname: a.test}\n"), "rules[0]: exactly one of target or targets is required"),
    (manifest("a", "  - match: {hostname: a.test}\n    targets: []\n"), "rules[0].targets"),
    (manifest("a", pool_rule("a.test", [("x", 1, 1), ("x", 1, 2)])), "rules[0].targets[1]: x:1 is already targets[0]"),
    (manifest("a", pool_rule("a.test", [("x", 1, 0), ("y", 1, 0)])), "rules[0].targets: every weight is 0"),
    (manifest("a", pool_rule("a.test", [("x", 1, -1)])), "rules[0].targets[0].weight"),
    (manifest("a", pool_rule("a.test", [("x", 1, 1001)])), "rules[0].targets[0].weight"),
    (manifest("a", pool_rule("{instance}.a.test", [("x", 1, 1)])),
     "rules[0].targets: a pattern hostname takes its instance from the request's host"),
    (manifest("a", pool_rule("a.test", [("x", 1, 1), ("'{vm}'", 1, 1)])),
     "rules[0].targets[1].instance references unknown capture {vm}"),
    (manifest("a", "  - match: {hostname: a.test}\n    target: {instance: x, port: 1}\n    sticky: {cookie: lb}\n"),
     "rules[0].sticky: requires targets"),
    (manifest("a", pool_rule("a.test", [("x", 1, 1)], sticky="'a b'")), "rules[0].sticky.cookie"),
])
def test_bad_pools_are_refused_naming_the_field(text: str, needle: str, tmp_path: Any) -> None:
    path = write(tmp_path / "m" / "a.yaml", text)
    rc, out = validate_cli(path)
    assert rc == 1, out
    assert needle in out, out
    assert f"{path}:" in out


def test_a_pool_renders_upstreams_by_name_with_its_policy() -> None:
    desired = desired_of([manifest("web", pool_rule("app.test", [("web-1", 8080, 3), ("web-2", 8081, None),
                                                                  ("canary", 8080, 0)], sticky="lb"))], SETTINGS)
    config = Renderer(SETTINGS)(desired)
    route = config["apps"]["http"]["servers"]["ingress-80"]["routes"][0]
    assert route["@id"] == "ingress.web.rule-0"
    proxy = route["handle"][-1]
    # a weight of 0 is out of the pool: never an upstream
    assert [u["dial"] for u in proxy["upstreams"]] == ["web-1.hypeman.internal.:8080", "web-2.hypeman.internal.:8081"]
    assert proxy["load_balancing"]["selection_policy"] == {
        "policy": "cookie", "name": "lb", "fallback": {"policy": "weighted_round_robin", "weights": [3, 1]}}
    # with the hold (5s by default) its duration bounds the tries: a retries limit would end them first
    assert proxy["load_balancing"]["try_duration"] == "5s" and "retries" not in proxy["load_balancing"]
    unheld = Renderer(Settings(hold="0s"))(desired)["apps"]["http"]["servers"]["ingress-80"]["routes"][0]
    assert unheld["handle"][-1]["load_balancing"]["retries"] == 1  # no hold: each target tried once, at once
    assert proxy["health_checks"]["passive"]["max_fails"] == 1
    assert route["handle"][0]["instance"] == "web-1, web-2"


def test_equal_weights_are_round_robin_and_a_single_target_keeps_its_route() -> None:
    r = Rule("a.test", 80, "x", 1, targets=(Target("x", 1, 2), Target("y", 1, 2)))
    assert selection_policy(r) == {"policy": "round_robin"}
    one = manifest("one", "  - match: {hostname: a.test}\n    target: {instance: x, port: 1}\n")
    single = desired_of([one], SETTINGS)
    proxy = Renderer(SETTINGS)(single)["apps"]["http"]["servers"]["ingress-80"]["routes"][0]["handle"][-1]
    assert "selection_policy" not in proxy.get("load_balancing", {}) and len(proxy["upstreams"]) == 1


def test_a_pool_in_a_bucketed_layout_keeps_its_route() -> None:
    settings = Settings(bucket_threshold=4)
    rules = [f"  - match: {{hostname: h{i}.test}}\n    target: {{instance: x, port: 1}}\n" for i in range(8)]
    desired = desired_of([manifest("many", *rules, pool_rule("pool.test", [("a", 1, 1), ("b", 1, 1)]))], settings)
    routes = Renderer(settings)(desired)["apps"]["http"]["servers"]["ingress-80"]["routes"]
    buckets = [r for r in routes if str(r.get("@id", "")).startswith("bucket.")]
    holding = [b for b in buckets if "pool.test" in b["match"][0]["host"]]
    assert len(holding) == 1
    sub = holding[0]["handle"][0]["routes"]
    pool = [r for r in sub if r.get("@id") == "ingress.many.rule-8"]
    assert len(pool) == 1 and len(pool[0]["handle"][-1]["upstreams"]) == 2


def test_the_backend_of_a_pool_is_up_while_one_target_runs() -> None:
    from reconciler.model import Instance, Origin

    def inst(name: str, state: str = "Running") -> Instance:
        return Instance(name, None, "10.0.0.1", state, Origin(0, "i.yaml", 0, "i.yaml", 1))

    rule = Rule("a.test", 80, "a", 1, targets=(Target("a", 1), Target("b", 2), Target("gone", 3), Target("z", 4, 0)))
    up = InstanceIndex([inst("a"), inst("b", "Stopped")]).backend(rule)
    assert up.__class__.__name__ == "Upstream"
    assert up.down == ("instance 'b' is not running (state: Stopped)", "instance 'gone' not found")  # type: ignore[union-attr]
    down = InstanceIndex([inst("a", "Stopped")]).backend(rule)
    assert down.reason == Reason.INSTANCE_NOT_RUNNING  # type: ignore[union-attr]
    assert down.message == ("no target is running: instance 'a' is not running (state: Stopped); instance 'b' "  # type: ignore[union-attr]
                            "not found; instance 'gone' not found")


def test_a_pool_is_resolved_again_when_any_of_its_instances_changes() -> None:
    from reconciler.model import Instance, Origin

    def inst(name: str, state: str) -> Instance:
        return Instance(name, None, "10.0.0.1", state, Origin(0, "i.yaml", 0, "i.yaml", 1))

    desired = desired_of([manifest("web", pool_rule("a.test", [("a", 1, 1), ("b", 1, 1)]))], SETTINGS)
    resolver = Resolver(SETTINGS)
    ingresses = [r.ingress for r in desired.ingresses]
    first = resolver(ingresses, [inst("a", "Running"), inst("b", "Running")])
    assert not first.ingresses[0].rules[0].backend.down  # type: ignore[union-attr]
    second = resolver(ingresses, [inst("a", "Running"), inst("b", "Stopped")])
    assert second.ingresses[0].rules[0].backend.down == ("instance 'b' is not running (state: Stopped)",)  # type: ignore[union-attr]


def test_the_api_body_and_status_show_the_pool() -> None:
    desired = desired_of([manifest("web", pool_rule("a.test", [("a", 1, 3), ("b", 2, None)], sticky="lb"))], SETTINGS)
    ing = desired.ingresses[0].ingress
    body = ingress_body(ing)
    assert body["rules"][0]["targets"] == [{"instance": "a", "port": 1, "weight": 3},
                                           {"instance": "b", "port": 2, "weight": 1}]
    assert body["rules"][0]["sticky"] == {"cookie": "lb"} and "target" not in body["rules"][0]
    rule = ing.rules[0]
    assert [target_text(rule, t) for t in rule.pool] == ["a:1 (weight 3)", "b:2 (weight 1)"]


# -- against the real Caddy ---------------------------------------------------------------------------------

def _serve(d: Daemon, names: list[str]) -> None:
    write(d.instances / "vms.yaml", "---\n".join(instance_yaml(n) for n in names))


def _count(port: int, host: str, n: int, cookies: httpx.Cookies | None = None) -> Counter[str]:
    seen: Counter[str] = Counter()
    with httpx.Client(timeout=5, cookies=cookies) as client:
        for _ in range(n):
            r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})
            assert r.status_code == 200, r.text
            seen[r.text.split()[0]] += 1
    return seen


def test_traffic_follows_the_weights(daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    a, b, c = backends("a"), backends("b"), backends("c")
    port = free_port()
    d = daemon_factory()
    _serve(d, ["a", "b", "c"])
    write(d.manifests[0] / "web.yaml", manifest("web", pool_rule("w.test", [("a", a.port, 3), ("b", b.port, 1),
                                                                            ("c", c.port, 0)], listen=port)))
    d.start()
    wait_for(lambda: _count(port, "w.test", 1), timeout=15, message="pool routed")
    seen = _count(port, "w.test", 400)
    # Caddy's weighted round robin is deterministic: each cycle of 4 requests sends 3 to a and 1 to b,
    # so 400 sequential requests are 300/100 up to where the first cycle started (one cycle: +-3)
    assert abs(seen["backend=a"] - 300) <= 3 and abs(seen["backend=b"] - 100) <= 3, seen
    assert seen["backend=c"] == 0, seen  # weight 0: out of the pool


def test_a_stopped_instance_leaves_the_pool_without_a_failed_request(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    a, b = backends("a"), backends("b")
    port, other = free_port(), backends("other")
    d = daemon_factory()
    _serve(d, ["a", "b", "other"])
    write(d.manifests[0] / "web.yaml", manifest("web", pool_rule("w.test", [("a", a.port, None), ("b", b.port, None)],
                                                                 listen=port)))
    write(d.manifests[0] / "other.yaml", manifest("other", f"  - match: {{hostname: o.test, port: {port}}}\n"
                                                           f"    target: {{instance: other, port: {other.port}}}\n"))
    d.start()
    wait_for(lambda: _count(port, "w.test", 2) == Counter({"backend=a": 1, "backend=b": 1}), timeout=15,
             message="both targets serve")
    loads = count_loads(d.caddy_log)
    failures: list[str] = []
    seen: Counter[str] = Counter()
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text}")
                else:
                    seen[r.text.split()[0]] += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        wait_for(lambda: seen["backend=b"] >= 5, timeout=10, message="traffic on both targets")
        write(d.instances / "vms.yaml", "---\n".join([instance_yaml("a"), instance_yaml("b", state="Stopped"),
                                                      instance_yaml("other")]))
        wait_for(lambda: _status(d, "web").get("message", "").endswith("left out of the pool"), timeout=15,
                 message="status tells b left the pool")
        after = seen["backend=b"]
        wait_for(lambda: seen["backend=a"] >= 50, timeout=15, message="traffic goes on")
        before_a = seen["backend=a"]
        wait_for(lambda: seen["backend=a"] >= before_a + 100, timeout=15, message="more traffic")
        assert seen["backend=b"] == after, "no request reaches the stopped instance once it is out"
    finally:
        stop.set()
        worker.join(timeout=15)
    assert failures == []
    st = _status(d, "web")
    assert st["ready"] is True and "instance 'b' is not running (state: Stopped), left out of the pool" in st["message"]
    assert count_loads(d.caddy_log) == loads  # data, not shape: no config load for a stopped instance

    # every target stopped: the 503 names them; the other ingress keeps serving
    write(d.instances / "vms.yaml", "---\n".join([instance_yaml("a", state="Stopped"),
                                                  instance_yaml("b", state="Stopped"), instance_yaml("other")]))

    def answer() -> tuple[int, str]:
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"}, timeout=5)
        return r.status_code, r.text

    wait_for(lambda: answer()[0] == 503, timeout=15, message="503 once no target runs")
    assert answer()[1].strip() == ("503 Service Unavailable: no target is running, known and healthy "
                                   "(instances: a, b)")
    st = _status(d, "web")
    assert st["ready"] is False and st["reason"] == Reason.INSTANCE_NOT_RUNNING
    assert "no target is running" in st["message"]
    r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "o.test"}, timeout=5)
    assert r.status_code == 200 and r.text.startswith("backend=other ")


def _status(d: Daemon, name: str) -> dict[str, Any]:
    r = httpx.get(f"{d.api_url}/ingresses/{name}", timeout=5)
    assert r.status_code == 200, r.text
    status: dict[str, Any] = r.json()["status"]
    return status


def test_a_sticky_cookie_keeps_a_client_on_one_target(daemon_factory: Callable[..., Daemon],
                                                     backends: Callable[[str], Backend]) -> None:
    a, b = backends("a"), backends("b")
    port = free_port()
    d = daemon_factory()
    _serve(d, ["a", "b"])
    write(d.manifests[0] / "web.yaml", manifest("web", pool_rule("w.test", [("a", a.port, None), ("b", b.port, None)],
                                                                 listen=port, sticky="hypeman-lb")))
    d.start()
    wait_for(lambda: _count(port, "w.test", 1), timeout=15, message="pool routed")
    # clients without the cookie: the fallback's round robin, each told its target in a cookie
    without = Counter(httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"}, timeout=5).text.split()[0]
                      for _ in range(20))
    assert without["backend=a"] > 0 and without["backend=b"] > 0, without
    for _ in range(4):
        with httpx.Client(timeout=5) as client:
            first = client.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"})
            assert "hypeman-lb" in first.cookies, first.headers
            name = first.text.split()[0]
            seen = _count(port, "w.test", 20, cookies=client.cookies)
        assert seen == Counter({name: 20}), seen


def test_a_canary_is_a_weight_change_that_disturbs_no_other_ingress(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    stable, canary, other = backends("stable"), backends("canary"), backends("other")
    port = free_port()
    d = daemon_factory()
    _serve(d, ["stable", "canary", "other"])
    path = d.manifests[0] / "web.yaml"

    def pool(weight: int) -> str:
        return manifest("web", pool_rule("w.test", [("stable", stable.port, 9), ("canary", canary.port, weight)],
                                         listen=port))

    write(path, pool(0))
    write(d.manifests[0] / "other.yaml", manifest("other", f"  - match: {{hostname: o.test, port: {port}}}\n"
                                                           f"    target: {{instance: other, port: {other.port}}}\n"))
    d.start()
    wait_for(lambda: _count(port, "w.test", 1), timeout=15, message="pool routed")
    assert _count(port, "w.test", 20) == Counter({"backend=stable": 20})
    before = httpx.get(f"http://127.0.0.1:{d.admin_port}/config/apps/http/servers", timeout=5).json()
    write(path, pool(1))
    wait_for(lambda: _count(port, "w.test", 10)["backend=canary"] > 0, timeout=15, message="canary gets traffic")
    seen = _count(port, "w.test", 100)
    assert abs(seen["backend=canary"] - 10) <= 1, seen
    after = httpx.get(f"http://127.0.0.1:{d.admin_port}/config/apps/http/servers", timeout=5).json()
    # only the pool's route changed: every other route of the config is as it was
    changed = [i for i, (x, y) in enumerate(zip(before[f"ingress-{port}"]["routes"],
                                                after[f"ingress-{port}"]["routes"], strict=True)) if x != y]
    assert [after[f"ingress-{port}"]["routes"][i].get("@id") for i in changed] == ["ingress.web.rule-0"]


def test_the_readme_example_of_a_pool_is_valid() -> None:
    from tests.helpers import ROOT

    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Several targets")) + len("```yaml")
    desired = desired_of([readme[start:readme.index("```", start)]], SETTINGS)
    assert not desired.problems, desired.problems
    (rule,) = desired.ingresses[0].ingress.rules
    assert [t.weight for t in rule.targets] == [9, 9, 2] and rule.sticky_cookie == "shop-lb"


def test_a_pool_with_no_target_running_holds_requests_like_one_target(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    a, b = backends("a"), backends("b")
    port = free_port()
    d = daemon_factory(env={"HYPEMAN_HOLD": "10s"})
    write(d.instances / "vms.yaml", instance_yaml("a", state="Stopped") + "---\n" + instance_yaml("b", state="Stopped"))
    write(d.manifests[0] / "web.yaml", manifest("web", pool_rule("w.test", [("a", a.port, None), ("b", b.port, None)],
                                                                 listen=port)))
    d.start()
    wait_for(lambda: _status(d, "web")["reason"] == Reason.INSTANCE_NOT_RUNNING, timeout=15, message="both stopped")
    answers: list[str] = []

    def request() -> None:
        r = httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"}, timeout=30)
        answers.append(f"{r.status_code} {r.text.split()[0]}")

    worker = threading.Thread(target=request)
    started = time.monotonic()
    worker.start()
    wait_for(lambda: time.monotonic() - started > 1.0, timeout=5, message="the request waiting")
    assert not answers  # held: neither target can be reached yet
    write(d.instances / "vms.yaml", instance_yaml("a", state="Stopped") + "---\n" + instance_yaml("b"))
    worker.join(timeout=30)
    assert answers == ["200 backend=b"]
