"""Renderer (memo) vs render (from scratch), and ConfigEncoder vs json.dumps, pass after pass.

The inputs change the way the daemon's do: an unchanged file keeps its very Ingress object, so the
Resolver hands the Renderer the very same ResolvedIngress objects and the encoder sees the very same route
dicts; changed files bring new objects. Flat (few routes per port) and bucketed (``bucket_threshold`` 8,
~100 ingresses) layouts, with and without TLS and ``redirect_http``.
"""

from __future__ import annotations

import copy
import json
import random
import zlib
from typing import Any

import pytest

from reconciler.model import Desired, Ingress, Instance, Origin, Rule, derive_ingress_id
from reconciler.render import ConfigEncoder, Renderer, render
from reconciler.settings import Settings, TLSSettings
from reconciler.validate import Resolver, resolve


def dumps(config: Any) -> bytes:
    return json.dumps(config, separators=(",", ":")).encode()


def origin(rel: str, source: int = 0) -> Origin:
    return Origin(source, rel, 0, f"/m{source}/{rel}", 1)


class Inputs:
    """Ingress files and instances; each step replaces a few of them with new objects."""

    def __init__(self, rng: random.Random, n: int, hosts: int, tls: bool) -> None:
        self.rng = rng
        self.tls = tls
        self.hosts = [f"app{i}.example.test" for i in range(hosts)]
        self.ingresses = {f"f{i:04}.yaml": self.make(f"f{i:04}.yaml", i) for i in range(n)}
        self.instances = {f"vm{i}": self.instance(f"vm{i}") for i in range(8)}
        # the instances a pass resolved against stay alive, as in the daemon
        self.keepalive: list[Instance] = list(self.instances.values())

    def make(self, rel: str, k: int) -> Ingress:
        rng = self.rng
        name = f"ing-{k}" if rng.random() < 0.95 else f"ing-{rng.randrange(5)}"
        rules = []
        used: set[tuple[str, int]] = set()
        for j in range(rng.randint(1, 2)):
            host = self.hosts[(k * 2 + j) % len(self.hosts)] if rng.random() < 0.9 else rng.choice(self.hosts)
            tls = self.tls and rng.random() < 0.3
            port = (443 if rng.random() < 0.8 else 8443) if tls else (80 if rng.random() < 0.8 else 8080)
            if (host, port) in used:
                continue
            used.add((host, port))
            target = rng.choice([f"vm{i}" for i in range(8)] + ["ghost"])
            rules.append(Rule(host, port, target, rng.choice([80, 3000]), tls, tls and rng.random() < 0.5))
        return Ingress(name, derive_ingress_id(name), tuple(rules), origin(rel))

    def instance(self, name: str) -> Instance:
        rng = self.rng
        return Instance(name, None, rng.choice(["10.0.0.1", "10.0.0.2", "fd00::5"]),
                        "Running" if rng.random() < 0.8 else "Stopped", origin(f"{name}.yaml", -1))

    def step(self) -> None:
        rng = self.rng
        for _ in range(rng.randint(0, 3)):
            rel = rng.choice(sorted(self.ingresses))
            roll = rng.random()
            if roll < 0.1:
                del self.ingresses[rel]
            elif roll < 0.25:
                self.ingresses[rel] = copy.copy(self.ingresses[rel])  # re-parsed, same content
            else:
                self.ingresses[rel] = self.make(rel, rng.randrange(10_000))
        if rng.random() < 0.2:
            self.ingresses[f"n{rng.randrange(10_000):05}.yaml"] = self.make("new", rng.randrange(10_000))
        if rng.random() < 0.3:
            name = f"vm{rng.randrange(8)}"
            if rng.random() < 0.2:
                self.instances.pop(name, None)
            else:
                self.instances[name] = self.instance(name)
            self.keepalive.extend(self.instances.values())


CASES: dict[str, tuple[Settings, int, int, bool]] = {
    # name: (settings, ingresses, distinct hosts, tls rules)
    "flat": (Settings(), 12, 20, False),
    "flat-tls": (Settings(tls=TLSSettings(issuer="internal")), 12, 20, True),
    "bucketed": (Settings(bucket_threshold=8), 100, 160, False),
    "bucketed-tls": (Settings(bucket_threshold=8, tls=TLSSettings(issuer="internal"), listen_address="127.0.0.1"),
                     100, 160, True),
    "bucketed-acme": (Settings(bucket_threshold=8, tls=TLSSettings(issuer="acme", acme_email="ops@example.test",
                                                                   acme_ca="https://127.0.0.1:14000/dir"),
                               listen_address="127.0.0.1"), 100, 160, True),
}


def all_routes(config: dict[str, Any]) -> list[Any]:
    servers = config.get("apps", {}).get("http", {}).get("servers", {})
    return [r for s in servers.values() for r in s["routes"]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_renderer_and_encoder_equal_the_reference_across_passes(case: str) -> None:
    s, n, hosts, tls = CASES[case]
    rng = random.Random(zlib.crc32(case.encode()))
    inputs = Inputs(rng, n, hosts, tls)
    resolver, renderer, encoder = Resolver(s), Renderer(s), ConfigEncoder()
    fresh_encoder = ConfigEncoder()  # fed with render() output: no memo upstream of it
    kept: list[Any] = []  # the previous pass's routes, held on even passes only
    reused = 0
    saw = {"tls": False, "redirect": False, "bucket": False, "503": False}
    for i in range(40):
        inputs.step()
        ings, insts = list(inputs.ingresses.values()), list(inputs.instances.values())
        desired = resolver(ings, insts)
        reference: Desired = resolve(ings, insts, s)
        assert desired.ingresses == reference.ingresses
        config = renderer(desired)
        want = render(reference, s)
        assert config == want
        assert encoder(config) == dumps(config)
        assert fresh_encoder(want) == dumps(want)
        text = dumps(config).decode()
        saw["tls"] |= '"tls"' in text
        saw["redirect"] |= ".redirect" in text
        saw["bucket"] |= '"bucket.' in text
        saw["503"] |= '"status_code":503' in text
        held = {id(r) for r in kept}
        reused += sum(id(r) in held for r in all_routes(config))
        # on odd passes nothing of this pass outlives it, so the next pass's new dicts may get the addresses
        # of this pass's freed ones: a memo by id() alone would then hand back stale text
        kept = all_routes(config) if i % 2 == 0 else []
        del desired, reference, config, want
    assert reused > 0  # identity reuse happened: the encoder's memo path was exercised
    assert saw["503"]
    assert saw["bucket"] == case.startswith("bucketed")
    assert saw["tls"] == tls and saw["redirect"] == tls


def test_encoder_follows_a_changed_route_in_a_bucket() -> None:
    """A one-host change inside a bucketed server: the encoder's bytes follow it (and equal json.dumps)."""
    s = Settings(bucket_threshold=8)
    vm = Instance("vm", None, "10.0.0.1", "Running", origin("vm.yaml", -1))
    ings = {f"f{i:03}.yaml": Ingress(f"w{i}", derive_ingress_id(f"w{i}"), (Rule(f"w{i}.test", 80, "vm", 80),),
                                     origin(f"f{i:03}.yaml")) for i in range(100)}
    resolver, renderer, encoder = Resolver(s), Renderer(s), ConfigEncoder()
    first = encoder(renderer(resolver(list(ings.values()), [vm])))
    ings["f050.yaml"] = Ingress("w50", derive_ingress_id("w50"), (Rule("w50.test", 80, "vm", 9999),),
                                origin("f050.yaml"))
    config = renderer(resolver(list(ings.values()), [vm]))
    second = encoder(config)
    assert second == dumps(config) and second != first
    assert b'"vm.hypeman.internal.:9999"' in second and b'"vm.hypeman.internal.:9999"' not in first
    stopped = Instance("vm", None, "10.0.0.1", "Stopped", origin("vm.yaml", -1))
    # instance state is data, not shape: the very same config object, nothing to encode or load
    assert renderer(resolver(list(ings.values()), [stopped])) is config


@pytest.mark.parametrize("config", [
    {},
    {"admin": {"listen": "127.0.0.1:2019"}},
    {"apps": {}},
    {"apps": {"http": {"servers": {}}}},
    {"apps": {"http": {"http_port": 80, "servers": {"s": {"listen": [":80"]}}}}},
    {"apps": {"http": {"servers": {"a": {"routes": []}, "b": {"routes": [{"x": "\u00e9\u2603"}], "z": 1}}},
              "tls": {}}, "storage": {"root": "/tmp/\"q\""}},
])
def test_encoder_edge_shapes(config: dict[str, Any]) -> None:
    encoder = ConfigEncoder()
    assert encoder(config) == dumps(config)
    assert encoder(config) == dumps(config)  # second call: from the memo


def test_encoder_with_many_servers_keeps_each_route_list_in_place() -> None:
    """Markers ``routes:1`` and ``routes:10`` must not be confused."""
    servers = {f"ingress-{8000 + i}": {"listen": [f":{8000 + i}"],
                                       "routes": [{"@id": f"r{i}-{j}", "n": j} for j in range(i % 3)]}
               for i in range(12)}
    config = {"apps": {"http": {"servers": servers}}}
    encoder = ConfigEncoder()
    assert encoder(config) == dumps(config)
    servers["ingress-8001"] = {**servers["ingress-8001"], "routes": [{"@id": "changed"}]}
    assert encoder(config) == dumps(config)


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_configs_equal_the_reference(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mostly changes that keep every route where it is (a backend edited, an instance stopped or moved):
    the Renderer patches its last config; now and then a change that moves routes (a full render)."""
    s, n, hosts, tls = CASES[case]
    rng = random.Random(zlib.crc32(b"patch-" + case.encode()))
    inputs = Inputs(rng, n, hosts, tls)
    resolver, renderer, encoder = Resolver(s), Renderer(s), ConfigEncoder()
    outcomes: list[bool] = []
    patch = renderer._patch

    def counting(desired: Desired) -> Any:
        got = patch(desired)
        outcomes.append(got is not None)
        return got

    monkeypatch.setattr(renderer, "_patch", counting)
    previous: tuple[dict[str, Any], bytes] | None = None
    for _ in range(60):
        roll = rng.random()
        if roll < 0.5:
            for rel in rng.sample(sorted(inputs.ingresses), rng.randint(1, 3)):
                ing = inputs.ingresses[rel]
                rules = tuple(Rule(r.hostname, r.port, rng.choice([f"vm{i}" for i in range(8)] + ["ghost"]),
                                   rng.choice([80, 3000, 4000]), r.tls, r.redirect_http) for r in ing.rules)
                inputs.ingresses[rel] = Ingress(ing.name, ing.id, rules, ing.origin)
        elif roll < 0.7:
            name = f"vm{rng.randrange(8)}"
            inputs.instances[name] = inputs.instance(name)
            inputs.keepalive.extend(inputs.instances.values())
        elif roll < 0.85:
            inputs.step()
        ings, insts = list(inputs.ingresses.values()), list(inputs.instances.values())
        desired = resolver(ings, insts)
        config = renderer(desired)
        assert config == render(resolve(ings, insts, s), s)
        assert encoder(config) == dumps(config)
        if previous is not None:  # the last config was not touched by the patch
            assert dumps(previous[0]) == previous[1]
        previous = (config, dumps(config))
    assert outcomes.count(True) > 20 and outcomes.count(False) >= 3, outcomes
