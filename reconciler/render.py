"""Render the desired state into Caddy JSON. PURE and deterministic.

Layout (DESIGN §3): one server ``ingress-<port>`` per listening port on ``CADDY_LISTEN_ADDRESS``; per
rule a host-matched route with ``@id`` ``ingress.<name>.rule-<index>``; the last route of every server
answers 404 naming the unmatched host. Rules whose instance is missing or stopped answer 503 so their
hostname never falls through. The ``admin`` block, ``http_port``/``https_port`` and the storage root are
always explicit; plain-HTTP servers disable automatic HTTPS so Caddy never reaches for a public CA.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.model import Desired, ResolvedRule, Unavailable, Upstream
from reconciler.settings import Settings

_TEXT = {"Content-Type": ["text/plain; charset=utf-8"], "X-Content-Type-Options": ["nosniff"]}


def route_id(ingress: str, rule_index: int) -> str:
    return f"ingress.{ingress}.rule-{rule_index}"


def server_name(port: int) -> str:
    return f"ingress-{port}"


def _listen(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port}"


def _literal(text: str) -> str:
    """Escape Caddy placeholders: the message quotes manifest/instance text, and an unescaped
    ``{env.SECRET}`` in a response body would be expanded by Caddy."""
    return text.replace("{", "\\{").replace("}", "\\}")


def _handler(rule: ResolvedRule) -> dict[str, Any]:
    backend = rule.backend
    if isinstance(backend, Upstream):
        return {"handler": "reverse_proxy", "upstreams": [{"dial": backend.dial}]}
    assert isinstance(backend, Unavailable)
    return {
        "handler": "static_response",
        "status_code": 503,
        "headers": _TEXT,
        "body": f"503 Service Unavailable: {_literal(backend.message)}\n",
    }


def fallback_route(port: int) -> dict[str, Any]:
    return {
        "@id": f"fallback.{port}",
        "handle": [
            {
                "handler": "static_response",
                "status_code": 404,
                "headers": _TEXT,
                "body": "404 Not Found: no ingress for host {http.request.host}\n",
            }
        ],
        "terminal": True,
    }


def admin_block(settings: Settings) -> dict[str, Any]:
    return {"listen": settings.admin_listen, "config": {"persist": False}}


def render(desired: Desired, settings: Settings) -> dict[str, Any]:
    """``(ingresses, instances, settings) -> Caddy JSON`` as a dict; same input, same output."""
    by_port: dict[int, list[tuple[str, str, dict[str, Any]]]] = {}
    for resolved in desired.ingresses:
        name = resolved.ingress.name
        for rule in resolved.rules:
            rid = route_id(name, rule.index)
            route: dict[str, Any] = {
                "@id": rid,
                "match": [{"host": [rule.rule.hostname]}],
                "handle": [_handler(rule)],
                "terminal": True,
            }
            by_port.setdefault(rule.rule.port, []).append((rule.rule.hostname, rid, route))
    servers: dict[str, Any] = {}
    for port in sorted(by_port):
        routes = [r for _, _, r in sorted(by_port[port], key=lambda t: (t[0], t[1]))]
        routes.append(fallback_route(port))
        servers[server_name(port)] = {
            "listen": [_listen(settings.listen_address, port)],
            "automatic_https": {"disable": True},
            "routes": routes,
        }
    return {
        "admin": admin_block(settings),
        "storage": {"module": "file_system", "root": settings.storage_dir},
        "apps": {
            "http": {
                "http_port": settings.http_port,
                "https_port": settings.https_port,
                "servers": servers,
            }
        },
    }


def to_json(config: dict[str, Any]) -> str:
    """Canonical text form: sorted keys, two-space indent, trailing newline."""
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
