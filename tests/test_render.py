"""reconciler.render: golden Caddy JSON, layout invariants, determinism.

Golden files live in tests/golden/; regenerate them after an intended change with
``UPDATE_GOLDEN=1 .venv/bin/pytest -q tests/test_render.py`` and review the diff.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.model import Desired, Document, Origin, Problem, Source
from reconciler.parse import parse_documents
from reconciler.render import Renderer, render, route_id, server_name, to_json
from reconciler.settings import Settings, TLSSettings
from reconciler.sources.inputs import ingress_reader, instance_reader
from reconciler.validate import ingress_from_document, instance_from_document, resolve

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

SETTINGS = Settings(data_dir="/var/lib/hypeman", admin_port=2019, listen_address="0.0.0.0",
                    http_port=80, https_port=443)


# --- building a Desired from text ------------------------------------------------------------------


def desired_from(sources: list[dict[str, str]], instances: str = "", settings: Settings = SETTINGS) -> Desired:
    """``sources``: one ``{relpath: text}`` per source, in source order."""
    ingresses, problems = [], []
    for index, files in enumerate(sources):
        for rel, text in files.items():
            for p in parse_documents(text):
                ing, probs = ingress_from_document(Document(Origin(index, rel, p.index, f"s{index}/{rel}", p.line), p))
                problems += probs
                if ing is not None:
                    ingresses.append(ing)
    insts = []
    for p in parse_documents(instances):
        inst, probs = instance_from_document(Document(Origin(-1, "vms.yaml", p.index, "vms.yaml", p.line), p))
        problems += probs
        if inst is not None:
            insts.append(inst)
    return resolve(ingresses, insts, settings, problems)


def render_text(sources: list[dict[str, str]], instances: str = "", settings: Settings = SETTINGS) -> str:
    return to_json(render(desired_from(sources, instances, settings), settings))


def m(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


def r(host: str, port: int | None, instance: str, target: int = 8080, extra: str = "") -> str:
    p = f", port: {port}" if port is not None else ""
    target_ = f"{{instance: {json.dumps(instance)}, port: {target}}}"
    return f"  - match: {{hostname: {host}{p}}}\n    target: {target_}\n{extra}"


INSTANCES = """\
name: web
id: inst-web-01
ip: 10.0.0.5
---
name: api
ip: 10.0.0.6
---
name: sleepy
ip: 10.0.0.7
state: Stopped
---
name: v6
ip: "fd00::1:2"
---
name: local6
ip: "::1"
"""

CASES: dict[str, tuple[list[dict[str, str]], str, Settings]] = {
    "single": ([{"app.yaml": m("app", r("app.example.com", None, "web"))}], INSTANCES, SETTINGS),
    "multi": (
        [
            {
                "shop.yaml": m("shop", r("www.shop.example", 8080, "web"), r("Shop.Example", 8080, "inst-web-01", 80),
                               r("admin.shop.example", 9000, "api", 9000)),
                "sub/api.yaml": m("api", r("api.example.com", 8080, "api")) + "---\n"
                + m("ipv6", r("v6.example.com", 8080, "v6", 443), r("local.example.com", 8080, "local6", 3000)),
            },
            {"a.yaml": m("aaa-first-by-name", r("zzz.example.com", None, "api", 81), r("b.example.com", None, "web"))},
        ],
        INSTANCES,
        Settings(data_dir="/srv/hypeman", admin_port=2999, admin_address="::1", listen_address="::",
                 http_port=8080, https_port=8443),
    ),
    "unavailable": (
        [
            {
                "a.yaml": m("ghosts", r("missing.example.com", None, "ghost"), r("stopped.example.com", None, "sleepy"),
                            r("tls.example.com", None, "web", extra="    tls: true\n"),
                            r("ok.example.com", None, "web"), r("inject.example.com", None, "{env.HOME}")),
                "b.yaml": m("loser", r("ok.example.com", None, "api")),
            },
        ],
        INSTANCES,
        Settings(data_dir="/var/lib/hypeman", admin_port=2019, listen_address="127.0.0.1",
                 http_port=18080, https_port=18443, tls=TLSSettings(issuer="internal")),
    ),
    "empty": ([], "", SETTINGS),
    # access logs: "logged" opts in (an exact host, a pattern, a TLS host with its redirect), "quiet" says
    # nothing (opt-in: not logged); traffic metrics off
    "access-logs": (
        [
            {
                "a.yaml": "access_log: true\n" + m("logged", r("log.example.com", None, "web"),
                                                   r('"{vm}.apps.example.com"', None, "{vm}"),
                                                   r("secure.example.com", None, "api",
                                                     extra="    tls: true\n    redirect_http: true\n")),
                "b.yaml": m("quiet", r("quiet.example.com", None, "web")),
            },
        ],
        INSTANCES,
        Settings(data_dir="/var/lib/hypeman", admin_port=2019, listen_address="127.0.0.1", http_port=80,
                 https_port=443, tls=TLSSettings(issuer="internal"), traffic_metrics=False,
                 access_log_roll_mb=10, access_log_roll_keep=3, access_log_roll_keep_days=7,
                 api_listen="127.0.0.1:8190"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str) -> None:
    sources, instances, settings_ = CASES[case]
    text = render_text(sources, instances, settings_)
    path = GOLDEN / f"{case}.json"
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"render output for {case!r} changed; UPDATE_GOLDEN=1 regenerates"


# --- layout invariants -----------------------------------------------------------------------------


def all_cases() -> list[tuple[dict[str, Any], Settings, Desired]]:
    out = []
    for sources, instances, settings_ in CASES.values():
        desired = desired_from(sources, instances, settings_)
        out.append((render(desired, settings_), settings_, desired))
    return out


def servers(config: dict[str, Any]) -> dict[str, Any]:
    return config["apps"]["http"]["servers"]  # type: ignore[no-any-return]


def test_admin_block_is_always_present() -> None:
    for config, settings_, _ in all_cases():
        assert config["admin"] == {"listen": settings_.admin_listen, "config": {"persist": False}}
    empty = render(Desired(()), SETTINGS)
    assert empty["admin"]["listen"] == "127.0.0.1:2019"
    v6 = Settings(admin_address="::1", admin_port=3000)
    assert render(Desired(()), v6)["admin"]["listen"] == "[::1]:3000"


def test_http_and_https_ports_are_explicit() -> None:
    for config, settings_, _ in all_cases():
        http = config["apps"]["http"]
        assert http["http_port"] == settings_.http_port
        assert http["https_port"] == settings_.https_port


def test_storage_root() -> None:
    for config, settings_, _ in all_cases():
        assert config["storage"] == {"module": "file_system", "root": settings_.storage_dir}
    assert render(Desired(()), Settings(data_dir="/x"))["storage"]["root"] == "/x/caddy/data"


def test_empty_desired_has_no_servers() -> None:
    assert servers(render(Desired(()), SETTINGS)) == {}


def test_every_plain_server_disables_automatic_https_and_tls_servers_have_no_implicit_redirects() -> None:
    seen = 0
    for config, _, _ in all_cases():
        for srv in servers(config).values():
            if "tls_connection_policies" in srv:
                assert srv["automatic_https"] == {"disable_redirects": True}
            else:
                assert srv["automatic_https"] == {"disable": True}
            seen += 1
    assert seen >= 4


def test_one_server_per_port() -> None:
    config, _, desired = all_cases()[list(CASES).index("multi")]
    ports = {rr.rule.port for ri in desired.ingresses for rr in ri.rules}
    assert ports == {80, 8080, 9000}
    assert set(servers(config)) == {server_name(p) for p in ports} == {"ingress-80", "ingress-8080", "ingress-9000"}
    for port in ports:
        srv = servers(config)[f"ingress-{port}"]
        assert srv["listen"] == [f"[::]:{port}"]
        hosts = [h for route in srv["routes"][:-1] for mt in route["match"] for h in mt["host"]]
        expected = sorted(rr.rule.hostname for ri in desired.ingresses for rr in ri.rules if rr.rule.port == port)
        assert hosts == expected


def test_listen_address_ipv4() -> None:
    text = render_text([{"a.yaml": m("a", r("a.example.com", 8081, "web"))}], INSTANCES,
                       Settings(listen_address="127.0.0.1"))
    assert servers(json.loads(text))["ingress-8081"]["listen"] == ["127.0.0.1:8081"]


def test_routes_are_sorted_by_hostname_with_fallback_last() -> None:
    hosts = ["m.example.com", "a.example.com", "z.example.com", "b.example.com", "a-b.example.com"]
    sources = [{f"{i}.yaml": m(f"ing{9 - i}", r(h, 80, "web")) for i, h in enumerate(hosts)}]
    config = render(desired_from(sources, INSTANCES), SETTINGS)
    routes = servers(config)["ingress-80"]["routes"]
    assert [rt["match"][0]["host"][0] for rt in routes[:-1]] == sorted(hosts)
    fallback = routes[-1]
    assert "match" not in fallback
    assert fallback["@id"] == "fallback.80"
    assert fallback["handle"][0]["status_code"] == 404
    assert "{http.request.host}" in fallback["handle"][0]["body"]
    assert all(rt["terminal"] is True for rt in routes)


def test_route_ids_name_the_ingress_and_rule_index() -> None:
    config, _, _ = all_cases()[list(CASES).index("unavailable")]
    ids = {rt["match"][0]["host"][0]: rt["@id"] for rt in servers(config)["ingress-80"]["routes"][:-1]}
    assert ids == {
        "missing.example.com": "ingress.ghosts.rule-0",
        "stopped.example.com": "ingress.ghosts.rule-1",
        "ok.example.com": "ingress.ghosts.rule-3",  # rule 2 (tls) lives on the TLS server, indices keep their place
        "inject.example.com": "ingress.ghosts.rule-4",
    }
    assert route_id("x", 7) == "ingress.x.rule-7"


def test_ids_are_unique_in_every_config() -> None:
    for config, _, _ in all_cases():
        ids = [rt["@id"] for srv in servers(config).values() for rt in srv["routes"]]
        assert len(ids) == len(set(ids))


def handlers_for(config: dict[str, Any], host: str) -> list[dict[str, Any]]:
    for srv in servers(config).values():
        for rt in srv["routes"][:-1]:
            if host in rt["match"][0]["host"]:
                return rt["handle"]  # type: ignore[no-any-return]
    raise AssertionError(f"no route for {host}")


def handler_for(config: dict[str, Any], host: str) -> dict[str, Any]:
    """The route's reverse_proxy handler (after the vars handler naming its instance)."""
    var, proxy = handlers_for(config, host)
    assert var["handler"] == "vars" and set(var) == {"handler", "instance"}
    return proxy


def test_upstreams_dial_instance_names_through_the_responder() -> None:
    config, _, _ = all_cases()[list(CASES).index("multi")]
    proxy = handler_for(config, "www.shop.example")
    assert proxy["upstreams"] == [{"dial": "web.hypeman.internal.:8080"}]
    assert proxy["transport"] == {"protocol": "http", "dial_timeout": "2s", "keep_alive": {"enabled": False},
                                  "resolver": {"addresses": ["udp/127.0.0.1:5354"]}}
    assert proxy["load_balancing"] == {"try_duration": "5s", "try_interval": "250ms"}
    # by id, lower-cased host; a reference that is not a DNS label is hashed
    assert handler_for(config, "shop.example")["upstreams"] == [{"dial": "inst-web-01.hypeman.internal.:80"}]
    assert handler_for(config, "v6.example.com")["upstreams"] == [{"dial": "v6.hypeman.internal.:443"}]
    assert handlers_for(config, "www.shop.example")[0] == {"handler": "vars", "instance": "web"}
    unavailable, _, _ = all_cases()[list(CASES).index("unavailable")]
    hashed = handler_for(unavailable, "inject.example.com")["upstreams"][0]["dial"]
    assert hashed.startswith("xh--") and hashed.endswith(".hypeman.internal.:8080")


def test_instance_state_is_not_in_the_config() -> None:
    """Shape, not data: a missing, stopped or moved instance renders exactly the same config."""
    sources, instances, settings_ = CASES["unavailable"]
    before = render(desired_from(sources, instances, settings_), settings_)
    moved = instances.replace("10.0.0.5", "10.9.9.9").replace("state: Stopped", "state: Running")
    assert render(desired_from(sources, moved + "---\nname: ghost\nip: 10.0.0.8\n", settings_), settings_) == before
    assert render(desired_from(sources, "", settings_), settings_) == before
    assert handler_for(before, "missing.example.com")["upstreams"] == [{"dial": "ghost.hypeman.internal.:8080"}]


def test_error_routes_name_the_instance() -> None:
    config, _, _ = all_cases()[list(CASES).index("unavailable")]
    errors = servers(config)["ingress-80"]["errors"]["routes"]
    bodies = [rt["handle"][0]["body"] for rt in errors]
    assert any('503 Service Unavailable: instance "{http.vars.instance}" is not running' in b for b in bodies)
    assert any("504 Gateway Timeout" in b for b in bodies)
    assert errors[0]["match"] == [{"vars": {"{http.vars.instance}": [""]}}]  # not a proxy error: Caddy's own


def test_instance_names_escape_caddy_placeholders() -> None:
    config, _, _ = all_cases()[list(CASES).index("unavailable")]
    var, proxy = handlers_for(config, "inject.example.com")
    assert var["instance"] == "\\{env.HOME\\}"
    assert "{" not in proxy["upstreams"][0]["dial"]


def test_conflict_losers_are_not_rendered_and_tls_rules_get_their_server() -> None:
    config, _, desired = all_cases()[list(CASES).index("unavailable")]
    text = to_json(config)
    assert "loser" not in text
    assert handler_for(config, "ok.example.com")["upstreams"] == [{"dial": "web.hypeman.internal.:8080"}]
    assert {p.reason for p in desired.problems} == {"HostnameConflict"}
    tls_server = servers(config)["ingress-443"]
    assert tls_server["routes"][0]["match"] == [{"host": ["tls.example.com"]}]
    assert tls_server["tls_connection_policies"] == [{"fallback_sni": "tls.example.com"}]
    assert "disable" not in tls_server["automatic_https"]
    assert config["apps"]["tls"]["automation"]["policies"][0]["subjects"] == ["tls.example.com"]


def test_to_json_is_canonical() -> None:
    for config, _, _ in all_cases():
        text = to_json(config)
        assert text.endswith("}\n")
        assert json.loads(text) == config
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_render_is_pure() -> None:
    sources, instances, settings_ = CASES["multi"]
    desired = desired_from(sources, instances, settings_)
    first = to_json(render(desired, settings_))
    config = render(desired, settings_)
    config["apps"]["http"]["servers"].clear()  # mutating one result must not leak into the next
    assert to_json(render(desired, settings_)) == first


# --- determinism -----------------------------------------------------------------------------------


names_st = st.sampled_from(["alpha", "beta", "gamma", "delta", "eps", "zeta"])
host_st = st.sampled_from(["a.example.com", "B.example.com", "c.test", "d.test", "e-1.example.org", "f"])
port_st = st.sampled_from([None, 80, 8080, 9000])
inst_st = st.sampled_from(["web", "api", "sleepy", "ghost", "inst-web-01", "v6"])
rule_st = st.tuples(host_st, port_st, inst_st, st.integers(1, 65535), st.booleans())
manifest_st = st.tuples(names_st, st.lists(rule_st, min_size=1, max_size=3))


def manifest_text(name: str, rules: list[tuple[str, int | None, str, int, bool]]) -> str:
    return m(name, *(r(h, p, i, t, "    tls: true\n" if tls else "") for h, p, i, t, tls in rules))


def render_dir(src: Path, instances_dir: Path) -> str:
    result = ingress_reader().read([Source(str(src), 0)])
    insts = instance_reader().read([Source(str(instances_dir), 0)])
    assert all(s.ok for s in insts.sources)
    problems: list[Problem] = [*result.problems, *insts.problems]
    return to_json(render(resolve(result.items, insts.items, SETTINGS, problems), SETTINGS))


def layouts(manifests: list[str], rng: random.Random) -> list[dict[str, str]]:
    """Ways to lay out ``manifests`` as files that keep their (relpath, doc index) order."""
    n = len(manifests)
    one_per_file = {f"{i:03d}.yaml": t for i, t in enumerate(manifests)}
    renamed = {f"m{i:03d}-{rng.choice(['x', 'yy', 'zzz'])}.yml": t for i, t in enumerate(manifests)}
    nested = {f"deep/er/{i:03d}.yaml": t for i, t in enumerate(manifests)}
    multi = {"all.yaml": "---\n".join(manifests)}
    as_json = {"all.json": json.dumps([parse_documents(t)[0].data for t in manifests], indent=1)}
    split = {"a.yaml": "---\n".join(manifests[: n // 2]) or "# none\n", "b.yaml": "---\n".join(manifests[n // 2:])}
    return [one_per_file, renamed, nested, multi, as_json, split]


@settings(max_examples=30, deadline=None)
@given(st.lists(manifest_st, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_same_manifests_in_any_file_layout_render_identically(
        manifests: list[tuple[str, list[tuple[str, int | None, str, int, bool]]]], rng: random.Random) -> None:
    texts = [manifest_text(n, rules) for n, rules in manifests]
    outputs = set()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        inst = base / "instances"
        inst.mkdir()
        (inst / "vms.yaml").write_text(INSTANCES)
        for k, files in enumerate(layouts(texts, rng)):
            src = base / f"layout{k}"
            items = list(files.items())
            rng.shuffle(items)  # creation order (and mtimes, inode numbers) must not matter
            for rel, text in items:
                path = src / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
            outputs.add(render_dir(src, inst))
    assert len(outputs) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(manifest_st, min_size=1, max_size=8), st.randoms(use_true_random=False))
def test_input_order_does_not_change_the_output(
        manifests: list[tuple[str, list[tuple[str, int | None, str, int, bool]]]], rng: random.Random) -> None:
    sources = [{f"{i:02d}.yaml": manifest_text(n, rules) for i, (n, rules) in enumerate(manifests)}]
    desired = desired_from(sources, INSTANCES)
    expected = to_json(render(desired, SETTINGS))
    ingresses = [ri.ingress for ri in desired.ingresses]
    all_ings = []
    for rel, text in sources[0].items():
        for p in parse_documents(text):
            ing, _ = ingress_from_document(Document(Origin(0, rel, p.index, rel, p.line), p))
            if ing is not None:
                all_ings.append(ing)
    assert {i.name for i in ingresses} <= {i.name for i in all_ings}
    insts = list(desired.instances.values())
    for _ in range(3):
        rng.shuffle(all_ings)
        rng.shuffle(insts)
        assert to_json(render(resolve(all_ings, insts, SETTINGS), SETTINGS)) == expected


@pytest.mark.parametrize("threshold", [256, 2])  # flat, and bucketed
def test_a_rendered_config_is_never_changed_by_a_later_render(threshold: int) -> None:
    """The memo's invariant (reconciler/memo.py): what a render returned is shared with later renders --
    the encoder and the daemon keep it by identity -- so no later render may change it, on the patch path
    (a backend edited) or the full one (an ingress added)."""
    settings = dataclasses.replace(SETTINGS, bucket_threshold=threshold)
    renderer = Renderer(settings)
    vms = "".join(f"---\nname: vm{i}\nip: 10.0.0.{i + 1}\n" for i in range(4))
    files = {f"{i}.yaml": m(f"ing{i}", r(f"h{i}.test", 8080, f"vm{i}")) for i in range(4)}
    first = renderer(desired_from([files], vms, settings))
    frozen = copy.deepcopy(first)
    patched = renderer(desired_from([{**files, "1.yaml": m("ing1", r("h1.test", 8080, "vm1", 9999))}], vms, settings))
    assert patched is not first and "9999" in json.dumps(patched) and first == frozen
    grown = renderer(desired_from([{**files, "5.yaml": m("ing5", r("h5.test", 8080, "vm2"))}], vms, settings))
    assert "h5.test" in json.dumps(grown) and first == frozen
