"""Caddy's traffic metrics on our ``/metrics``: a prometheus_client collector that fetches Caddy's admin
``/metrics`` (loopback, short timeout, at most once per ``max_age`` however many scrapes come) and serves
the per-ingress families of :func:`reconciler.traffic.relabel`.

When Caddy does not answer, a scrape still answers at once with our own metrics:
``hypeman_ingress_traffic_scrape_up`` is 0 and no traffic series are served (stale numbers would read as
live ones); a fetch that failed is not tried again before ``max_age`` either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.traffic import Family, HostMap, parse, relabel


class HostMaps:
    """The :class:`HostMap` of the last pass's resolved ingresses, built once per pass (``ingresses``:
    None before the first pass)."""

    def __init__(self, ingresses: Callable[[], Any], *, http_port: int = 80) -> None:
        self._ingresses = ingresses
        self._http_port = http_port
        self._last: tuple[Any, HostMap] | None = None

    def __call__(self) -> HostMap:
        current = self._ingresses()
        last = self._last
        if last is None or last[0] is not current:
            last = self._last = (current, HostMap(current or (), http_port=self._http_port))
        return last[1]


class TrafficCollector(Collector):
    def __init__(self, admin_url: str, hosts: Callable[[], HostMap], *, timeout: float = 2.0,
                 max_age: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 transport: httpx.BaseTransport | None = None) -> None:
        # plain HTTP to Caddy's admin address: no CA bundle loaded (~4 MB of memory per client)
        self._client = httpx.Client(base_url=admin_url.rstrip("/"), timeout=timeout, transport=transport,
                                    verify=False)
        self._hosts = hosts
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        #: (when fetched, families or None when the fetch failed, seconds the fetch and relabelling took)
        self._cached: tuple[float, list[Family] | None, float] | None = None

    def close(self) -> None:
        self._client.close()

    def _families(self) -> tuple[list[Family] | None, float]:
        with self._lock:  # one fetch at a time; the scrapes waiting meanwhile get its result
            cached = self._cached
            now = self._clock()
            if cached is None or now - cached[0] >= self._max_age:
                start = time.perf_counter()
                families = self._fetch()
                cached = self._cached = (now, families, time.perf_counter() - start)
            return cached[1], cached[2]

    def _fetch(self) -> list[Family] | None:
        try:
            resp = self._client.get("/metrics", headers={"Accept": "text/plain;version=0.0.4"})
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        return relabel(parse(resp.text), self._hosts())

    def collect(self) -> Iterator[Metric]:
        families, took = self._families()
        yield GaugeMetricFamily("hypeman_ingress_traffic_scrape_up",
                                "1 when the last fetch of Caddy's traffic metrics answered", value=0 if families is None
                                else 1)
        yield GaugeMetricFamily("hypeman_ingress_traffic_scrape_duration_seconds",
                                "How long the last fetch and relabelling of Caddy's traffic metrics took", value=took)
        for family in families or ():
            metric = Metric(family.name, family.help or family.name, family.type)
            for sample in family.samples:
                metric.add_sample(sample.name, dict(sample.labels), sample.value)
            yield metric
