"""Health-gated cutover (issue 15, part 4): when a health-checked rule's targets change, the old ones serve
until the new ones pass the rule's health check (probed by the reconciler); status ``Progressing``, then
``Stalled`` past the deadline; then traffic moves in one load, and requests in flight to the old target
finish.

Unit tests of :class:`reconciler.cutover.Cutover` (pure) and the prober; against the real Caddy: with
200 req/s flowing, a change to a target whose health path fails holds (0 failed requests, Progressing,
Stalled, no config load, the old target serving); once it is healthy traffic moves with 0 failed requests
while a slow request to the old target completes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import httpx

from reconciler.cutover import Cutover, ProbeResult
from reconciler.loop.health import Prober
from reconciler.model import Desired, HealthCheck, Reason
from reconciler.settings import Settings
from tests.helpers import Daemon, Flow, Service, count_loads, free_port, instance_yaml, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()
CHECK = "{active: {path: /healthz, interval: 200ms, cutover_deadline: 3s}}"


def manifest(instance: str, port: int, *, listen: int = 80, weight_pool: list[tuple[str, int, int]] | None = None,
             check: str = CHECK) -> str:
    if weight_pool is not None:
        items = ", ".join(f"{{instance: {i}, port: {p}, weight: {w}}}" for i, p, w in weight_pool)
        target = f"    targets: [{items}]\n"
    else:
        target = f"    target: {{instance: {instance}, port: {port}}}\n"
    return (f"name: web\nrules:\n  - match: {{hostname: w.test, port: {listen}}}\n{target}"
            f"    health_check: {check}\n")


def _desired(text: str) -> Desired:
    return desired_of([text], SETTINGS, instances="name: old\nip: 10.0.0.1\n---\nname: new\nip: 10.0.0.2\n")


def _targets(desired: Desired) -> list[tuple[str, int]]:
    return [(t.instance, t.port) for t in desired.ingresses[0].ingress.rules[0].pool]


def always(ref: str) -> bool:
    return True


# -- the decisions ------------------------------------------------------------------------------------------

def test_a_changed_target_is_held_until_it_passes() -> None:
    cut = Cutover()
    first = cut.decide(_desired(manifest("old", 1)), now=0.0, probes={}, alive=always)
    assert _targets(first.desired) == [("old", 1)]
    assert not first.gates and not first.progress  # first sight: nothing to protect
    cut.served()

    changed = _desired(manifest("new", 2))
    held = cut.decide(changed, now=10.0, probes={}, alive=always)
    assert _targets(held.desired) == [("old", 1)]  # the old target renders meanwhile
    assert list(held.probes) == [("new", 2, "/healthz", None)]
    (p,) = held.progress
    assert p.reason == Reason.PROGRESSING and p.message == (
        "w.test:80: waiting for new:2 to pass GET /healthz before moving traffic from old:1 (last answer: new:2: "
        "not probed yet)")
    assert held.next_deadline == 3.0
    again = cut.decide(changed, now=11.0, probes={("new", 2, "/healthz", None): ProbeResult(False, 3, "HTTP 500")},
                       alive=always)
    assert again.desired.ingresses[0] is held.desired.ingresses[0]  # the same object while held: memos hold
    assert "(last answer: new:2: HTTP 500)" in again.progress[0].message

    stalled = cut.decide(changed, now=13.5, probes={("new", 2, "/healthz", None): ProbeResult(False, 9, "HTTP 500")},
                         alive=always)
    (p,) = stalled.progress
    assert p.reason == Reason.STALLED and p.message == (
        "w.test:80: new:2 did not pass GET /healthz within 3s (last answer: new:2: HTTP 500); old:1 still serves")

    passed = cut.decide(changed, now=14.0, probes={("new", 2, "/healthz", None): ProbeResult(True, 1, "HTTP 200")},
                        alive=always)
    assert _targets(passed.desired) == [("new", 2)] and not passed.progress and not passed.probes
    assert passed.desired.ingresses[0] is changed.ingresses[0]


def test_what_is_never_held() -> None:
    cut = Cutover()
    pool = [("old", 1, 1), ("new", 2, 1)]
    cut.decide(_desired(manifest("", 0, weight_pool=pool)), now=0, probes={}, alive=always)
    cut.served()
    # weights only (a canary's step): at once
    weights = _desired(manifest("", 0, weight_pool=[("old", 1, 1), ("new", 2, 5)]))
    assert not cut.decide(weights, now=1, probes={}, alive=always).progress
    # a target removed, none added: at once
    fewer = _desired(manifest("old", 1))
    assert not cut.decide(fewer, now=1, probes={}, alive=always).progress
    # nothing of the old pool runs: at once
    moved = _desired(manifest("", 0, weight_pool=[("third", 3, 1)]))
    assert not cut.decide(moved, now=1, probes={}, alive=lambda ref: False).progress
    assert cut.decide(moved, now=1, probes={}, alive=always).progress  # (while one runs, it is held)
    # no active check: never held
    passive = _desired(manifest("new", 9, check="{passive: {fails: 1}}"))
    assert not cut.decide(passive, now=1, probes={}, alive=always).progress


def test_the_prober_probes_and_counts_a_streak() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(503 if len(seen) < 3 else 200)

    notified: list[int] = []
    prober = Prober(notify=lambda: notified.append(1), transport=httpx.MockTransport(handler))
    check = HealthCheck("/healthz", interval="1s", passes=2)
    key = ("new", 8080, "/healthz", None)
    prober.want({key: (check, "10.0.0.2")})
    assert prober.probe_once(key, check, "10.0.0.2") == ProbeResult(False, 1, "HTTP 503")
    assert prober.probe_once(key, check, "10.0.0.2") == ProbeResult(False, 2, "HTTP 503")
    assert prober.probe_once(key, check, "10.0.0.2") == ProbeResult(True, 1, "HTTP 200")
    assert seen[0] == "http://10.0.0.2:8080/healthz"
    assert prober.probe_once(key, check, None) == ProbeResult(False, 1, "instance 'new' is not running or not known")
    prober.want({})
    assert prober.results() == {}
    prober.stop()


# -- against the real Caddy ---------------------------------------------------------------------------------

def _status(d: Daemon) -> dict[str, Any]:
    r = httpx.get(f"{d.api_url}/ingresses/web", timeout=5)
    assert r.status_code == 200, r.text
    status: dict[str, Any] = r.json()["status"]
    return status


def test_cutover_under_traffic(daemon_factory: Callable[..., Daemon], services: Callable[[str], Service]) -> None:
    old, new = services("old"), services("new")
    new.healthy = False
    port = free_port()
    d = daemon_factory()
    write(d.instances / "vms.yaml", instance_yaml("old") + "---\n" + instance_yaml("new"))
    path = d.manifests[0] / "web.yaml"
    write(path, manifest("old", old.port, listen=port))
    d.start()
    wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": "w.test"}, timeout=5).status_code == 200,
             timeout=15, message="routed to old")
    with Flow(port, "w.test") as flow:
        wait_for(lambda: flow.seen["backend=old"] >= 100, timeout=15, message="traffic flows")
        loads = count_loads(d.caddy_log)
        write(path, manifest("new", new.port, listen=port))
        wait_for(lambda: _status(d)["reason"] == Reason.PROGRESSING, timeout=15, message="Progressing")
        st = _status(d)
        assert st["ready"] is False and f"waiting for new:{new.port} to pass GET /healthz" in st["message"], st
        wait_for(lambda: _status(d)["reason"] == Reason.STALLED, timeout=15, message="Stalled after 3s")
        st = _status(d)
        assert f"(last answer: new:{new.port}: HTTP 500); old:{old.port} still serves" in st["message"], st
        served = flow.seen["backend=old"]
        wait_for(lambda: flow.seen["backend=old"] >= served + 100, timeout=15, message="old still serving")
        assert flow.seen["backend=new"] == 0 and new.requests == 0
        assert count_loads(d.caddy_log) == loads  # held: Caddy's config never changed

        slow: list[str] = []

        def slow_request() -> None:
            r = httpx.get(f"http://127.0.0.1:{port}/slow?s=3", headers={"Host": "w.test"}, timeout=15)
            slow.append(f"{r.status_code} {r.text}")

        worker = threading.Thread(target=slow_request)
        worker.start()
        assert old.slow_started.wait(5)  # in flight: it takes 3 s on the old target
        new.healthy = True
        wait_for(lambda: flow.seen["backend=new"] >= 100, timeout=20, message="traffic moved to new")
        moved = flow.seen["backend=old"]
        wait_for(lambda: flow.seen["backend=new"] >= 300, timeout=20, message="more traffic on new")
        assert flow.seen["backend=old"] == moved  # all of it
        worker.join(timeout=20)
    assert slow == ["200 backend=old path=/slow?s=3"]  # in flight across the switch: it finished (drain)
    assert flow.failures == [], flow.failures[:5]
    assert count_loads(d.caddy_log) == loads + 1  # one load: the switch
    wait_for(lambda: _status(d)["reason"] == Reason.APPLIED, timeout=15, message="Applied")


def test_a_held_rule_whose_new_instance_is_not_running_yet_is_progressing_not_down() -> None:
    from reconciler.status import ingress_statuses, with_progress

    def desired(text: str) -> Desired:  # (the new instance is not known yet)
        return desired_of([text], SETTINGS, instances="name: old\nip: 10.0.0.1\n")

    cut = Cutover()
    cut.decide(desired(manifest("old", 1)), now=0.0, probes={}, alive=always)
    cut.served()
    changed = desired(manifest("new", 2))
    decision = cut.decide(changed, now=1.0, probes={}, alive=lambda ref: ref == "old")
    assert _targets(decision.desired) == [("old", 1)]
    plain = ingress_statuses(changed)  # the manifest's own view: its only target is unknown
    assert plain[0].reason == Reason.INSTANCE_NOT_FOUND
    (st,) = with_progress(ingress_statuses(decision.for_status), decision.progress)
    assert st.reason == Reason.PROGRESSING and not st.ready
    assert st.targets == ("new:2",)  # the status shows what the manifest wants
    assert "(last answer: new:2: not probed yet); " not in st.message and "from old:1" in st.message
