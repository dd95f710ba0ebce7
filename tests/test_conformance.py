"""Where we behave as hypeman's own ingress manager does: an empty
``TLS_ALLOWED_DOMAINS``, ``tls: true`` without an issuer through the API, ``match.port: 0``, the lookup
order of ``/ingresses/{ref}``, and "201 means live" against a real process holding the port."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from reconciler.api.app import answer
from reconciler.api.writer import ManifestWriter, Refused
from reconciler.model import Document, Origin, Reason
from reconciler.parse import ParsedDocument
from reconciler.settings import Settings, TLSSettings, domain_allowed
from reconciler.validate import ingress_from_document, resolve
from tests.helpers import Backend, Daemon, free_port, routed_to, status_of, wait_for
from tests.test_api import call, setup_instances, writer_settings


def _ingress(data: dict[str, Any]) -> Any:
    doc = Document(Origin(0, "x.yaml", 0, "/m/x.yaml", 1), ParsedDocument(0, 1, data))
    return ingress_from_document(doc)


def test_tls_allowed_domains_unset_allows_all_set_but_empty_allows_none() -> None:
    assert TLSSettings.from_env({}).allowed_domains is None
    assert TLSSettings.from_env({"TLS_ALLOWED_DOMAINS": ""}).allowed_domains == ()
    assert TLSSettings.from_env({"TLS_ALLOWED_DOMAINS": " , "}).allowed_domains == ()
    assert domain_allowed("a.example.com", None) and not domain_allowed("a.example.com", ())
    settings = Settings(tls=TLSSettings.from_env({"TLS_ISSUER": "internal", "TLS_ALLOWED_DOMAINS": ""}))
    ing, problems = _ingress({"name": "web", "rules": [{"match": {"hostname": "a.example.com"},
                                                        "target": {"instance": "vm", "port": 80}, "tls": True}]})
    assert not problems
    desired = resolve([ing], [], settings)
    [problem] = desired.problems
    assert problem.reason == Reason.DOMAIN_NOT_ALLOWED
    assert "TLS_ALLOWED_DOMAINS is set but empty" in problem.message


@pytest.mark.parametrize(("tls", "expected"), [(False, 80), (True, 443)])
def test_match_port_zero_means_the_default_port(tls: bool, expected: int) -> None:
    ing, problems = _ingress({"name": "web", "rules": [{"match": {"hostname": "a.test", "port": 0},
                                                        "target": {"instance": "vm", "port": 80}, "tls": tls}]})
    assert not problems and ing.rules[0].port == expected


def test_api_tls_without_an_issuer_is_a_bad_request(tmp_path: Path) -> None:
    writer = ManifestWriter(writer_settings(tmp_path), validate_config=lambda c: None)
    with pytest.raises(Refused) as info:
        writer.create({"name": "web", "rules": [{"match": {"hostname": "a.test"}, "tls": True,
                                                  "target": {"instance": "vm", "port": 80}}]})
    assert answer(info.value) == (400, "bad_request")
    assert "needs a certificate issuer" in info.value.message


def test_lookup_order_is_exact_id_then_exact_name_then_id_prefix(tmp_path: Path) -> None:
    s = writer_settings(tmp_path)
    writer = ManifestWriter(s, validate_config=lambda c: None)
    rule = {"match": {"hostname": "a.test", "port": 8001}, "target": {"instance": "vm", "port": 80}}
    holder = writer.create({"name": "holder", "id": "shared", "rules": [rule]})
    named = writer.create({"name": "shared", "rules": [{**rule, "match": {"hostname": "b.test", "port": 8001}}]})
    assert writer.find("shared").ingress.name == "holder"  # the exact id wins over the exact name
    assert writer.find(named.id).ingress.name == "shared"
    assert writer.find(named.id[:8]).ingress.name == "shared"  # a unique id prefix
    assert writer.find("holder").ingress.id == holder.id


@pytest.mark.caddy
def test_a_create_whose_port_is_held_by_another_process_is_not_201(
        tmp_path: Path, daemon_factory: Any, backends: Any) -> None:
    """201 means live. Another process holds the port: Caddy refuses the route, so the create answers 202
    with the ingress ``CaddyRejected`` and Caddy's message naming the port (the manifest stays: it goes
    live by itself once the port is free); the other ingresses keep serving."""
    a: Backend = backends("a")
    d: Daemon = daemon_factory(instances=setup_instances(tmp_path)).start()
    free, held = free_port(), free_port()
    ok = call(d, "POST", "/ingresses", json={"name": "ok", "rules": [
        {"match": {"hostname": "ok.test", "port": free}, "target": {"instance": "vm", "port": a.port}}]})
    assert ok.status_code == 201, ok.text
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", held))
    squatter.listen()
    try:
        r = call(d, "POST", "/ingresses", json={"name": "blocked", "rules": [
            {"match": {"hostname": "blocked.test", "port": held}, "target": {"instance": "vm", "port": a.port}}]})
        assert r.status_code == 202, r.text
        st = r.json()["status"]
        assert st["ready"] is False and st["reason"] == "CaddyRejected" and str(held) in st["message"], st
        assert (d.data_dir / "ingresses" / "blocked.yaml").exists()
        assert routed_to(free, "ok.test", "a")
    finally:
        squatter.close()
    # the port is free again: the next resync retries it
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: routed_to(held, "blocked.test", "a"), timeout=15, message="blocked.test live once freed")
    assert status_of(free, "ok.test") == 200


def test_a_name_held_by_an_ingress_refused_for_now_is_still_taken(tmp_path: Path) -> None:
    """A read-only source's ``web`` loses its hostname to another ingress (refused for now): its name is
    still taken for the API -- once fixed it would win it back and take the API's ``web`` offline."""
    git = tmp_path / "git"
    rule = "  - match: {{hostname: {h}, port: 8001}}\n    target: {{instance: vm, port: 80}}\n"
    (git).mkdir()
    (git / "a.yaml").write_text("name: first\nrules:\n" + rule.format(h="taken.test"))
    (git / "b.yaml").write_text("name: web\nrules:\n" + rule.format(h="taken.test"))  # loses the host to a.yaml
    writer = ManifestWriter(writer_settings(tmp_path, (git,)), validate_config=lambda c: None)
    with pytest.raises(Refused) as info:
        writer.create({"name": "web", "rules": [{"match": {"hostname": "free.test", "port": 8001},
                                                  "target": {"instance": "vm", "port": 80}}]})
    assert answer(info.value) == (409, "already_exists") and str(git / "b.yaml") in info.value.message
