"""reconciler.traffic (pure: parse, relabel, fold) and the collector over httpx.MockTransport."""

from __future__ import annotations

from typing import Any

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.caddy.traffic import HostMaps, TrafficCollector
from reconciler.model import Ingress, Origin, ResolvedIngress, Rule
from reconciler.traffic import OTHER, HostMap, parse, relabel
from tests.helpers import FakeClock


def resolved(name: str, *hosts: str, port: int = 80, tls: bool = False, redirect: bool = False
             ) -> ResolvedIngress:
    rules = tuple(Rule(h, port, "vm", 8080, tls=tls, redirect_http=redirect) for h in hosts)
    return ResolvedIngress(Ingress(name, name, rules, Origin(0, f"{name}.yaml", 0, f"{name}.yaml", 1)), ())


HOSTS = HostMap([resolved("shop", "shop.example.com", "www.shop.example.com"),
                 resolved("apps", "{vm}.apps.example.com", port=443, tls=True),
                 resolved("deep", "{a}.{b}.example.com", port=443, tls=True)])

H = 'code="200",handler="vars",method="GET",server="ingress-443"'
CADDY = f"""\
# HELP caddy_http_requests_total Counter of HTTP(S) requests made.
# TYPE caddy_http_requests_total counter
caddy_http_requests_total{{handler="vars",host="shop.example.com",server="ingress-80"}} 3
caddy_http_requests_total{{handler="vars",host="www.shop.example.com",server="ingress-80"}} 2
caddy_http_requests_total{{handler="headers",host="shop.example.com",server="ingress-80"}} 1
caddy_http_requests_total{{handler="vars",host="vm1.apps.example.com:443",server="ingress-443"}} 4
caddy_http_requests_total{{handler="vars",host="vm2.apps.example.com",server="ingress-443"}} 1
caddy_http_requests_total{{handler="vars",host="x.y.example.com",server="ingress-443"}} 6
caddy_http_requests_total{{handler="static_response",host="_other",server="ingress-80"}} 7
caddy_http_requests_total{{handler="static_response",host="evil.test",server="ingress-443"}} 1
# HELP caddy_http_request_duration_seconds Histogram of round-trip request durations.
# TYPE caddy_http_request_duration_seconds histogram
caddy_http_request_duration_seconds_bucket{{{H},host="vm1.apps.example.com",le="0.1"}} 1
caddy_http_request_duration_seconds_bucket{{{H},host="vm1.apps.example.com",le="+Inf"}} 2
caddy_http_request_duration_seconds_sum{{{H},host="vm1.apps.example.com"}} 0.5
caddy_http_request_duration_seconds_count{{{H},host="vm1.apps.example.com"}} 2
caddy_http_request_duration_seconds_bucket{{{H},host="vm2.apps.example.com",le="0.1"}} 0
caddy_http_request_duration_seconds_bucket{{{H},host="vm2.apps.example.com",le="+Inf"}} 1
caddy_http_request_duration_seconds_sum{{{H},host="vm2.apps.example.com"}} 0.25
caddy_http_request_duration_seconds_count{{{H},host="vm2.apps.example.com"}} 1
# HELP caddy_http_request_size_bytes Total size of the request. Includes body
# TYPE caddy_http_request_size_bytes histogram
caddy_http_request_size_bytes_count{{{H},host="shop.example.com"}} 3
# HELP caddy_http_requests_in_flight Number of requests currently handled by this server.
# TYPE caddy_http_requests_in_flight gauge
caddy_http_requests_in_flight{{handler="vars",host="shop.example.com",server="ingress-80"}} 1
caddy_admin_http_requests_total{{code="200",handler="metrics",method="GET",path="/metrics"}} 4
go_goroutines 12
"""


def series(families: list[Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Samples named ``name`` summed by (host, ingress, le) -- over handler and server."""
    out: dict[tuple[tuple[str, str], ...], float] = {}
    for f in families:
        for s in f.samples:
            if s.name == name:
                key = tuple(sorted((k, v) for k, v in s.labels if k in ("ingress", "host", "le")))
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_host_map_exact_pattern_port_and_other() -> None:
    assert HOSTS.lookup("shop.example.com", "ingress-80") == ("shop", "shop.example.com")
    assert HOSTS.lookup("SHOP.example.com:8080", "ingress-80") == ("shop", "shop.example.com")
    assert HOSTS.lookup("shop.example.com", "ingress-443") == (OTHER, OTHER)  # not its port
    assert HOSTS.lookup("vm7.apps.example.com", "ingress-443") == ("apps", "*.apps.example.com")
    assert HOSTS.lookup("a.apps.example.com", "ingress-443") == ("apps", "*.apps.example.com")  # 1 star first
    assert HOSTS.lookup("p.q.example.com", "ingress-443") == ("deep", "*.*.example.com")
    assert HOSTS.lookup("apps.example.com", "ingress-443") == (OTHER, OTHER)
    assert HOSTS.lookup(OTHER, "ingress-80") == (OTHER, OTHER)
    assert HOSTS.lookup("[::1]:80", "ingress-80") == (OTHER, OTHER)


def test_one_hostname_on_two_ports_is_two_ingresses() -> None:
    """Hostnames are unique per port only: the server Caddy names tells the two apart; a TLS rule's
    redirect on the HTTP port counts for its ingress."""
    hosts = HostMap([resolved("plain", "x.example.com"), resolved("alt", "x.example.com", port=8080),
                     resolved("secure", "s.example.com", port=443, tls=True, redirect=True)], http_port=80)
    assert hosts.lookup("x.example.com", "ingress-80") == ("plain", "x.example.com")
    assert hosts.lookup("x.example.com:8080", "ingress-8080") == ("alt", "x.example.com")
    assert hosts.lookup("s.example.com", "ingress-443") == ("secure", "s.example.com")
    assert hosts.lookup("s.example.com", "ingress-80") == ("secure", "s.example.com")  # its redirect
    assert hosts.lookup("s.example.com", "ingress-8080") == (OTHER, OTHER)
    text = ('caddy_http_requests_total{handler="vars",host="x.example.com",server="ingress-80"} 3\n'
            'caddy_http_requests_total{handler="vars",host="x.example.com",server="ingress-8080"} 5\n')
    assert series(relabel(parse(text), hosts), "caddy_http_requests_total") == {
        (("host", "x.example.com"), ("ingress", "plain")): 3, (("host", "x.example.com"), ("ingress", "alt")): 5}


def test_parse_keeps_only_the_traffic_families() -> None:
    parsed = parse(CADDY)
    assert set(parsed) == {"caddy_http_requests_total", "caddy_http_request_duration_seconds",
                           "caddy_http_requests_in_flight"}
    assert parsed["caddy_http_requests_total"][0] == "Counter of HTTP(S) requests made."
    assert len(parsed["caddy_http_request_duration_seconds"][1]) == 8


def test_parse_reads_escaped_label_values_and_skips_broken_lines() -> None:
    text = ('caddy_http_requests_total{host="a\\"b\\\\c",server="s"} 1\n'
            'caddy_http_requests_total{host="unterminated} 1\n'
            'caddy_http_requests_total{host="x"} not-a-number\n')
    (sample,) = parse(text)["caddy_http_requests_total"][1]
    assert dict(sample.labels)["host"] == 'a"b\\c' and sample.value == 1


def test_relabel_adds_ingress_folds_patterns_and_strangers_and_drops_the_lowercasing_route() -> None:
    families = relabel(parse(CADDY), HOSTS)
    assert [f.name for f in families] == ["caddy_http_requests", "caddy_http_request_duration_seconds",
                                          "caddy_http_requests_in_flight"]
    requests = series(families, "caddy_http_requests_total")
    assert requests == {
        (("host", "shop.example.com"), ("ingress", "shop")): 3,  # the "headers" route's 1 is not a request
        (("host", "www.shop.example.com"), ("ingress", "shop")): 2,
        (("host", "*.apps.example.com"), ("ingress", "apps")): 5,  # vm1 (with a port) + vm2
        (("host", "*.*.example.com"), ("ingress", "deep")): 6,
        (("host", OTHER), ("ingress", OTHER)): 8,  # Caddy's _other + a host no ingress has
    }
    buckets = series(families, "caddy_http_request_duration_seconds_bucket")
    assert buckets == {(("host", "*.apps.example.com"), ("ingress", "apps"), ("le", "0.1")): 1,
                       (("host", "*.apps.example.com"), ("ingress", "apps"), ("le", "+Inf")): 3}
    assert series(families, "caddy_http_request_duration_seconds_count") == {
        (("host", "*.apps.example.com"), ("ingress", "apps")): 3}


class Caddy:
    """A MockTransport answering /metrics with ``text`` (or failing), counting the fetches."""

    def __init__(self, text: str) -> None:
        self.text: str | None = text
        self.fetches = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.fetches += 1
        if self.text is None:
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200, text=self.text)


def scrape(registry: CollectorRegistry) -> dict[str, list[Any]]:
    return {f.name: f.samples for f in text_string_to_metric_families(generate_latest(registry).decode())}


def test_collector_serves_valid_exposition_caches_and_survives_caddy_down() -> None:
    caddy, clock = Caddy(CADDY), FakeClock()
    collector = TrafficCollector("http://caddy", HostMaps(lambda: [resolved("shop", "shop.example.com")]),
                                 clock=clock, max_age=2.0, transport=httpx.MockTransport(caddy))
    registry = CollectorRegistry()
    registry.register(collector)
    first = scrape(registry)
    assert first["hypeman_ingress_traffic_scrape_up"][0].value == 1
    by_ingress: dict[str, float] = {}
    for s in first["caddy_http_requests"]:
        by_ingress[s.labels["ingress"]] = by_ingress.get(s.labels["ingress"], 0.0) + s.value
    assert by_ingress == {"shop": 3, OTHER: 7 + 5 + 6 + 1 + 2}
    assert any(s.name.endswith("_bucket") for s in first["caddy_http_request_duration_seconds"])
    for _ in range(5):  # a scrape storm: one fetch per max_age
        scrape(registry)
    assert caddy.fetches == 1
    caddy.text = None
    clock.advance(2.5)
    down = scrape(registry)
    assert down["hypeman_ingress_traffic_scrape_up"][0].value == 0 and "caddy_http_requests" not in down
    assert caddy.fetches == 2
    collector.close()


def test_host_maps_are_built_once_per_pass() -> None:
    current: list[Any] = [resolved("a", "a.example.com")]
    maps = HostMaps(lambda: current)
    first = maps()
    assert maps() is first
    current = [resolved("b", "b.example.com")]
    assert maps() is not first and maps().lookup("b.example.com", "ingress-80") == ("b", "b.example.com")
    assert HostMaps(lambda: None)().lookup("a.example.com", "ingress-80") == (OTHER, OTHER)
