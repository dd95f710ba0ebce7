"""Instance names in the responder's zone and hostname patterns (reconciler.zone, the validation of
patterns and holds, their rendering). Pure: no processes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from reconciler.model import Document, Instance, Origin
from reconciler.parse import parse_documents
from reconciler.render import render
from reconciler.settings import Settings, TLSSettings, hold_seconds
from reconciler.validate import ingress_from_document, resolve, zone_records
from reconciler.zone import label, parse_pattern


def inst(name: str, ip: str = "10.0.0.1", state: str = "Running", id: str | None = None, at: int = 0) -> Instance:
    return Instance(name, id, ip, state, Origin(0, "vms.yaml", at, "vms.yaml", at + 1))


def test_labels_are_the_reference_or_a_hash_that_cannot_collide_with_one() -> None:
    assert label("web") == "web"
    assert label("web-2") == "web-2"
    for ref in ("Web", "inst_01", "a.b", "ab--c", "xh--0123", "-x", "x" * 64, "{env.HOME}", "é"):
        out = label(ref)
        assert out.startswith("xh--") and len(out) == 28 and out[2:4] == "--", ref
    assert label("Web") != label("web") and label("a.b") == label("a.b")


def test_records_follow_the_lookup_rules_of_the_resolver() -> None:
    records = zone_records([
        inst("web", "10.0.0.1", id="i-1", at=0),
        inst("web", "10.0.0.9", at=1),  # a duplicate name: the first wins
        inst("sleepy", "10.0.0.2", "Stopped", id="i-2", at=2),
        inst("i-3", "10.0.0.3", "Stopped", at=3),  # a stopped instance *named* i-3 hides the id i-3 below
        inst("other", "10.0.0.4", id="i-3", at=4),
        inst("v6", "fd00::1", at=5),
    ])
    assert records == {"web": "10.0.0.1", "i-1": "10.0.0.1", "other": "10.0.0.4", "v6": "fd00::1"}


@pytest.mark.parametrize(("hostname", "message"), [
    ("a{instance}.example.com", "mixed captures like 'a{instance}' are not supported, use pure captures like {name}"),
    ("{instance}.{instance}.example.com", "duplicate capture name 'instance' in pattern"),
    ("{instance}", "hostname pattern '{instance}' must have at least two parts"),
    ("{instance}.*.example.com", "wildcard hostnames are not supported, use pattern syntax like"),
])
def test_refused_patterns_use_hypemans_wording(hostname: str, message: str) -> None:
    parsed = parse_pattern(hostname)
    assert isinstance(parsed, str) and parsed.startswith(message)


def test_a_pattern_maps_each_capture_to_its_label_from_the_right() -> None:
    parsed = parse_pattern("{instance}.{env}.example.com")
    assert not isinstance(parsed, str)
    assert parsed.wildcard == "*.*.example.com" and parsed.captures == {"instance": 3, "env": 2}


def doc(text: str) -> Document:
    (p,) = parse_documents(text)
    return Document(Origin(0, "m.yaml", 0, "m.yaml", p.line), p)


def rule(host: str, instance: str, extra: str = "") -> str:
    return (f"name: x\nrules:\n  - match: {{hostname: {json.dumps(host)}, port: 80}}\n"
            f"    target: {{instance: {json.dumps(instance)}, port: 8080}}\n{extra}")


@pytest.mark.parametrize(("host", "instance", "fragment"), [
    ("*.example.com", "vm", "wildcard hostnames are not supported, use pattern syntax like {instance}.example.com"),
    ("{instance}.example.com", "{name}", "rules[0].target.instance references unknown capture {name}"),
    ("{instance}.example.com", "web", "rules[0].pattern hostname requires target.instance to reference a capture"),
    ("web.example.com", "{instance}", "references unknown capture {instance} (match.hostname is not a pattern)"),
    ("{instance}.exa_mple.com", "{instance}", "label 'exa_mple' is not valid"),
    ("{instance}.example.com", "App_{instance}", "around its captures only lower-case letters"),
    ("x{a}.example.com", "{a}", "rules[0].match.hostname: mixed captures like 'x{a}'"),
])
def test_pattern_problems_name_the_field(host: str, instance: str, fragment: str) -> None:
    ing, problems = ingress_from_document(doc(rule(host, instance)))
    assert ing is None and len(problems) == 1
    assert fragment in problems[0].message, problems[0].message
    assert problems[0].line in (3, 4)


@pytest.mark.parametrize(("extra", "fragment"), [
    ("    hold: {duration: 11m}\n", "rules[0].hold.duration: '11m' is longer than 600s"),
    ("    hold: {interval: 0s}\n", "rules[0].hold.interval: must be more than 0"),
    ("    hold: {duration: 5}\n", "rules[0].hold.duration"),
    ("    hold: {duration: 5 s}\n", "does not match"),
    ("    hold: {wait: 5s}\n", "unknown field"),
])
def test_bad_holds_are_refused(extra: str, fragment: str) -> None:
    ing, problems = ingress_from_document(doc(rule("a.example.com", "vm", extra)))
    assert ing is None and problems and fragment in problems[0].message, problems


def test_hold_seconds() -> None:
    assert hold_seconds("250ms") == 0.25 and hold_seconds("1.5m") == 90 and hold_seconds("0s") == 0
    assert hold_seconds("601s") is None and hold_seconds("5") is None and hold_seconds("-1s") is None


def config_of(*texts: str, settings: Settings | None = None) -> dict[str, Any]:
    ings = []
    for i, text in enumerate(texts):
        (p,) = parse_documents(text)
        ing, problems = ingress_from_document(Document(Origin(0, f"{i}.yaml", 0, f"{i}.yaml", 1), p))
        assert ing is not None, problems
        ings.append(ing)
    return render(resolve(ings, [], settings or Settings()), settings or Settings())


def test_exact_hosts_come_before_patterns_whatever_the_file_order() -> None:
    pattern = rule("{instance}.example.com", "{instance}").replace("name: x", "name: a-pattern")
    exact = rule("web.example.com", "special").replace("name: x", "name: z-exact")
    deeper = rule("{instance}.{env}.example.com", "{instance}-{env}").replace("name: x", "name: b-deeper")
    for order in ((pattern, exact, deeper), (deeper, exact, pattern), (exact, pattern, deeper)):
        routes = config_of(*order)["apps"]["http"]["servers"]["ingress-80"]["routes"]
        assert [r["match"][0]["host"] for r in routes[:-1]] == [
            ["web.example.com"], ["*.example.com"], ["*.*.example.com"]]


def test_a_pattern_dials_the_captured_label() -> None:
    text = rule("{instance}.{env}.example.com", "app-{instance}-{env}", "    hold: {duration: 30s}\n")
    (route, _fallback) = config_of(text)["apps"]["http"]["servers"]["ingress-80"]["routes"]
    var, proxy = route["handle"]
    name = "app-{http.request.host.labels.3}-{http.request.host.labels.2}"
    assert var == {"handler": "vars", "instance": name}
    assert proxy["upstreams"] == [{"dial": f"{name}.hypeman.internal.:8080"}]
    assert proxy["load_balancing"] == {"try_duration": "30s", "try_interval": "250ms"}


def test_two_patterns_matching_the_same_hosts_conflict() -> None:
    a = rule("{instance}.example.com", "{instance}").replace("name: x", "name: a")
    b = rule("{name}.example.com", "{name}").replace("name: x", "name: b")
    ings = []
    for i, text in enumerate((a, b)):
        (p,) = parse_documents(text)
        ing, _ = ingress_from_document(Document(Origin(0, f"{i}.yaml", 0, f"{i}.yaml", 1), p))
        assert ing is not None
        ings.append(ing)
    desired = resolve(ings, [], Settings())
    assert [r.ingress.name for r in desired.ingresses] == ["a"]
    (problem,) = desired.problems
    assert problem.reason == "HostnameConflict" and problem.winner == "a"


def test_tls_permission_asks_for_an_instance_and_the_allowed_domains() -> None:
    from reconciler.validate import tls_patterns, tls_permission

    text = rule("{instance}.{env}.example.com", "{instance}-{env}", "    tls: true\n").replace("port: 80", "port: 443")
    (p,) = parse_documents(text)
    ing, problems = ingress_from_document(Document(Origin(0, "t.yaml", 0, "t.yaml", 1), p))
    assert ing is not None, problems
    desired = resolve([ing], [inst("web-prod")], Settings(tls=TLSSettings(issuer="internal")))
    patterns = tls_patterns(desired)
    assert tls_permission("web.prod.example.com", patterns, desired.instances, None) is None
    assert tls_permission("WEB.Prod.example.com.", patterns, desired.instances, None) is None
    why = tls_permission("api.prod.example.com", patterns, desired.instances, None)
    assert why is not None and "no instance 'api-prod'" in why
    assert "no TLS hostname pattern" in str(tls_permission("web.example.com", patterns, desired.instances, None))
    assert "not a hostname" in str(tls_permission("we b.prod.example.com", patterns, desired.instances, None))
    why = tls_permission("web.prod.example.com", patterns, desired.instances, ("*.other.com",))
    assert why is not None and "TLS_ALLOWED_DOMAINS" in why
