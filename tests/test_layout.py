"""Bucketed route layout (reconciler.layout): pure properties, and real routing through Caddy."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from reconciler.layout import bucket_count, bucket_of, layout, proxy_handlers
from reconciler.model import Desired, Ingress, Instance, Origin, ResolvedIngress, ResolvedRule, Rule, Unavailable
from reconciler.render import render
from reconciler.settings import Settings
from reconciler.validate import InstanceIndex
from tests.helpers import Backend, CaddyProcess, Responder, free_port, wait_for

PROXY: dict[str, Any] = {"handler": "reverse_proxy", "transport": {"protocol": "http"}}


def proxy(host: str, dial: str) -> tuple[str, dict[str, Any]]:
    return host, {"@id": f"r-{host}", "match": [{"host": [host]}],
                  "handle": proxy_handlers("vm", dial, PROXY), "terminal": True}


def test_small_configs_stay_flat_and_readable() -> None:
    entries = [proxy(f"h{i}.test", "vm.hypeman.internal:80") for i in range(10)]
    assert layout(entries, port=80, threshold=256, proxy=PROXY) == [r for _, r in entries]


def test_buckets_cover_every_host_exactly_once() -> None:
    entries = [proxy(f"h{i:04d}.test", f"vm.hypeman.internal:{1000 + i}") for i in range(1000)]
    first, *routes = layout(entries, port=80, threshold=100, proxy=PROXY)
    assert first["@id"] == "lowercase-host.80" and "terminal" not in first
    assert 16 <= len(routes) <= 64  # ~sqrt(n) buckets instead of n routes
    seen = [h for r in routes for h in r["match"][0]["host"]]
    assert sorted(seen) == sorted(h for h, _ in entries)
    for r in routes:
        (sub,) = r["handle"]
        exact = sub["routes"][0]["handle"][0]
        assert exact["handler"] == "map"
        assert {m["input"] for m in exact["mappings"]} == set(r["match"][0]["host"])
        assert {m["outputs"][0] for m in exact["mappings"]} <= {d for _, rt in entries
                                                                for d in [rt["handle"][1]["upstreams"][0]["dial"]]}
        assert {m["outputs"][1] for m in exact["mappings"]} == {"vm"}
    # exactly one reverse_proxy handler per bucket, not one per host, and no regexp per host
    text = json.dumps(routes)
    assert text.count('"reverse_proxy"') == len(routes)
    assert "regexp" not in text


def test_bucket_membership_is_stable_when_hosts_come_and_go() -> None:
    n = bucket_count(1000)
    assert n == bucket_count(1100)  # a power of two: small changes of n keep the bucket count
    assert bucket_of("api.example.com", n) == bucket_of("api.example.com", n)


def test_special_routes_stay_as_they_are_inside_their_bucket() -> None:
    special = ("down.test", {"@id": "x", "match": [{"host": ["down.test"]}],
                             "handle": [{"handler": "static_response", "status_code": 503}], "terminal": True})
    entries = sorted([proxy(f"h{i}.test", "vm.hypeman.internal:80") for i in range(50)] + [special])
    routes = layout(entries, port=80, threshold=10, proxy=PROXY)[1:]
    owners = [r for r in routes if "down.test" in r["match"][0]["host"]]
    assert len(owners) == 1
    assert special[1] in owners[0]["handle"][0]["routes"]


def _desired(n: int, backends: list[Backend], port: int) -> tuple[Desired, list[str]]:
    origin = Origin(0, "m.yaml", 0, "m.yaml", 1)
    insts = [Instance(f"vm{k}", None, "127.0.0.1", "Running", origin) for k in range(len(backends))]
    insts.append(Instance("stopped", None, "127.0.0.1", "Stopped", origin))
    index = InstanceIndex(insts)
    ingresses, hosts = [], []
    for i in range(n):
        host = f"h{i}.bucket.test"
        k = i % len(backends)
        instance = "stopped" if i == 7 else f"vm{k}"
        rule = Rule(host, port, instance, backends[k].port)
        backend = index.backend(rule)
        ing = Ingress(f"ing-{i}", f"id-{i}", (rule,), dataclasses.replace(origin, relpath=f"{i}.yaml"))
        ingresses.append(ResolvedIngress(ing, (ResolvedRule(rule, 0, backend),)))
        hosts.append(host)
    assert isinstance(ingresses[7].rules[0].backend, Unavailable)
    return Desired(tuple(ingresses), instances=index.by_name), hosts


@pytest.mark.caddy
def test_bucketed_config_routes_like_the_flat_one(caddy: CaddyProcess, responder: Responder,
                                                  backends: Callable[[str], Backend]) -> None:
    bs = [backends("b0"), backends("b1"), backends("b2")]
    port = free_port()
    desired, hosts = _desired(300, bs, port)
    responder.publish_instances(desired.instances.values())
    settings = Settings(data_dir="/tmp/unused", admin_port=caddy.admin_port, listen_address="127.0.0.1",
                        http_port=free_port(), https_port=free_port(), bucket_threshold=50,
                        dns_port=responder.port, hold="0s")
    config = render(desired, settings)
    routes = config["apps"]["http"]["servers"][f"ingress-{port}"]["routes"]
    assert len(routes) < 300 and routes[0]["@id"] == f"lowercase-host.{port}"
    assert all(r["@id"].startswith("bucket.") for r in routes[1:-1])
    assert "input_regexp" not in json.dumps(config)  # no regexp per host
    assert caddy.load(config).status_code == 200
    with httpx.Client(timeout=5) as client:
        def get(host: str) -> httpx.Response:
            return client.get(f"http://127.0.0.1:{port}/", headers={"Host": host})

        wait_for(lambda: get(hosts[0]).status_code == 200, timeout=10, message="bucketed config live")
        for i, host in enumerate(hosts):
            r = get(host)
            if i == 7:
                assert r.status_code == 503 and 'instance "stopped" is not running' in r.text, r.text
            else:
                assert r.status_code == 200 and r.text.startswith(f"backend=b{i % 3} "), (host, r.text)
        # Host is case-insensitive: lower-cased first, then found in the exact map (backends see it lower-cased)
        r = get(hosts[11].upper())
        assert r.status_code == 200 and r.text.startswith("backend=b2 ") and f"host={hosts[11]}" in r.text
        r = get(hosts[12][:3].upper() + hosts[12][3:] + ":" + str(port))  # mixed case, with the port
        assert r.status_code == 200 and r.text.startswith("backend=b0 ")
        r = get(hosts[7].upper())  # the stopped instance's 503 too
        assert r.status_code == 503 and '"stopped"' in r.text
        r = get("NOPE.Bucket.test")
        assert r.status_code == 404 and "nope.bucket.test" in r.text
        r = get("nope.bucket.test")
        assert r.status_code == 404 and "nope.bucket.test" in r.text
