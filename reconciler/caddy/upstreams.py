"""Upstream health as Caddy sees it, read from its admin API (I/O edge).

Caddy shows two things, in two places (measured on 2.11.7):

* ``GET /reverse_proxy/upstreams`` -- ``[{"address", "num_requests", "fails"}]``, one row per upstream
  address, process-wide: ``fails`` is what passive health checks counted (failed requests within their
  window); it does not say what active checks found.
* ``GET /metrics`` -- ``caddy_reverse_proxy_upstreams_healthy{upstream="<address>"}`` 1/0: the upstream's
  whole verdict (active checks, passive counts), refreshed by Caddy every 10 s (and when a config is
  loaded); served without ``apps.http.metrics``.

:func:`read_upstreams` reads them, :func:`join` joins them: address -> ``{"healthy", "fails", "requests"}``;
``healthy`` is None for an address the gauge does not list yet (a config loaded less than one refresh ago).
"""

from __future__ import annotations

import re
from typing import Any

import httpx

from reconciler.errors import CaddyUnavailable

_HEALTHY = re.compile(r'^caddy_reverse_proxy_upstreams_healthy\{upstream="((?:[^"\\]|\\.)*)"\}\s+(\S+)', re.M)


def parse_healthy(text: str) -> dict[str, bool]:
    """address -> healthy, from Caddy's metrics text."""
    out: dict[str, bool] = {}
    for m in _HEALTHY.finditer(text):
        try:
            value = float(m.group(2))
        except ValueError:
            continue
        out[m.group(1).replace('\\"', '"').replace("\\\\", "\\")] = value >= 1
    return out


def join(rows: Any, healthy: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """The upstreams endpoint's rows with the gauge's verdict (rows that are not objects are skipped)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict) or not isinstance(row.get("address"), str):
            continue
        address = row["address"]
        out[address] = {"healthy": healthy.get(address), "fails": _int(row.get("fails")),
                        "requests": _int(row.get("num_requests"))}
    for address, ok in healthy.items():
        out.setdefault(address, {"healthy": ok, "fails": 0, "requests": 0})
    return out


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def read_upstreams(client: httpx.Client, *, metrics: bool = True) -> tuple[Any, dict[str, bool] | None]:
    """Caddy's upstream rows now and, with ``metrics``, its health gauge (``client``: on Caddy's admin
    address; the metrics are the larger answer, and Caddy refreshes the gauge only every 10 s);
    :class:`CaddyUnavailable` when it does not answer."""
    try:
        rows = client.get("/reverse_proxy/upstreams")
        rows.raise_for_status()
        data = rows.json()
        if not metrics:
            return data, None
        text = client.get("/metrics")
        text.raise_for_status()
    except (httpx.HTTPError, ValueError) as exc:
        raise CaddyUnavailable(f"reading Caddy's upstreams: {exc}") from exc
    return data, parse_healthy(text.text)
