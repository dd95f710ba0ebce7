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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler.caddy.binary import find_caddy
from reconciler.model import Document, Origin, derive_ingress_id
from reconciler.parse import parse_documents
from reconciler.validate import ingress_from_document
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

def call(d: Daemon, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, d.api_url + path, timeout=30, **kwargs)


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
  "$REAL" "$@" || exit $?
  if grep -q '"{REJECTED_HOST}"' "$3"; then
    echo "Error: test wrapper: hostname {REJECTED_HOST} is refused" >&2
    exit 1
  fi
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
    ("unknown-nested-field", lambda s: ("POST", "/ingresses", {"json": _with_rule(s, match={"path": "/x"})}),
     400, "bad_request", ("rules[0].match.path: unknown field",)),
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


def test_error_codes_cover_the_seed(shared: Shared) -> None:
    """Every seed code but ``internal_error`` (nothing a client sends triggers it) is reached above;
    every code the API can answer is in the OpenAPI document."""
    reached = {c[3] for c in ERROR_CASES}
    assert SEED_CODES - reached == {"internal_error"}
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

    # the restarted daemon reads them all cleanly and serves them
    n_problems = len(d1.log_events("input.problem"))
    n = d1.passes()
    d2 = daemon_factory(instances=instances, data_dir=d1.data_dir, admin_port=d1.admin_port,
                        env={"CADDY_HTTP_PORT": d1.env["CADDY_HTTP_PORT"],
                             "CADDY_HTTPS_PORT": d1.env["CADDY_HTTPS_PORT"]})
    d2.start(wait_ready=False)
    wait_for(lambda: d2.passes() > n, timeout=30, message="first pass after the restart")
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
    d = daemon_factory(instances=setup_instances(tmp_path), env={"CADDY_BINARY": str(wrapper)}).start()
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
    assert set(doc["paths"]) == {"/ingresses", "/ingresses/{ref}", "/status", "/healthz", "/readyz", "/metrics"}
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
    assert r.json() == {"ready": False, "message": "Caddy is not running"}
    assert call(d, "GET", "/healthz").status_code == 200
    assert metrics(d)[("hypeman_ingress_caddy_up", ())] == 0
    assert call(d, "GET", "/status").json()["caddy"]["running"] is False
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
