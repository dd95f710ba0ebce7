"""Basic auth and client IP allowlists (issue 16, part 2): ``basic_auth`` with bcrypt hashes only (a plain
password is refused, naming how to hash one) and ``allow_ips`` (CIDRs), with ``HYPEMAN_TRUSTED_PROXIES``
deciding whose ``X-Forwarded-For`` is believed (hypeman's trusted forwarded headers).

Unit tests for the rules and the rendering; against the real Caddy: 401 without or with wrong credentials
and 200 with right ones; the allowlist by the connection's address, and by ``X-Forwarded-For`` only from a
trusted proxy.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from reconciler.caddy.binary import find_caddy
from reconciler.render import REDACTED, Renderer, redact, to_json
from reconciler.settings import Settings
from tests.helpers import ROOT, Backend, Daemon, free_port, instance_yaml, validate_cli, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()


def bcrypt_hash(password: str) -> str:
    """A real bcrypt hash, made by Caddy itself (cost 4: fast requests in tests)."""
    r = subprocess.run([find_caddy(), "hash-password", "--algorithm", "bcrypt", "--bcrypt-cost", "4",
                        "--plaintext", password], capture_output=True, text=True, timeout=30, check=True)
    return r.stdout.strip()


def rule(host: str, instance: str, port: int, extra: str, *, listen: int = 80) -> str:
    return (f"  - match: {{hostname: {host}, port: {listen}}}\n    target: {{instance: {instance}, port: {port}}}\n"
            + extra)


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


def _validate(tmp_path: Path, text: str) -> tuple[int, str]:
    return validate_cli(write(tmp_path / "m" / "a.yaml", text))


GOOD_HASH = "$2a$04$" + "a" * 53


@pytest.mark.parametrize(("extra", "needle"), [
    ("    basic_auth: {users: [{username: ops, password: hunter2-plain}]}\n",
     "rules[0].basic_auth.users[0].password: plain passwords are refused; put a bcrypt hash in password_hash "
     "(make one with `caddy hash-password --algorithm bcrypt`"),
    ("    basic_auth: {users: [{username: ops, password_hash: md5-not-bcrypt-hunter2}]}\n",
     "rules[0].basic_auth.users[0].password_hash: not a bcrypt hash"),
    ("    basic_auth: {users: [{username: ops}]}\n", "rules[0].basic_auth.users[0].password_hash: required"),
    (f"    basic_auth: {{users: [{{username: ops, password_hash: '{GOOD_HASH}'}}, "
     f"{{username: ops, password_hash: '{GOOD_HASH}'}}]}}\n", "rules[0].basic_auth.users[1]: user 'ops' is already"),
    (f"    basic_auth: {{users: [{{username: 'a:b', password_hash: '{GOOD_HASH}'}}]}}\n",
     "rules[0].basic_auth.users[0].username"),
    ("    allow_ips: [10.0.0.0/8, not-an-ip]\n", "rules[0].allow_ips[1]: 'not-an-ip' is not an IP address or CIDR"),
    ("    allow_ips: []\n", "rules[0].allow_ips"),
    ("    basic_auth: {users: ['ops:hunter2-plain']}\n", "rules[0].basic_auth.users[0]: invalid"),
    ("    basic_auth: {users: [{username: ops, password_hash: '$2a$15$hunter2" + "a" * 46 + "'}]}\n",
     "rules[0].basic_auth.users[0].password_hash: not a bcrypt hash of cost 4 to 14"),
])
def test_bad_access_control_is_refused(extra: str, needle: str, tmp_path: Path) -> None:
    rc, out = _validate(tmp_path, manifest("a", rule("a.test", "vm", 1, extra)))
    assert rc == 1 and needle in out, out
    assert "hunter2" not in out  # a password or hash is never quoted


def test_access_control_renders_in_order_and_redacts() -> None:
    text = manifest("a", rule("a.test", "vm", 1, f"    allow_ips: [10.1.2.3, 192.168.0.0/16]\n"
                                                  f"    basic_auth: {{realm: ops area, users: [{{username: ops, "
                                                  f"password_hash: '{GOOD_HASH}'}}]}}\n"))
    config = Renderer(Settings(trusted_proxies=("10.0.0.0/8",)))(desired_of([text], SETTINGS))
    server = config["apps"]["http"]["servers"]["ingress-80"]
    assert server["trusted_proxies"] == {"source": "static", "ranges": ["10.0.0.0/8"]}
    (sub,) = server["routes"][0]["handle"]
    deny, allow = sub["routes"]
    assert deny["match"] == [{"not": [{"client_ip": {"ranges": ["10.1.2.3/32", "192.168.0.0/16"]}}]}]
    auth = allow["handle"][0]
    assert auth["handler"] == "authentication"
    assert auth["providers"]["http_basic"]["accounts"] == [{"username": "ops", "password": GOOD_HASH}]
    assert auth["providers"]["http_basic"]["realm"] == "ops area"
    assert GOOD_HASH not in to_json(redact(config)) and REDACTED in to_json(redact(config))


def test_basic_auth_and_allowlists_against_caddy(daemon_factory: Callable[..., Daemon],
                                                backends: Callable[[str], Backend]) -> None:
    web = backends("web")
    hashed = bcrypt_hash("correct horse battery")
    port = free_port()
    d = daemon_factory()
    write(d.instances / "vms.yaml", instance_yaml("web"))
    write(d.manifests[0] / "a.yaml", manifest(
        "a",
        rule("auth.test", "web", web.port,
             f"    basic_auth: {{users: [{{username: ops, password_hash: '{hashed}'}}]}}\n", listen=port),
        rule("lan.test", "web", web.port, "    allow_ips: [127.0.0.2]\n", listen=port)))
    d.start()
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: httpx.get(url, headers={"Host": "auth.test"}, timeout=5).status_code == 401, timeout=15,
             message="basic auth live")
    r = httpx.get(url, headers={"Host": "auth.test"}, timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == 'Basic realm="restricted"'
    assert httpx.get(url, headers={"Host": "auth.test"}, auth=("ops", "wrong"), timeout=5).status_code == 401
    ok = httpx.get(url, headers={"Host": "auth.test"}, auth=("ops", "correct horse battery"), timeout=5)
    assert ok.status_code == 200 and ok.text.startswith("backend=web ")

    # the allowlist: by the connection's address
    denied = httpx.get(url, headers={"Host": "lan.test"}, timeout=5)
    assert denied.status_code == 403 and "your address may not reach this host" in denied.text
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=5) as lan:
        assert lan.get(url, headers={"Host": "lan.test"}).text.startswith("backend=web ")
    # X-Forwarded-For is not believed from a peer that is not a trusted proxy
    spoofed = httpx.get(url, headers={"Host": "lan.test", "X-Forwarded-For": "127.0.0.2"}, timeout=5)
    assert spoofed.status_code == 403


def test_x_forwarded_for_is_believed_from_a_trusted_proxy(daemon_factory: Callable[..., Daemon],
                                                         backends: Callable[[str], Backend]) -> None:
    web = backends("web")
    port = free_port()
    d = daemon_factory(env={"HYPEMAN_TRUSTED_PROXIES": "127.0.0.1"})
    write(d.instances / "vms.yaml", instance_yaml("web"))
    write(d.manifests[0] / "a.yaml", manifest("a", rule("lan.test", "web", web.port, "    allow_ips: [10.9.0.0/16]\n",
                                                         listen=port)))
    d.start()
    url = f"http://127.0.0.1:{port}/"
    wait_for(lambda: httpx.get(url, headers={"Host": "lan.test"}, timeout=5).status_code == 403, timeout=15,
             message="allowlist live")
    via_proxy = httpx.get(url, headers={"Host": "lan.test", "X-Forwarded-For": "10.9.8.7"}, timeout=5)
    assert via_proxy.status_code == 200 and via_proxy.text.startswith("backend=web ")
    outside = httpx.get(url, headers={"Host": "lan.test", "X-Forwarded-For": "10.10.0.1"}, timeout=5)
    assert outside.status_code == 403
    # a client that writes an allowed address first, behind a proxy that appends what it saw: not believed
    forged = httpx.get(url, headers={"Host": "lan.test", "X-Forwarded-For": "10.9.8.7, 10.10.0.1"}, timeout=5)
    assert forged.status_code == 403
    # and from a peer that is not the trusted proxy, the header counts for nothing
    with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.3"), timeout=5) as other:
        assert other.get(url, headers={"Host": "lan.test", "X-Forwarded-For": "10.9.8.7"}).status_code == 403


def test_the_api_shows_access_control_without_secrets() -> None:
    from reconciler.api.writer import ingress_body

    text = manifest("a", rule("a.test", "vm", 1, f"    allow_ips: [10.1.2.3]\n    basic_auth: {{users: "
                                                  f"[{{username: ops, password_hash: '{GOOD_HASH}'}}]}}\n"))
    body = ingress_body(desired_of([text], SETTINGS).ingresses[0].ingress)
    assert body["rules"][0]["basic_auth"] == {"realm": "restricted",
                                              "users": [{"username": "ops", "password_hash": REDACTED}]}
    assert body["rules"][0]["allow_ips"] == ["10.1.2.3/32"]
    assert GOOD_HASH not in json.dumps(body)


def test_the_readme_example_is_valid() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Basic auth and client allowlists")) + len("```yaml")
    desired = desired_of([readme[start:readme.index("```", start)]], SETTINGS)
    assert not desired.problems, desired.problems
    (r,) = desired.ingresses[0].ingress.rules
    assert r.basic_auth is not None and r.basic_auth[0] == "staging" and r.allow_ips == ("10.0.0.0/8", "203.0.113.7/32")
