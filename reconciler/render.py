"""Render the desired state into Caddy JSON. PURE and deterministic.

Layout: one server ``ingress-<port>`` per listening port on ``CADDY_LISTEN_ADDRESS``; per
rule a host-matched route with ``@id`` ``ingress.<name>.rule-<index>``; exact hosts first, then hostname
patterns (``{instance}.example.com``: fewer captures first), and last a route answering 404 naming the
unmatched host. The ``admin`` block, ``http_port``/``https_port`` and the storage root are always
explicit; plain-HTTP servers disable automatic HTTPS so Caddy never reaches for a public CA.

Shape, not data: a rule's upstream is its instance's *name* in the DNS responder's zone
(``<label>.hypeman.internal:<port>``, see :mod:`reconciler.zone`), resolved by Caddy through the
responder at each new upstream connection, so the config depends on the manifests and the settings only
-- never on where an instance is or whether it runs. A request whose instance has no address (stopped,
unknown) or does not accept connections (restarting) is held: Caddy tries the dial again every
``hold_interval`` for ``hold`` (per rule: ``hold``), then the server's error routes answer 503/504
naming the instance.

TLS (``tls: true``): the rule's server keeps automatic HTTPS (certificates) but not Caddy's implicit
redirects; every TLS hostname is a subject of one explicit automation policy whose issuer comes from the
settings (ACME with HTTP-01/TLS-ALPN-01 or DNS-01, or Caddy's internal CA), plus a catch-all policy
with the same issuer. ``redirect_http: true`` adds a 308 route for that hostname on the HTTP port.

Traffic: ``apps.http.metrics.per_host`` (``HYPEMAN_TRAFFIC_METRICS``) makes Caddy count requests, errors and
latency per host (relabelled per ingress by :mod:`reconciler.traffic`); ingresses that log
(:func:`reconciler.accesslog.logged`) get ``logs`` on their servers and a file in ``logging``.
"""

from __future__ import annotations

import functools
import html
import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from reconciler.accesslog import logged, logging_block, server_logs
from reconciler.jsonutil import compact, compact_bytes
from reconciler.layout import (
    INSTANCE_VAR,
    Buckets,
    Member,
    Placement,
    bucket_route,
    layout,
    literal,
    member,
    proxy_handlers,
    server_name,
)
from reconciler.memo import IdentityMemo
from reconciler.model import EXACT, Desired, Ingress, Limits, Maintenance, Rule, path_rank
from reconciler.settings import Settings, TLSSettings, hold_seconds, join_hostport
from reconciler.zone import dial_name, is_pattern, parse_pattern, template

_TEXT = {"Content-Type": ["text/plain; charset=utf-8"], "X-Content-Type-Options": ["nosniff"]}


def route_id(ingress: str, rule_index: int) -> str:
    return f"ingress.{ingress}.rule-{rule_index}"


def proxy_template(settings: Settings, hold: tuple[str, str] | None = None) -> dict[str, Any]:
    """The reverse_proxy fields every upstream shares: dial through the responder, hold while it fails."""
    duration, interval = (hold[0] or settings.hold, hold[1] or settings.hold_interval) if hold else (
        settings.hold, settings.hold_interval)
    transport: dict[str, Any] = {"protocol": "http", "dial_timeout": settings.dial_timeout,
                                 "resolver": {"addresses": [f"udp/{settings.dns_listen}"]}}
    if not settings.upstream_keepalive:
        # every request dials (and so resolves) anew: a stopped or moved instance gets no request on a
        # connection opened to its old address
        transport["keep_alive"] = {"enabled": False}
    proxy: dict[str, Any] = {"handler": "reverse_proxy", "transport": transport}
    if hold_seconds(settings.stream_close_delay):  # websockets outlive a config load (by up to this long)
        proxy["stream_close_delay"] = settings.stream_close_delay
    if hold_seconds(duration):
        proxy["load_balancing"] = {"try_duration": duration, "try_interval": interval}
    return proxy


def matcher_host(hostname: str) -> str:
    """What Caddy's host matcher holds for a rule's hostname (a pattern's captures become ``*``)."""
    if not is_pattern(hostname):
        return hostname
    parsed = parse_pattern(hostname)
    assert not isinstance(parsed, str), parsed  # validated before
    return parsed.wildcard


def upstream(rule: Rule, zone: str) -> tuple[str, str]:
    """(dial, instance as a Caddy value) of a rule: the instance's name in the zone, or for a pattern the
    name Caddy builds per request from the captured labels. The name is rooted (a trailing dot): never
    tried with the host's resolv.conf search domains first (``ndots:5`` in a Kubernetes pod)."""
    if is_pattern(rule.hostname):
        parsed = parse_pattern(rule.hostname)
        assert not isinstance(parsed, str), parsed
        name = template(rule.instance, parsed)
        assert name is not None, rule.instance
        return f"{name}.{zone}.:{rule.target_port}", name
    return dial_name(rule.instance, rule.target_port, zone), literal(rule.instance)


def path_matcher(rule: Rule) -> list[str] | None:
    """Caddy's ``path`` matcher of a rule (None: every path). A prefix is segment-bounded: ``/api`` and
    ``/api/*`` (never ``/apix``)."""
    if rule.path is None:
        return None
    return [rule.path] if rule.path_type == EXACT else [rule.path, f"{rule.path}/*"]


def _match(rule: Rule, host: str) -> dict[str, Any]:
    paths = path_matcher(rule)
    return {"host": [host]} if paths is None else {"host": [host], "path": paths}


def selection_policy(rule: Rule) -> dict[str, Any]:
    """How a pool's reverse_proxy picks a target: round robin, weighted when the weights differ, by cookie
    (falling back to those for a client without one, or whose target left the pool) when sticky."""
    weights = [t.weight for t in rule.targets if t.weight]
    policy: dict[str, Any] = ({"policy": "round_robin"} if len(set(weights)) <= 1
                              else {"policy": "weighted_round_robin", "weights": weights})
    if rule.sticky_cookie is not None:
        policy = {"policy": "cookie", "name": rule.sticky_cookie, "fallback": policy}
    return policy


def pool_handlers(rule: Rule, settings: Settings) -> list[dict[str, Any]]:
    """The handlers of a rule with ``targets``: each target with a weight is an upstream (its instance's name
    in the zone); a request that could not reach one (stopped: no address; not accepting) is tried again on
    the next -- after the hold's interval, or at once without a hold --, and the one that failed is left out
    for a while (passive health), so a stopped instance leaves the pool without a failed request. The hold
    covers the whole pool: while no target can be reached, requests wait as for one target."""
    zone = settings.dns_zone
    members = [t for t in rule.targets if t.weight]
    proxy = proxy_template(settings, rule.hold)
    balancing = {**proxy.get("load_balancing", {}), "selection_policy": selection_policy(rule)}
    if "try_duration" not in balancing and len(members) > 1:
        # no hold: one try per target (with a hold, its duration bounds the tries -- a retries limit would
        # end them first: Caddy stops at whichever comes first)
        balancing["retries"] = len(members) - 1
    names = ", ".join(t.instance for t in members)
    return [{"handler": "vars", INSTANCE_VAR: literal(names), POOL_VAR: "pool"},
            {**proxy, "load_balancing": balancing,
             "upstreams": [{"dial": dial_name(t.instance, t.port, zone)} for t in members]}]


#: the request variable set on requests of a rule with a pool (the error routes word its 503 for the pool)
POOL_VAR = "pool"
#: a pool's passive health check when the rule sets none: one failure leaves a target out for 3s (short: a
#: target back from a stop waits at most that long, within the default hold)
POOL_PASSIVE = {"fail_duration": "3s", "max_fails": 1}


def health_checks(rule: Rule) -> dict[str, Any]:
    """Caddy's ``health_checks`` of a rule: its own (see :class:`reconciler.model.HealthCheck`), and for a pool
    at least :data:`POOL_PASSIVE`."""
    out: dict[str, Any] = {"passive": dict(POOL_PASSIVE)} if rule.targets else {}
    check = rule.health
    if check is None:
        return out
    if check.active:
        active: dict[str, Any] = {"uri": check.path, "interval": check.interval, "timeout": check.timeout,
                                  "passes": check.passes, "fails": check.fails}
        if check.expect_status is not None:
            active["expect_status"] = check.expect_status
        out["active"] = active
    if check.passive_fails is not None:
        out["passive"] = {"fail_duration": check.passive_window, "max_fails": check.passive_fails}
    return out


def limited(limits: Limits, handle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rule's limits on its handlers (the last is its ``reverse_proxy``): a body limit before the proxy,
    timeouts on its transport, a concurrency cap on each upstream."""
    proxy = dict(handle[-1])
    transport = dict(proxy["transport"])
    for key in ("dial_timeout", "response_header_timeout", "read_timeout"):
        value = getattr(limits, key)
        if value is not None:
            transport[key] = value
    proxy["transport"] = transport
    if limits.max_concurrent is not None:
        proxy["upstreams"] = [{**u, "max_requests": limits.max_concurrent} for u in proxy["upstreams"]]
    before: list[dict[str, Any]] = []  # (the rate limit goes before any access control: see _route)
    if limits.max_body is not None:
        before.append({"handler": "request_body", "max_size": limits.max_body})
    return [*handle[:-1], *before, proxy]


def _deny(match: dict[str, Any], body: str) -> dict[str, Any]:
    return {"match": [{"not": [match]}], "terminal": True,
            "handle": [{"handler": "static_response", "status_code": 403, "headers": _TEXT, "body": body + "\n"}]}


def guarded(rule: Rule, handle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rule's access control around its handlers, in order: the client's address (``allow_ips``: 403),
    hypeman's request header auth (403 without the header at exactly the value; with it, the request is
    proxied without the header: the instance never sees it), basic auth (401 with the realm). The header
    value is a literal: validation refuses ``*`` (a wildcard to Caddy's header matcher) and ``{}``."""
    routes: list[dict[str, Any]] = []
    first: list[dict[str, Any]] = []
    if rule.allow_ips:
        # client_ip: the peer, or X-Forwarded-For when the peer is a trusted proxy (HYPEMAN_TRUSTED_PROXIES)
        routes.append(_deny({"client_ip": {"ranges": list(rule.allow_ips)}},
                            "403 Forbidden: your address may not reach this host"))
    if rule.header_auth is not None:
        header, value = rule.header_auth
        routes.append(_deny({"header": {header: [value]}}, "403 Forbidden: this host requires authorization"))
        first.append({"handler": "headers", "request": {"delete": [header]}})
    if rule.basic_auth is not None:
        realm, users = rule.basic_auth
        first.insert(0, {"handler": "authentication", "providers": {"http_basic": {
            "accounts": [{"username": u, "password": h} for u, h in users], "hash": {"algorithm": "bcrypt"},
            "realm": realm}}})
    routes.append({"handle": [*first, *handle]})
    return [{"handler": "subroute", "routes": routes}]


def maintenance_page(m: Maintenance) -> list[dict[str, Any]]:
    """The answers of an ingress in maintenance: 503 with Retry-After, an HTML page to clients that accept
    HTML, plain text to the others (the message is the manifest's text: HTML-escaped, Caddy placeholders
    escaped)."""
    headers: dict[str, list[str]] = {"Retry-After": [str(m.retry_after)]} if m.retry_after else {}
    text = literal(m.message)
    page = literal(f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>503 Service Unavailable</title></head>"
                   f"<body><h1>Down for maintenance</h1><p>{html.escape(m.message)}</p></body></html>\n")
    return [
        {"match": [{"header_regexp": {"Accept": {"pattern": "text/html"}}}], "terminal": True,
         "handle": [{"handler": "static_response", "status_code": 503, "body": page,
                     "headers": {**headers, "Content-Type": ["text/html; charset=utf-8"],
                                 "X-Content-Type-Options": ["nosniff"]}}]},
        {"handle": [{"handler": "static_response", "status_code": 503, "headers": {**headers, **_TEXT},
                     "body": f"503 Service Unavailable: {text}\n"}], "terminal": True},
    ]


def maintained(m: Maintenance, handle: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A route's handlers while its ingress is in maintenance: ``allow_path`` still proxied, the rest 503."""
    routes: list[dict[str, Any]] = []
    if m.allow_path is not None:
        routes.append({"match": [{"path": [m.allow_path, f"{m.allow_path}/*"]}], "handle": handle, "terminal": True})
    return [{"handler": "subroute", "routes": [*routes, *maintenance_page(m)]}]


def _route(rid: str, rule: Rule, settings: Settings, maintenance: Maintenance | None = None,
           paged: str | None = None) -> dict[str, Any]:
    """One host-matched route (and path-matched, for a rule with a path). ``paged``: the name of its ingress,
    when that has error pages of its own (the error routes find them by it)."""
    if rule.targets:
        handle = pool_handlers(rule, settings)
    else:
        dial, instance = upstream(rule, settings.dns_zone)
        handle = proxy_handlers(instance, dial, proxy_template(settings, rule.hold))
    if paged is not None:
        handle = [{**handle[0], INGRESS_VAR: literal(paged)}, *handle[1:]]
    if rule.strip_prefix and rule.path is not None:
        # (Caddy keeps a leading "/": /api stripped of /api reaches the instance as /)
        handle = [handle[0], {"handler": "rewrite", "strip_path_prefix": rule.path}, *handle[1:]]
    checks = health_checks(rule)
    if checks:
        handle = [*handle[:-1], {**handle[-1], "health_checks": checks}]
    if rule.limits is not None:
        handle = limited(rule.limits, handle)
    if maintenance is not None:
        handle = maintained(maintenance, handle)
    if rule.header_auth is not None or rule.basic_auth is not None or rule.allow_ips:
        handle = guarded(rule, handle)
    if rule.limits is not None and rule.limits.rate_limit is not None:
        # first of all: failed credentials count against the limit too
        requests, window = rule.limits.rate_limit
        handle = [{"handler": "rate_limit", "rate_limits": {"client": {
            "key": "{http.vars.client_ip}", "window": window, "max_events": requests}}}, *handle]
    return {"@id": rid, "match": [_match(rule, matcher_host(rule.hostname))], "handle": handle, "terminal": True}


#: the request variable naming the ingress of a route whose ingress has its own error pages
INGRESS_VAR = "ingress"


#: the delimiters of the templates that fill an HTML error page: control characters, which no manifest or
#: page file may hold, so a page's own text is never a template action (Caddy's templates can read env)
TEMPLATE_DELIMITERS = ["\u0001", "\u0002"]
#: what an error page may quote: the request's host, the instance it was for
PAGE_TOKENS = {"{host}": "http.request.host", "{instance}": f"http.vars.{INSTANCE_VAR}"}


def _page_text(text: str) -> str:
    """A plain-text page as Caddy's static_response body: its braces literal, its tokens placeholders."""
    out = literal(text)
    for token, placeholder in PAGE_TOKENS.items():
        out = out.replace(literal(token), "{" + placeholder + "}")
    return out


def _page_html(page: str) -> str:
    """An HTML page: its tokens filled by Caddy's templates, HTML-escaped (a Host or an instance name is
    never markup); everything else literal."""
    open_, close = TEMPLATE_DELIMITERS
    out = literal(page.replace(open_, "").replace(close, ""))  # (validation refuses them; never an action)
    for token, placeholder in PAGE_TOKENS.items():
        out = out.replace(literal(token), f'{open_}html (placeholder "{placeholder}"){close}')
    return out


def page_handlers(status: int, page: tuple[str | None, str | None], default: str) -> list[dict[str, Any]]:
    """Answer ``status`` with an error page: its HTML to clients that accept HTML (when it has one), its
    text (else ``default``, a static_response body) to the others."""
    html_page, text = page
    routes: list[dict[str, Any]] = []
    if html_page is not None:
        routes.append({"match": [{"header_regexp": {"Accept": {"pattern": "text/html"}}}], "terminal": True, "handle": [
            # (file_root: nowhere -- a page can include no file; and no action but ours can run)
            {"handler": "templates", "delimiters": TEMPLATE_DELIMITERS, "mime_types": ["text/html"],
             "file_root": "/nonexistent/hypeman-ingress-pages"},
            {"handler": "static_response", "status_code": status, "body": _page_html(html_page),
             "headers": {"Content-Type": ["text/html; charset=utf-8"], "X-Content-Type-Options": ["nosniff"]}}]})
    routes.append({"terminal": True, "handle": [{"handler": "static_response", "status_code": status, "headers": _TEXT,
                                                 "body": _page_text(text) if text is not None else default}]})
    return [{"handler": "subroute", "routes": routes}]


#: error pages: status -> (HTML, text), either may be None
Pages = Mapping[int, tuple[str | None, str | None]]


def error_routes(pages: Pages | None = None, by_host: list[tuple[str, Pages]] | None = None
                 ) -> list[dict[str, Any]]:
    """A server's error routes: what a request gets when its instance could not be reached (after the
    hold), naming the instance (set by the route, see :func:`reconciler.layout.proxy_handlers`). ``pages``:
    the operator's error pages; ``by_host``: ingresses' own (the ingress, its pages), found by the
    ``ingress`` variable its routes set (never by host: a pattern's wildcard covers other ingresses' hosts)."""
    var = f"{{http.vars.{INSTANCE_VAR}}}"
    message = "{http.error.message}"
    pages = pages or {}
    by_host = by_host or []

    def handlers(status: int | str, body: str) -> list[dict[str, Any]]:
        plain = [{"handler": "static_response", "status_code": status, "headers": _TEXT, "body": body}]
        if not isinstance(status, int):
            return plain
        fallback = pages.get(status, (None, None))  # what an ingress's page leaves out is the operator's
        mine = [(name, (own[status][0] if own[status][0] is not None else fallback[0],
                        own[status][1] if own[status][1] is not None else fallback[1]))
                for name, own in by_host if status in own]
        if not mine and status not in pages:
            return plain
        routes = [{"match": [{"vars": {f"{{http.vars.{INGRESS_VAR}}}": [literal(name)]}}],
                   "handle": page_handlers(status, page, body), "terminal": True} for name, page in mine]
        routes.append({"handle": page_handlers(status, pages[status], body) if status in pages else plain,
                       "terminal": True})
        return [{"handler": "subroute", "routes": routes}]

    def answer(status: int | str, body: str, *match: dict[str, Any]) -> dict[str, Any]:
        route: dict[str, Any] = {"handle": handlers(status, body + "\n"), "terminal": True}
        if match:
            route["match"] = [{k: v for m in match for k, v in m.items()}]
        return route

    # errors Caddy itself gave a status (a target's bad answer: 502, ...) with a page for it
    paged = sorted({s for s in pages} | {s for _, own in by_host for s in own} - {404})
    by_status = [answer(s, f'{s} {HTTP_STATUS_TEXT.get(s, "Error")}: instance "{var}"',
                        {"vars": {"{http.error.status_code}": [str(s)]}}) for s in paged]
    pool = f"{{http.vars.{POOL_VAR}}}"
    return [
        answer("{http.error.status_code}", "{http.error.status_code} {http.error.status_text}", {"vars": {var: [""]}}),
        # a pool: every target was tried (or left out after failing) -- none is running, known or accepting
        answer(503, f"503 Service Unavailable: no target is running, known and healthy (instances: {var})",
               {"vars": {pool: ["pool"]}},
               {"vars_regexp": {message: {"pattern": "no such host|no upstreams available"}}}),
        answer(503, f'503 Service Unavailable: instance "{var}" is not running or not known',
               {"vars_regexp": {message: {"pattern": "no such host"}}}),
        # left out by its health checks (failing the active check, or failed requests just now), or full
        answer(503, f'503 Service Unavailable: instance "{var}" is unhealthy (failing its health checks) or at its '
               "limit of concurrent requests",
               {"vars_regexp": {message: {"pattern": "no upstreams available"}}}),
        # the lookup itself failed: the DNS responder is down or hung (not the instance's fault)
        answer(503, f'503 Service Unavailable: instance "{var}": its address could not be looked up (the DNS '
               "responder did not answer)", {"vars_regexp": {message: {"pattern": "lookup [^ ]+"}}}),
        answer(504, f'504 Gateway Timeout: instance "{var}" did not answer in time',
               {"vars_regexp": {message: {"pattern": "i/o timeout|deadline exceeded|timeout awaiting"}}}),
        answer(503, f'503 Service Unavailable: instance "{var}" does not accept connections on port '
               "{http.reverse_proxy.upstream.port}", {"vars_regexp": {message: {"pattern": "^dial "}}}),
        *by_status,
        answer("{http.error.status_code}", f'{{http.error.status_code}} {{http.error.status_text}}: instance "{var}"'),
    ]


HTTP_STATUS_TEXT = {502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


def fallback_route(port: int, page: tuple[str | None, str | None] | None = None) -> dict[str, Any]:
    """The last route of a server: 404 naming the host no ingress has (the operator's 404 page, if any)."""
    body = "404 Not Found: no ingress for host {http.request.host}\n"
    handle = (page_handlers(404, page, body) if page is not None
              else [{"handler": "static_response", "status_code": 404, "headers": _TEXT, "body": body}])
    return {"@id": f"fallback.{port}", "handle": handle, "terminal": True}


#: the Host names Caddy's admin API accepts on a loopback listener unless told otherwise
_ADMIN_DEFAULT_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def admin_block(settings: Settings) -> dict[str, Any]:
    """Caddy's ``admin``. On a loopback address other than its default names (``127.0.0.2``, say: one node
    of several on one host) Caddy would refuse our own requests by their ``Host`` (it allows only
    localhost, 127.0.0.1 and ::1 there), so the address is named as the allowed origin."""
    block: dict[str, Any] = {"listen": settings.admin_listen, "config": {"persist": False}}
    address = settings.admin_address
    if address not in _ADMIN_DEFAULT_HOSTS:
        try:
            loopback = ipaddress.ip_address(address).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            block["origins"] = [settings.admin_listen]
    return block


REDACTED = "[REDACTED]"
#: keys whose values are secrets wherever they appear in a rendered config
SECRET_KEYS = frozenset({"api_token", "access_key_id", "secret_access_key", "session_token", "token", "password"})


def _duration(value: str) -> str | int:
    """A Caddy duration: ``"2m"`` stays a string; ``-1`` (e.g. "skip propagation checks") must be the JSON
    number -1, because Caddy parses a string with ``time.ParseDuration``, which refuses ``"-1"``."""
    return -1 if value == "-1" else value


def issuer(tls: TLSSettings) -> dict[str, Any]:
    """The certificate issuer every TLS hostname gets (never an implicit public CA)."""
    if tls.issuer == "internal":
        return {"module": "internal", "ca": "local"}
    acme: dict[str, Any] = {"module": "acme", "email": tls.acme_email}
    if tls.acme_ca:
        acme["ca"] = tls.acme_ca
    if tls.acme_ca_root:
        acme["trusted_roots_pem_files"] = [tls.acme_ca_root]
    challenges: dict[str, Any] = {}
    if tls.dns_provider is not None:
        provider: dict[str, Any] = {"name": tls.dns_provider}
        if tls.dns_provider == "cloudflare":
            provider["api_token"] = tls.cloudflare_api_token
        elif tls.dns_provider == "route53":
            provider["region"] = tls.aws_region
            if tls.aws_access_key_id:
                provider["access_key_id"] = tls.aws_access_key_id
            if tls.aws_secret_access_key:
                provider["secret_access_key"] = tls.aws_secret_access_key
            if tls.aws_hosted_zone_id:
                provider["hosted_zone_id"] = tls.aws_hosted_zone_id
        dns: dict[str, Any] = {"provider": provider}
        if tls.dns_propagation_timeout:
            dns["propagation_timeout"] = _duration(tls.dns_propagation_timeout)
        if tls.dns_propagation_delay:
            dns["propagation_delay"] = _duration(tls.dns_propagation_delay)
        if tls.dns_resolvers:
            dns["resolvers"] = list(tls.dns_resolvers)
        challenges = {"dns": dns, "http": {"disabled": True}, "tls-alpn": {"disabled": True}}
    else:
        if "http-01" not in tls.challenges:
            challenges["http"] = {"disabled": True}
        if "tls-alpn-01" not in tls.challenges:
            challenges["tls-alpn"] = {"disabled": True}
    if challenges:
        acme["challenges"] = challenges
    return acme


def _redirect_route(name: str, index: int, hostname: str, tls_port: int, rule: Rule | None = None) -> dict[str, Any]:
    suffix = "" if tls_port == 443 else f":{tls_port}"
    match: dict[str, Any] = {"host": [hostname], "protocol": "http"}
    paths = path_matcher(rule) if rule is not None else None
    if paths is not None:  # the rule's own paths only: another rule may own the host's others
        match["path"] = paths
    return {
        "@id": f"{route_id(name, index)}.redirect",
        "match": [match],
        "handle": [{"handler": "static_response", "status_code": 308,
                    "headers": {"Location": [f"https://{{http.request.host}}{suffix}{{http.request.uri}}"]}}],
        "terminal": True,
    }


class _Entry(NamedTuple):
    """One rendered rule."""

    port: int
    hostname: str
    route_id: str
    rule: Rule
    #: its route; None for a plain proxy to an upstream (built only if its port is laid out flat)
    route: dict[str, Any] | None
    member: Member
    tls: bool
    #: the place of a hostname pattern among a server's routes (None: an exact host), see :func:`_order`
    pattern: tuple[int, int, str] | None
    #: the ingress whose access log takes this route's requests (None: not logged), see reconciler.accesslog
    logger: str | None = None
    #: its ingress's own error pages
    pages: tuple[tuple[int, str | None, str | None], ...] = ()


@dataclass(slots=True)
class _Port:
    """What the last render laid out on one port, to patch it when only routes' contents changed."""

    entries: list[_Entry]  # sorted by _order: exact hosts, then patterns
    at: dict[str, int]  # route id -> index in entries
    routes: list[dict[str, Any]]  # the server's routes (the 404 fallback last)
    placement: Placement | None  # bucketed layouts: bucket -> (entry indices, route index)
    bucket: dict[int, int] = field(default_factory=dict)  # entry index -> its bucket (bucketed layouts)


def _shape(entries: list[_Entry]) -> list[tuple[Any, ...]]:
    """What decides where an ingress's routes go (and what else of the config they touch): port, hostname,
    route id, TLS, pattern, access log, path, the header of a request header auth (redacted in access logs),
    its error pages (in the server's error routes)."""
    return [(e.port, e.hostname, e.route_id, e.tls, e.pattern is not None, e.logger, e.rule.path_key,
             e.rule.header_auth[0] if e.rule.header_auth is not None else None, e.pages) for e in entries]


def _order(e: _Entry) -> tuple[int, int, int, str, tuple[int, int, str], str]:
    """Routes of a server: exact hosts first (by name), then patterns -- fewer captures first, then more
    labels (more specific), then by name; a host's (or pattern's) rules by path -- Exact, longer prefix,
    shorter, then none (Kubernetes' precedence); never by file order."""
    rank = path_rank(e.rule.path_key)
    if e.pattern is None:
        return (0, 0, 0, e.hostname, rank, e.route_id)
    stars, labels, wildcard = e.pattern
    return (1, stars, -labels, wildcard, rank, e.route_id)


class Renderer:
    """:func:`render` with a memory between passes (the output is the same as a fresh call's).

    What an accepted ingress renders to depends on its :class:`Ingress` alone (never on instances: they
    are data, answered by the responder), so it is kept by object identity (the invariant of
    :mod:`reconciler.memo`: each entry holds its object): unchanged ingresses (the very same objects, see
    :class:`reconciler.sources.inputs`) are not rendered again, and buckets whose members did not change are
    reused (shared, read-only dicts). The memory holds what the last render used, nothing older. An
    instance that moves, stops or starts gives the very same config object back.

    When the ingresses are last render's, position by position, except some whose routes go to the same
    ports, hostnames and ids (a changed target port or instance), the last config is patched:
    only the routes (flat ports) or buckets of those change, in new lists and dicts -- the last config
    stays as it was.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._memo: dict[int, tuple[Ingress, list[_Entry]]] = {}
        self._buckets: Buckets = {}
        self._given: tuple[Ingress, ...] = ()
        self._proxy = proxy_template(settings)
        self._ports: dict[int, _Port] = {}
        self._config: dict[str, Any] | None = None

    def _patch(self, desired: Desired) -> dict[str, Any] | None:
        """The last config with the changed ingresses' routes swapped in; None when a full render is needed."""
        config, given = self._config, tuple(r.ingress for r in desired.ingresses)
        if config is None or len(given) != len(self._given):
            return None
        swaps: list[tuple[Ingress, Ingress, list[_Entry]]] = []
        for new, old in zip(given, self._given, strict=True):
            if new is old:
                continue
            entries = self._memo_of(new)[1]
            if _shape(entries) != _shape(self._memo[id(old)][1]) or any(e.pattern for e in entries):
                return None
            swaps.append((old, new, entries))
        if not swaps:
            return config
        dirty: dict[int, set[int]] = {}  # port -> changed entry indices
        for old, new, entries in swaps:
            del self._memo[id(old)]
            self._memo[id(new)] = (new, entries)
            for entry in entries:
                port = self._ports[entry.port]
                i = port.at[entry.route_id]
                port.entries[i] = entry
                dirty.setdefault(entry.port, set()).add(i)
        servers = dict(config["apps"]["http"]["servers"])
        for number, changed in dirty.items():
            port = self._ports[number]
            routes = list(port.routes)
            if port.placement is None:
                for i in changed:
                    e = port.entries[i]
                    routes[i] = e.route if e.route is not None else _route(e.route_id, e.rule, self.settings)
            else:
                for k in {port.bucket[i] for i in changed}:
                    where, r = port.placement[k]
                    members = tuple(port.entries[i].member for i in where)
                    hit = self._buckets.get((number, k))
                    routes[r] = (hit[1] if hit is not None and hit[0] == members
                                 else bucket_route(number, k, members, self._proxy))
                    self._buckets[(number, k)] = (members, routes[r])
            port.routes = routes
            name = server_name(number)
            servers[name] = {**servers[name], "routes": routes}
        self._given = given
        apps = config["apps"]
        config = {**config, "apps": {**apps, "http": {**apps["http"], "servers": servers}}}
        self._config = config
        return config

    def _memo_of(self, ingress: Ingress) -> tuple[Ingress, list[_Entry]]:
        hit = self._memo.get(id(ingress))
        if hit is None or hit[0] is not ingress:
            hit = (ingress, self._entries(ingress))
        return hit

    def _entries(self, ingress: Ingress) -> list[_Entry]:
        name, zone, proxy = ingress.name, self.settings.dns_zone, self._proxy
        logger = name if logged(ingress.access_log, self.settings.access_logs) else None
        pages = ingress.error_pages
        out: list[_Entry] = []
        for index, r in enumerate(ingress.rules):
            rid = route_id(name, index)
            host = matcher_host(r.hostname)
            pattern = (host.split(".").count("*"), host.count(".") + 1, host) if host != r.hostname else None
            if (pattern is None and r.hold is None and r.path is None and not r.targets and r.health is None
                    and r.header_auth is None and r.basic_auth is None and not r.allow_ips and r.limits is None
                    and ingress.maintenance is None and not pages):
                dial, instance = upstream(r, zone)
                out.append(_Entry(r.port, host, rid, r, None, (host, dial, instance, None), r.tls, None, logger,
                                  pages))
            else:
                route = _route(rid, r, self.settings, ingress.maintenance, name if pages else None)
                out.append(_Entry(r.port, host, rid, r, route, member(host, route, proxy), r.tls, pattern, logger,
                                  pages))
            if r.tls and r.redirect_http:
                redirect = _redirect_route(name, index, host, r.port, r)
                out.append(_Entry(self.settings.http_port, host, redirect["@id"], r, redirect,
                                  member(host, redirect, proxy), False, pattern, logger))
        return out

    def __call__(self, desired: Desired) -> dict[str, Any]:
        patched = self._patch(desired)
        if patched is not None:
            return patched
        memo: dict[int, tuple[Ingress, list[_Entry]]] = {}
        by_port: dict[int, list[_Entry]] = {}
        for resolved in desired.ingresses:
            ingress = resolved.ingress
            hit = memo[id(ingress)] = self._memo_of(ingress)
            for entry in hit[1]:
                by_port.setdefault(entry.port, []).append(entry)
        servers: dict[str, Any] = {}
        buckets: Buckets = {}
        ports: dict[int, _Port] = {}
        for number in sorted(by_port):
            ports[number], servers[server_name(number)] = self._server(number, by_port[number], buckets)
        tls_hosts = {e.hostname for entries in by_port.values() for e in entries if e.tls and e.pattern is None}
        tls_patterns = {e.hostname for entries in by_port.values() for e in entries if e.tls and e.pattern}
        config: dict[str, Any] = {
            "admin": admin_block(self.settings),
            "storage": {"module": "file_system", "root": self.settings.storage_dir},
            "apps": self._apps(servers, tls_hosts, tls_patterns),
        }
        loggers = {e.logger for entries in by_port.values() for e in entries if e.logger is not None}
        secret_headers = {e.rule.header_auth[0] for entries in by_port.values() for e in entries
                          if e.rule.header_auth is not None}
        if loggers or secret_headers:
            config["logging"] = logging_block(self.settings, sorted(loggers), secret_headers)
        # all of the memory at once: a render that failed half-way leaves the last one whole
        given = tuple(r.ingress for r in desired.ingresses)
        self._memo, self._buckets, self._given, self._ports, self._config = memo, buckets, given, ports, config
        return config

    def _server(self, number: int, unsorted: list[_Entry], buckets: Buckets) -> tuple[_Port, dict[str, Any]]:
        """The server of one port: one route per rule, or (above the threshold) bucketed; the 404 last."""
        settings = self.settings
        entries = sorted(unsorted, key=_order)
        exact = [e for e in entries if e.pattern is None]
        placement: Placement | None = None
        if len(exact) <= settings.bucket_threshold:
            routes = [e.route if e.route is not None else _route(e.route_id, e.rule, settings) for e in exact]
        else:
            placement = {}
            routes = layout([(e.hostname, e.route) for e in exact], port=number, threshold=settings.bucket_threshold,
                            proxy=self._proxy, members=[e.member for e in exact], previous=self._buckets,
                            kept=buckets, placement=placement)
        routes += [e.route for e in entries[len(exact):] if e.route is not None]  # patterns: after every exact host
        global_pages = {status: (h, t) for status, h, t in settings.error_pages}
        routes.append(fallback_route(number, global_pages.get(404)))
        port = _Port(entries, {e.route_id: i for i, e in enumerate(entries)}, routes, placement,
                     {i: k for k, (where, _) in (placement or {}).items() for i in where})
        server: dict[str, Any] = {"listen": [join_hostport(settings.listen_address, number)], "routes": routes}
        if any(e.tls for e in entries):
            # certificates for the hosts of this server; our redirects only (no implicit :80 listener);
            # unknown SNI falls back to the first host's certificate so it still gets the 404
            server["automatic_https"] = {"disable_redirects": True}
            if exact:
                server["tls_connection_policies"] = [{"fallback_sni": exact[0].hostname}]
            else:
                server["tls_connection_policies"] = [{}]
            patterns = sorted({e.hostname for e in entries if e.tls and e.pattern is not None})
            if patterns:  # issued on demand, name by name (see _apps); never a wildcard order at start
                server["automatic_https"]["skip_certificates"] = patterns
        else:
            server["automatic_https"] = {"disable": True}
        own = {e.route_id.split(".")[1]: e.pages for e in entries if e.pages}  # (ingress.<name>.rule-<i>)
        server["errors"] = {"routes": error_routes(
            {s: p for s, p in global_pages.items() if s != 404},
            [(name, {s: (h, t) for s, h, t in pages}) for name, pages in sorted(own.items())])}
        if settings.trusted_proxies:  # their X-Forwarded-For names the client (allow_ips, access logs)
            server["trusted_proxies"] = {"source": "static", "ranges": list(settings.trusted_proxies)}
            # read X-Forwarded-For from the right, skipping trusted proxies: what a client wrote first is
            # never believed (a proxy appends the address it saw)
            server["trusted_proxies_strict"] = 1
        logged_hosts = {e.hostname: e.logger for e in entries if e.logger is not None}
        if logged_hosts:
            server["logs"] = server_logs(logged_hosts)
        return port, server

    def _apps(self, servers: dict[str, Any], tls_hosts: set[str], tls_patterns: set[str]) -> dict[str, Any]:
        settings = self.settings
        apps: dict[str, Any] = {
            "http": {"http_port": settings.http_port, "https_port": settings.https_port, "servers": servers},
        }
        if settings.traffic_metrics:
            # request counts, errors and latency per host; Caddy labels only the hosts of its host matchers
            # (others: "_other"), see reconciler.traffic
            apps["http"]["metrics"] = {"per_host": True}
        if tls_hosts or tls_patterns:
            the_issuer = issuer(settings.tls)
            wildcard = settings.listen_address in ("", "0.0.0.0", "::", "[::]")
            if the_issuer["module"] == "acme" and settings.tls.dns_provider is None and not wildcard:
                # Caddy's own HTTP-01/TLS-ALPN-01 solver listeners bind where our servers listen, not everywhere
                the_issuer = {**the_issuer, "challenges": {**the_issuer.get("challenges", {}),
                                                           "bind_host": settings.listen_address}}
            policies: list[dict[str, Any]] = []
            if tls_hosts:
                policies.append({"subjects": sorted(tls_hosts), "issuers": [the_issuer]})
            automation: dict[str, Any] = {"policies": policies}
            endpoint = settings.permission_endpoint
            if tls_patterns and endpoint is not None:
                # a pattern's hosts get certificates on demand, each name only when the reconciler says its
                # instance exists and TLS_ALLOWED_DOMAINS allows it (validation refuses patterns without it)
                policies.append({"subjects": sorted(tls_patterns), "issuers": [the_issuer], "on_demand": True})
                automation["on_demand"] = {"permission": {"module": "http", "endpoint": endpoint}}
            # catch-all: nothing ever falls back to Caddy's default public CAs
            policies.append({"issuers": [the_issuer]})
            apps["tls"] = {"automation": automation}
            if settings.tls.issuer == "internal":
                apps["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
        return apps




def render(desired: Desired, settings: Settings) -> dict[str, Any]:
    """``(ingresses, instances, settings) -> Caddy JSON`` as a dict; same input, same output."""
    return Renderer(settings)(desired)


class ConfigEncoder:
    """Compact JSON of rendered configs (byte for byte ``json.dumps(config, separators=(",", ":"))``) that
    reuses the encoded text of every route unchanged since the previous call. Rendered routes are shared,
    read-only objects (see :class:`Renderer`), so a route is known by identity: at 10k ingresses a one-file
    change re-encodes one bucket instead of the whole config, and the body is joined once."""

    def __init__(self) -> None:
        self._texts: IdentityMemo[Any, bytes] = IdentityMemo()

    def __call__(self, config: dict[str, Any]) -> bytes:
        servers = config.get("apps", {}).get("http", {}).get("servers")
        if not isinstance(servers, dict) or not servers:
            return compact(config).encode()
        texts = self._texts
        lists: dict[str, list[bytes]] = {}
        shallow = {}
        for name, server in servers.items():
            routes = server.get("routes") if isinstance(server, dict) else None
            if not isinstance(routes, list):
                shallow[name] = server
                continue
            marker = f"\x00routes:{len(lists)}\x00"  # encodes as "\u0000routes:N\u0000": never in real text
            parts = [texts.get(route, functools.partial(compact_bytes, route)) for route in routes]
            lists[json.dumps(marker)] = parts
            shallow[name] = {**server, "routes": marker}
        texts.round()
        http = {**config["apps"]["http"], "servers": shallow}
        skeleton = compact({**config, "apps": {**config["apps"], "http": http}})
        chunks: list[bytes] = []
        rest = skeleton
        for marker, parts in lists.items():
            before, _, rest = rest.partition(marker)
            chunks.append(before.encode())
            chunks.append(b"[")
            for i, part in enumerate(parts):
                if i:
                    chunks.append(b",")
                chunks.append(part)
            chunks.append(b"]")
        chunks.append(rest.encode())
        return b"".join(chunks)


def redact(config: Any) -> Any:
    """A copy of ``config`` with every secret value replaced by ``[REDACTED]`` (for printing/diffs): DNS
    credentials, and the values of header matchers (request header auth)."""
    if isinstance(config, dict):
        return {k: (REDACTED if k in SECRET_KEYS and isinstance(v, str) and v
                    else {h: [REDACTED for _ in vals] if isinstance(vals, list) else REDACTED for h, vals in v.items()}
                    if k == "header" and isinstance(v, dict) else redact(v))
                for k, v in config.items()}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def secret_values(desired: Desired) -> tuple[str, ...]:
    """The secrets the manifests put into a config: request header auth values, basic auth hashes."""
    out: list[str] = []
    for ri in desired.ingresses:
        for r in ri.ingress.rules:
            if r.header_auth is not None:
                out.append(r.header_auth[1])
            if r.basic_auth is not None:
                out.extend(h for _, h in r.basic_auth[1])
    # and as JSON (or Go) quotes them in a message: escaped
    escaped = [json.dumps(v)[1:-1] for v in out]
    escaped += [e.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026") for e in escaped]
    return tuple(dict.fromkeys([*out, *escaped]))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Remove secret values from free text (error messages that might echo a config)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def to_json(config: dict[str, Any]) -> str:
    """Canonical text form: sorted keys, two-space indent, trailing newline."""
    return json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
