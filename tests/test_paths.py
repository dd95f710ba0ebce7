"""Paths (issue 15, part 1): ``match.path`` + ``match.path_type`` (Prefix, segment-bounded, or Exact) and
``strip_prefix``, with Kubernetes' precedence on a host -- Exact, longer prefix, shorter, then the host's
rule without a path -- never file order; the same (host, port, path, type) twice is a conflict decided by
file position, as for hostnames.

Unit tests for the rules and the rendered order (flat and bucketed); against the real Caddy: routing in
both file orders and both layouts, ``/apix`` is not ``/api``, the path the backend sees, the conflict.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.api.writer import ingress_body
from reconciler.layout import member, proxy_handlers
from reconciler.model import Reason, Rule, path_rank
from reconciler.render import ConfigEncoder, Renderer, proxy_template
from reconciler.settings import Settings
from reconciler.validate import rule_path
from tests.helpers import ROOT, Backend, Daemon, free_port, instance_yaml, wait_for, write
from tests.test_tls import desired_of

SETTINGS = Settings()


def rule(host: str, instance: str, port: int = 8080, path: str | None = None, path_type: str | None = None,
         strip: bool = False, listen: int = 80) -> str:
    match = f"{{hostname: {json.dumps(host)}, port: {listen}"
    match += f", path: {path}" if path is not None else ""
    match += f", path_type: {path_type}" if path_type is not None else ""
    return (f"  - match: {match}}}\n    target: {{instance: {json.dumps(instance)}, port: {port}}}\n"
            + ("    strip_prefix: true\n" if strip else ""))


def manifest(name: str, *rules: str) -> str:
    return f"name: {name}\nrules:\n" + "".join(rules)


# -- the rules ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("match", "expected"), [
    ({"hostname": "a"}, (None, "Prefix")),
    ({"hostname": "a", "path": "/"}, (None, "Prefix")),  # the Prefix / is every path: a rule without one
    ({"hostname": "a", "path": "/api/"}, ("/api", "Prefix")),  # a prefix's trailing / is dropped
    ({"hostname": "a", "path": "/api", "path_type": "Exact"}, ("/api", "Exact")),
    ({"hostname": "a", "path": "/api/", "path_type": "Exact"}, ("/api/", "Exact")),  # Exact is exact
])
def test_a_rules_path_after_defaults(match: dict[str, Any], expected: tuple[str | None, str]) -> None:
    assert rule_path(match) == expected


def test_precedence_is_exact_then_longer_prefix_then_the_catch_all() -> None:
    keys = ["", "/api", "=/api", "/api/v2", "=/", "/b"]
    assert sorted(keys, key=path_rank) == ["=/api", "=/", "/api/v2", "/api", "/b", ""]
    r = Rule("a.test", 80, "vm", 8080, path="/api", path_type="Exact")
    assert r.path_key == "=/api" and Rule("a.test", 80, "vm", 8080, path="/api").path_key == "/api"
    assert Rule("a.test", 80, "vm", 8080).path_key == ""


@pytest.mark.parametrize(("rules", "needle"), [
    ([rule("a.test", "vm", path="/a/../b")], "rules[0].match.path: '/a/../b' holds a '.' or '..' segment"),
    ([rule("a.test", "vm", path="/api?x=1")], "rules[0].match.path"),
    ([rule("a.test", "vm", path="/a//b")], "rules[0].match.path: '/a//b' holds an empty segment"),
    # a long path with one bad character at its end: refused at once (the schema's pattern is linear; a
    # nested repetition there would backtrack for hours on this -- in the API too)
    ([rule("a.test", "vm", path="/" + "a" * 4000 + "!?")], "rules[0].match.path"),
    ([rule("a.test", "vm", path="/" + "ab/" * 300 + "^")], "rules[0].match.path"),
    ([rule("a.test", "vm", path="/api/*")], "rules[0].match.path"),
    ([rule("a.test", "vm", path="api")], "rules[0].match.path"),
    ([rule("a.test", "vm", strip=True)], "rules[0].strip_prefix: requires match.path"),
    ([rule("a.test", "vm", path="/"), rule("a.test", "vm", strip=True, path="/")],
     "rules[1].strip_prefix: requires match.path"),
    ([rule("a.test", "vm", path="/api"), rule("a.test", "vm", path="/api/")],
     "rules[1]: a.test:80/api is already matched by rules[0]"),
    ([rule("a.test", "vm"), rule("a.test", "vm", path="/")], "rules[1]: a.test:80 is already matched by rules[0]"),
    ([rule("a.test", "vm", path="/x", path_type="Exact"), rule("a.test", "vm", path="/x", path_type="Exact")],
     "rules[1]: a.test:80/x (exact) is already matched by rules[0]"),
    ([rule("a.test", "vm", path="/x", path_type="Sometimes")], "rules[0].match.path_type"),
])
def test_bad_paths_are_refused_naming_the_rule(rules: list[str], needle: str) -> None:
    desired = desired_of([manifest("x", *rules)], SETTINGS)
    assert not desired.ingresses
    assert any(needle in p.message for p in desired.problems), [p.message for p in desired.problems]


def test_one_host_several_paths_several_ingresses() -> None:
    """Paths of one host may come from several ingresses; only the same (host, port, path, type) twice is a
    conflict, lost by the later file, which is told the winner's file:line."""
    desired = desired_of([manifest("site", rule("a.test", "vm")),
                          manifest("api", rule("a.test", "vm", path="/api"), rule("a.test", "vm", path="/api",
                                                                                  path_type="Exact")),
                          manifest("dup", rule("a.test", "vm", path="/api/"))], SETTINGS)
    assert [ri.ingress.name for ri in desired.ingresses] == ["site", "api"]
    (problem,) = desired.problems
    assert problem.reason == Reason.HOSTNAME_CONFLICT and problem.ingress == "dup"
    assert "a.test:80/api is already claimed by ingress 'api' in m1.yaml:1" in problem.message


def server_routes(config: dict[str, Any], port: int = 80) -> list[dict[str, Any]]:
    return list(config["apps"]["http"]["servers"][f"ingress-{port}"]["routes"])


def route_paths(routes: list[dict[str, Any]]) -> list[tuple[str, list[str] | None]]:
    return [(r["@id"], r["match"][0].get("path")) for r in routes if "match" in r]


MANIFESTS = [manifest("site", rule("shop.test", "web")),
             manifest("api", rule("shop.test", "api", path="/api", strip=True),
                      rule("shop.test", "exact", path="/api", path_type="Exact")),
             manifest("v2", rule("shop.test", "v2", path="/api/v2"))]


@pytest.mark.parametrize("threshold", [256, 0], ids=["flat", "bucketed"])
def test_the_rendered_order_never_depends_on_file_order(threshold: int) -> None:
    settings = Settings(bucket_threshold=threshold)
    configs = []
    for order in (MANIFESTS, MANIFESTS[::-1]):
        desired = desired_of(order, settings)
        assert not desired.problems, desired.problems
        configs.append(ConfigEncoder()(Renderer(settings)(desired)))
    # the same routes, in the same order, whatever the files' order (ids aside: they name the ingress)
    assert configs[0] == configs[1]
    config = Renderer(settings)(desired_of(MANIFESTS, settings))
    routes = server_routes(config)
    if threshold:
        assert route_paths(routes) == [("ingress.api.rule-1", ["/api"]),  # Exact first
                                       ("ingress.v2.rule-0", ["/api/v2", "/api/v2/*"]),  # longer prefix
                                       ("ingress.api.rule-0", ["/api", "/api/*"]),
                                       ("ingress.site.rule-0", None)]  # the host's catch-all last
        stripped = routes[2]["handle"]
        assert stripped[1] == {"handler": "rewrite", "strip_path_prefix": "/api"}
    else:
        (bucket,) = [r for r in routes if r.get("@id", "").startswith("bucket.")]
        sub = bucket["handle"][0]["routes"]
        # per path matcher, one map of the hosts that have it and one proxy (stripping when asked), in
        # precedence; then the catch-alls' map and proxy
        assert [(r["match"][0].get("path") if "match" in r else None, r["handle"][0]["handler"]) for r in sub] == [
            (["/api"], "map"), (["/api"], "vars"),
            (["/api/v2", "/api/v2/*"], "map"), (["/api/v2", "/api/v2/*"], "vars"),
            (["/api", "/api/*"], "map"), (["/api", "/api/*"], "vars"),
            (None, "map"), (None, "vars")]
        assert [m["outputs"][1] for m in sub[0]["handle"][0]["mappings"]] == ["exact"]
        assert sub[5]["handle"][1] == {"handler": "rewrite", "strip_path_prefix": "/api"}
        assert "rewrite" not in [h["handler"] for h in sub[3]["handle"]]
        assert bucket["match"] == [{"host": ["shop.test"]}]  # listed once (Caddy refuses a repeated host)


def test_a_route_with_a_path_joins_its_paths_group_never_the_catch_all_map() -> None:
    proxy = proxy_template(SETTINGS)
    plain = {"@id": "r", "match": [{"host": ["a.test"]}], "handle": proxy_handlers("vm", "vm.z.:80", proxy)}
    with_path = {**plain, "match": [{"host": ["a.test"], "path": ["/api", "/api/*"]}]}
    handle = plain["handle"]
    stripped = {**with_path, "handle": [handle[0], {"handler": "rewrite", "strip_path_prefix": "/api"}, handle[1]]}
    assert member("a.test", plain, proxy) == ("a.test", "vm.z.:80", "vm", None)
    assert member("a.test", with_path, proxy) == ("a.test", "vm.z.:80", "vm", '[["/api", "/api/*"], null]')
    assert member("a.test", stripped, proxy) == ("a.test", "vm.z.:80", "vm", '[["/api", "/api/*"], "/api"]')
    odd = {**plain, "handle": [handle[0], {"handler": "rewrite", "uri": "/x"}, handle[1]]}
    assert member("a.test", odd, proxy)[1] is None  # anything else stays a route of its own


# -- against the real Caddy -----------------------------------------------------------------------------------

@pytest.mark.caddy
@pytest.mark.parametrize("reverse", [False, True], ids=["files-in-order", "files-reversed"])
@pytest.mark.parametrize("threshold", ["256", "0"], ids=["flat", "bucketed"])
def test_paths_route_by_precedence(reverse: bool, threshold: str, daemon_factory: Callable[..., Daemon],
                                   backends: Callable[[str], Backend]) -> None:
    web, api, v2, exact = backends("web"), backends("api"), backends("v2"), backends("exact")
    port = free_port()
    d = daemon_factory(env={"HYPEMAN_BUCKET_THRESHOLD": threshold})
    write(d.instances / "vms.yaml", "---\n".join(instance_yaml(n) for n in ("web", "api", "v2", "exact")))
    files = {
        "a-site.yaml": manifest("site", rule("shop.test", "web", web.port, listen=port)),
        "b-api.yaml": manifest("api", rule("shop.test", "api", api.port, path="/api", strip=True, listen=port),
                               rule("shop.test", "exact", exact.port, path="/api", path_type="Exact", listen=port)),
        "c-v2.yaml": manifest("v2", rule("shop.test", "v2", v2.port, path="/api/v2", listen=port)),
    }
    names = sorted(files, reverse=reverse)
    for i, name in enumerate(names):  # the order the files sort in decides nothing
        write(d.manifests[0] / f"{i}-{name}", files[name])
    d.start()
    url = f"http://127.0.0.1:{port}"

    def answer(path: str) -> str:
        r = httpx.get(url + path, headers={"Host": "shop.test"}, timeout=5)
        assert r.status_code == 200, (path, r.status_code, r.text)
        return r.text

    wait_for(lambda: answer("/api/v2").startswith("backend=v2 "), timeout=15, message="paths routed")
    expected = {
        "/": "backend=web host=shop.test path=/",
        "/apix": "backend=web host=shop.test path=/apix",  # segment-bounded: /apix is not /api
        "/api": "backend=exact host=shop.test path=/api",  # Exact beats the prefix
        "/api/": "backend=api host=shop.test path=/",  # the prefix, stripped (a leading / kept)
        "/api/x?q=1": "backend=api host=shop.test path=/x?q=1",
        "/api/v2": "backend=v2 host=shop.test path=/api/v2",  # the longer prefix wins; not stripped
        "/api/v2/y": "backend=v2 host=shop.test path=/api/v2/y",
        "/api/v2x": "backend=api host=shop.test path=/v2x",  # /api/v2 is segment-bounded too
        "/API/V2/z": "backend=v2 host=shop.test path=/API/V2/z",  # compared case-insensitively (Caddy)
    }
    assert {p: answer(p) for p in expected} == expected

    # the same (host, port, path, type) again: the later file loses, told the winner's file:line; the rest serves
    write(d.manifests[0] / "9-dup.yaml", manifest("dup", rule("shop.test", "web", web.port, path="/api/v2/",
                                                              listen=port)))

    def dup_status() -> dict[str, Any] | None:
        st = httpx.get(f"{d.api_url}/status", timeout=5).json()
        return next((i for i in st["ingresses"] if i["name"] == "dup" and i["reason"] == "HostnameConflict"), None)

    dup = wait_for(dup_status, timeout=15, message="the duplicate reported")
    winner = next(n for n in sorted(d.manifests[0].iterdir()) if n.name.endswith("c-v2.yaml"))
    assert f"shop.test:{port}/api/v2 is already claimed by ingress 'v2' in {winner}:1" in dup["message"], dup
    assert answer("/api/v2/y").startswith("backend=v2 ")
    st = httpx.get(f"{d.api_url}/status", timeout=5).json()
    assert next(i for i in st["ingresses"] if i["name"] == "v2")["hosts"] == [f"shop.test:{port}/api/v2"]


def test_patterns_and_tls_redirects_keep_their_paths() -> None:
    settings = Settings.from_env({"TLS_ISSUER": "internal"})
    desired = desired_of([manifest("apps", rule("{vm}.apps.test", "{vm}", path="/api"), rule("{vm}.apps.test", "{vm}")),
                          "name: secure\nrules:\n  - match: {hostname: s.test, path: /admin}\n"
                          "    target: {instance: web, port: 80}\n    tls: true\n    redirect_http: true\n"],
                         settings)
    assert not desired.problems, desired.problems
    config = Renderer(settings)(desired)
    plain = server_routes(config)
    patterns = [(r["@id"], r["match"][0]) for r in plain if r["@id"].startswith("ingress.apps")]
    assert patterns == [("ingress.apps.rule-0", {"host": ["*.apps.test"], "path": ["/api", "/api/*"]}),
                        ("ingress.apps.rule-1", {"host": ["*.apps.test"]})]
    (redirect,) = [r for r in plain if r["@id"] == "ingress.secure.rule-0.redirect"]
    assert redirect["match"] == [{"host": ["s.test"], "protocol": "http", "path": ["/admin", "/admin/*"]}]
    (secure,) = [r for r in server_routes(config, 443) if r["@id"] == "ingress.secure.rule-0"]
    assert secure["match"] == [{"host": ["s.test"], "path": ["/admin", "/admin/*"]}]


def test_the_readme_examples_of_paths_are_valid(tmp_path: Path) -> None:
    """The Manifests example (with a path) and the Paths example are what the loader accepts."""
    readme = (ROOT / "README.md").read_text()
    blocks = []
    for heading in ("## Manifests", "### Paths"):
        start = readme.index("```yaml", readme.index(heading)) + len("```yaml")
        blocks.append(readme[start:readme.index("```", start)])
    for i, text in enumerate(blocks):
        write(tmp_path / f"m{i}.yaml", text)
    desired = desired_of(blocks, Settings.from_env({"TLS_ISSUER": "internal"}))
    assert not desired.problems, desired.problems
    paths = {r.path_key for ri in desired.ingresses for r in ri.ingress.rules}
    assert {"/api", "/api/v2", "=/healthz"} <= paths


def test_the_api_shows_a_rules_path_and_hold() -> None:
    desired = desired_of([manifest("api", rule("a.test", "vm", path="/api/", strip=True),
                                   rule("a.test", "vm", path="/x", path_type="Exact"), rule("a.test", "vm"))
                          + "    hold: {duration: 30s}\n"], SETTINGS)
    (ri,) = desired.ingresses
    rules = ingress_body(ri.ingress)["rules"]
    assert rules[0] == {"match": {"hostname": "a.test", "port": 80, "path": "/api", "path_type": "Prefix"},
                        "target": {"instance": "vm", "port": 8080}, "strip_prefix": True}
    assert rules[1]["match"] == {"hostname": "a.test", "port": 80, "path": "/x", "path_type": "Exact"}
    assert rules[2] == {"match": {"hostname": "a.test", "port": 80}, "target": {"instance": "vm", "port": 8080},
                        "hold": {"duration": "30s"}}


@pytest.mark.parametrize("threshold", [256, 0], ids=["flat", "bucketed"])
def test_an_incremental_render_with_paths_is_a_fresh_render(threshold: int) -> None:
    """The renderer patches its last config when only targets changed; with paths the result is still
    exactly a fresh render's -- and a path that changes renders afresh."""
    settings = Settings(bucket_threshold=threshold)
    renderer = Renderer(settings)
    renderer(desired_of(MANIFESTS, settings))
    for changed in ([MANIFESTS[0], manifest("api", rule("shop.test", "api2", path="/api", strip=True),
                                            rule("shop.test", "exact", path="/api", path_type="Exact")), MANIFESTS[2]],
                    [MANIFESTS[0], MANIFESTS[1], manifest("v2", rule("shop.test", "v2", path="/api/v3"))]):
        desired = desired_of(changed, settings)
        assert ConfigEncoder()(renderer(desired)) == ConfigEncoder()(Renderer(settings)(desired))
