"""VM churn never reloads Caddy: instances reach Caddy through the DNS responder (real daemon, real Caddy,
real responder, real backends on loopback addresses)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    Backend,
    Daemon,
    count_loads,
    get,
    ingress_yaml,
    instance_yaml,
    kill_pid,
    routed_to,
    status_of,
    wait_for,
    write,
)

pytestmark = pytest.mark.caddy


def http_port(d: Daemon) -> int:
    return int(d.env["CADDY_HTTP_PORT"])


def test_an_instance_that_moves_stops_and_starts_needs_no_load(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    a = backends("a")
    b = Backend("b", host="127.0.0.2", port=a.port)  # the same port on another address: only the IP moves
    try:
        d = daemon_factory()
        port = http_port(d)
        write(d.manifests[0] / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
        write(d.manifests[0] / "other.yaml", ingress_yaml("other", "other.test", port, "other", a.port))
        write(d.instances / "vm.yaml", instance_yaml("vm", "127.0.0.1"))
        write(d.instances / "other.yaml", instance_yaml("other", "127.0.0.1"))
        d.start()
        wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed to a")
        loads = count_loads(d.caddy_log)
        assert loads >= 1  # (the count works: the first config was loaded)
        n = d.passes()
        write(d.instances / "vm.yaml", instance_yaml("vm", "127.0.0.2"))
        wait_for(lambda: routed_to(port, "web.test", "b"), timeout=10, message="routed to the new address")
        write(d.instances / "vm.yaml", instance_yaml("vm", "127.0.0.2", state="Stopped"))
        wait_for(lambda: status_of(port, "web.test") == 503, timeout=10, message="503 once stopped")
        r = get(port, "web.test")
        assert r.text == '503 Service Unavailable: instance "vm" is not running or not known\n'
        assert r.headers["content-type"].startswith("text/plain")
        (d.instances / "vm.yaml").unlink()
        wait_for(lambda: d.passes() > n + 2, timeout=10, message="passes")
        assert status_of(port, "web.test") == 503
        write(d.instances / "vm.yaml", instance_yaml("vm", "127.0.0.1"))
        wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="back on a")
        assert routed_to(port, "other.test", "a")
        assert count_loads(d.caddy_log) == loads  # four changes of the instance, no config load
        # the status still tells why, as before
        wait_for(lambda: httpx.get(f"{d.api_url}/ingresses/web").json()["status"]["ready"], timeout=10)
        # (its counters as of the keeper's last look: at most 2 s old)
        responder = wait_for(lambda: (r := httpx.get(f"{d.api_url}/status").json()["responder"])["records"] == 2
                             and r["counters"]["nxdomain"] >= 1 and r, timeout=10, message="the responder's account")
        assert responder["running"] and responder["in_sync"] and responder["dns_error"] is None
        assert responder["counters"]["address"] >= 3 and responder["counters"]["nxdomain"] >= 1
        metrics = httpx.get(f"{d.api_url}/metrics").text
        assert 'hypeman_ingress_dns_answers_total{answer="nxdomain"}' in metrics
        assert "hypeman_ingress_responder_up 1.0" in metrics
    finally:
        b.close()


def test_requests_are_held_while_an_instance_restarts(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    a = backends("a")
    d = daemon_factory(env={"HYPEMAN_HOLD": "20s", "HYPEMAN_HOLD_INTERVAL": "100ms"})
    port = http_port(d)
    write(d.manifests[0] / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    short = ingress_yaml("quick", "quick.test", port, "gone", a.port) + "    hold: {duration: 1s}\n"
    write(d.manifests[0] / "quick.yaml", short)
    write(d.instances / "vm.yaml", instance_yaml("vm"))
    d.start()
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed")
    write(d.instances / "vm.yaml", instance_yaml("vm", state="Stopped"))
    assert d.responder_pid() is not None
    records = d.data_dir / "dns" / "zone.json"
    wait_for(lambda: '"vm"' not in records.read_text(), timeout=10, message="vm gone from the zone")
    answers: dict[str, httpx.Response | Exception] = {}

    def call(method: str) -> None:
        try:
            answers[method] = httpx.request(method, f"http://127.0.0.1:{port}/", headers={"Host": "web.test"},
                                            content=b"payload" if method == "POST" else None, timeout=30)
        except httpx.HTTPError as exc:
            answers[method] = exc

    threads = [threading.Thread(target=call, args=(m,)) for m in ("GET", "POST")]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(1.0)  # (the point of the test: requests that arrive while the VM is down, then it comes back)
    assert not answers, answers  # still waiting
    write(d.instances / "vm.yaml", instance_yaml("vm"))
    for t in threads:
        t.join(timeout=30)
    waited = time.monotonic() - started
    got, posted = answers["GET"], answers["POST"]
    assert isinstance(got, httpx.Response) and got.status_code == 200 and got.text.startswith("backend=a ")
    assert isinstance(posted, httpx.Response) and posted.status_code == 200 and "posted=payload" in posted.text
    assert 1.0 <= waited < 15
    # a rule's own hold: an instance that never comes answers after it, naming the instance
    t0 = time.monotonic()
    r = get(port, "quick.test", timeout=30)
    assert r.status_code == 503 and '"gone"' in r.text
    assert 0.9 <= time.monotonic() - t0 < 10


def test_a_pattern_reaches_a_new_vm_without_a_load(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend]) -> None:
    a, special = backends("a"), backends("special")
    d = daemon_factory()
    port = http_port(d)
    pattern = (f"name: vms\nrules:\n  - match: {{hostname: '{{instance}}.vm.test', port: {port}}}\n"
               f"    target: {{instance: '{{instance}}', port: {a.port}}}\n")
    write(d.manifests[0] / "z-pattern.yaml", pattern)
    # an exact host under the pattern, in a file that sorts after it: it still wins
    write(d.manifests[0] / "zz-exact.yaml", ingress_yaml("exact", "one.vm.test", port, "special", special.port))
    write(d.instances / "special.yaml", instance_yaml("special"))
    write(d.instances / "one.yaml", instance_yaml("one"))
    d.start()
    wait_for(lambda: routed_to(port, "one.vm.test", "special"), timeout=10, message="exact host first")
    loads = count_loads(d.caddy_log)
    assert loads >= 1
    write(d.instances / "fresh.yaml", instance_yaml("fresh"))
    wait_for(lambda: routed_to(port, "fresh.vm.test", "a"), timeout=10, message="a new VM under the pattern")
    assert routed_to(port, "FRESH.vm.test", "a")
    r = get(port, "nobody.vm.test")
    assert r.status_code == 503 and '"nobody"' in r.text
    assert status_of(port, "a.b.vm.test") == 404  # a capture is one label
    assert count_loads(d.caddy_log) == loads
    status = httpx.get(f"{d.api_url}/ingresses/vms").json()["status"]
    assert status["ready"] and status["reason"] == "Applied"
    # through the API too: a pattern names no instance of its own, so none has to exist yet
    body = {"name": "api-vms", "rules": [{"match": {"hostname": "{instance}.api.test", "port": port},
                                          "target": {"instance": "{instance}", "port": a.port}}]}
    r = httpx.post(f"{d.api_url}/ingresses", json=body, timeout=30)
    assert r.status_code == 201, r.text
    assert routed_to(port, "fresh.api.test", "a")


def test_the_responder_outlives_the_reconciler_and_is_restarted_when_it_dies(
        daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend], tmp_path: Path) -> None:
    a = backends("a")
    d = daemon_factory()
    port = http_port(d)
    write(d.manifests[0] / "web.yaml", ingress_yaml("web", "web.test", port, "vm", a.port))
    write(d.instances / "vm.yaml", instance_yaml("vm"))
    d.start()
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed")
    first = d.responder_pid()
    assert first is not None
    assert d.proc is not None
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(timeout=10)
    d.proc = None
    assert routed_to(port, "web.test", "a")  # Caddy and the responder go on without the reconciler
    d.start()
    assert d.responder_pid() == first  # adopted
    assert d.log_events("responder.adopted")
    kill_pid(first)  # (SIGTERM, then SIGKILL: it is gone either way)
    wait_for(lambda: d.responder_pid() not in (None, first) and routed_to(port, "web.test", "a"), timeout=15,
             message="responder restarted")
    state = wait_for(lambda: (s := httpx.get(f"{d.api_url}/status").json()["responder"])["restarts"] == 1 and s,
                     timeout=10, message="restart counted")
    assert state["running"] and state["in_sync"]
    assert os.path.exists(d.data_dir / "dns" / "responder.log")
