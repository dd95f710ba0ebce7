"""Data model: sources, documents, ingresses, instances, problems. PURE: dataclasses only."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reconciler.parse import ParsedDocument

#: Namespace for ids derived from ingress names: the same name gives the same id everywhere.
INGRESS_ID_NAMESPACE = uuid.UUID("6f1c0f4e-5a52-4c8e-9a51-7f0d3c1e9b2a")
_NAMESPACE_BYTES = INGRESS_ID_NAMESPACE.bytes

RUNNING = "Running"


class Record:
    """Base of the records a forked parse helper sends back: pickled as a call of the constructor with
    the fields (~3x faster both ways than the default for frozen slotted dataclasses)."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return type(self), tuple(getattr(self, name) for name in self.__dataclass_fields__)  # type: ignore[attr-defined]


def derive_ingress_id(name: str) -> str:
    """Deterministic id of an ingress that does not carry one: ``str(uuid.uuid5(INGRESS_ID_NAMESPACE,
    name))``, computed without building UUID objects (RFC 4122 §4.3: SHA-1 of namespace + name, version
    and variant bits set), ~10x faster at 10k manifests."""
    b = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name.encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Reason(StrEnum):
    """Machine reasons of problems and ingress statuses (a ``str``: compared with and written as text)."""

    APPLIED = "Applied"
    PENDING = "Pending"
    INVALID_MANIFEST = "InvalidManifest"
    NAME_CONFLICT = "NameConflict"
    HOSTNAME_CONFLICT = "HostnameConflict"
    INSTANCE_NOT_FOUND = "InstanceNotFound"
    INSTANCE_NOT_RUNNING = "InstanceNotRunning"
    TLS_NOT_CONFIGURED = "TLSNotConfigured"
    DOMAIN_NOT_ALLOWED = "DomainNotAllowed"
    PORT_CONFLICT = "PortConflict"
    CERTIFICATE_PENDING = "CertificatePending"
    CERTIFICATE_FAILING = "CertificateFailing"
    CADDY_REJECTED = "CaddyRejected"
    INVALID_INSTANCE = "InvalidInstance"
    SOURCE_UNAVAILABLE = "SourceUnavailable"
    INSECURE_FILE = "InsecureFile"  # (problems only: a manifest holding a secret is readable by others)
    STALE = "Stale"
    TARGET_UNHEALTHY = "TargetUnhealthy"  # no target of a health-checked rule passes its checks
    PROGRESSING = "Progressing"  # a rule's new target is probed before traffic moves to it
    STALLED = "Stalled"  # ... and has not passed its health check by the deadline (the old one serves)
    INVALID_SETTINGS = "InvalidSettings"  # (validate: the TLS settings cannot work with this Caddy)
    REMOVED = "Removed"  # (log events only: an ingress no longer defined)


class CertificateState(StrEnum):
    """The state of a TLS hostname's certificate (see :mod:`reconciler.caddy.certs`)."""

    PENDING = "pending"
    ISSUED = "issued"
    FAILING = "failing"
    EXPIRED = "expired"


class Outcome(StrEnum):
    """How a pass ended."""

    APPLIED = "applied"
    UNCHANGED = "unchanged"
    PARTIAL = "partial"  # applied without the ingresses Caddy rejected
    REJECTED = "rejected"  # Caddy refused, and nothing could be applied
    UNAVAILABLE = "unavailable"  # Caddy's admin API did not answer: transient
    FAILED = "error"

    @property
    def converged(self) -> bool:
        """Caddy runs exactly the config the pass wanted (culprits excluded)."""
        return self in (Outcome.APPLIED, Outcome.UNCHANGED, Outcome.PARTIAL)


@dataclass(frozen=True, slots=True)
class Source(Record):
    """A manifest directory. ``index`` is its position; earlier sources win conflicts."""

    path: str
    index: int
    read_only: bool = True


@dataclass(frozen=True, slots=True)
class Origin(Record):
    """Where a document came from. Orders documents deterministically: source, relative path, index."""

    source_index: int
    relpath: str
    doc_index: int
    file: str
    line: int

    @property
    def sort_key(self) -> tuple[int, str, int]:
        return (self.source_index, self.relpath, self.doc_index)

    def describe(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed document tagged with its origin."""

    origin: Origin
    parsed: ParsedDocument

    @property
    def data(self) -> Any:
        return self.parsed.data


@dataclass(frozen=True, slots=True)
class Problem(Record):
    """Something wrong with the input, located at ``file:line``."""

    file: str
    line: int | None
    message: str
    reason: str = Reason.INVALID_MANIFEST
    ingress: str | None = None
    #: the ingress that won the conflict this problem is about (None: not a conflict)
    winner: str | None = None

    def format(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        return f"{where}: {self.message}"


@dataclass(frozen=True, slots=True)
class GoodFile:
    """The last valid content of one input file (kept so a file that turns invalid keeps serving)."""

    display: str
    digest: str
    text: str
    since: float  # wall-clock time it was first seen valid


PREFIX, EXACT = "Prefix", "Exact"
PATH_TYPES = (PREFIX, EXACT)


def path_rank(path_key: str) -> tuple[int, int, str]:
    """Where a rule of a host goes among the host's rules (Kubernetes' precedence, never file order):
    Exact paths first, then prefixes, longest first, then the host's catch-all (``""``)."""
    if not path_key:
        return (2, 0, "")
    if path_key.startswith("="):
        return (0, -len(path_key), path_key)
    return (1, -len(path_key), path_key)


def path_display(path_key: str) -> str:
    """A claim's path as messages and statuses show it: ``/api`` (prefix), ``/api (exact)``, or nothing."""
    return f"{path_key[1:]} (exact)" if path_key.startswith("=") else path_key


@dataclass(frozen=True, slots=True)
class Target(Record):
    """One target of a rule's pool (``targets``): an instance reference, its port, its share of requests."""

    instance: str
    port: int
    #: requests go to a target in proportion to its weight; 0: out of the pool (drained, e.g. a canary at 0)
    weight: int = 1


@dataclass(frozen=True, slots=True)
class HealthCheck(Record):
    """A rule's health checks (Caddy's ``health_checks``). Active: Caddy asks each target ``GET path``
    every ``interval`` (``timeout``), expecting ``expect_status`` (None: any 2xx); ``passes``/``fails``
    answers in a row make it healthy/unhealthy. Passive: ``passive_fails`` failed requests within
    ``passive_window`` take a target out for that long. ``cutover_deadline``: how long a changed target may
    take to pass before the change is reported Stalled (the old target serving on)."""

    path: str | None = None
    interval: str = "10s"
    timeout: str = "2s"
    expect_status: int | None = None
    passes: int = 1
    fails: int = 1
    passive_fails: int | None = None
    passive_window: str = "30s"
    cutover_deadline: str = "5m"

    @property
    def active(self) -> bool:
        return self.path is not None


@dataclass(frozen=True, slots=True)
class Limits(Record):
    """A rule's limits and timeouts (None: the defaults)."""

    max_body: int | None = None  # bytes of a request body (413 beyond)
    max_concurrent: int | None = None  # requests at once per target (503 beyond, after the hold)
    dial_timeout: str | None = None
    response_header_timeout: str | None = None
    read_timeout: str | None = None
    #: (requests, window): at most that many requests per client address per window (429 beyond); needs a
    #: Caddy with the rate_limit module
    rate_limit: tuple[int, str] | None = None


@dataclass(frozen=True, slots=True)
class Rule(Record):
    """One routing rule after defaults: (hostname, port) -> instance:target_port."""

    hostname: str
    port: int
    instance: str
    target_port: int
    tls: bool = False
    redirect_http: bool = False
    #: (duration, interval) a request waits for an unreachable instance; None: the settings' default
    hold: tuple[str, str] | None = None
    #: the request path this rule takes (None: every path, as a rule without ``match.path``); a Prefix is
    #: segment-bounded (``/api``: ``/api`` and ``/api/x``, never ``/apix``), stored without a trailing ``/``
    path: str | None = None
    #: ``Prefix`` or ``Exact`` (:data:`PATH_TYPES`)
    path_type: str = "Prefix"
    #: the matched prefix is removed from the path before the request is proxied
    strip_prefix: bool = False
    #: the manifest's ``targets`` (load balanced); empty for a rule with one ``target`` (``instance``,
    #: ``target_port``), which are the first target's otherwise
    targets: tuple[Target, ...] = ()
    #: the name of the cookie that keeps a client on one target of ``targets`` (None: not sticky)
    sticky_cookie: str | None = None
    #: the rule's health checks (None: none -- a pool still leaves a failed target out for a moment)
    health: HealthCheck | None = None
    #: (header, value): only requests carrying the header with exactly this value are proxied, without the
    #: header (hypeman's request header auth); the value is a secret: never in a repr, message or output
    header_auth: tuple[str, str] | None = field(default=None, repr=False)
    #: (realm, ((username, bcrypt hash), ...)): HTTP basic auth in front of the rule (None: none)
    basic_auth: tuple[str, tuple[tuple[str, str], ...]] | None = field(default=None, repr=False)
    #: the client addresses (CIDRs) the rule serves (empty: every client)
    allow_ips: tuple[str, ...] = ()
    limits: Limits | None = None

    @property
    def pattern(self) -> bool:
        """The hostname is a pattern (``{instance}.example.com``, see :mod:`reconciler.zone`)."""
        return "{" in self.hostname

    @property
    def pool(self) -> tuple[Target, ...]:
        """Every target of the rule (one for a rule with ``target``)."""
        return self.targets or (Target(self.instance, self.target_port),)

    @property
    def path_key(self) -> str:
        """What the rule claims of a host's paths: ``""`` (every path), ``/api`` (a prefix), ``=/api``
        (exactly that path)."""
        if self.path is None:
            return ""
        return f"={self.path}" if self.path_type == EXACT else self.path


@dataclass(frozen=True, slots=True)
class Maintenance(Record):
    """An ingress in maintenance: every request answers 503 with ``Retry-After`` and ``message``, but those
    for ``allow_path`` (a prefix: say its health path), which still reach the instance."""

    message: str = "This service is down for maintenance."
    retry_after: int | None = 300  # seconds (None: no Retry-After)
    allow_path: str | None = None


@dataclass(frozen=True, slots=True)
class Ingress(Record):
    name: str
    id: str
    rules: tuple[Rule, ...]
    origin: Origin
    created_at: str | None = None
    #: the manifest's ``access_log`` (None: not said; ``HYPEMAN_ACCESS_LOGS`` decides, see
    #: :func:`reconciler.accesslog.logged`)
    access_log: bool | None = None
    maintenance: Maintenance | None = None
    #: its own error pages: (status, HTML, text) for 502/503/504 (see :func:`reconciler.render.error_routes`)
    error_pages: tuple[tuple[int, str | None, str | None], ...] = ()


@dataclass(frozen=True, slots=True)
class Instance(Record):
    name: str
    id: str | None
    ip: str
    state: str
    origin: Origin

    @property
    def running(self) -> bool:
        return self.state == RUNNING


@dataclass(frozen=True, slots=True)
class Upstream:
    """The rule's instance is known and running: proxy to ``dial`` (a pool: its first running target's).
    ``down``: why each target of a pool left it (unknown or not running), while others serve."""

    dial: str
    down: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unavailable:
    """The rule's instance is unknown or not running: answer 503 with ``message``."""

    reason: str
    message: str


@dataclass(frozen=True, slots=True)
class ResolvedRule:
    rule: Rule
    index: int
    backend: Upstream | Unavailable


@dataclass(frozen=True, slots=True)
class ResolvedIngress:
    """An accepted ingress with every rule's backend resolved."""

    ingress: Ingress
    rules: tuple[ResolvedRule, ...]


@dataclass(frozen=True, slots=True)
class Desired:
    """Everything the renderer needs, plus the problems found on the way."""

    ingresses: tuple[ResolvedIngress, ...]
    problems: tuple[Problem, ...] = ()
    instances: Mapping[str, Instance] = field(default_factory=dict)
