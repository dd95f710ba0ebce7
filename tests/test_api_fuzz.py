"""Property-based tests of the HTTP API, in process (ASGI): the app of :func:`reconciler.api.app.create_app`
with a real :class:`~reconciler.api.writer.ManifestWriter` on a temporary data dir and a fake daemon
(:class:`FakeBackend`: no reconcile loop, no Caddy process).

* ``test_openapi_conformance``: schemathesis generates requests from the served ``/openapi.json`` (valid and
  invalid ones, plus undeclared methods) and checks that nothing answers 5xx, that every status code is
  documented and every response matches its schema (and content type), that schema-invalid input is
  refused, and that 405 answers carry ``Allow``. The writer runs the real ``caddy validate``.
* ``test_openapi_conformance_with_token``: the same with ``INGRESS_API_TOKEN`` set and the right header.
* ``test_only_the_exact_bearer_token_passes``: arbitrary ``Authorization`` values.
* ``TestWriterStateMachine``: random sequences of create / get / delete / list against a model of the
  API's contract (name/id uniqueness, (hostname, port) claims, id-prefix lookup, ``ambiguous``), checking
  the API dir after every step. ``caddy validate`` is replaced by an accept-all function there (speed; the
  real one runs in the conformance tests and in tests/test_api.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)
from starlette.applications import Starlette

from reconciler.api.app import create_app
from reconciler.api.writer import ManifestWriter
from reconciler.caddy.binary import find_caddy
from reconciler.caddy.validate import caddy_validate
from reconciler.model import derive_ingress_id
from reconciler.settings import Settings
from tests.helpers import ingress_yaml, instance_yaml, write

with warnings.catch_warnings():  # starlette >= 1.x nags about httpx vs httpx2 in its test client
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, content_type_conformance,
          response_headers_conformance, negative_data_rejection, unsupported_method]
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
TOKEN = "fuzz-token-0123456789"


class FakeBackend:
    """The daemon side of :class:`reconciler.api.app.Backend`, without a loop: every pass "ran"."""

    def __init__(self) -> None:
        self.tickets = 0

    def request_pass(self, path: str | None = None) -> int:
        self.tickets += 1
        return self.tickets

    def wait_pass(self, ticket: int, timeout: float) -> bool:
        return True

    def ingress_status(self, name: str) -> dict[str, Any] | None:
        return {"name": name, "ready": True, "reason": "Applied", "message": "routes are live",
                "stale_since": None}

    def status(self) -> dict[str, Any]:
        """A status document shaped like the daemon's (see tests/test_api.py for the real one)."""
        rev = "0" * 16
        entry = {"at": 1.0, "trigger": "api", "revision": rev, "outcome": "applied", "changes": 1,
                 "duration_ms": 2.5, "error": None, "commits": {}}
        return {
            "revision": {"last_attempted": rev, "last_applied": rev, "commits": {}},
            "last_attempted": entry, "last_applied": {"revision": rev, "at": 1.0, "commits": {}},
            "last_error": None, "history": [entry, {**entry, "outcome": "unchanged", "repeats": 3, "first_at": 0.5}],
            "caddy": {"pid": 1234, "running": True, "adopted": False, "restarts": 0, "binary": "/bin/caddy",
                      "admin": "http://127.0.0.1:2999"},
            "sources": [{"path": "/git", "ok": True, "root": "/git", "commit": None, "files": 1, "error": None}],
            "problems": [], "certificates": {}, "counts": {"ingresses": 1, "ready": 1},
            "ingresses": [{"name": "git-app", "ready": True, "reason": "Applied", "message": "routes are live",
                           "file": "/git/app.yaml", "line": 1, "id": derive_ingress_id("git-app"),
                           "hosts": ["git.example.com:80"], "targets": ["vm:8080"], "stale_since": None,
                           "problems": [], "certificates": None}],
        }

    def ready(self) -> tuple[bool, str]:
        return True, "last pass applied"

    def tls_permission(self, domain: str) -> str | None:
        return None if domain == "web.vms.example.com" else f"{domain}: no TLS hostname pattern matches it"

    def metrics_text(self) -> bytes:
        return b"# TYPE hypeman_ingress_reconcile_passes_total counter\nhypeman_ingress_reconcile_passes_total 1.0\n"


def make_settings(root: Path) -> Settings:
    """Data dir, one read-only source with ``git-app`` (git.example.com:80), instances ``my-api`` (the
    schema's example instance) and ``vm``."""
    write(root / "instances" / "vms.yaml", instance_yaml("my-api") + "---\n" + instance_yaml("vm"))
    write(root / "git" / "app.yaml", ingress_yaml("git-app", "git.example.com", 80, "vm", 8080))
    s = Settings(data_dir=str(root / "data"), manifest_dirs=(str(root / "git"),),
                 instances_dir=str(root / "instances"), listen_address="127.0.0.1", admin_port=2999,
                 http_port=8081, https_port=8443)
    os.makedirs(s.api_dir, mode=0o700)
    return s


def make_app(root: Path, *, token: str | None = None, real_validate: bool = True) -> tuple[Starlette, Settings]:
    s = make_settings(root)

    def validate(config: dict[str, Any]) -> str | None:
        return caddy_validate(find_caddy(), config) if real_validate else None

    app = create_app(writer=ManifestWriter(s, validate_config=validate), backend=FakeBackend(), token=token)
    return app, s


# -- schemathesis: the API against its own OpenAPI document ---------------------------------------------

# schemathesis needs the schema when the module is collected, so the apps are built at import time
_ROOT = Path(tempfile.mkdtemp(prefix="hypeman-api-fuzz-"))
FUZZ_APP, _ = make_app(_ROOT / "open")
TOKEN_APP, _ = make_app(_ROOT / "token", token=TOKEN)
schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)
schema_with_token = schemathesis.openapi.from_asgi("/openapi.json", TOKEN_APP,
                                                   headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module", autouse=True)
def _remove_fuzz_dirs() -> Iterator[None]:
    yield
    shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.mark.caddy  # the writer runs the real `caddy validate`
@schema.parametrize()
@FUZZ
def test_openapi_conformance(case: Any) -> None:
    case.call_and_validate(checks=CHECKS)


@pytest.mark.caddy
@schema_with_token.parametrize()
@FUZZ
def test_openapi_conformance_with_token(case: Any) -> None:
    case.call_and_validate(checks=CHECKS, headers={"Authorization": f"Bearer {TOKEN}"})


@given(header=st.one_of(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=60),
                        st.builds(lambda t: f"Bearer {t}", st.text(
                            alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=30)),
                        st.sampled_from([f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN}",
                                         f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}0", f"Basic {TOKEN}",
                                         TOKEN, f"Bearer{TOKEN}"])),
       path=st.sampled_from(["/ingresses", "/ingresses/git-app", "/status", "/readyz", "/metrics",
                             "/openapi.json", "/nope", "/healthz"]))
@settings(max_examples=150, deadline=None, database=None)
def test_only_the_exact_bearer_token_passes(header: str, path: str) -> None:
    client = TestClient(TOKEN_APP)
    r = client.get(path, headers={"Authorization": header})
    scheme, _, given_token = header.partition(" ")
    accepted = scheme.lower() == "bearer" and given_token.strip() == TOKEN
    if path == "/healthz":
        assert r.status_code == 200
    elif accepted:
        assert r.status_code == (404 if path == "/nope" else 200), r.text
    else:
        assert r.status_code == 401, (header, r.text)
        assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"


# -- a model of the writer's contract --------------------------------------------------------------------

NAMES = ["a", "b", "c", "app-1", "app-2", "app-3"]
IDS = [None, None, "x1", "x12", "x2", "x3", "y"]  # "x" and "x1" are prefixes of several of them
REFS = ["a", "b", "app-1", "app-", "x", "x", "x1", "x1", "x12", "x2", "y", "z", "0", "git-app", "seed-0"]
HOSTS = ["h1.test", "h2.test", "h3.test", "h4.test", "H1.Test", "git.example.com"]
PORTS = [80, 8001, 8002]
INSTANCES = ["vm"] * 5 + ["ghost"]


class WriterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="api-model-"))
        app, self.settings = make_app(self.root, real_validate=False)
        self.client = TestClient(app)
        self.client.__enter__()
        self.api_dir = Path(self.settings.api_dir)
        # name -> (id, claims); the read-only git-app is part of it but not deletable
        self.model: dict[str, tuple[str, set[tuple[str, int]]]] = {
            "git-app": (derive_ingress_id("git-app"), {("git.example.com", 80)})}

    def teardown(self) -> None:
        self.client.__exit__(None, None, None)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- what the contract says ----------------------------------------------------------------------
    def resolve(self, ref: str) -> tuple[int, str | None]:
        """(status, name) of a lookup by name, id, or unique id prefix."""
        if ref in self.model:
            return 200, ref
        by_id = [n for n, (i, _) in self.model.items() if i == ref]
        if by_id:
            return 200, by_id[0]
        prefixed = [n for n, (i, _) in self.model.items() if i.startswith(ref)]
        if len(prefixed) == 1:
            return 200, prefixed[0]
        return (409, None) if prefixed else (404, None)

    @initialize(ids=st.lists(st.sampled_from(["x1", "x12", "x2", "x3"]), unique=True, max_size=3))
    def seed(self, ids: list[str]) -> None:
        """Start some runs with ids sharing prefixes, so ``ambiguous`` is reached often."""
        for i, ident in enumerate(ids):
            self.create(f"seed-{i}", ident, [(f"seed{i}.test", 8001, "vm")])

    @rule(name=st.sampled_from(NAMES), id_=st.sampled_from(IDS),
          rules=st.lists(st.tuples(st.sampled_from(HOSTS), st.sampled_from(PORTS), st.sampled_from(INSTANCES)),
                         min_size=1, max_size=2))
    def create(self, name: str, id_: str | None, rules: list[tuple[str, int, str]]) -> None:
        payload: dict[str, Any] = {"name": name, "rules": [
            {"match": {"hostname": h, "port": p}, "target": {"instance": inst, "port": 8080}} for h, p, inst in rules]}
        if id_ is not None:
            payload["id"] = id_
        ident = id_ or derive_ingress_id(name)
        claims = [(h.lower(), p) for h, p, _ in rules]
        taken = {c for _, cs in self.model.values() for c in cs}
        if len(set(claims)) != len(claims):
            expected = (400, "bad_request")
        elif name in self.model or ident in {i for i, _ in self.model.values()}:
            expected = (409, "already_exists")
        elif taken & set(claims):
            expected = (409, "hostname_in_use")
        elif any(inst == "ghost" for _, _, inst in rules):
            expected = (400, "instance_not_found")
        else:
            expected = (201, None)
        r = self.client.post("/ingresses", json=payload)
        got = (r.status_code, r.json().get("code") if r.status_code != 201 else None)
        assert got == expected, (payload, r.text)
        if r.status_code == 201:
            self.model[name] = (ident, set(claims))
            out = r.json()
            assert (out["name"], out["id"], out["read_only"]) == (name, ident, False)
            assert out["source"] == str(self.api_dir / f"{name}.yaml")

    @rule(ref=st.sampled_from(REFS))
    def get(self, ref: str) -> None:
        status, name = self.resolve(ref)
        r = self.client.get(f"/ingresses/{ref}")
        assert r.status_code == status, (ref, r.text)
        if status == 200:
            assert r.json()["name"] == name
            assert r.json()["read_only"] is (name == "git-app")
        else:
            assert r.json()["code"] == {404: "not_found", 409: "ambiguous"}[status]

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def get_by_id_and_prefix(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        ident = self.model[name][0]
        assert self.client.get(f"/ingresses/{ident}").json()["name"] == name
        n = data.draw(st.integers(1, len(ident)))
        status, expected = self.resolve(ident[:n])
        r = self.client.get(f"/ingresses/{ident[:n]}")
        assert r.status_code == status, (ident[:n], r.text)
        if status == 200:
            assert r.json()["name"] == expected

    @rule(ref=st.sampled_from(REFS))
    def delete(self, ref: str) -> None:
        status, name = self.resolve(ref)
        if name == "git-app":
            status = 409
        r = self.client.delete(f"/ingresses/{ref}")
        assert r.status_code == {200: 204}.get(status, status), (ref, r.text)
        if r.status_code == 204:
            assert name is not None
            del self.model[name]
        elif status == 409:
            assert r.json()["code"] == ("read_only_source" if name == "git-app" else "ambiguous")

    @precondition(lambda self: len(self.model) > 1)
    @rule(data=st.data())
    def delete_existing(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.model)))
        self.delete(data.draw(st.sampled_from([name, self.model[name][0]])))

    @rule()
    def list_all(self) -> None:
        r = self.client.get("/ingresses")
        assert r.status_code == 200
        assert [(i["name"], i["id"]) for i in r.json()] == sorted((n, i) for n, (i, _) in self.model.items())

    @invariant()
    def api_dir_holds_exactly_the_api_ingresses(self) -> None:
        files = sorted(os.listdir(self.api_dir))
        assert files == sorted(f"{n}.yaml" for n in self.model if n != "git-app")
        for f in files:
            doc = yaml.safe_load((self.api_dir / f).read_text())
            assert f == f"{doc['name']}.yaml" and doc.get("id", derive_ingress_id(doc["name"])) == \
                self.model[doc["name"]][0]


WriterMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=20, deadline=None, database=None)
TestWriterStateMachine = WriterMachine.TestCase
