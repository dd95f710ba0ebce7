"""The rendered config against the REAL Caddy: ``caddy validate`` accepts it, and routing really works.

No config here lets Caddy bind 80/443 or reach an ACME CA: every rendered config sets http_port/https_port
to free loopback ports, listens on 127.0.0.1 and contains no TLS rule (TLS, which needs an explicit issuer,
is tested against a real Pebble in ``test_tls.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.caddy.binary import find_caddy
from reconciler.model import Desired, Document, Origin
from reconciler.parse import parse_documents
from reconciler.render import render, to_json
from reconciler.settings import Settings
from reconciler.validate import ingress_from_document, instance_from_document, resolve
from tests.helpers import Backend, CaddyProcess, Responder, free_port, get, routed_to, status_of, wait_for

pytestmark = pytest.mark.caddy


def desired_from(manifests: list[str], instances: list[str], settings_: Settings) -> Desired:
    ingresses, insts, problems = [], [], []
    for i, text in enumerate(manifests):
        for p in parse_documents(text):
            ing, probs = ingress_from_document(Document(Origin(0, f"{i:03d}.yaml", p.index, f"{i:03d}.yaml",
                                                               p.line), p))
            problems += probs
            if ing is not None:
                ingresses.append(ing)
    for i, text in enumerate(instances):
        for p in parse_documents(text):
            inst, probs = instance_from_document(Document(Origin(-1, f"vm{i}.yaml", p.index, f"vm{i}.yaml",
                                                                 p.line), p))
            problems += probs
            if inst is not None:
                insts.append(inst)
    return resolve(ingresses, insts, settings_, problems)


def caddy_env(home: Path) -> dict[str, str]:
    return {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
            "XDG_CONFIG_HOME": str(home / "config")}


def caddy_validate(config: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.json"
    path.write_text(to_json(config))
    return subprocess.run([find_caddy(), "validate", "--config", str(path)], capture_output=True, text=True,
                          timeout=60, env=caddy_env(workdir), cwd=workdir)


# --- caddy validate --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validate_env(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    return tmp_path_factory.mktemp("validate"), [free_port() for _ in range(4)]


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hostname = st.lists(label, min_size=1, max_size=4).map(".".join)
ipv4 = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
ipv6 = st.sampled_from(["::1", "fd00::1:2", "2001:db8::5", "::ffff:10.0.0.1", "fe80::1"])
instance_names = ["web", "api", "sleepy", "ghost", "inst-7", "{env.HOME}", "we ird\"name"]


@st.composite
def scenario(draw: st.DrawFn, ports: list[int]) -> tuple[list[str], list[str]]:
    instances = []
    for name in ("web", "api", "sleepy"):
        ip = draw(ipv4 | ipv6)
        state = "Stopped" if name == "sleepy" else draw(st.sampled_from(["Running", "Running", "Paused"]))
        instances.append(json.dumps({"name": name, "id": f"inst-{len(instances) + 6}", "ip": ip, "state": state}))
    manifests = []
    for i in range(draw(st.integers(0, 6))):
        rules = []
        for _ in range(draw(st.integers(1, 4))):
            rules.append({"match": {"hostname": draw(hostname), "port": draw(st.sampled_from(ports))},
                          "target": {"instance": draw(st.sampled_from(instance_names)),
                                     "port": draw(st.integers(1, 65535))}})
        manifests.append(json.dumps({"name": f"ing-{i}", "rules": rules}))
    return manifests, instances


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_caddy_validate_accepts_rendered_configs(validate_env: tuple[Path, list[int]], data: st.DataObject) -> None:
    workdir, ports = validate_env
    manifests, instances = data.draw(scenario(ports))
    settings_ = Settings(data_dir=str(workdir / "data"), admin_port=free_port(),
                         listen_address="127.0.0.1", http_port=free_port(), https_port=free_port())
    config = render(desired_from(manifests, instances, settings_), settings_)
    result = caddy_validate(config, workdir)
    assert result.returncode == 0, f"caddy validate refused:\n{result.stderr[-3000:]}\n{to_json(config)}"
    assert "Valid configuration" in result.stdout + result.stderr


def test_caddy_validate_can_fail(tmp_path: Path) -> None:
    # the check above means something: a broken config is refused
    settings_ = Settings(data_dir=str(tmp_path / "data"), admin_port=free_port(), listen_address="127.0.0.1",
                         http_port=free_port(), https_port=free_port())
    config = render(Desired(()), settings_)
    config["apps"]["http"]["servers"]["bad"] = {"listen": [f"127.0.0.1:{free_port()}"],
                                                "routes": [{"handle": [{"handler": "no_such_handler"}]}]}
    result = caddy_validate(config, tmp_path)
    assert result.returncode != 0


def test_examples_validate(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "examples"
    manifests = [p.read_text() for p in sorted((root / "manifests").rglob("*.yaml"))]
    instances = [p.read_text() for p in sorted((root / "instances").rglob("*.yaml"))]
    assert manifests and instances
    settings_ = Settings(data_dir=str(tmp_path / "data"), admin_port=free_port(), listen_address="127.0.0.1",
                         http_port=free_port(), https_port=free_port())
    desired = desired_from(manifests, instances, settings_)
    assert desired.problems == ()
    result = caddy_validate(render(desired, settings_), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


# --- routing through a real Caddy ------------------------------------------------------------------


def ingress(name: str, *rules: tuple[str, int, str, int]) -> str:
    return json.dumps({"name": name, "rules": [
        {"match": {"hostname": h, "port": p}, "target": {"instance": i, "port": t}} for h, p, i, t in rules]})


def instance(name: str, ip: str = "127.0.0.1", state: str = "Running", id: str | None = None) -> str:
    return json.dumps({"name": name, "ip": ip, "state": state, **({"id": id} if id else {})})


Routed = tuple[CaddyProcess, Settings, int, int, Backend, Backend, Responder]


@pytest.fixture
def routed(tmp_path: Path, caddy: CaddyProcess, responder: Responder, backends: Callable[[str], Backend]
           ) -> Iterator[Routed]:
    settings_ = Settings(data_dir=str(tmp_path / "data"), admin_port=caddy.admin_port, listen_address="127.0.0.1",
                         http_port=free_port(), https_port=free_port(), dns_port=responder.port, hold="0s")
    yield caddy, settings_, free_port(), free_port(), backends("A"), backends("B"), responder


def load(routed: Routed, manifests: list[str], instances: list[str]) -> dict[str, Any]:
    """Render and load the config, and publish the instances' records to the responder, as the daemon does."""
    caddy, settings_, *_, responder = routed
    desired = desired_from(manifests, instances, settings_)
    responder.publish_instances(desired.instances.values())
    config = render(desired, settings_)
    response = caddy.load(config)
    assert response.status_code == 200, response.text
    return config


def test_requests_are_routed_by_host_and_port(routed: Routed) -> None:
    caddy, _settings, p1, p2, a, b, _ = routed
    manifests = [
        ingress("site-a", ("a.test", p1, "vm-a", a.port), ("a.test", p2, "inst-b", b.port)),
        ingress("site-b", ("b.test", p1, "inst-b", b.port)),
        ingress("broken", ("missing.test", p1, "ghost", 80), ("stopped.test", p1, "vm-stopped", a.port),
                ("inject.test", p1, "{env.HOME}", 80)),
    ]
    instances = [instance("vm-a"), instance("vm-b", id="inst-b"), instance("vm-stopped", state="Stopped")]
    load(routed, manifests, instances)

    wait_for(lambda: routed_to(p1, "a.test", "A"), message="a.test on the first port -> A")
    assert routed_to(p1, "b.test", "B")  # target by instance id
    assert routed_to(p2, "a.test", "B")  # same host, other port, other backend
    assert routed_to(p1, "A.TEST", "A")  # host match is case-insensitive
    assert routed_to(p1, f"a.test:{p1}", "A")  # Host header with a port
    assert get(p1, "a.test", "/some/path?q=1").text == "backend=A host=a.test path=/some/path?q=1"

    unknown = get(p1, "nobody.test")
    assert unknown.status_code == 404
    assert "nobody.test" in unknown.text
    assert status_of(p2, "b.test") == 404  # b.test is only routed on the first port

    missing = get(p1, "missing.test")
    assert missing.status_code == 503
    assert missing.text == '503 Service Unavailable: instance "ghost" is not running or not known\n'
    stopped = get(p1, "stopped.test")
    assert stopped.status_code == 503
    assert '"vm-stopped" is not running' in stopped.text

    injected = get(p1, "inject.test")
    assert injected.status_code == 503
    assert 'instance "{env.HOME}" is not running' in injected.text  # the placeholder is not expanded
    assert str(caddy.workdir) not in injected.text


def test_routing_follows_instance_state(routed: Routed) -> None:
    *_, p1, _, a, b, _ = routed
    manifests = [ingress("app", ("app.test", p1, "vm", a.port))]
    config = load(routed, manifests, [instance("vm")])
    wait_for(lambda: routed_to(p1, "app.test", "A"), message="app.test -> A")

    assert load(routed, manifests, [instance("vm", state="Stopped")]) == config  # the same config: data only
    wait_for(lambda: status_of(p1, "app.test") == 503, message="app.test -> 503 once the VM stops")

    load(routed, [ingress("app", ("app.test", p1, "vm", b.port))], [instance("vm")])
    wait_for(lambda: routed_to(p1, "app.test", "B"), message="app.test -> B after the target port changes")

    load(routed, [], [instance("vm")])
    wait_for(lambda: status_of(p1, "app.test") is None, message="listener closed when nothing routes there")


def test_conflicting_manifests_route_to_the_winner(routed: Routed) -> None:
    _caddy, settings_, p1, _, a, b, _ = routed
    # file 000.yaml wins the (hostname, port) claim whatever the order of the list
    manifests = [ingress("first", ("shared.test", p1, "vm-a", a.port)),
                 ingress("second", ("shared.test", p1, "vm-a", b.port), ("other.test", p1, "vm-a", b.port))]
    desired = desired_from(manifests, [instance("vm-a")], settings_)
    assert [p.reason for p in desired.problems] == ["HostnameConflict"]
    load(routed, manifests, [instance("vm-a")])
    wait_for(lambda: routed_to(p1, "shared.test", "A"), message="shared.test -> winner A")
    assert status_of(p1, "other.test") == 404  # the loser is rejected as a whole


def test_a_responder_that_does_not_answer_is_named_not_the_instance(
        tmp_path: Path, caddy: CaddyProcess, responder: Responder, backends: Callable[[str], Backend]) -> None:
    import socket
    import time

    a = backends("A")
    p1 = free_port()
    settings_ = Settings(data_dir=str(tmp_path / "data"), admin_port=caddy.admin_port, listen_address="127.0.0.1",
                         http_port=free_port(), https_port=free_port(), dns_port=responder.port, hold="0s",
                         dial_timeout="1s")
    desired = desired_from([ingress("app", ("app.test", p1, "vm", a.port))], [instance("vm")], settings_)
    responder.publish_instances(desired.instances.values())
    assert caddy.load(render(desired, settings_)).status_code == 200
    wait_for(lambda: routed_to(p1, "app.test", "A"), message="routed")
    responder.stop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hung:  # its port, answering nothing
        hung.bind(("127.0.0.1", responder.port))
        t0 = time.monotonic()
        r = get(p1, "app.test", timeout=10)
        took = time.monotonic() - t0
    assert r.status_code == 503 and "its address could not be looked up" in r.text and '"vm"' in r.text, r.text
    assert 0.9 <= took < 5  # bounded by the dial timeout, lookup included
