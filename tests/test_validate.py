"""reconciler.validate + reconciler.schema: per-document checks, conflicts across sources, targets."""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import uuid
from typing import Any

import pytest

from reconciler.model import (
    Desired,
    Document,
    Ingress,
    Instance,
    Origin,
    Problem,
    Reason,
    Unavailable,
    Upstream,
    derive_ingress_id,
)
from reconciler.parse import parse_documents
from reconciler.schema import INGRESS_SCHEMA, format_path, load_schema
from reconciler.settings import Settings, TLSSettings
from reconciler.validate import hostname_error, ingress_from_document, instance_from_document, resolve

SETTINGS = Settings(data_dir="/srv/hypeman", admin_port=2019, listen_address="127.0.0.1",
                    http_port=18080, https_port=18443)
TLS_SETTINGS = dataclasses.replace(SETTINGS, tls=TLSSettings(issuer="internal"))


# --- builders --------------------------------------------------------------------------------------


def documents(text: str, *, file: str = "m.yaml", source: int = 0, relpath: str | None = None) -> list[Document]:
    rel = relpath if relpath is not None else file
    return [Document(Origin(source, rel, p.index, file, p.line), p) for p in parse_documents(text)]


def check(text: str, **kw: Any) -> tuple[Ingress | None, list[Problem]]:
    (doc,) = documents(text, **kw)
    return ingress_from_document(doc)


def ok(text: str, **kw: Any) -> Ingress:
    ing, problems = check(text, **kw)
    assert problems == []
    assert ing is not None
    return ing


def bad(text: str, **kw: Any) -> list[Problem]:
    ing, problems = check(text, **kw)
    assert ing is None
    assert problems
    return problems


def rule(host: str, port: int | None = None, instance: str = "vm", target_port: int = 80,
         **extra: Any) -> dict[str, Any]:
    match: dict[str, Any] = {"hostname": host}
    if port is not None:
        match["port"] = port
    return {"match": match, "target": {"instance": instance, "port": target_port}, **extra}


def manifest(name: str, *rules: dict[str, Any], **extra: Any) -> str:
    """One manifest as block YAML (one line per key, so lines are predictable)."""
    out = [f"name: {name}"] + [f"{k}: {json.dumps(v)}" for k, v in extra.items()] + ["rules:"]
    for r in rules:
        out.append(f"  - match: {json.dumps(r['match'])}")
        out.append(f"    target: {json.dumps(r['target'])}")
        out.extend(f"    {k}: {json.dumps(v)}" for k, v in r.items() if k not in ("match", "target"))
    return "\n".join(out) + "\n"


def ingresses_of(text: str, **kw: Any) -> list[Ingress]:
    out = []
    for doc in documents(text, **kw):
        ing, problems = ingress_from_document(doc)
        assert problems == []
        assert ing is not None
        out.append(ing)
    return out


def instances_of(text: str, *, file: str = "vms.yaml") -> list[Instance]:
    out = []
    for doc in documents(text, file=file, source=-1):
        inst, problems = instance_from_document(doc)
        assert problems == []
        assert inst is not None
        out.append(inst)
    return out


def summary(desired: Desired) -> tuple[Any, ...]:
    """Everything observable about a resolve result, in a comparable form."""
    accepted = tuple(
        (r.ingress.name, r.ingress.origin.file, tuple((x.index, x.rule, x.backend) for x in r.rules))
        for r in desired.ingresses
    )
    return accepted, tuple(desired.problems)


# --- schema ----------------------------------------------------------------------------------------


def test_valid_manifest_gives_an_ingress() -> None:
    ing = ok(manifest("my-api", rule("api.example.com", 8080, "my-vm", 9000)))
    assert ing.name == "my-api"
    assert ing.id == derive_ingress_id("my-api")
    assert len(ing.rules) == 1
    r = ing.rules[0]
    assert (r.hostname, r.port, r.instance, r.target_port, r.tls, r.redirect_http) == (
        "api.example.com", 8080, "my-vm", 9000, False, False)


def test_id_is_derived_deterministically_from_the_name() -> None:
    a = ok(manifest("same-name", rule("a.example.com")))
    b = ok(manifest("same-name", rule("b.example.com")), file="other.yaml", source=3)
    assert a.id == b.id == str(uuid.uuid5(uuid.UUID("6f1c0f4e-5a52-4c8e-9a51-7f0d3c1e9b2a"), "same-name"))
    assert ok(manifest("other-name", rule("a.example.com"))).id != a.id


def test_explicit_id_and_created_at_are_kept() -> None:
    ing = ok(manifest("x", rule("a.example.com"), id="ing-123", created_at="2026-01-01T00:00:00Z"))
    assert ing.id == "ing-123"
    assert ing.created_at == "2026-01-01T00:00:00Z"


def test_schema_file_is_draft_2020_12_with_an_id() -> None:
    schema = load_schema(INGRESS_SCHEMA)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].endswith("ingress.schema.json")


def test_missing_name() -> None:
    (p,) = bad("# a comment\nrules:\n  - match: {hostname: a.example.com}\n    target: {instance: vm, port: 80}\n")
    assert p.message == "name: required field is missing"
    assert p.file == "m.yaml"
    assert p.line == 2
    assert p.reason == Reason.INVALID_MANIFEST
    assert p.format() == "m.yaml:2: name: required field is missing"


def test_missing_rules() -> None:
    (p,) = bad("name: x\n")
    assert p.message == "rules: required field is missing"
    assert p.ingress == "x"


def test_empty_rules() -> None:
    (p,) = bad("name: x\nrules: []\n")
    assert p.message.startswith("rules: ")
    assert "non-empty" in p.message
    assert p.line == 2
    assert p.ingress == "x"


@pytest.mark.parametrize("name", ["Bad", "-a", "a-", "a_b", "a.b", "a b", "ä", "UPPER"])
def test_bad_name_pattern(name: str) -> None:
    (p,) = bad(f"# header\nname: {json.dumps(name)}\nrules:\n  - {json.dumps(rule('a.example.com'))}\n")
    assert p.message.startswith("name: ")
    assert "does not match" in p.message
    assert repr(name) in p.message
    assert p.line == 2


def test_empty_name() -> None:
    problems = bad(manifest('""', rule("a.example.com")))
    assert all(p.message.startswith("name: ") for p in problems)
    assert problems[0].line == 1


def test_name_length_limit() -> None:
    ok(manifest("a" * 63, rule("a.example.com")))
    (p,) = bad(manifest("a" * 64, rule("a.example.com")))
    assert p.message.startswith("name: ")
    assert "too long" in p.message


def test_unknown_top_level_field_names_the_field_and_line() -> None:
    (p,) = bad("name: x\nrules:\n  - match: {hostname: a.example.com}\n    target: {instance: vm, port: 80}\n"
               "spec: {}\n")
    assert p.message.startswith("spec: unknown field")
    assert "allowed: access_log, created_at, error_pages, id, maintenance, name, rules" in p.message
    assert p.line == 5
    assert p.ingress == "x"


def test_unknown_nested_field_names_the_path_and_line() -> None:
    text = ("name: x\nrules:\n  - match:\n      hostname: a.example.com\n      paths: /api\n"
            "    target: {instance: vm, port: 80}\n")
    (p,) = bad(text)
    assert p.message.startswith("rules[0].match.paths: unknown field")
    assert "hostname, path, path_type, port" in p.message
    assert p.line == 5


def test_unknown_rule_field() -> None:
    (p,) = bad(manifest("x", rule("a.example.com"), rule("b.example.com", tsl=True)))
    assert p.message.startswith("rules[1].tsl: unknown field")
    assert p.line == 7


@pytest.mark.parametrize(("field", "value", "line"), [
    ("match", 70000, 3), ("match", -1, 3), ("target", 0, 4), ("target", 65536, 4),
])
def test_port_out_of_range(field: str, value: int, line: int) -> None:
    r = rule("a.example.com", 80)
    r[field]["port"] = value
    (p,) = bad(manifest("x", r))
    assert p.message.startswith(f"rules[0].{field}.port: {value} ")
    assert ("minimum" in p.message) if value < 1 else ("maximum" in p.message)
    assert p.line == line


def test_match_port_zero_is_the_default_port() -> None:
    """As in hypeman: an explicit 0 means the default (80, or 443 with tls); the target port has none."""
    assert ok(manifest("x", rule("a.example.com", 0))).rules[0].port == 80


@pytest.mark.parametrize("port", [1, 65535])
def test_port_limits_are_inclusive(port: int) -> None:
    ing = ok(manifest("x", rule("a.example.com", port, target_port=port)))
    assert ing.rules[0].port == ing.rules[0].target_port == port


def test_integral_float_ports_become_ints() -> None:
    # JSON Schema counts 8080.0 as an integer; it must not reach Caddy as "8080.0"
    ing = ok('{"name": "x", "rules": [{"match": {"hostname": "a.example.com", "port": 8080.0},'
             ' "target": {"instance": "vm", "port": 80.0}}]}', file="m.json")
    assert ing.rules[0].port == 8080 and type(ing.rules[0].port) is int
    assert ing.rules[0].target_port == 80 and type(ing.rules[0].target_port) is int


def test_fractional_port_is_refused() -> None:
    (p,) = bad('{"name": "x", "rules": [{"match": {"hostname": "a.example.com", "port": 80.5},'
               ' "target": {"instance": "vm", "port": 80}}]}')
    assert p.message.startswith("rules[0].match.port: expected integer")


@pytest.mark.parametrize(("text", "message"), [
    ("name: 5\nrules: [{match: {hostname: a.b}, target: {instance: v, port: 1}}]\n", "name: expected string, got 5"),
    ("name: x\nrules: {}\n", "rules: expected array, got {}"),
    ("name: x\nrules: [hello]\n", "rules[0]: expected object, got 'hello'"),
    ("name: x\nrules: [{match: {hostname: 7}, target: {instance: v, port: 1}}]\n",
     "rules[0].match.hostname: expected string, got 7"),
    ("name: x\nrules: [{match: {hostname: a.b, port: '80'}, target: {instance: v, port: 1}}]\n",
     "rules[0].match.port: expected integer, got '80'"),
    ("name: x\nrules: [{match: {hostname: a.b, port: true}, target: {instance: v, port: 1}}]\n",
     "rules[0].match.port: expected integer, got true"),
    ("name: x\nrules: [{match: {hostname: a.b}, target: {instance: v, port: 1}, tls: 'yes'}]\n",
     "rules[0].tls: expected boolean, got 'yes'"),
    ("name: x\nrules: [{match: {hostname: a.b}, target: vm}]\n", "rules[0].target: expected object, got 'vm'"),
    ("name: x\nrules: [{match: {hostname: a.b}, target: {instance: [v], port: 1}}]\n",
     "rules[0].target.instance: expected string"),
    ("- 1\n", "document: expected object, got 1"),
])
def test_wrong_types(text: str, message: str) -> None:
    problems = bad(text)
    assert any(p.message.startswith(message) for p in problems), [p.message for p in problems]


def test_missing_nested_fields() -> None:
    problems = bad("name: x\nrules:\n  - match: {}\n    target: {port: 80}\n  - target: {instance: v, port: 1}\n")
    messages = {p.message: p.line for p in problems}
    assert messages == {
        "rules[0].match.hostname: required field is missing": 3,
        "rules[0].target.instance: required field is missing": 4,
        "rules[1].match: required field is missing": 5,
    }


def test_problems_are_sorted_by_line() -> None:
    problems = bad("name: X\nrules:\n  - match: {hostname: a.b, port: -1}\n    target: {instance: v, port: 0}\n"
                   "extra: 1\n")
    assert [p.line for p in problems] == sorted(p.line or 0 for p in problems)
    assert len(problems) == 4


def test_problem_lines_in_a_later_document_are_file_lines() -> None:
    docs = documents(manifest("good", rule("a.example.com")) + "---\n" + "name: bad\nrules:\n  - nope: 1\n")
    results = [ingress_from_document(d) for d in docs]
    assert results[0][0] is not None
    problems = results[1][1]
    assert {p.line for p in problems} == {8}
    assert all(p.ingress == "bad" for p in problems)


def test_format_path() -> None:
    assert format_path(("rules", 0, "match", "port")) == "rules[0].match.port"
    assert format_path(()) == ""
    assert format_path([0, "a"]) == "[0].a"


# --- hostnames -------------------------------------------------------------------------------------


def test_hostname_is_lower_cased() -> None:
    ing = ok(manifest("x", rule("API.Example.COM")))
    assert ing.rules[0].hostname == "api.example.com"


@pytest.mark.parametrize("host", ["localhost", "a.example.com", "xn--bcher-kva.example", "1a.example.com",
                                  "a-b.c-d.example", "123.example.com", "a" * 63 + ".example.com",
                                  ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])])
def test_valid_hostnames(host: str) -> None:
    assert hostname_error(host) is None
    assert ok(manifest("x", rule(host))).rules[0].hostname == host


@pytest.mark.parametrize(("host", "fragment"), [
    ("*.example.com", "wildcard hostnames are not supported, use pattern syntax"),
    ("a.*.example.com", "wildcard hostnames are not supported, use pattern syntax"),
    ("*", "wildcard hostnames are not supported, use pattern syntax"),
    ("example.com.", "trailing dot"),
    ("-a.example.com", "label '-a' is not valid"),
    ("a-.example.com", "label 'a-' is not valid"),
    ("a_b.example.com", "label 'a_b' is not valid"),
    ("a..example.com", "label '' is not valid"),
    (".example.com", "label '' is not valid"),
    ("a b.example.com", "label 'a b' is not valid"),
    ("bücher.example", "label 'bücher' is not valid"),
    ("example.com:8080", "label 'com:8080' is not valid"),
    ("http://example.com", "is not valid"),
    ("a" * 64 + ".example.com", "is not valid"),
    ("{http.request.host}", "is not valid"),
])
def test_bad_hostnames(host: str, fragment: str) -> None:
    text = f"name: x\nrules:\n  - match:\n      hostname: {json.dumps(host)}\n    target: {{instance: v, port: 1}}\n"
    (p,) = bad(text)
    assert p.message.startswith("rules[0].match.hostname")
    assert fragment in p.message
    assert p.line == 4
    assert p.reason == Reason.INVALID_MANIFEST


def test_hostname_longer_than_253_is_refused() -> None:
    host = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 62])  # 254 characters
    assert len(host) == 254
    (p,) = bad(manifest("x", rule(host)))
    assert p.message.startswith("rules[0].match.hostname")
    assert "too long" in p.message or "longer than 253" in p.message
    assert "longer than 253" in (hostname_error(host) or "")


def test_second_rule_bad_hostname_rejects_the_whole_ingress() -> None:
    problems = bad(manifest("x", rule("good.example.com"), rule("*.example.com")))
    assert [p.message.split(" ")[0] for p in problems] == ["rules[1].match.hostname"]


# --- ports, tls, redirect, duplicates inside one ingress -------------------------------------------


def test_port_defaults_to_80() -> None:
    assert ok(manifest("x", rule("a.example.com"))).rules[0].port == 80


def test_port_defaults_to_443_with_tls() -> None:
    r = ok(manifest("x", rule("a.example.com", tls=True))).rules[0]
    assert (r.port, r.tls) == (443, True)


def test_explicit_port_wins_over_tls_default() -> None:
    assert ok(manifest("x", rule("a.example.com", 8443, tls=True))).rules[0].port == 8443


def test_redirect_http_with_tls() -> None:
    r = ok(manifest("x", rule("a.example.com", tls=True, redirect_http=True))).rules[0]
    assert r.redirect_http is True


def test_redirect_http_requires_tls() -> None:
    (p,) = bad(manifest("x", rule("a.example.com", redirect_http=True)))
    assert p.message == "rules[0].redirect_http: requires tls: true"
    assert p.line == 5
    assert p.ingress == "x"


def test_redirect_http_false_without_tls_is_fine() -> None:
    assert ok(manifest("x", rule("a.example.com", redirect_http=False, tls=False))).rules[0].redirect_http is False


@pytest.mark.parametrize(("first", "second", "line"), [
    (rule("a.example.com"), rule("a.example.com", instance="other"), 7),
    (rule("a.example.com", 80), rule("A.EXAMPLE.com"), 7),
    (rule("a.example.com", tls=True), rule("a.example.com", 443), 8),
])
def test_duplicate_hostname_port_in_one_ingress(first: dict[str, Any], second: dict[str, Any], line: int) -> None:
    (p,) = bad(manifest("x", rule("z.example.com"), first, second))
    assert p.message.startswith("rules[2]: ")
    assert "is already matched by rules[1]" in p.message
    assert p.line == line  # the line of the second rule's match


def test_same_hostname_on_different_ports_is_fine() -> None:
    ing = ok(manifest("x", rule("a.example.com", 80), rule("a.example.com", 8080)))
    assert [(r.hostname, r.port) for r in ing.rules] == [("a.example.com", 80), ("a.example.com", 8080)]


# --- instances -------------------------------------------------------------------------------------


def test_instance_document() -> None:
    (inst,) = instances_of("name: vm\nid: inst-1\nip: 10.0.0.5\nstate: Stopped\n")
    assert (inst.name, inst.id, inst.ip, inst.state, inst.running) == ("vm", "inst-1", "10.0.0.5", "Stopped", False)


def test_instance_state_defaults_to_running_and_extra_fields_are_allowed() -> None:
    (inst,) = instances_of("name: vm\nip: 10.0.0.5\nvcpus: 2\nlabels: {a: b}\n")
    assert inst.state == "Running"
    assert inst.running
    assert inst.id is None


def test_instance_ipv6_is_normalised() -> None:
    (inst,) = instances_of("name: vm\nip: '0:0:0:0:0:0:0:1'\n")
    assert inst.ip == "::1"


@pytest.mark.parametrize("ip", ["10.0.0.300", "fe80::1%eth0", "not-an-ip", "010.0.0.1", "", "10.0.0.1:80",
                                "[::1]"])
def test_instance_bad_ip(ip: str) -> None:
    (doc,) = documents(f"name: vm\nip: {json.dumps(ip)}\n", file="vms.yaml")
    inst, problems = instance_from_document(doc)
    assert inst is None
    (p,) = problems
    assert p.message.startswith("ip: ")
    assert p.reason == Reason.INVALID_INSTANCE
    assert p.line == 2
    assert p.file == "vms.yaml"


@pytest.mark.parametrize(("text", "message"), [
    ("ip: 10.0.0.1\n", "name: required field is missing"),
    ("name: vm\n", "ip: required field is missing"),
    ("name: vm\nip: 10.0.0.1\nstate: 3\n", "state: expected string, got 3"),
    ("name: vm\nip: 167772161\n", "ip: expected string"),
])
def test_instance_schema_errors(text: str, message: str) -> None:
    (doc,) = documents(text)
    inst, problems = instance_from_document(doc)
    assert inst is None
    assert any(p.message.startswith(message) and p.reason == Reason.INVALID_INSTANCE for p in problems)


def test_duplicate_instance_names_first_by_origin_wins() -> None:
    a = instances_of("name: vm\nip: 10.0.0.1\n", file="a.yaml")
    b = instances_of("# x\nname: vm\nip: 10.0.0.2\n", file="b.yaml")
    ing = ingresses_of(manifest("x", rule("a.example.com", instance="vm")))
    for order in (a + b, b + a):
        desired = resolve(ing, order, SETTINGS)
        assert desired.ingresses[0].rules[0].backend == Upstream("10.0.0.1:80")
        (p,) = desired.problems
        assert p.file == "b.yaml" and p.line == 2
        assert p.reason == Reason.INVALID_INSTANCE
        assert "already defined in a.yaml:1" in p.message
        assert desired.instances["vm"].ip == "10.0.0.1"


def test_duplicate_instance_ids_first_by_origin_wins() -> None:
    insts = instances_of("name: one\nid: i-1\nip: 10.0.0.1\n---\nname: two\nid: i-1\nip: 10.0.0.2\n")
    ing = ingresses_of(manifest("x", rule("a.example.com", instance="i-1")))
    desired = resolve(ing, list(reversed(insts)), SETTINGS)
    assert desired.ingresses[0].rules[0].backend == Upstream("10.0.0.1:80")
    (p,) = desired.problems
    assert "instance id 'i-1' is already defined in vms.yaml:1" in p.message
    assert p.line == 5


# --- targets ---------------------------------------------------------------------------------------


INSTANCES = """\
name: web
id: inst-web-01
ip: 10.0.0.5
---
name: db
ip: 10.0.0.6
state: Stopped
---
name: v6
ip: fd00::1:2
"""


def backends(*rules: dict[str, Any]) -> list[Upstream | Unavailable]:
    desired = resolve(ingresses_of(manifest("x", *rules)), instances_of(INSTANCES), SETTINGS)
    assert desired.problems == ()
    return [r.backend for r in desired.ingresses[0].rules]


def test_target_by_instance_name() -> None:
    assert backends(rule("a.example.com", instance="web", target_port=8080)) == [Upstream("10.0.0.5:8080")]


def test_target_by_instance_id() -> None:
    assert backends(rule("a.example.com", instance="inst-web-01", target_port=9)) == [Upstream("10.0.0.5:9")]


def test_target_ipv6_dial_is_bracketed() -> None:
    assert backends(rule("a.example.com", instance="v6", target_port=443)) == [Upstream("[fd00::1:2]:443")]


def test_unknown_instance_is_unavailable_not_found() -> None:
    (b,) = backends(rule("a.example.com", instance="ghost"))
    assert isinstance(b, Unavailable)
    assert b.reason == Reason.INSTANCE_NOT_FOUND
    assert "'ghost'" in b.message and "not found" in b.message


def test_stopped_instance_is_unavailable_not_running() -> None:
    (b,) = backends(rule("a.example.com", instance="db"))
    assert isinstance(b, Unavailable)
    assert b.reason == Reason.INSTANCE_NOT_RUNNING
    assert "'db'" in b.message and "Stopped" in b.message


def test_each_rule_resolves_on_its_own() -> None:
    got = backends(rule("a.example.com", instance="web"), rule("b.example.com", instance="ghost"),
                   rule("c.example.com", instance="db"))
    assert isinstance(got[0], Upstream)
    assert [getattr(b, "reason", None) for b in got[1:]] == [Reason.INSTANCE_NOT_FOUND, Reason.INSTANCE_NOT_RUNNING]


def test_no_instances_at_all() -> None:
    desired = resolve(ingresses_of(manifest("x", rule("a.example.com", instance="web"))), [], SETTINGS)
    assert desired.ingresses[0].rules[0].backend.reason == Reason.INSTANCE_NOT_FOUND  # type: ignore[union-attr]


# --- tls, admin port -------------------------------------------------------------------------------


def test_tls_without_an_issuer_is_a_validation_error() -> None:
    ings = ingresses_of(manifest("x", rule("a.example.com", instance="web"), rule("b.example.com", tls=True)))
    desired = resolve(ings, instances_of(INSTANCES), SETTINGS)
    assert desired.ingresses == ()  # never served as plain HTTP, never a silent public CA
    (p,) = desired.problems
    assert p.reason == Reason.TLS_NOT_CONFIGURED
    assert p.ingress == "x"
    assert "rules[1]" in p.message and "b.example.com:443" in p.message and "ACME_EMAIL" in p.message


def test_tls_ingress_is_accepted_with_an_issuer() -> None:
    desired = resolve(ingresses_of(manifest("x", rule("a.example.com", tls=True))), [], TLS_SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["x"]
    assert [(r.rule.hostname, r.rule.port, r.rule.tls) for r in desired.ingresses[0].rules] == [
        ("a.example.com", 443, True)]
    assert desired.problems == ()


@pytest.mark.parametrize(("patterns", "host", "allowed"), [
    (("*",), "a.example.com", True),
    (("a.example.com",), "a.example.com", True),
    (("a.example.com",), "b.example.com", False),
    (("*.example.com",), "a.example.com", True),
    (("*.example.com",), "a.b.example.com", False),  # exactly one label
    (("*.example.com",), "example.com", False),
    (("x.org", "*.example.com"), "www.example.com", True),
])
def test_tls_allowed_domains(patterns: tuple[str, ...], host: str, allowed: bool) -> None:
    settings = dataclasses.replace(TLS_SETTINGS, tls=dataclasses.replace(TLS_SETTINGS.tls, allowed_domains=patterns))
    desired = resolve(ingresses_of(manifest("x", rule(host, tls=True))), [], settings)
    assert bool(desired.ingresses) is allowed
    if not allowed:
        (p,) = desired.problems
        assert p.reason == Reason.DOMAIN_NOT_ALLOWED and host in p.message and "TLS_ALLOWED_DOMAINS" in p.message


def test_tls_rule_on_the_http_port_is_refused() -> None:
    desired = resolve(ingresses_of(manifest("x", rule("a.example.com", 18080, tls=True))), [], TLS_SETTINGS)
    (p,) = desired.problems
    assert desired.ingresses == () and "plain HTTP port" in p.message


def test_a_port_cannot_mix_tls_and_plain() -> None:
    first = ingresses_of(manifest("secure", rule("a.example.com", 8443, tls=True)), file="1.yaml")
    second = ingresses_of(manifest("plain", rule("b.example.com", 8443)), file="2.yaml")
    desired = resolve(second + first, [], TLS_SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["secure"]
    (p,) = desired.problems
    assert p.reason == Reason.PORT_CONFLICT and "'secure'" in p.message and "1.yaml" in p.message


def test_redirect_claims_the_http_port() -> None:
    first = ingresses_of(manifest("secure", rule("a.example.com", tls=True, redirect_http=True)), file="1.yaml")
    second = ingresses_of(manifest("plain", rule("a.example.com", 18080)), file="2.yaml")
    desired = resolve(second + first, [], TLS_SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["secure"]
    (p,) = desired.problems
    assert p.reason == Reason.HOSTNAME_CONFLICT and "a.example.com:18080" in p.message


@pytest.mark.parametrize("admin_port", [2019, 8080])
def test_rule_on_the_admin_port_is_refused(admin_port: int) -> None:
    settings = Settings(data_dir="/d", admin_port=admin_port, http_port=18080, https_port=18443)
    ings = ingresses_of(manifest("x", rule("a.example.com", 80), rule("b.example.com", admin_port)))
    desired = resolve(ings, [], settings)
    assert desired.ingresses == ()
    (p,) = desired.problems
    assert p.reason == Reason.INVALID_MANIFEST
    assert f"port {admin_port} is Caddy's admin port" in p.message
    assert p.ingress == "x"


# --- conflicts across sources ----------------------------------------------------------------------


def test_name_conflict_earlier_source_wins() -> None:
    late = ingresses_of("# pad\n" + manifest("shared", rule("late.example.com")), file="git/a.yaml", source=1,
                        relpath="a.yaml")
    early = ingresses_of(manifest("shared", rule("early.example.com")), file="api/z.yaml", source=0,
                         relpath="z.yaml")
    for order in (late + early, early + late):
        desired = resolve(order, [], SETTINGS)
        assert [(r.ingress.name, r.ingress.origin.file) for r in desired.ingresses] == [("shared", "api/z.yaml")]
        (p,) = desired.problems
        assert (p.file, p.line, p.reason, p.ingress) == ("git/a.yaml", 2, Reason.NAME_CONFLICT, "shared")
        assert "name 'shared' is already used by the ingress in api/z.yaml:1" in p.message


def test_name_conflict_same_source_smaller_relpath_wins() -> None:
    a = ingresses_of(manifest("n", rule("a.example.com")), file="src/sub/a.yaml", relpath="sub/a.yaml")
    b = ingresses_of(manifest("n", rule("b.example.com")), file="src/b.yaml", relpath="b.yaml")
    desired = resolve(a + b, [], SETTINGS)
    assert [r.ingress.origin.file for r in desired.ingresses] == ["src/b.yaml"]
    assert "src/b.yaml:1" in desired.problems[0].message
    assert desired.problems[0].file == "src/sub/a.yaml"


def test_name_conflict_same_file_first_document_wins() -> None:
    ings = ingresses_of(manifest("n", rule("a.example.com")) + "---\n" + manifest("n", rule("b.example.com")))
    desired = resolve(list(reversed(ings)), [], SETTINGS)
    assert [r.ingress.rules[0].hostname for r in desired.ingresses] == ["a.example.com"]
    (p,) = desired.problems
    assert (p.file, p.line) == ("m.yaml", 6)
    assert "m.yaml:1" in p.message


def test_explicit_id_conflict() -> None:
    a = ingresses_of(manifest("a", rule("a.example.com"), id="same-id"), file="a.yaml")
    b = ingresses_of(manifest("b", rule("b.example.com"), id="same-id"), file="b.yaml")
    desired = resolve(b + a, [], SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["a"]
    (p,) = desired.problems
    assert p.reason == Reason.NAME_CONFLICT
    assert "id 'same-id' is already used by ingress 'a' in a.yaml:1" in p.message


def test_hostname_port_conflict_across_sources() -> None:
    winner = ingresses_of(manifest("one", rule("a.example.com", 8080)), file="s0/x.yaml", source=0, relpath="x.yaml")
    loser = ingresses_of("# c\n# c\n" + manifest("two", rule("b.example.com"), rule("A.example.com", 8080)),
                         file="s1/a.yaml", source=1, relpath="a.yaml")
    desired = resolve(loser + winner, [], SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["one"]
    (p,) = desired.problems
    assert (p.file, p.line, p.reason, p.ingress) == ("s1/a.yaml", 3, Reason.HOSTNAME_CONFLICT, "two")
    assert "a.example.com:8080 is already claimed by ingress 'one' in s0/x.yaml:1" in p.message


def test_same_hostname_on_another_port_is_no_conflict() -> None:
    a = ingresses_of(manifest("one", rule("a.example.com", 80)), file="a.yaml")
    b = ingresses_of(manifest("two", rule("a.example.com", 8080)), file="b.yaml")
    desired = resolve(a + b, [], SETTINGS)
    assert sorted(r.ingress.name for r in desired.ingresses) == ["one", "two"]
    assert desired.problems == ()


def test_rejected_ingress_claims_nothing() -> None:
    # "dup" loses on its name, so its hostname stays free for the later "free" ingress
    first = ingresses_of(manifest("dup", rule("a.example.com")), file="1.yaml")
    second = ingresses_of(manifest("dup", rule("b.example.com")), file="2.yaml")
    third = ingresses_of(manifest("free", rule("b.example.com")), file="3.yaml")
    desired = resolve(third + second + first, [], SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["dup", "free"]
    assert [p.reason for p in desired.problems] == [Reason.NAME_CONFLICT]


def test_tls_rule_claims_its_hostname() -> None:
    first = ingresses_of(manifest("secure", rule("a.example.com", tls=True)), file="1.yaml")
    second = ingresses_of(manifest("plain", rule("a.example.com", 443)), file="2.yaml")
    desired = resolve(second + first, [], TLS_SETTINGS)
    assert [r.ingress.name for r in desired.ingresses] == ["secure"]
    assert [p.reason for p in desired.problems] == [Reason.HOSTNAME_CONFLICT]


def conflict_corpus() -> tuple[list[Ingress], list[Instance]]:
    ings: list[Ingress] = []
    ings += ingresses_of(manifest("alpha", rule("a.example.com")) + "---\n"
                         + manifest("beta", rule("b.example.com", instance="db")), file="s0/m.yaml", source=0,
                         relpath="m.yaml")
    ings += ingresses_of(manifest("alpha", rule("c.example.com")), file="s0/sub/a.yaml", source=0,
                         relpath="sub/a.yaml")
    ings += ingresses_of(manifest("gamma", rule("b.example.com"), rule("d.example.com")), file="s1/a.yaml",
                         source=1, relpath="a.yaml")
    ings += ingresses_of(manifest("delta", rule("c.example.com", instance="inst-web-01")), file="s1/b.yaml",
                         source=1, relpath="b.yaml")
    ings += ingresses_of(manifest("eps", rule("e.example.com", tls=True), rule("f.example.com", 2019)),
                         file="s1/c.yaml", source=1, relpath="c.yaml")
    ings += ingresses_of(manifest("zeta", rule("d.example.com", 8080, instance="ghost")), file="s2/z.yaml",
                         source=2, relpath="z.yaml")
    return ings, instances_of(INSTANCES)


def test_conflict_outcome_is_the_documented_one() -> None:
    ings, insts = conflict_corpus()
    desired = resolve(ings, insts, SETTINGS)
    assert [(r.ingress.name, r.ingress.origin.file) for r in desired.ingresses] == [
        ("alpha", "s0/m.yaml"), ("beta", "s0/m.yaml"), ("delta", "s1/b.yaml"), ("zeta", "s2/z.yaml")]
    assert [(p.file, p.reason) for p in desired.problems] == [
        ("s0/sub/a.yaml", Reason.NAME_CONFLICT),
        ("s1/a.yaml", Reason.HOSTNAME_CONFLICT),
        ("s1/c.yaml", Reason.INVALID_MANIFEST),
    ]
    assert "s0/m.yaml:1" in desired.problems[0].message
    assert "'beta' in s0/m.yaml:6" in desired.problems[1].message


def test_conflict_outcome_does_not_depend_on_input_order() -> None:
    ings, insts = conflict_corpus()
    expected = summary(resolve(ings, insts, SETTINGS))
    rng = random.Random(1234)
    orders = [list(p) for p in itertools.islice(itertools.permutations(ings), 0, None, 97)]
    for _ in range(30):
        shuffled = ings[:]
        rng.shuffle(shuffled)
        orders.append(shuffled)
    for order in orders:
        inst_order = insts[:]
        rng.shuffle(inst_order)
        assert summary(resolve(order, inst_order, SETTINGS)) == expected


def test_problems_from_earlier_stages_are_carried_first() -> None:
    earlier = Problem("x.yaml", 3, "broken")
    desired = resolve(ingresses_of(manifest("a", rule("a.example.com", tls=True))), [], SETTINGS, [earlier])
    assert desired.problems[0] == earlier
    assert len(desired.problems) == 2


def test_instance_ip_with_a_zone_id_is_refused() -> None:
    (d,) = parse_documents("name: vm\nip: 'fe80::1%{env.HOME}'\n")
    inst, problems = instance_from_document(Document(Origin(0, "i.yaml", 0, "i.yaml", 1), d))
    assert inst is None
    (p,) = problems
    assert p.line == 2 and "ip:" in p.message  # refused by the schema format, and by the zone-id guard
