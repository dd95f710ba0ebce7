"""deploy/observability: the Prometheus scrape config and the Grafana dashboard -- their shape, and that every
metric the dashboard asks for is one /metrics exports (a real scrape: tests/test_traffic_real.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry

from reconciler.caddy.traffic import HostMaps, TrafficCollector
from reconciler.settings import DEFAULT_API_LISTEN
from reconciler.state.metrics import Metrics
from tests.helpers import ROOT
from tests.test_traffic import CADDY, resolved

OBSERVABILITY = ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
PROMETHEUS = OBSERVABILITY / "prometheus.yml"
_METRIC = re.compile(r"\b((?:hypeman_ingress|caddy_http)_[a-z0-9_]+)\b")
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def expressions(board: dict[str, Any]) -> list[str]:
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    return out


def dashboard_metric_names() -> list[str]:
    """Every metric (sample) name the dashboard's queries and variables use."""
    return sorted({m for expr in expressions(dashboard()) for m in _METRIC.findall(expr)})


def exported_names(registry: CollectorRegistry) -> set[str]:
    return {f.name + suffix for f in registry.collect() for suffix in _SUFFIXES.get(f.type, ("",))}


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in board["panels"]:
        assert panel["type"] in ("timeseries", "stat") and panel["title"]
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"])
        for target in panel["targets"]:  # brackets and parentheses balance: a typo shows here, not in Grafana
            expr = re.sub(r'"[^"]*"', '""', target["expr"])
            for a, b in ("()", "{}", "[]"):
                assert expr.count(a) == expr.count(b), target["expr"]
    names = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "node", "ingress"} <= names
    titles = " ".join(p["title"].lower() for p in board["panels"])
    for wanted in ("requests per second", "error ratio", "p50", "p95", "p99", "reconcile passes", "caddy up",
                   "responder up"):
        assert wanted in titles, wanted


def test_every_metric_of_the_dashboard_is_exported() -> None:
    metrics = Metrics()
    caddy = httpx.MockTransport(lambda request: httpx.Response(200, text=CADDY))
    collector = TrafficCollector("http://caddy", HostMaps(lambda: [resolved("shop", "shop.example.com")]),
                                 transport=caddy)
    metrics.registry.register(collector)
    exported = exported_names(metrics.registry)
    collector.close()
    used = dashboard_metric_names()
    assert used and set(used) <= exported, set(used) - exported
    assert {"caddy_http_requests_total", "caddy_http_request_duration_seconds_bucket",
            "hypeman_ingress_reconcile_passes_total", "hypeman_ingress_caddy_up"} <= set(used)


def test_the_prometheus_config_scrapes_our_metrics_with_the_token_file() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics" and job["scheme"] == "http"
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"].startswith("/")
    assert "credentials" not in job["authorization"]  # never the token itself in the file
    (static,) = job["static_configs"]
    assert static["targets"] == [DEFAULT_API_LISTEN]
    assert float(job["scrape_timeout"].rstrip("s")) <= float(config["global"]["scrape_interval"].rstrip("s"))
