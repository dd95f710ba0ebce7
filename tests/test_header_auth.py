"""Request header auth (issue 16, part 1), with hypeman's semantics: ``request_header_auth: {header,
value}`` on a rule -- requests carrying the header with exactly the value are proxied with the header
removed; others get 403; the HTTP->HTTPS redirect does not require it. The value is a secret: it never
appears in errors, logs, render/diff output, status or the API's answers, and a manifest holding one that
others may read is reported.

Unit tests for the rules, the rendering and the redaction; against the real Caddy: the right value
passes (the backend never sees the header), a wrong or missing one gets 403, a pattern on the same port
cannot reach the protected host, and the value appears in no output at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from reconciler.api.writer import ingress_body
from reconciler.model import Reason
from reconciler.render import REDACTED, Renderer, redact, to_json
from reconciler.settings import Settings
from tests.helpers import ROOT, Daemon, free_port, instance_yaml, validate_cli, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()
VALUE = "s3cr3t-Value-0123456789-abcdefghijklmnop"  # 40 visible characters
HEADER = "X-Hypeman-Auth"


def auth_rule(host: str, instance: str, port: int, *, listen: int = 80, header: str = HEADER,
              value: str = VALUE) -> str:
    return (f"  - match: {{hostname: {json.dumps(host)}, port: {listen}}}\n"
            f"    target: {{instance: {json.dumps(instance)}, port: {port}}}\n"
            f"    request_header_auth: {{header: {header}, value: {json.dumps(value)}}}\n")


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


# -- the rules ----------------------------------------------------------------------------------------------

def _validate(tmp_path: Path, text: str) -> tuple[int, str]:
    return validate_cli(write(tmp_path / "m" / "a.yaml", text))


@pytest.mark.parametrize(("length", "ok"), [(31, False), (32, True), (256, True), (257, False)])
def test_the_value_is_32_to_256_characters(length: int, ok: bool, tmp_path: Path) -> None:
    value = ("Ab9-" * 80)[:length]
    rc, out = _validate(tmp_path, manifest("a", auth_rule("a.test", "vm", 1, value=value)))
    assert (rc == 0) is ok, out
    if not ok:
        assert f"rules[0].request_header_auth.value: must be 32 to 256 characters (it has {length}" in out
        assert value not in out


@pytest.mark.parametrize("value", ["a" * 31 + "*", "{env.HOME}" + "a" * 30, "a" * 31 + " ", "a" * 31 + "é"])
def test_the_value_is_visible_ascii_without_wildcards_or_placeholders(value: str, tmp_path: Path) -> None:
    rc, out = _validate(tmp_path, manifest("a", auth_rule("a.test", "vm", 1, value=value)))
    assert rc == 1 and "request_header_auth.value: only visible ASCII characters" in out, out
    assert value not in out


@pytest.mark.parametrize("header", ["Host", "authorization", "COOKIE", "Proxy-Authorization", "proxy-x",
                                    "Content-Length", "Connection", "Keep-Alive", "TE", "Trailer", "Transfer-Encoding",
                                    "Upgrade", "Sec-WebSocket-Key"])
def test_reserved_headers_are_refused(header: str, tmp_path: Path) -> None:
    rc, out = _validate(tmp_path, manifest("a", auth_rule("a.test", "vm", 1, header=header)))
    assert rc == 1 and f"rules[0].request_header_auth.header: {header!r} is reserved" in out, out
    assert VALUE not in out


@pytest.mark.parametrize(("auth", "needle"), [
    ("{header: X-A, value: 123456789012345678901234567890123}", "rules[0].request_header_auth.value: invalid"),
    ("'X-A: 123456789012345678901234567890123'", "rules[0].request_header_auth: invalid"),
    ("{header: X-A, value: [123456789012345678901234567890123]}", "rules[0].request_header_auth.value: invalid"),
])
def test_a_value_of_the_wrong_shape_is_not_quoted(auth: str, needle: str, tmp_path: Path) -> None:
    text = manifest("a", "  - match: {hostname: a.test}\n    target: {instance: vm, port: 1}\n"
                         f"    request_header_auth: {auth}\n")
    rc, out = _validate(tmp_path, text)
    assert rc == 1 and needle in out, out
    assert "123456789012345678901234567890123" not in out


def test_a_guarded_rule_still_strips_its_prefix_before_proxying() -> None:
    text = manifest("a", "  - match: {hostname: a.test, path: /api}\n    target: {instance: vm, port: 1}\n"
                         f"    strip_prefix: true\n    request_header_auth: {{header: {HEADER}, value: {VALUE}}}\n")
    routes = Renderer(SETTINGS)(desired_of([text], SETTINGS))["apps"]["http"]["servers"]["ingress-80"]["routes"]
    (sub,) = routes[0]["handle"]
    allowed = [h["handler"] for h in sub["routes"][-1]["handle"]]
    assert allowed == ["headers", "vars", "rewrite", "reverse_proxy"]


def test_the_config_denies_without_the_value_and_removes_the_header() -> None:
    desired = desired_of([manifest("a", auth_rule("a.test", "vm", 8080))], SETTINGS)
    config = Renderer(SETTINGS)(desired)
    (route, _) = config["apps"]["http"]["servers"]["ingress-80"]["routes"]
    (sub,) = route["handle"]
    deny, allow = sub["routes"]
    assert deny["match"] == [{"not": [{"header": {HEADER: [VALUE]}}]}]
    assert deny["handle"][0]["status_code"] == 403 and deny["terminal"] is True
    assert allow["handle"][0] == {"handler": "headers", "request": {"delete": [HEADER]}}
    assert allow["handle"][-1]["handler"] == "reverse_proxy"
    shown = to_json(redact(config))
    assert VALUE not in shown and f'"{HEADER}": [\n' in shown and REDACTED in shown
    body = ingress_body(desired.ingresses[0].ingress)
    assert body["rules"][0]["request_header_auth"] == {"header": HEADER, "value": REDACTED}
    assert VALUE not in repr(desired)  # (never in a repr: a log line or a traceback)


def test_a_logged_ingress_redacts_the_auth_header_in_its_access_log() -> None:
    text = manifest("a", auth_rule("a.test", "vm", 8080, header="x-team-token")) + "access_log: true\n"
    config = Renderer(SETTINGS)(desired_of([text], SETTINGS))
    fields = config["logging"]["logs"]["access-a"]["encoder"]["fields"]
    from reconciler.accesslog import REDACTED as LOGGED_REDACTED

    assert fields["request>headers>X-Team-Token"] == {"filter": "replace", "value": LOGGED_REDACTED}


# -- against the real Caddy ---------------------------------------------------------------------------------

class Echo:
    """A backend answering ``backend=<name> headers=<the request's header names>``."""

    def __init__(self, name: str) -> None:
        echo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = f"backend={echo.name} headers={','.join(sorted(self.headers.keys()))}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.name = name
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def echoes() -> Iterator[Callable[[str], Echo]]:
    made: list[Echo] = []

    def make(name: str) -> Echo:
        e = Echo(name)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def test_header_auth_against_caddy_and_the_value_in_no_output(daemon_factory: Callable[..., Daemon],
                                                              echoes: Callable[[str], Echo]) -> None:
    secret, vms = echoes("secret"), echoes("vms")
    port = free_port()
    d = daemon_factory(env={"HYPEMAN_ACCESS_LOGS": "all"})
    write(d.instances / "vms.yaml", instance_yaml("secret") + "---\n" + instance_yaml("other"))
    path = write(d.manifests[0] / "secret.yaml", manifest("secret", auth_rule("secret.apps.test", "secret", secret.port,
                                                                              listen=port),
                                                          auth_rule("down.apps.test", "gone", 1, listen=port)))
    os.chmod(path, 0o644)
    # a pattern on the same port whose wildcard covers the protected host
    write(d.manifests[0] / "vms.yaml", manifest("vms", f"  - match: {{hostname: '{{vm}}.apps.test', port: {port}}}\n"
                                                       f"    target: {{instance: '{{vm}}', port: {vms.port}}}\n"))
    d.start()

    def get(host: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{port}/", headers={"Host": host, **(headers or {})}, timeout=5)

    wait_for(lambda: get("secret.apps.test", {HEADER: VALUE}).status_code == 200, timeout=15, message="routed")
    ok = get("secret.apps.test", {HEADER: VALUE})
    assert ok.text.startswith("backend=secret ") and HEADER.lower() not in ok.text.lower()  # removed
    assert get("secret.apps.test", {HEADER.lower(): VALUE}).status_code == 200  # header names: any case
    # (a value in another header does not pass; the test sends another string there: a client's own headers
    # are the client's to log)
    for headers in (None, {HEADER: VALUE[:-1]}, {HEADER: VALUE + "x"}, {"X-Other": VALUE[::-1]}):
        r = get("secret.apps.test", headers)
        assert r.status_code == 403, (headers, r.status_code, r.text)  # never the pattern's backend
        assert "backend=" not in r.text and VALUE not in r.text
    assert get("other.apps.test").text.startswith("backend=vms ")  # the pattern still serves its hosts
    # an error with the right header (an unknown instance): Caddy's own error log must not keep the value
    assert get("down.apps.test", {HEADER: VALUE}).status_code == 503

    # the file is readable by others: reported, still serving
    def reported() -> bool:
        st = httpx.get(f"{d.api_url}/ingresses/secret", timeout=5).json()
        problems = httpx.get(f"{d.api_url}/status", timeout=5).json()["problems"]
        # (still served: its reason is its own -- the rule to an unknown instance -- not the file's mode)
        return (st["status"]["reason"] == Reason.INSTANCE_NOT_FOUND
                and any(p["reason"] == Reason.INSECURE_FILE for p in problems))

    wait_for(reported, timeout=15, message="the readable file reported")

    # the value appears nowhere: API answers, status, render, diff, the daemon's and Caddy's logs
    outputs: dict[str, str] = {
        "GET /ingresses/secret": httpx.get(f"{d.api_url}/ingresses/secret", timeout=5).text,
        "GET /ingresses": httpx.get(f"{d.api_url}/ingresses", timeout=5).text,
        "GET /status": httpx.get(f"{d.api_url}/status", timeout=5).text,
        "GET /metrics": httpx.get(f"{d.api_url}/metrics", timeout=5).text,
    }
    env = {**d.env}
    for command in ("render", "diff", "status"):
        r = subprocess.run([sys.executable, "-m", "reconciler.cli", command, "--data-dir", str(d.data_dir),
                            "--manifests", str(d.manifests[0]), "--instances", str(d.instances)]
                           if command != "status" else
                           [sys.executable, "-m", "reconciler.cli", command, "--data-dir", str(d.data_dir)],
                           env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=60)
        outputs[command] = r.stdout + r.stderr
    assert "secret.apps.test" in outputs["render"] and REDACTED in outputs["render"]
    outputs["daemon log"] = d.log_path.read_text(errors="replace")
    outputs["caddy log"] = d.caddy_log.read_text(errors="replace")
    access = d.data_dir / "logs" / "access"
    outputs["access logs"] = "".join(p.read_text(errors="replace") for p in access.glob("*.log"))
    assert "secret.apps.test" in outputs["access logs"]  # (the 200s and 403s were logged)
    leaks = [where for where, text in outputs.items() if VALUE in text]
    assert leaks == [], leaks


def test_the_http_redirect_does_not_require_the_header() -> None:
    settings = Settings.from_env({"TLS_ISSUER": "internal"})
    text = manifest("a", auth_rule("a.test", "vm", 8080, listen=443) + "    tls: true\n    redirect_http: true\n")
    config = Renderer(settings)(desired_of([text], settings))
    redirect = next(r for r in config["apps"]["http"]["servers"]["ingress-80"]["routes"]
                    if str(r.get("@id", "")).endswith(".redirect"))
    assert redirect["handle"][0]["status_code"] == 308 and "header" not in json.dumps(redirect["match"])


def test_the_readme_example_is_valid() -> None:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```yaml", readme.index("### Request header auth")) + len("```yaml")
    desired = desired_of([readme[start:readme.index("```", start)]], SETTINGS)
    assert not desired.problems, desired.problems
    (rule,) = desired.ingresses[0].ingress.rules
    assert rule.header_auth is not None and rule.header_auth[0] == "X-Hypeman-Auth"
