"""The HTTP API end to end: real HTTP against ``hypeman-ingress run`` driving a real Caddy, real backends.

Every test starts its own daemon (own data dir, free API/admin/HTTP ports) except the table of error cases,
which share one module-scoped daemon. Nothing sleeps "long enough": outcomes are polled with a deadline,
and where the contract says "answers once live" the route is checked right after the answer, without
polling.

Two tests run the daemon with ``CADDY_BINARY`` pointing at a tiny shell wrapper around the real Caddy
(:func:`caddy_wrapper`): it execs the real binary for everything, but (a) refuses ``caddy run`` while a
marker file exists, so "Caddy is down" can be held long enough to observe ``/readyz`` = 503, and (b) makes
``caddy validate`` reject configs that route the hostname ``caddy-says-no.test`` after the real validation
passed -- nothing an API client can send today is accepted by our own checks yet refused by the real
``caddy validate``, so this is the only way to drive that path through the daemon.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from jsonschema import Draft202012Validator
from prometheus_client.parser import text_string_to_metric_families

from reconciler.api.app import answer, create_app
from reconciler.api.openapi import openapi_document
from reconciler.api.writer import ManifestWriter, Refused, remove_stale_temp_files
from reconciler.caddy.binary import find_caddy
from reconciler.model import Document, GoodFile, Origin, Source, derive_ingress_id
from reconciler.parse import parse_documents
from reconciler.settings import Settings, TLSSettings
from reconciler.validate import ingress_from_document

with warnings.catch_warnings():  # starlette >= 1.x nags about httpx vs httpx2 in its test client
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from tests.helpers import (
    ROOT,
    Backend,
    Daemon,
    free_port,
    ingress_yaml,
    instance_yaml,
    kill_pid,
    routed_to,
    status_of,
    wait_for,
    write,
)

pytestmark = pytest.mark.caddy

DaemonFactory = Callable[..., Daemon]
BackendFactory = Callable[[str], Backend]

SEED_CODES = {"bad_request", "instance_not_found", "domain_not_allowed", "config_validation_failed",
              "already_exists", "hostname_in_use", "ambiguous", "not_found", "internal_error"}
REJECTED_HOST = "caddy-says-no.test"


# -- local helpers -------------------------------------------------------------------------------------

SPEC = openapi_document()


def _spec_validator(schema: dict[str, Any]) -> Draft202012Validator:
    # the spec's schemas are JSON Schema 2020-12 (OpenAPI 3.1); "#/components/..." resolves against this root
    return Draft202012Validator({**schema, "components": SPEC["components"]})


def check_spec(method: str, path: str, r: httpx.Response) -> None:
    """``r`` is what the OpenAPI document (as served, ingress schema inlined) says ``method path`` answers:
    a declared status, the declared content type and a body valid against the declared schema. A path or
    method the document does not have answers a valid ``Error`` (404 / 405)."""
    path = path.split("?", 1)[0]
    template = path if path in SPEC["paths"] else (
        "/ingresses/{ref}" if re.fullmatch(r"/ingresses/[^/]+", path) else None)
    operation = SPEC["paths"].get(template or "", {}).get(method.lower())
    if path == "/openapi.json":
        return
    if operation is None:
        assert r.status_code in (400, 401, 404, 405), (method, path, r.status_code, r.text)
        declared: dict[str, Any] = SPEC["components"]["responses"]["Error"]
    else:
        assert str(r.status_code) in operation["responses"], (method, path, r.status_code, r.text)
        declared = operation["responses"][str(r.status_code)]
    if "$ref" in declared:
        declared = SPEC["components"]["responses"][declared["$ref"].rsplit("/", 1)[1]]
    content = declared.get("content")
    if not content:
        assert r.content == b"", (method, path, r.status_code, r.text)
        return
    [(media, body_spec)] = content.items()
    assert r.headers["content-type"].split(";")[0] == media, (method, path, r.headers)
    if media == "application/json":
        errors = sorted(_spec_validator(body_spec["schema"]).iter_errors(r.json()), key=lambda e: list(e.path))
        assert not errors, (method, path, r.status_code, [f"{list(e.path)}: {e.message}" for e in errors[:5]])


def call(d: Daemon, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """A request to the daemon's API; its answer must match the OpenAPI document."""
    r = httpx.request(method, d.api_url + path, timeout=30, **kwargs)
    check_spec(method, path, r)
    return r


def body(name: str, host: str, port: int, target_port: int, instance: str = "vm", **extra: Any) -> dict[str, Any]:
    return {"name": name, "rules": [{"match": {"hostname": host, "port": port},
                                     "target": {"instance": instance, "port": target_port}}], **extra}


def create(d: Daemon, payload: dict[str, Any]) -> dict[str, Any]:
    r = call(d, "POST", "/ingresses", json=payload)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def assert_error(r: httpx.Response, status: int, code: str, *fragments: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()
    assert set(err) == {"code", "message"}, err
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"], err
    for f in fragments:
        assert f in err["message"], (f, err)
    return dict(err)


def dir_state(path: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file under ``path`` (hidden ones included): content, mtime and mode."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(path))] = (p.read_bytes() if p.is_file() else b"", st.st_mtime_ns, st.st_mode)
    return out


def raw_request(d: Daemon, method: str, path: str) -> tuple[int, dict[str, Any]]:
    """A request whose path is sent exactly as given (httpx would normalise ``..`` segments away)."""
    conn = http.client.HTTPConnection("127.0.0.1", d.api_port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler.cli", *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def caddy_wrapper(directory: Path) -> tuple[Path, Path]:
    """A ``CADDY_BINARY`` that runs the real Caddy (see the module docstring). Returns (wrapper, marker):
    while ``marker`` exists, ``caddy run`` fails at once."""
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "no-run"
    wrapper = directory / "caddy-wrapper"
    wrapper.write_text(f"""#!/bin/sh
REAL='{find_caddy()}'
if [ "$1" = run ] && [ -e '{marker}' ]; then
  echo "test wrapper: caddy run refused while {marker} exists" >&2
  exit 1
fi
if [ "$1" = validate ]; then
  config="$(mktemp)"
  cat > "$config"  # the config comes on stdin (--config -)
  "$REAL" "$@" < "$config" || {{ rc=$?; rm -f "$config"; exit $rc; }}
  if grep -q '"{REJECTED_HOST}"' "$config"; then
    rm -f "$config"
    echo "Error: test wrapper: hostname {REJECTED_HOST} is refused" >&2
    exit 1
  fi
  rm -f "$config"
  exit 0
fi
exec "$REAL" "$@"
""")
    wrapper.chmod(0o755)
    return wrapper, marker


def pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def metrics(d: Daemon, headers: dict[str, str] | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = call(d, "GET", "/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def writer_settings(root: Path, manifests: tuple[Path, ...] = ()) -> Settings:
    """Settings for an in-process writer: data dir, instances ``vm`` (Running) and ``idle-vm`` (Stopped)."""
    s = Settings(data_dir=str(root / "data"), manifest_dirs=tuple(str(m) for m in manifests),
                 instances_dir=str(setup_instances(root)), listen_address="127.0.0.1", admin_port=2999,
                 http_port=8081, https_port=8443)
    os.makedirs(s.api_dir, mode=0o700, exist_ok=True)
    return s


def setup_instances(tmp: Path) -> Path:
    instances = tmp / "instances"
    write(instances / "vms.yaml", instance_yaml("vm") + "---\n" + instance_yaml("idle-vm", state="Stopped"))
    return instances


# -- create -> routed -> get -> list -> delete ----------------------------------------------------------

def test_lifecycle_create_get_list_delete(tmp_path: Path, daemon_factory: DaemonFactory,
                                          backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    instances = setup_instances(tmp_path)
    manifests = tmp_path / "manifests"
    port = free_port()
    # a read-only ingress on the same port keeps the server up, so a deleted host answers 404
    ro_file = write(manifests / "keep.yaml", ingress_yaml("keep", "keep.test", port, "vm", a.port))
    d = daemon_factory(manifests=[manifests], instances=instances).start()
    wait_for(lambda: routed_to(port, "keep.test", "a"), timeout=10, message="keep.test routed")
    assert status_of(port, "web.test") == 404
    api_dir = d.data_dir / "ingresses"

    # POST answers 201 once live: the route works right after the answer, without polling
    r = call(d, "POST", "/ingresses", json=body("web", "web.test", port, b.port))
    assert r.status_code == 201, r.text
    assert routed_to(port, "web.test", "b")
    web = r.json()
    assert web["name"] == "web" and web["id"] == derive_ingress_id("web")
    assert web["rules"] == [{"match": {"hostname": "web.test", "port": port},
                             "target": {"instance": "vm", "port": b.port}}]
    assert web["source"] == str(api_dir / "web.yaml") and web["read_only"] is False
    assert web["status"]["ready"] is True and web["status"]["reason"] == "Applied", web
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", web["created_at"]), web

    # the manifest file: 0600, a plain manifest the loader reads like any other
    f = api_dir / "web.yaml"
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    on_disk = yaml.safe_load(f.read_text())
    assert on_disk == {"name": "web", "created_at": web["created_at"], "rules": web["rules"]}
    assert sorted(os.listdir(api_dir)) == ["web.yaml"]

    # GET by name, by id and by a unique id prefix: the same ingress
    for ref in ("web", web["id"], web["id"][:8]):
        g = call(d, "GET", f"/ingresses/{ref}")
        assert g.status_code == 200, (ref, g.text)
        assert g.json() == web, ref

    # ids with a shared prefix (the optional `id` field): the prefix is ambiguous, the full ids are not
    one = create(d, body("grp-one", "one.test", port, a.port, id="grp-1"))
    two = create(d, body("grp-two", "two.test", port, a.port, id="grp-2"))
    assert (one["id"], two["id"]) == ("grp-1", "grp-2")
    assert routed_to(port, "one.test", "a") and routed_to(port, "two.test", "a")
    before = dir_state(api_dir)
    assert_error(call(d, "GET", "/ingresses/grp-"), 409, "ambiguous", "grp-one", "grp-two")
    assert_error(call(d, "DELETE", "/ingresses/grp-"), 409, "ambiguous")
    assert dir_state(api_dir) == before
    assert call(d, "GET", "/ingresses/grp-1").json()["name"] == "grp-one"
    assert call(d, "GET", "/ingresses/grp-2").json()["name"] == "grp-two"

    # list: every source, sorted by name, each with its source file and status
    listed = call(d, "GET", "/ingresses").json()
    assert [i["name"] for i in listed] == ["grp-one", "grp-two", "keep", "web"]
    keep = listed[2]
    assert keep["read_only"] is True and keep["source"] == str(ro_file), keep
    assert keep["status"]["ready"] is True
    assert listed[3] == web
    ids = [i["id"] for i in listed]
    assert len([i for i in ids if i.startswith(web["id"][:8])]) == 1

    # DELETE by id answers 204 once the route is gone; the prefix is unique afterwards
    r = call(d, "DELETE", "/ingresses/grp-1")
    assert r.status_code == 204 and r.content == b"", r.text
    assert status_of(port, "one.test") == 404
    assert call(d, "GET", "/ingresses/grp-").json()["name"] == "grp-two"

    # DELETE by name: 204, 404 at the route right away, the file is gone, the rest keeps serving
    r = call(d, "DELETE", "/ingresses/web")
    assert r.status_code == 204, r.text
    assert status_of(port, "web.test") == 404
    assert routed_to(port, "keep.test", "a") and routed_to(port, "two.test", "a")
    assert sorted(os.listdir(api_dir)) == ["grp-two.yaml"]
    assert_error(call(d, "GET", "/ingresses/web"), 404, "not_found", "web")
    assert_error(call(d, "DELETE", "/ingresses/web"), 404, "not_found")
    assert [i["name"] for i in call(d, "GET", "/ingresses").json()] == ["grp-two", "keep"]

    # /status, probes and metrics of the real daemon (each answer checked against the OpenAPI document)
    st = call(d, "GET", "/status").json()
    assert {i["name"]: i["reason"] for i in st["ingresses"]} == {"grp-two": "Applied", "keep": "Applied"}
    assert st["revision"]["last_applied"] == st["revision"]["last_attempted"] and st["history"], st
    assert st["caddy"]["running"] is True and st["counts"] == {"ingresses": 2, "ready": 2}
    assert {s["path"] for s in st["sources"]} == {str(manifests), str(api_dir), str(instances)}
    for probe in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert call(d, "GET", probe).status_code == 200, probe

    created = [(e["ingress"], e["id"]) for e in d.log_events("api.ingress_created")]
    assert created == [("web", web["id"]), ("grp-one", "grp-1"), ("grp-two", "grp-2")]
    assert [e["ingress"] for e in d.log_events("api.ingress_deleted")] == ["grp-one", "web"]
    assert not d.log_events("api.internal_error")


# -- every error code, on one shared daemon ----------------------------------------------------------------

@dataclass
class Shared:
    d: Daemon
    port: int
    backend: Backend
    api_dir: Path
    manifests: Path
    ro_file: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One daemon for the error table: a read-only source with ``git-web`` (git.test), ``taken``
    (taken.test) and ``grp-one``/``grp-two`` (ids ``grp-1``/``grp-2``) created through the API."""
    tmp = tmp_path_factory.mktemp("api-errors")
    backend = Backend("a")
    wrapper, _ = caddy_wrapper(tmp / "wrapper")
    port = free_port()
    manifests = tmp / "manifests"
    ro_file = write(manifests / "git-web.yaml", ingress_yaml("git-web", "git.test", port, "vm", backend.port))
    d = Daemon(tmp, manifests=[manifests], instances=setup_instances(tmp),
               env={"CADDY_BINARY": str(wrapper), "TLS_ISSUER": "internal", "TLS_ALLOWED_DOMAINS": "*.allowed.test"})
    try:
        d.start()
        wait_for(lambda: routed_to(port, "git.test", "a"), timeout=10, message="git.test routed")
        create(d, body("taken", "taken.test", port, backend.port))
        create(d, body("grp-one", "one.test", port, backend.port, id="grp-1"))
        create(d, body("grp-two", "two.test", port, backend.port, id="grp-2"))
        yield Shared(d, port, backend, d.data_dir / "ingresses", manifests, ro_file)
    finally:
        d.cleanup()
        backend.close()


def _chunks(n: int) -> Iterator[bytes]:
    yield b'{"name": "big", "pad": "'
    for _ in range(n):
        yield b"x" * 4096
    yield b'"}'


def _good(s: Shared, name: str = "fresh", host: str = "fresh.test", **extra: Any) -> dict[str, Any]:
    return body(name, host, s.port, s.backend.port, **extra)


def _with_rule(s: Shared, **changes: Any) -> dict[str, Any]:
    b = _good(s)
    for k, v in changes.items():
        if k in ("match", "target"):
            b["rules"][0][k].update(v)
        else:
            b["rules"][0][k] = v
    return b


Request = Callable[[Shared], tuple[str, str, dict[str, Any]]]
ERROR_CASES: list[tuple[str, Request, int, str, tuple[str, ...]]] = [
    # -- 400 bad_request: the body
    ("malformed-json", lambda s: ("POST", "/ingresses", {"content": b'{"name": "x", '}),
     400, "bad_request", ("malformed JSON", "line 1")),
    ("schema-violation-names-field",
     lambda s: ("POST", "/ingresses", {"json": _with_rule(s, target={"port": "80"})}),
     400, "bad_request", ("rules[0].target.port", "expected integer")),
    ("port-out-of-range", lambda s: ("POST", "/ingresses", {"json": _with_rule(s, match={"port": 70000})}),
     400, "bad_request", ("rules[0].match.port",)),
    ("missing-field", lambda s: ("POST", "/ingresses", {"json": {"name": "fresh"}}),
     400, "bad_request", ("rules: required field is missing",)),
    ("unknown-field", lambda s: ("POST", "/ingresses", {"json": _good(s, colour="red")}),
     400, "bad_request", ("colour: unknown field",)),
    ("unknown-nested-field", lambda s: ("POST", "/ingresses", {"json": _with_rule(s, match={"paths": "/x"})}),
     400, "bad_request", ("rules[0].match.paths: unknown field",)),
    ("bad-name", lambda s: ("POST", "/ingresses", {"json": _good(s, name="Fresh_1")}),
     400, "bad_request", ("name",)),
    ("name-with-trailing-newline", lambda s: ("POST", "/ingresses", {"json": _good(s, name="fresh\n")}),
     400, "bad_request", ("name: control characters",)),
    ("id-with-trailing-newline", lambda s: ("POST", "/ingresses", {"json": _good(s, id="fresh-id\n")}),
     400, "bad_request", ("id: control characters",)),
    ("created-at-too-long", lambda s: ("POST", "/ingresses", {"json": _good(s, created_at="x" * 65)}),
     400, "bad_request", ("created_at",)),
    ("bad-hostname", lambda s: ("POST", "/ingresses", {"json": _good(s, host="-bad-.test")}),
     400, "bad_request", ("rules[0].match.hostname",)),
    ("hostname-with-newline", lambda s: ("POST", "/ingresses", {"json": _good(s, host="fresh.test\n")}),
     400, "bad_request", ("rules[0].match.hostname", "not valid")),
    ("wildcard-hostname", lambda s: ("POST", "/ingresses", {"json": _good(s, host="*.fresh.test")}),
     400, "bad_request", ("wildcard",)),
    ("redirect-without-tls", lambda s: ("POST", "/ingresses", {"json": _with_rule(s, redirect_http=True)}),
     400, "bad_request", ("redirect_http: requires tls",)),
    ("duplicate-rule", lambda s: ("POST", "/ingresses", {"json": {**_good(s), "rules": _good(s)["rules"] * 2}}),
     400, "bad_request", ("already matched by rules[0]",)),
    ("caddy-admin-port", lambda s: ("POST", "/ingresses", {"json": _with_rule(s, match={"port": s.d.admin_port})}),
     400, "bad_request", ("admin port",)),
    ("empty-body", lambda s: ("POST", "/ingresses", {"content": b""}), 400, "bad_request", ("empty body",)),
    ("blank-body", lambda s: ("POST", "/ingresses", {"content": b" \n\t"}), 400, "bad_request", ("empty body",)),
    ("array-body", lambda s: ("POST", "/ingresses", {"content": b"[]"}), 400, "bad_request", ("JSON object",)),
    ("string-body", lambda s: ("POST", "/ingresses", {"content": b'"web"'}), 400, "bad_request", ("JSON object",)),
    ("null-body", lambda s: ("POST", "/ingresses", {"content": b"null"}), 400, "bad_request", ("JSON object",)),
    ("not-utf8", lambda s: ("POST", "/ingresses", {"content": b'{"name": "\xff"}'}), 400, "bad_request",
     ("UTF-8",)),
    ("deeply-nested", lambda s: ("POST", "/ingresses", {"content": b"[" * 50000 + b"]" * 50000}),
     413, "bad_request", ("larger than",)),
    ("nested-within-limit", lambda s: ("POST", "/ingresses", {"content": b"[" * 30000 + b"]" * 30000}),
     400, "bad_request", ("nesting too deep",)),
    ("oversized-body", lambda s: ("POST", "/ingresses", {"content": b'{"pad": "' + b"x" * 70000 + b'"}'}),
     413, "bad_request", ("larger than 65536 bytes",)),
    ("oversized-chunked-body", lambda s: ("POST", "/ingresses", {"content": _chunks(20)}),
     413, "bad_request", ("larger than 65536 bytes",)),
    # -- 400 bad_request: the reference in the path
    ("ref-dotdot-encoded", lambda s: ("GET", "/ingresses/..%2fx", {}), 400, "bad_request", ("reference",)),
    ("ref-dotdot-fully-encoded", lambda s: ("GET", "/ingresses/%2e%2e%2fx", {}), 400, "bad_request", ()),
    ("ref-dotdot-delete", lambda s: ("DELETE", "/ingresses/%2e%2e%2f%2e%2e%2fmanifests%2fgit-web.yaml", {}),
     400, "bad_request", ()),
    ("ref-dotdot-only", lambda s: ("DELETE", "/ingresses/%2e%2e", {}), 400, "bad_request", ()),
    ("ref-nul", lambda s: ("GET", "/ingresses/taken%00", {}), 400, "bad_request", ()),
    ("ref-nul-delete", lambda s: ("DELETE", "/ingresses/taken%00.yaml", {}), 400, "bad_request", ()),
    ("ref-newline", lambda s: ("DELETE", "/ingresses/taken%0a", {}), 400, "bad_request", ()),
    ("ref-hidden", lambda s: ("GET", "/ingresses/.taken.yaml", {}), 400, "bad_request", ()),
    ("ref-too-long", lambda s: ("GET", "/ingresses/" + "a" * 129, {}), 400, "bad_request", ()),
    ("ref-absolute", lambda s: ("DELETE", "/ingresses/%2fetc%2fpasswd", {}), 400, "bad_request", ()),
    # -- instance / validation
    ("instance-not-found", lambda s: ("POST", "/ingresses", {"json": _good(s) | {"rules": [
        {"match": {"hostname": "fresh.test", "port": s.port}, "target": {"instance": "ghost", "port": 80}}]}}),
     400, "instance_not_found", ("ghost",)),
    ("pattern-mixed-capture", lambda s: ("POST", "/ingresses", {"json": _good(s) | {"rules": [
        {"match": {"hostname": "a{instance}.test", "port": s.port},
         "target": {"instance": "{instance}", "port": 80}}]}}),
     400, "bad_request", ("mixed captures like 'a{instance}' are not supported",)),
    ("pattern-unknown-capture", lambda s: ("POST", "/ingresses", {"json": _good(s) | {"rules": [
        {"match": {"hostname": "{instance}.p.test", "port": s.port}, "target": {"instance": "{name}", "port": 80}}]}}),
     400, "bad_request", ("references unknown capture {name}",)),
    ("tls-domain-not-allowed", lambda s: ("POST", "/ingresses", {"json": _with_rule(
        s, tls=True, match={"hostname": "x.other.test", "port": free_port()})}),
     400, "domain_not_allowed", ("x.other.test", "TLS_ALLOWED_DOMAINS")),
    ("tls-on-a-plain-port", lambda s: ("POST", "/ingresses", {"json": _with_rule(
        s, tls=True, match={"hostname": "x.allowed.test"})}),
     409, "port_conflict", ("cannot mix TLS and plain HTTP",)),
    ("caddy-validate-rejects", lambda s: ("POST", "/ingresses", {"json": _good(s, host=REJECTED_HOST)}),
     400, "config_validation_failed", ("Caddy would reject the config", f"hostname {REJECTED_HOST} is refused")),
    # -- 409
    ("same-name-in-api-dir", lambda s: ("POST", "/ingresses", {"json": _good(s, name="taken")}),
     409, "already_exists", ("'taken'", "ingresses/taken.yaml")),
    ("same-id-in-api-dir", lambda s: ("POST", "/ingresses", {"json": _good(s, id=derive_ingress_id("taken"))}),
     409, "already_exists", ("'taken'",)),
    ("shadow-read-only-name", lambda s: ("POST", "/ingresses", {"json": _good(s, name="git-web")}),
     409, "already_exists", ("'git-web'", "manifests/git-web.yaml")),
    ("shadow-read-only-id", lambda s: ("POST", "/ingresses", {"json": _good(s, id=derive_ingress_id("git-web"))}),
     409, "already_exists", ("manifests/git-web.yaml",)),
    ("hostname-in-use-api", lambda s: ("POST", "/ingresses", {"json": _good(s, host="taken.test")}),
     409, "hostname_in_use", ("taken.test", "'taken'")),
    ("hostname-in-use-case-insensitive", lambda s: ("POST", "/ingresses", {"json": _good(s, host="TAKEN.Test")}),
     409, "hostname_in_use", ("taken.test",)),
    ("hostname-in-use-read-only", lambda s: ("POST", "/ingresses", {"json": _good(s, host="git.test")}),
     409, "hostname_in_use", ("'git-web'", "manifests/git-web.yaml")),
    ("ambiguous-get", lambda s: ("GET", "/ingresses/grp-", {}), 409, "ambiguous", ("grp-one", "grp-two")),
    ("ambiguous-delete", lambda s: ("DELETE", "/ingresses/grp", {}), 409, "ambiguous", ()),
    ("delete-read-only", lambda s: ("DELETE", "/ingresses/git-web", {}),
     409, "read_only_source", ("read-only", "manifests/git-web.yaml")),
    ("delete-read-only-by-id", lambda s: ("DELETE", f"/ingresses/{derive_ingress_id('git-web')}", {}),
     409, "read_only_source", ("manifests/git-web.yaml",)),
    # -- 404 / 405
    ("get-unknown", lambda s: ("GET", "/ingresses/nope", {}), 404, "not_found", ("'nope'",)),
    ("delete-unknown", lambda s: ("DELETE", "/ingresses/nope", {}), 404, "not_found", ()),
    ("unknown-endpoint", lambda s: ("GET", "/nope", {}), 404, "not_found", ()),
    ("deeper-path", lambda s: ("GET", "/ingresses/taken/rules", {}), 400, "bad_request", ()),
    ("method-not-allowed", lambda s: ("PUT", "/ingresses/taken", {"json": _good(s)}), 405, "method_not_allowed", ()),
]


@pytest.mark.parametrize(("method_path", "status", "code", "fragments"),
                         [pytest.param(c[1], c[2], c[3], c[4], id=c[0]) for c in ERROR_CASES])
def test_error_codes_leave_everything_untouched(shared: Shared, method_path: Request, status: int, code: str,
                                                fragments: tuple[str, ...]) -> None:
    s = shared
    before, before_ro = dir_state(s.api_dir), dir_state(s.manifests)
    method, path, kwargs = method_path(s)
    try:
        r = call(s.d, method, path, **kwargs)
        assert_error(r, status, code, *fragments)
        assert dir_state(s.api_dir) == before
        assert dir_state(s.manifests) == before_ro
        assert routed_to(s.port, "taken.test", "a") and routed_to(s.port, "git.test", "a")
        assert status_of(s.port, "fresh.test") == 404
    finally:  # a case that wrongly wrote something must not break the cases after it
        stray = set(dir_state(s.api_dir)) - set(before)
        for rel in stray:
            (s.api_dir / rel).unlink(missing_ok=True)
        if stray:
            wait_for(lambda: status_of(s.port, "fresh.test") == 404, timeout=5, message="clean-up applied")


def test_a_write_the_disk_refuses_names_the_file_and_changes_nothing(shared: Shared) -> None:
    """A manifest write that the file system refuses (here: a directory sits where the atomic write's temp
    file goes, so opening it fails with EISDIR) answers 503 ``storage_unavailable`` naming the file and the
    OS's reason -- not an opaque 500 --; nothing is written; the same create works once the obstacle is
    gone. (A full disk answers 507: see tests/test_faults.py.)"""
    s = shared
    assert s.d.proc is not None
    blocker = s.api_dir / f".fresh.yaml.{s.d.proc.pid}.tmp"
    blocker.mkdir()
    try:
        before, before_ro = dir_state(s.api_dir), dir_state(s.manifests)
        n_logged = len(s.d.log_events("api.internal_error"))
        r = call(s.d, "POST", "/ingresses", json=_good(s))
        err = assert_error(r, 503, "storage_unavailable", str(s.api_dir / "fresh.yaml"), "Is a directory",
                           "nothing was written")
        assert "Traceback" not in r.text and "Errno" not in r.text, err
        assert dir_state(s.api_dir) == before and dir_state(s.manifests) == before_ro
        assert status_of(s.port, "fresh.test") == 404
        assert s.d.log_events("api.internal_error")[n_logged:] == []
    finally:
        blocker.rmdir()
    create(s.d, _good(s))
    assert routed_to(s.port, "fresh.test", "a")
    assert call(s.d, "DELETE", "/ingresses/fresh").status_code == 204
    assert status_of(s.port, "fresh.test") == 404


class _Failing(Exception):
    pass


SECRET = "s3cret-" + secrets.token_hex(8)


class _RaisingWriter:
    """A writer whose every operation fails with a message full of internals."""

    def _fail(self, *args: Any) -> Any:
        raise _Failing(f"/var/lib/hypeman/ingresses/.x.yaml.1.tmp: disk on fire; token={SECRET}")

    all = find = create = delete = _fail


class _RaisingBackend:
    def __init__(self) -> None:
        self.broken = True

    def _fail(self, *args: Any) -> Any:
        raise _Failing(f"caddy admin at 127.0.0.1:2019 said no; AWS_SECRET_ACCESS_KEY={SECRET}")

    status = ready = metrics_text = _fail

    def request_pass(self, path: str | None = None) -> int:
        return 0

    def wait_pass(self, ticket: int, timeout: float) -> bool:
        return True

    def ingress_status(self, name: str) -> dict[str, Any] | None:
        return None


# (method, path, what fails): every operation but /healthz and /openapi.json can fail inside
FAILURE_CASES: list[tuple[str, str, str]] = [
    ("GET", "/ingresses", "writer"), ("POST", "/ingresses", "writer"), ("GET", "/ingresses/web", "writer"),
    ("DELETE", "/ingresses/web", "writer"), ("GET", "/status", "backend"), ("GET", "/readyz", "backend"),
    ("GET", "/metrics", "backend"),
]


@pytest.mark.parametrize("token", [None, "tok-" + secrets.token_hex(8)])
@pytest.mark.parametrize(("method", "path", "failing"), FAILURE_CASES)
def test_internal_error_answer_has_no_details(tmp_path: Path, method: str, path: str, failing: str,
                                              token: str | None) -> None:
    """In process: whatever raises inside the API answers 500 ``{"code": "internal_error", "message"}``
    (as the OpenAPI document declares it), never the exception's text, paths or secrets."""
    writer: Any = _RaisingWriter()
    backend: Any = _RaisingBackend()
    if failing == "backend":  # a working writer, so only the backend fails
        writer = ManifestWriter(writer_settings(tmp_path), validate_config=lambda c: None)
    app = create_app(writer=writer, backend=backend, token=token)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.request(method, path, headers=headers, json=body("web", "web.test", 80, 8080)
                           if method == "POST" else None)
        assert r.status_code == 500, r.text
        assert r.json() == {"code": "internal_error", "message": "internal error; see the daemon log"}
        for leak in (SECRET, "disk on fire", "said no", "/var/lib", "_Failing", "Traceback"):
            assert leak not in r.text, leak
        check_spec(method, path, r)
        if token:
            assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert client.get("/healthz").status_code == 200  # the process stays healthy


def test_error_codes_cover_the_seed(shared: Shared) -> None:
    """Every seed code is reached above (``internal_error`` by the failure cases); every code the API can
    answer is in the OpenAPI document."""
    reached = {c[3] for c in ERROR_CASES} | ({"internal_error"} if FAILURE_CASES else set())
    assert reached >= SEED_CODES, SEED_CODES - reached
    doc = call(shared.d, "GET", "/openapi.json").json()
    enum = set(doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"])
    assert SEED_CODES | reached | {"unauthorized"} <= enum, enum ^ (SEED_CODES | reached)


def test_method_not_allowed_names_allowed_methods(shared: Shared) -> None:
    r = call(shared.d, "PUT", "/ingresses")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET, HEAD, POST"
    r = call(shared.d, "POST", "/ingresses/taken")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "DELETE, GET, HEAD"


@pytest.mark.parametrize("path", ["/ingresses/../x", "/ingresses/../../manifests/git-web.yaml",
                                  "/ingresses/./taken", "/ingresses/taken/../taken"])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
def test_raw_dot_segments_are_refused(shared: Shared, method: str, path: str) -> None:
    before, before_ro = dir_state(shared.api_dir), dir_state(shared.manifests)
    status, err = raw_request(shared.d, method, path)
    assert (status, err["code"]) == (400, "bad_request"), err
    assert dir_state(shared.api_dir) == before and dir_state(shared.manifests) == before_ro


# -- races and crashes ------------------------------------------------------------------------------------

def test_concurrent_creates_for_one_hostname(tmp_path: Path, daemon_factory: DaemonFactory,
                                             backends: BackendFactory) -> None:
    """Two simultaneous POSTs claim the same (hostname, port) under different names: exactly one 201 and
    one 409 hostname_in_use, round after round, and only the winner's file exists."""
    a = backends("a")
    port = free_port()
    d = daemon_factory(instances=setup_instances(tmp_path)).start()
    api_dir = d.data_dir / "ingresses"
    rounds = 25
    with httpx.Client(base_url=d.api_url, timeout=30) as c1, httpx.Client(base_url=d.api_url, timeout=30) as c2:
        for i in range(rounds):
            host = f"race{i}.test"
            barrier = threading.Barrier(2)
            results: dict[str, httpx.Response | BaseException] = {}
            routed_after_201: dict[str, bool] = {}

            def post(client: httpx.Client, name: str, host: str = host, barrier: threading.Barrier = barrier,
                     results: dict[str, Any] = results, routed: dict[str, bool] = routed_after_201) -> None:
                try:
                    barrier.wait(timeout=10)
                    r = client.post("/ingresses", json=body(name, host, port, a.port))
                    if r.status_code == 201:
                        routed[name] = routed_to(port, host, "a")
                    results[name] = r
                except BaseException as exc:
                    results[name] = exc

            names = (f"r{i}-x", f"r{i}-y")
            threads = [threading.Thread(target=post, args=(c, n)) for c, n in zip((c1, c2), names, strict=True)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            rs = {n: results[n] for n in names}
            assert all(isinstance(r, httpx.Response) for r in rs.values()), rs
            codes = sorted(r.status_code for r in rs.values())  # type: ignore[union-attr]
            assert codes == [201, 409], (i, {n: r.text for n, r in rs.items()})  # type: ignore[union-attr]
            [winner] = [n for n, r in rs.items() if r.status_code == 201]  # type: ignore[union-attr]
            [loser] = [n for n in names if n != winner]
            assert_error(rs[loser], 409, "hostname_in_use", f"{host}:{port}", f"'{winner}'")  # type: ignore[arg-type]
            assert routed_after_201 == {winner: True}, (i, routed_after_201)
            assert (api_dir / f"{winner}.yaml").exists() and not (api_dir / f"{loser}.yaml").exists()
    files = sorted(os.listdir(api_dir))
    assert len(files) == rounds, files
    listed = call(d, "GET", "/ingresses").json()
    assert sorted(f"{i['name']}.yaml" for i in listed) == files
    assert all(i["status"]["ready"] for i in listed)
    assert not d.log_events("input.problem")


def test_sigkill_during_a_burst_of_posts_leaves_only_complete_manifests(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    port = free_port()
    instances = setup_instances(tmp_path)
    d1 = daemon_factory(instances=instances).start()
    api_dir = d1.data_dir / "ingresses"
    created: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def burst(worker: int) -> None:
        with httpx.Client(base_url=d1.api_url, timeout=30) as client:
            for i in range(200):
                if stop.is_set():
                    return
                name = f"b{worker}-{i}"
                try:
                    r = client.post("/ingresses", json=body(name, f"{name}.burst.test", port, a.port))
                except httpx.HTTPError:
                    return  # the daemon is gone
                if r.status_code == 201:
                    with lock:
                        created.append(name)

    threads = [threading.Thread(target=burst, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(created) >= 12, timeout=60, message="a dozen creates")
        assert d1.proc is not None
        killed = d1.proc.pid
        d1.proc.send_signal(signal.SIGKILL)  # while several POSTs are in flight
        assert d1.proc.wait(timeout=10) == -signal.SIGKILL
        d1.proc = None
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)

    # only complete manifests: every visible file parses and validates; temp files, if any, are hidden
    entries = sorted(os.listdir(api_dir))
    visible = [e for e in entries if not e.startswith(".")]
    leftovers = [e for e in entries if e.startswith(".")]
    assert all(re.fullmatch(r"\..+\.tmp", e) for e in leftovers), leftovers
    assert not [e for e in visible if not e.endswith(".yaml")], visible
    names = set()
    for e in visible:
        [parsed] = parse_documents((api_dir / e).read_text())
        ing, problems = ingress_from_document(Document(Origin(0, e, 0, e, 1), parsed))
        assert ing is not None and not problems, (e, problems)
        assert f"{ing.name}.yaml" == e
        names.add(ing.name)
    assert set(created) <= names  # every 201 was durable before it was answered
    # what a write cut short by the SIGKILL leaves (planted, so the test does not depend on the timing)
    planted = api_dir / f".planted.yaml.{killed}.tmp"
    planted.write_text("name: planted\nrules:\n  - match: {hostn")
    leftovers = sorted(e for e in os.listdir(api_dir) if e.startswith("."))

    # the restarted daemon reads them all cleanly and serves them, and its API removes the dead writer's
    # temp files
    n_problems = len(d1.log_events("input.problem"))
    n = d1.passes()
    d2 = daemon_factory(instances=instances, data_dir=d1.data_dir, admin_port=d1.admin_port,
                        env={"CADDY_HTTP_PORT": d1.env["CADDY_HTTP_PORT"],
                             "CADDY_HTTPS_PORT": d1.env["CADDY_HTTPS_PORT"],
                             "HYPEMAN_DNS_PORT": d1.env["HYPEMAN_DNS_PORT"]})
    d2.start(wait_ready=False)
    wait_for(lambda: d2.passes() > n, timeout=30, message="first pass after the restart")
    assert [e for e in os.listdir(api_dir) if e.startswith(".")] == []
    [removed] = wait_for(lambda: d2.log_events("api.temp_files_removed"), timeout=5, message="removal logged")
    assert removed["files"] == leftovers and planted.name in leftovers, (removed, leftovers)
    listed = call(d2, "GET", "/ingresses").json()
    assert {i["name"] for i in listed} == names
    assert all(i["status"]["ready"] for i in listed), [i for i in listed if not i["status"]["ready"]]
    assert len(d2.log_events("input.problem")) == n_problems
    for name in sorted(names):
        assert routed_to(port, f"{name}.burst.test", "a"), name
    # and it takes writes again
    create(d2, body("after", "after.burst.test", port, a.port))
    assert routed_to(port, "after.burst.test", "a")


# -- read-only sources ---------------------------------------------------------------------------------------

def test_read_only_source_cannot_be_deleted_or_shadowed(tmp_path: Path, daemon_factory: DaemonFactory,
                                                        backends: BackendFactory) -> None:
    a, b = backends("a"), backends("b")
    port = free_port()
    git = tmp_path / "git"
    app = write(git / "apps" / "app.yaml", ingress_yaml("app", "app.test", port, "vm", a.port))
    team = write(git / "team.yaml", ingress_yaml("team-a", "team-a.test", port, "vm", a.port) + "---\n"
                 + ingress_yaml("team-b", "team-b.test", port, "vm", a.port))
    d = daemon_factory(manifests=[git], instances=setup_instances(tmp_path)).start()
    wait_for(lambda: routed_to(port, "app.test", "a") and routed_to(port, "team-b.test", "a"), timeout=10,
             message="git ingresses routed")
    api_dir = d.data_dir / "ingresses"
    git_before = dir_state(git)

    got = call(d, "GET", "/ingresses/app").json()
    assert got["read_only"] is True and got["source"] == str(app)
    assert_error(call(d, "DELETE", "/ingresses/app"), 409, "read_only_source", str(app))
    assert_error(call(d, "DELETE", "/ingresses/team-b"), 409, "read_only_source", str(team))
    assert_error(call(d, "POST", "/ingresses", json=body("app", "other.test", port, b.port)),
                 409, "already_exists", str(app))
    assert_error(call(d, "POST", "/ingresses", json=body("team-b", "other.test", port, b.port)),
                 409, "already_exists", str(team))
    assert dir_state(git) == git_before and os.listdir(api_dir) == []
    assert routed_to(port, "app.test", "a") and routed_to(port, "team-a.test", "a")

    # an API-created ingress later committed to git under the same name: git wins, the API copy is
    # shadowed -- reported as such, and still deletable through the API (it is the only copy the API owns)
    create(d, body("moved", "moved-api.test", port, b.port))
    assert routed_to(port, "moved-api.test", "b")
    moved_git = write(git / "moved.yaml", ingress_yaml("moved", "moved-git.test", port, "vm", a.port))
    wait_for(lambda: routed_to(port, "moved-git.test", "a") and status_of(port, "moved-api.test") == 404,
             timeout=5, message="git copy served, API copy shadowed")
    copies = [i for i in call(d, "GET", "/ingresses").json() if i["name"] == "moved"]
    assert [(c["read_only"], c["source"]) for c in copies] == [(True, str(moved_git)),
                                                               (False, str(api_dir / "moved.yaml"))]
    assert copies[0]["status"]["ready"] is True
    assert copies[1]["status"]["ready"] is False and copies[1]["status"]["reason"] == "NameConflict", copies
    assert call(d, "GET", "/ingresses/moved").json()["source"] == str(moved_git)
    r = call(d, "DELETE", "/ingresses/moved")
    assert r.status_code == 204, r.text
    assert os.listdir(api_dir) == [] and moved_git.exists()
    assert routed_to(port, "moved-git.test", "a")
    assert_error(call(d, "DELETE", "/ingresses/moved"), 409, "read_only_source", str(moved_git))


# -- token -------------------------------------------------------------------------------------------------

def test_token_is_required_everywhere_but_healthz_and_never_shown(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    port = free_port()
    token = "tok-" + secrets.token_urlsafe(24)
    d = daemon_factory(instances=setup_instances(tmp_path), env={"INGRESS_API_TOKEN": token}).start()
    api_dir = d.data_dir / "ingresses"
    good = {"Authorization": f"Bearer {token}"}
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {token}x"},
        {"Authorization": f"Bearer {token[:-1]}"}, {"Authorization": f"Basic {token}"},
        {"Authorization": token}, {"Authorization": "Bearer"}, {"X-Api-Token": token},
    ]
    endpoints: list[tuple[str, str, dict[str, Any], int]] = [
        ("POST", "/ingresses", {"json": body("tok", "tok.test", port, a.port)}, 201),
        ("GET", "/ingresses", {}, 200),
        ("GET", "/ingresses/tok", {}, 200),
        ("GET", "/status", {}, 200),
        ("GET", "/readyz", {}, 200),
        ("GET", "/metrics", {}, 200),
        ("GET", "/openapi.json", {}, 200),
        ("GET", "/nope", {}, 404),
        ("DELETE", "/ingresses/tok", {}, 204),
    ]
    for method, path, kwargs, ok in endpoints:
        for headers in bad_headers:
            before = dir_state(api_dir)
            r = call(d, method, path, headers=headers, **kwargs)
            assert_error(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
            assert dir_state(api_dir) == before
        r = call(d, method, path, headers=good, **kwargs)
        assert r.status_code == ok, (method, path, r.text)
        if (method, path) == ("POST", "/ingresses"):
            assert routed_to(port, "tok.test", "a")
    assert status_of(port, "tok.test") in (None, 404)  # deleted: the port's only route, so its server is gone
    r = call(d, "GET", "/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert call(d, "GET", "/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 200
    assert call(d, "GET", "/ingresses", headers={"Authorization": f"bearer   {token}"}).status_code == 200

    # the status CLI sends the token from the environment; an empty --data-dir proves it read the API
    empty = tmp_path / "empty-data"
    env = {k: v for k, v in d.env.items() if k not in ("INGRESS_API_TOKEN", "HYPEMAN_API_LISTEN")}
    args = ["status", "--data-dir", str(empty), "--api-listen", f"127.0.0.1:{d.api_port}"]
    r = httpx.post(d.api_url + "/ingresses", json=body("tok", "tok.test", port, a.port), headers=good, timeout=30)
    assert r.status_code == 201, r.text
    res = cli(*args, env={**env, "INGRESS_API_TOKEN": token})
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"^tok\s+tok\.test:\d+\s+vm:\d+\s+yes\s+Applied\s", res.stdout, re.M), res.stdout
    assert token not in res.stdout + res.stderr
    res = cli(*args, env=env)  # no token: the API refuses, and there is no state in the empty data dir
    assert res.returncode == 1 and "no status yet" in res.stderr, res.stdout + res.stderr

    # the token is nowhere to be read
    places = {
        "/status": call(d, "GET", "/status", headers=good).text,
        "/metrics": call(d, "GET", "/metrics", headers=good).text,
        "/ingresses": call(d, "GET", "/ingresses", headers=good).text,
        "daemon log": d.log_path.read_text(errors="replace"),
        "caddy log": d.caddy_log.read_text(errors="replace"),
    }
    for p in (d.data_dir / "state").rglob("*"):
        if p.is_file():
            places[str(p)] = p.read_text(errors="replace")
    assert [e["auth"] for e in d.log_events("api.listening")] == [True]
    for where, text in places.items():
        assert token not in text, where


# -- probes, metrics, status, OpenAPI, CLI -----------------------------------------------------------------

def test_probes_metrics_status_and_readyz_while_caddy_is_down(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    port = free_port()
    wrapper, no_run = caddy_wrapper(tmp_path / "wrapper")
    # (refused starts count as quick deaths: Caddy is "flapping" until it has stayed up for 3 s)
    d = daemon_factory(instances=setup_instances(tmp_path),
                       env={"CADDY_BINARY": str(wrapper), "HYPEMAN_CADDY_STABLE_SECONDS": "3"}).start()
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=10, message="ready")
    r = call(d, "GET", "/readyz")
    assert r.json()["ready"] is True and r.json()["message"].startswith("last pass "), r.json()
    assert call(d, "GET", "/healthz").json() == {"status": "ok"}

    web = create(d, body("web", "web.test", port, a.port))
    assert routed_to(port, "web.test", "a")
    idle = create(d, body("idle", "idle.test", port, a.port, instance="idle-vm"))
    assert idle["status"]["ready"] is False and idle["status"]["reason"] == "InstanceNotRunning", idle
    assert status_of(port, "idle.test") == 503
    assert web["status"]["reason"] == "Applied"

    # /status: revisions, caddy, sources, every ingress
    st = call(d, "GET", "/status").json()
    assert st["revision"]["last_applied"] == st["revision"]["last_attempted"]
    assert st["last_attempted"]["outcome"] in ("applied", "unchanged") and st["last_error"] is None
    assert st["caddy"]["running"] is True and st["caddy"]["pid"] == d.caddy_pid()
    assert {(i["name"], i["ready"], i["reason"]) for i in st["ingresses"]} == {
        ("web", True, "Applied"), ("idle", False, "InstanceNotRunning")}
    assert st["counts"] == {"ingresses": 2, "ready": 1}
    assert str(d.data_dir / "ingresses") in [s["path"] for s in st["sources"]]

    # /metrics: Prometheus text, consistent with /status
    m = metrics(d)
    passes = sum(v for (name, _), v in m.items() if name == "hypeman_ingress_reconcile_passes_total")
    assert passes >= 3  # start + two API creates
    assert m[("hypeman_ingress_reconcile_passes_total", (("outcome", "applied"),))] >= 3
    assert m[("hypeman_ingress_reconcile_duration_seconds_count", ())] == passes
    assert m[("hypeman_ingress_reconcile_duration_seconds_sum", ())] > 0
    assert m[("hypeman_ingress_caddy_loads_total", ())] >= 3
    assert m[("hypeman_ingress_ingresses", (("ready", "true"), ("reason", "Applied")))] == 1
    assert m[("hypeman_ingress_ingresses", (("ready", "false"), ("reason", "InstanceNotRunning")))] == 1
    info = [labels for (name, labels), v in m.items() if name == "hypeman_ingress_last_applied_info" and v == 1]
    assert info == [(("revision", st["revision"]["last_applied"]),)]
    assert m[("hypeman_ingress_last_applied_timestamp_seconds", ())] > 0
    assert m[("hypeman_ingress_caddy_up", ())] == 1

    # /openapi.json
    doc = call(d, "GET", "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert set(doc["paths"]) == {"/ingresses", "/ingresses/{ref}", "/status", "/healthz", "/readyz", "/metrics",
                                 "/internal/tls/permission", "/ui/", "/ui/status"}
    assert "domain_not_allowed" in doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert doc["paths"]["/ingresses"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/IngressSpec"}
    assert "./ingress.schema.json" not in json.dumps(doc)

    # Caddy SIGKILLed and (held by the wrapper) unable to restart: not ready, but alive
    no_run.touch()
    old = d.caddy_pid()
    assert old is not None
    os.kill(old, signal.SIGKILL)
    r = wait_for(lambda: (x := call(d, "GET", "/readyz")).status_code == 503 and x, timeout=10,
                 message="/readyz 503 while Caddy is down")
    assert r.json()["ready"] is False, r.json()
    # (each start the wrapper refuses exits at once: after two, Caddy counts as flapping)
    assert r.json()["message"].startswith(("Caddy is not running", "Caddy is starting", "Caddy is flapping")), r.json()
    assert call(d, "GET", "/healthz").status_code == 200
    # (each restart attempt runs the wrapper for a moment, which counts as a Caddy process while it lasts)
    wait_for(lambda: metrics(d)[("hypeman_ingress_caddy_up", ())] == 0, timeout=10, message="caddy_up 0")
    wait_for(lambda: call(d, "GET", "/status").json()["caddy"]["running"] is False, timeout=10,
             message="status: Caddy not running")
    wait_for(lambda: d.log_events("caddy.restart_failed"), timeout=10, message="a failed restart")
    assert call(d, "GET", "/readyz").status_code == 503

    # the wrapper lets Caddy start again: ready, routed, counted
    no_run.unlink()
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=30, message="ready after restart")
    new = d.caddy_pid()
    assert new is not None and new != old and pid_running(new)
    wait_for(lambda: routed_to(port, "web.test", "a"), timeout=10, message="routed after restart")
    # (/readyz may turn 200 a moment before the supervisor counts the restart: see the report)
    wait_for(lambda: metrics(d)[("hypeman_ingress_caddy_restarts", ())] >= 1, timeout=5, message="restart counted")
    assert metrics(d)[("hypeman_ingress_caddy_up", ())] == 1
    kill_pid(old)


def test_status_cli_reads_the_api(tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    a = backends("a")
    port = free_port()
    d = daemon_factory(instances=setup_instances(tmp_path)).start()
    create(d, body("web", "web.test", port, a.port))
    empty = tmp_path / "empty-data"  # no state there: whatever is shown came from the API
    env = {k: v for k, v in d.env.items() if k != "HYPEMAN_API_LISTEN"}
    args = ["status", "--data-dir", str(empty), "--api-listen", f"127.0.0.1:{d.api_port}"]

    r = cli(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "HOSTS", "TARGETS", "READY", "REASON", "SOURCE"]
    assert lines[1].split() == ["web", f"web.test:{port}", f"vm:{a.port}", "yes", "Applied",
                                str(d.data_dir / "ingresses" / "web.yaml") + ":2"]  # line 1: the API's header comment
    assert re.search(r"^caddy:\s+running, pid \d+", r.stdout, re.M), r.stdout

    # one ingress not ready -> exit 1, and the table says why
    create(d, body("idle", "idle.test", port, a.port, instance="idle-vm"))
    r = cli(*args, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"^idle\s+idle\.test:\d+\s+idle-vm:\d+\s+no\s+InstanceNotRunning\s", r.stdout, re.M), r.stdout
    assert "idle: " in r.stdout and "not running" in r.stdout

    r = cli(*args, "-o", "json", env=env)
    assert r.returncode == 1
    assert [(i["name"], i["ready"]) for i in json.loads(r.stdout)["ingresses"]] == [("idle", False), ("web", True)]

    # back to all ready -> 0
    assert call(d, "DELETE", "/ingresses/idle").status_code == 204
    assert cli(*args, env=env).returncode == 0

    # nothing answers on --api-listen and no state in the data dir: exit 1 with a hint
    r = cli("status", "--data-dir", str(empty), "--api-listen", f"127.0.0.1:{free_port()}", env=env)
    assert r.returncode == 1 and "no status yet" in r.stderr


# -- the writer validates against what the loop serves -----------------------------------------------------

def _state_status(d: Daemon) -> dict[str, Any]:
    """``{data}/state/status.json`` as written (after the pass's ``lastgood.json``, on the same thread)."""
    try:
        return dict(json.loads((d.data_dir / "state" / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def _reasons(d: Daemon) -> dict[str, str]:
    return {i["name"]: i["reason"] for i in _state_status(d).get("ingresses", [])}


def test_writer_sees_the_last_good_versions_the_loop_serves(tmp_path: Path, daemon_factory: DaemonFactory,
                                                            backends: BackendFactory) -> None:
    """A git file and a hand-written API-dir file go live, then both turn invalid: the daemon keeps serving
    their last good versions (``Stale``). The API never read them while they were valid, yet it must
    validate against what is live: a create claiming their hostname or name is refused (201 here would
    write an ingress that loses to the stale one and ends ``HostnameConflict``), and the API-dir one can be
    deleted (its routes go)."""
    a, b = backends("a"), backends("b")
    port = free_port()
    git = tmp_path / "git"
    x_file = write(git / "x.yaml", ingress_yaml("x", "x.test", port, "vm", a.port))
    d = daemon_factory(manifests=[git], instances=setup_instances(tmp_path)).start()
    api_dir = d.data_dir / "ingresses"
    hand = write(api_dir / "hand.yaml", ingress_yaml("hand", "hand.test", port, "vm", a.port))
    wait_for(lambda: routed_to(port, "x.test", "a") and routed_to(port, "hand.test", "a"), timeout=10,
             message="x and hand routed")
    # no API call until now: the API process has never read either file while it was valid
    x_file.write_text("name: x\nrules: [\n")
    hand.write_text("name: hand\nrules:\n  - match: {hostname: [oops\n")
    wait_for(lambda: _reasons(d) == {"x": "Stale", "hand": "Stale"}, timeout=10, message="both Stale")
    assert routed_to(port, "x.test", "a") and routed_to(port, "hand.test", "a")
    before, git_before = dir_state(api_dir), dir_state(git)

    # the hostname of a stale ingress is taken, in a read-only source and in the API dir
    r = call(d, "POST", "/ingresses", json=body("y", "x.test", port, b.port))
    assert_error(r, 409, "hostname_in_use", f"x.test:{port}", "'x'", str(x_file), "last valid version")
    r = call(d, "POST", "/ingresses", json=body("y", "hand.test", port, b.port))
    assert_error(r, 409, "hostname_in_use", f"hand.test:{port}", "'hand'", str(hand))
    # so is its name (and its id)
    assert_error(call(d, "POST", "/ingresses", json=body("x", "other.test", port, b.port)),
                 409, "already_exists", "'x'", str(x_file))
    assert_error(call(d, "POST", "/ingresses", json=body("z", "other.test", port, b.port,
                                                         id=derive_ingress_id("x"))),
                 409, "already_exists", str(x_file))
    assert dir_state(api_dir) == before and dir_state(git) == git_before
    assert routed_to(port, "x.test", "a") and status_of(port, "other.test") == 404

    # GET shows them as the loop does; the read-only one cannot be deleted
    got = call(d, "GET", "/ingresses/x").json()
    assert (got["source"], got["read_only"], got["status"]["reason"]) == (str(x_file), True, "Stale"), got
    assert_error(call(d, "DELETE", "/ingresses/x"), 409, "read_only_source", str(x_file))
    assert [i["name"] for i in call(d, "GET", "/ingresses").json()] == ["hand", "x"]

    # the broken API-dir file whose last good version serves is deletable: 204 once its routes are gone
    r = call(d, "DELETE", "/ingresses/hand")
    assert r.status_code == 204, r.text
    assert not hand.exists() and status_of(port, "hand.test") == 404
    assert routed_to(port, "x.test", "a")
    # and its hostname is free again
    create(d, body("y", "hand.test", port, b.port))
    assert routed_to(port, "hand.test", "b")
    assert not d.log_events("api.internal_error")


def test_writer_follows_lastgood_json_as_the_daemon_rewrites_it(tmp_path: Path) -> None:
    """In process: the writer takes the last good versions from ``{data}/state/lastgood.json`` (what the
    daemon serves), re-read whenever the daemon rewrote it, not from what the writer itself once read."""
    from reconciler.sources.dirs import sources_for
    from reconciler.sources.inputs import ingress_reader, instance_reader
    from reconciler.state.store import StateStore

    git = tmp_path / "git"
    x_file = write(git / "x.yaml", ingress_yaml("x", "x.test", 80, "vm", 8080))
    s = writer_settings(tmp_path, (git,))
    store = StateStore(s.state_dir)

    def daemon_pass() -> None:
        """What the daemon persists after a pass (its own readers, reading from scratch)."""
        m, i = ingress_reader(), instance_reader()
        m.read(sources_for(s))
        i.read([Source(s.instances_path, 0)])
        assert store.save_lastgood(m.good, i.good)

    writer = ManifestWriter(s, validate_config=lambda c: None)
    daemon_pass()  # the daemon saw x valid; the writer never read it
    x_file.write_text("name: x\nrules: [\n")
    with pytest.raises(Refused) as exc:
        writer.create(body("y", "x.test", 80, 8080))
    assert answer(exc.value) == (409, "hostname_in_use"), exc.value.message
    assert os.listdir(s.api_dir) == []

    # x deleted, the daemon's pass drops it from lastgood.json: the hostname is free
    x_file.unlink()
    daemon_pass()
    writer.create(body("y", "x.test", 80, 8080))
    assert os.listdir(s.api_dir) == ["y.yaml"]

    # the writer saw z valid itself, but the daemon never did (z broke before its pass): z is not live, so
    # it claims nothing -- the writer follows the daemon, not its own memory
    z_file = write(git / "z.yaml", ingress_yaml("z", "z.test", 80, "vm", 8080))
    assert "z" in [f.ingress.name for f in writer.all()]
    z_file.write_text("name: z\nrules: [\n")
    writer.create(body("w", "z.test", 80, 8080))
    assert sorted(os.listdir(s.api_dir)) == ["w.yaml", "y.yaml"]


# -- bounded waits -----------------------------------------------------------------------------------------

def test_post_and_delete_answer_202_with_the_status_when_the_wait_runs_out(
        tmp_path: Path, daemon_factory: DaemonFactory, backends: BackendFactory) -> None:
    """Caddy frozen (SIGSTOP): the pass that would apply a write hangs in POST /load. POST and DELETE do not
    hang with it: after INGRESS_API_WAIT they answer 202 with the ingress's current status (201/204 mean
    "live"/"gone", so they are not used); once Caddy runs again the loop converges by itself."""
    a = backends("a")
    port = free_port()
    d = daemon_factory(instances=setup_instances(tmp_path), env={"INGRESS_API_WAIT": "1"}).start()
    create(d, body("web", "web.test", port, a.port))
    assert routed_to(port, "web.test", "a")
    caddy = d.caddy_pid()
    assert caddy is not None
    os.kill(caddy, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = call(d, "POST", "/ingresses", json=body("late", "late.test", port, a.port))
        assert r.status_code == 202, r.text
        assert time.monotonic() - start < 8  # the configured 1 s, not the default 10 s
        late = r.json()
        assert late["name"] == "late" and late["source"] == str(d.data_dir / "ingresses" / "late.yaml")
        assert late["status"]["ready"] is False and late["status"]["reason"] == "Pending", late
        assert (d.data_dir / "ingresses" / "late.yaml").exists()  # written: the loop will converge

        r = call(d, "DELETE", "/ingresses/web")
        assert r.status_code == 202, r.text
        gone = r.json()
        assert gone["name"] == "web" and gone["status"]["reason"] == "Applied", gone  # still live for now
        assert not (d.data_dir / "ingresses" / "web.yaml").exists()
        timed_out = [(e["ingress"], e["operation"]) for e in d.log_events("api.not_live_yet")]
        assert timed_out == [("late", "create"), ("web", "delete")], timed_out
    finally:
        os.kill(caddy, signal.SIGCONT)
    wait_for(lambda: routed_to(port, "late.test", "a") and status_of(port, "web.test") == 404, timeout=30,
             message="converged once Caddy runs again")
    wait_for(lambda: call(d, "GET", "/ingresses/late").json()["status"]["reason"] == "Applied", timeout=10,
             message="late Applied")
    assert_error(call(d, "GET", "/ingresses/web"), 404, "not_found")


def test_api_wait_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.cli import build_parser, settings_from
    from reconciler.errors import ConfigError

    def parsed(*args: str) -> float:
        return settings_from(build_parser().parse_args(["run", *args])).api_wait

    monkeypatch.delenv("INGRESS_API_WAIT", raising=False)
    assert parsed() == 10.0
    assert parsed("--api-wait", "2.5") == 2.5
    monkeypatch.setenv("INGRESS_API_WAIT", "0")
    assert parsed() == 0.0
    assert parsed("--api-wait", "3") == 3.0  # the flag wins
    for bad in ("-1", "601", "soon", "nan"):
        monkeypatch.setenv("INGRESS_API_WAIT", bad)
        with pytest.raises(ConfigError, match="INGRESS_API_WAIT"):
            parsed()
    monkeypatch.delenv("INGRESS_API_WAIT")
    with pytest.raises(ConfigError, match="api-wait"):
        parsed("--api-wait", "-2")


# -- readiness and failures --------------------------------------------------------------------------------

def test_readyz_is_503_while_the_last_pass_did_not_apply(tmp_path: Path, daemon_factory: DaemonFactory,
                                                         backends: BackendFactory) -> None:
    """Caddy runs, but its admin API is moved away behind the daemon's back: passes cannot apply. /readyz
    says 503 naming the admin address that does not answer (not "Caddy is not running": the process
    lives), status says ``unresponsive``, the failures metric counts the passes; once the admin API is back
    the retry converges and /readyz is 200 again."""
    a = backends("a")
    port = free_port()
    d = daemon_factory(instances=setup_instances(tmp_path)).start()
    create(d, body("web", "web.test", port, a.port))
    assert call(d, "GET", "/readyz").status_code == 200
    failures = "hypeman_ingress_reconcile_failures_total"
    assert not [k for k in metrics(d) if k[0] == failures]

    admin = f"http://127.0.0.1:{d.admin_port}"
    moved_port = free_port()
    live = httpx.get(admin + "/config/", timeout=10).json()
    live["admin"]["listen"] = f"127.0.0.1:{moved_port}"
    moved = f"http://127.0.0.1:{moved_port}"
    try:
        httpx.post(admin + "/load", json=live, timeout=30)
        wait_for(lambda: httpx.get(moved + "/config/", timeout=2).status_code == 200, timeout=10,
                 message="admin API moved")
        # a change the daemon must apply: its POST /load finds no admin API
        write(d.data_dir / "ingresses" / "more.yaml", ingress_yaml("more", "more.test", port, "vm", a.port))
        wait_for(lambda: call(d, "GET", "/readyz").status_code == 503, timeout=10, message="/readyz 503")
        r = call(d, "GET", "/readyz")  # passes keep failing (retries) until the admin API is back
        assert r.status_code == 503
        message = r.json()["message"]
        assert r.json()["ready"] is False and "does not answer on its admin API" in message, r.json()
        assert admin in message and "Caddy is not running" not in message, message
        assert call(d, "GET", "/healthz").status_code == 200
        m = metrics(d)
        assert m[(failures, (("outcome", "unavailable"),))] >= 1
        assert m[("hypeman_ingress_caddy_up", ())] == 0  # "up" means its admin API answers
        assert routed_to(port, "web.test", "a") and status_of(port, "more.test") == 404
        st = call(d, "GET", "/status").json()
        assert st["last_attempted"]["outcome"] == "unavailable" and st["last_error"], st["last_attempted"]
        assert st["revision"]["last_applied"] != st["revision"]["last_attempted"]
        assert st["caddy"]["state"] == "unresponsive" and st["caddy"]["running"] is False, st["caddy"]
        assert st["caddy"]["pid"] == d.caddy_pid()  # the same process, not restarted
    finally:
        back = httpx.get(moved + "/config/", timeout=10).json()
        back["admin"]["listen"] = f"127.0.0.1:{d.admin_port}"
        httpx.post(moved + "/load", json=back, timeout=30)
    wait_for(lambda: call(d, "GET", "/readyz").status_code == 200, timeout=40, message="ready again")
    assert routed_to(port, "more.test", "a")
    assert metrics(d)[(failures, (("outcome", "unavailable"),))] >= 1  # a counter: it never goes back


# -- temp files of writes cut short ------------------------------------------------------------------------

def test_stale_temp_files_are_removed_when_the_writer_starts(tmp_path: Path) -> None:
    s = writer_settings(tmp_path)
    api = Path(s.api_dir)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        gone_pid = _dead_pid()
        files = {
            f".a.yaml.{gone_pid}.tmp": 0,  # its writer is gone: removed
            f".b.yaml.{proc.pid}.tmp": 0,  # a live writer, young: kept (it may be writing right now)
            f".c.yaml.{proc.pid}.tmp": 120,  # a live pid, but two minutes old: a leftover (pid reused)
            f".d.yaml.{os.getpid()}.tmp": 0,  # ours, young: kept
            ".e.yaml.tmp": 120,  # not an atomic write's name: kept
            ".keep": 120,
            "web.yaml": 120,  # a manifest: never touched
        }
        now = time.time()
        for name, age in files.items():
            (api / name).write_text("name: x\n")
            os.utime(api / name, (now - age, now - age))
        (api / f".f.yaml.{gone_pid}.tmp").mkdir()  # not a regular file: kept
        w = ManifestWriter(s, validate_config=lambda c: None)
        assert w.removed_temp_files == sorted([f".a.yaml.{gone_pid}.tmp", f".c.yaml.{proc.pid}.tmp"])
        assert sorted(os.listdir(api)) == sorted(
            [f".b.yaml.{proc.pid}.tmp", f".d.yaml.{os.getpid()}.tmp", ".e.yaml.tmp", ".keep", "web.yaml",
             f".f.yaml.{gone_pid}.tmp"])
        assert remove_stale_temp_files(str(tmp_path / "missing")) == []
    finally:
        kill_pid(proc.pid)
        proc.wait(timeout=5)


def _dead_pid() -> int:
    """A pid no process has right now."""
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=5)
    pid = proc.pid
    assert not pid_running(pid)
    return pid


# -- the OpenAPI document itself ----------------------------------------------------------------------------

def test_openapi_reasons_and_error_responses_are_complete() -> None:
    """The ``IngressReason`` enum is exactly the reasons a status can carry (and the README documents),
    every operation declares its 500, and the status document is a real schema, not ``{type: object}``."""
    from reconciler.model import Reason
    from reconciler.status import INGRESS_REASONS

    schemas = SPEC["components"]["schemas"]
    assert schemas["IngressReason"]["enum"] == list(INGRESS_REASONS)
    # every Reason but the ones only problems (and log events) carry, never an ingress's status
    every = set(Reason)
    assert every - set(INGRESS_REASONS) == {Reason.INVALID_INSTANCE, Reason.SOURCE_UNAVAILABLE,
                                             Reason.INVALID_SETTINGS, Reason.REMOVED, Reason.INSECURE_FILE}
    readme = (ROOT / "README.md").read_text()
    documented = re.search(r"Reasons: (.*?)\. Every change", readme, re.S)
    assert documented is not None
    assert re.findall(r"`(\w+)`", documented[1]) == list(INGRESS_REASONS)
    for short in ("IngressStatus", "IngressState"):
        assert schemas[short]["properties"]["reason"] == {"$ref": "#/components/schemas/IngressReason"}
    for path, ops in SPEC["paths"].items():
        for method, op in ops.items():
            if method != "parameters":
                assert op["responses"]["500"] == {"$ref": "#/components/responses/Error"}, (path, method)
    status = SPEC["paths"]["/status"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert status == {"$ref": "#/components/schemas/Status"}
    assert {"revision", "caddy", "sources", "ingresses", "history", "last_error"} <= set(
        schemas["Status"]["properties"])
    validator = _spec_validator(status)
    assert not validator.is_valid({"ingresses": [{"name": "x", "ready": True, "reason": "Live", "message": "",
                                                  "file": "f"}]})  # not a documented reason
    assert validator.is_valid({"ingresses": []})  # a fresh data dir before the first pass


def test_writer_takes_the_daemons_last_good_versions_in_process(tmp_path: Path) -> None:
    """In the daemon's process the writer is handed the loop's last good versions (no file to re-read):
    a file the loop serves from its last good version claims its host; one it never saw valid does not."""
    from reconciler.sources.dirs import sources_for
    from reconciler.sources.inputs import ingress_reader, instance_reader

    git = tmp_path / "git"
    x_file = write(git / "x.yaml", ingress_yaml("x", "x.test", 80, "vm", 8080))
    s = writer_settings(tmp_path, (git,))
    handed: list[Any] = [None]
    writer = ManifestWriter(s, validate_config=lambda c: None, daemon_good=lambda: handed[0])
    m, i = ingress_reader(), instance_reader()
    m.read(sources_for(s))
    i.read([Source(s.instances_path, 0)])
    handed[0] = ({k: dict(v) for k, v in m.good.items()}, {k: dict(v) for k, v in i.good.items()})
    x_file.write_text("name: x\nrules: [\n")
    with pytest.raises(Refused) as exc:
        writer.create(body("y", "x.test", 80, 8080))
    assert answer(exc.value) == (409, "hostname_in_use"), exc.value.message
    handed[0] = ({}, {})  # the loop's next pass: x has no last good version any more
    writer.create(body("y", "x.test", 80, 8080))
    assert os.listdir(s.api_dir) == ["y.yaml"]
    assert not os.path.exists(os.path.join(s.state_dir, "lastgood.json"))  # no file involved


def test_caddy_validate_errors_never_carry_a_secret(tmp_path: Path) -> None:
    """``caddy validate`` may quote the config it refused (a DNS module echoing its token): the 400 answer
    has the secret scrubbed."""
    token = "cf-" + secrets.token_hex(12)
    s = dataclasses.replace(writer_settings(tmp_path), tls=TLSSettings(issuer="acme", acme_email="ops@example.test",
                                                                       acme_ca="https://127.0.0.1:14000/dir",
                                                                       dns_provider="cloudflare",
                                                                       cloudflare_api_token=token))
    writer = ManifestWriter(s, validate_config=lambda c: f"loading module: API token '{token}' appears invalid")
    with pytest.raises(Refused) as exc:
        writer.create(body("y", "y.test", 80, 8080))
    assert answer(exc.value) == (400, "config_validation_failed")
    assert token not in exc.value.message and "[REDACTED]" in exc.value.message
    assert os.listdir(s.api_dir) == []


def test_a_damaged_lastgood_json_keeps_what_it_held(tmp_path: Path) -> None:
    from reconciler.state.store import LastGoodFollower, StateStore

    s = writer_settings(tmp_path)
    store = StateStore(s.state_dir)
    good = GoodFile("/g/x.yaml", "d1", ingress_yaml("x", "x.test", 80, "vm", 8080), 100.0)
    assert store.save_lastgood({"/g": {"x.yaml": good}}, {})
    follower = LastGoodFollower(s.state_dir)
    first = follower.current()
    assert first is not None and first[0]["/g"]["x.yaml"].digest == "d1"
    Path(follower.path).write_text('{"manifests": {"/g": ')  # damaged (not by our atomic writes)
    assert follower.current() == first


def test_temp_files_of_impossible_pids_are_removed_not_fatal(tmp_path: Path) -> None:
    s = writer_settings(tmp_path)
    huge = Path(s.api_dir) / ".x.yaml.99999999999999999999.tmp"
    huge.write_text("half")
    writer = ManifestWriter(s, validate_config=lambda c: None)  # must not raise OverflowError
    assert writer.removed_temp_files == [huge.name] and not huge.exists()
