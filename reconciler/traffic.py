"""Per-ingress traffic series from Caddy's own metrics: parse, keep, relabel, fold. PURE.

Caddy (``apps.http.metrics.per_host``, see :mod:`reconciler.render`) counts requests per *host* on its admin
endpoint ``/metrics``: ``caddy_http_requests_total``, ``caddy_http_request_errors_total`` (requests a handler
failed: an instance that could not be reached), ``caddy_http_request_duration_seconds`` (a histogram by
``code`` and ``method``) and ``caddy_http_requests_in_flight``, each with ``server``, ``handler`` and ``host``.
Only the routes of a server's top level are counted, once per route a request matched.

What Caddy puts in ``host``: the request's ``Host`` lower-cased (with a port, when the client sent one) when
it is a host of a server's host matchers, or any host on a TLS server; else ``_other`` (its cardinality
guard: made-up ``Host`` headers on plain HTTP do not create series). So a hostname pattern's hosts on a
plain-HTTP server count as ``_other``; on a TLS server each host is reported and is folded here into its
pattern.

:func:`relabel` keeps those four families, drops the series of the lower-casing route of bucketed servers
(handler ``headers``: it matches before the request's real route, so its requests are counted there) and
gives every series an ``ingress`` label from the (server, host) -> ingress map of the last pass
(:class:`HostMap`):
an exact host as it is, a pattern's host as the pattern's wildcard (``*.example.com``), anything else --
``_other``, a host no ingress has (any more) -- as ``host="_other", ingress="_other"``. Series that end up
with the same labels are added up (histograms bucket by bucket), so the output never has more series than
Caddy's for the same families, and no more hosts than the config has.

Caddy starts its counters again from 0 at every config load (a new registry per config): these are
counters all the same, and ``rate()``/``increase()`` handle the resets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from reconciler.layout import server_name
from reconciler.zone import is_pattern, parse_pattern

#: the families kept (name in Caddy's exposition -> type); request/response sizes and time to first byte
#: are left out: three more histograms per host would quadruple what each scrape parses
FAMILIES: Mapping[str, str] = {
    "caddy_http_requests_total": "counter",
    "caddy_http_request_errors_total": "counter",
    "caddy_http_request_duration_seconds": "histogram",
    "caddy_http_requests_in_flight": "gauge",
}
#: the ingress (and host) label of series no ingress owns
OTHER = "_other"
#: the handler of the routes that are no request's own (the lower-casing first route of a bucketed server)
SKIPPED_HANDLERS = frozenset({"headers"})

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = re.compile(r"\\(.)")


class Sample(NamedTuple):
    name: str  # the sample's name (a histogram's ``_bucket``, ``_sum``, ``_count``)
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass(slots=True)
class Family:
    """One metric family: its name (a counter's without ``_total``, as prometheus_client has it), help, type,
    and samples."""

    name: str
    help: str
    type: str
    samples: list[Sample]


def _family_of(sample: str) -> str | None:
    for suffix in ("_bucket", "_sum", "_count", ""):
        if sample.endswith(suffix) and sample[: len(sample) - len(suffix)] in FAMILIES:
            return sample[: len(sample) - len(suffix)]
    return None


def _labels(text: str) -> tuple[tuple[str, str], ...] | None:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            return None
        out.append((m.group(1), _UNESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1), m.group(2))))
        pos = m.end()
    return tuple(out)


def parse(text: str) -> dict[str, tuple[str, list[Sample]]]:
    """The kept families of a Prometheus text exposition (format 0.0.4): name -> (help, samples). Lines of
    other families are skipped without parsing them; a line that cannot be read is skipped."""
    prefixes = tuple(FAMILIES)
    helps: dict[str, str] = {}
    out: dict[str, tuple[str, list[Sample]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            if name in FAMILIES:
                helps[name] = doc.replace("\\n", "\n").replace("\\\\", "\\")
            continue
        if not line.startswith(prefixes):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        family = _family_of(m.group(1))
        labels = _labels(m.group(2) or "")
        if family is None or labels is None:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.setdefault(family, ("", []))[1].append(Sample(m.group(1), labels, value))
    return {name: (helps.get(name, ""), samples) for name, (_, samples) in out.items()}


class _Resolved(Protocol):
    """What the map needs of a resolved ingress (:class:`reconciler.model.ResolvedIngress`)."""

    @property
    def ingress(self) -> _Ingress: ...


class _Ingress(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def rules(self) -> Iterable[_Rule]: ...


class _Rule(Protocol):
    @property
    def hostname(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def tls(self) -> bool: ...
    @property
    def redirect_http(self) -> bool: ...


class HostMap:
    """(server, host) -> (ingress, host label) of a set of resolved ingresses: exact hosts by name, patterns
    by their wildcard (fewer ``*`` first, as Caddy's routes try them). Keyed by Caddy's server (one per
    port, :func:`reconciler.layout.server_name`) as well: a hostname is unique per port only, so one name on
    two ports may belong to two ingresses. A TLS rule with ``redirect_http`` also owns its host on the HTTP
    port (``http_port``: its redirect route)."""

    def __init__(self, ingresses: Iterable[_Resolved], *, http_port: int = 80) -> None:
        self.exact: dict[tuple[str, str], str] = {}
        patterns: list[tuple[int, str, str, tuple[str, ...], str]] = []
        for resolved in ingresses:
            ing = resolved.ingress
            for rule in ing.rules:
                host = rule.hostname.lower()
                servers = [server_name(rule.port)]
                if rule.tls and rule.redirect_http:
                    servers.append(server_name(http_port))
                if is_pattern(host):
                    parsed = parse_pattern(host)
                    if isinstance(parsed, str):
                        continue
                    labels = tuple(parsed.wildcard.split("."))
                    patterns += [(parsed.stars, parsed.wildcard, server, labels, ing.name) for server in servers]
                else:
                    for server in servers:
                        self.exact.setdefault((server, host), ing.name)
        patterns.sort(key=lambda p: (p[0], p[1]))
        self.patterns = [(server, wildcard, labels, name) for _, wildcard, server, labels, name in patterns]
        self._seen: dict[tuple[str, str], tuple[str, str]] = {}

    def lookup(self, host: str, server: str) -> tuple[str, str]:
        """(ingress, host label) of the ``host`` label Caddy reported on ``server``; ``(_other, _other)``
        when no ingress has it there."""
        key = (server, host)
        hit = self._seen.get(key)
        if hit is not None:
            return hit
        bare = _strip_port(host).rstrip(".").lower()
        name = self.exact.get((server, bare))
        out = (name, bare) if name is not None else (OTHER, OTHER)
        if name is None and bare != OTHER:
            given = bare.split(".")
            for where, wildcard, labels, owner in self.patterns:
                if where == server and len(labels) == len(given) and all(
                        w == "*" or w == g for w, g in zip(labels, given, strict=True)):
                    out = (owner, wildcard)
                    break
        if len(self._seen) < 100_000:  # (bounded: hosts come from requests)
            self._seen[key] = out
        return out


def _strip_port(host: str) -> str:
    if host.startswith("["):  # [v6]:port
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def relabel(parsed: Mapping[str, tuple[str, list[Sample]]], hosts: HostMap) -> list[Family]:
    """The kept families with an ``ingress`` label (see the module's docstring), series of equal labels
    added up; families in :data:`FAMILIES` order, samples in a stable order."""
    out: list[Family] = []
    for family, kind in FAMILIES.items():
        if family not in parsed:
            continue
        doc, samples = parsed[family]
        folded: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for sample in samples:
            labels = dict(sample.labels)
            if "host" not in labels or labels.get("handler") in SKIPPED_HANDLERS:
                continue
            ingress, host = hosts.lookup(labels["host"], labels.get("server", ""))
            labels["host"] = host
            labels["ingress"] = ingress
            key = (sample.name, tuple(labels.items()))
            folded[key] = folded.get(key, 0.0) + sample.value
        name = family.removesuffix("_total") if kind == "counter" else family
        out.append(Family(name, doc, kind, [Sample(n, labels, v) for (n, labels), v in folded.items()]))
    return out
