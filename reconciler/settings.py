"""Runtime settings, with hypeman's environment variable names and defaults. PURE."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from reconciler.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/hypeman"
#: the DNS zone of instance names (see reconciler.zone)
DEFAULT_ZONE = "hypeman.internal"
DEFAULT_API_LISTEN = "127.0.0.1:8190"


def join_hostport(host: str, port: int) -> str:
    """``HOST:PORT``, an IPv6 host bracketed (the inverse of :func:`parse_listen`)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen address {value!r} must be HOST:PORT")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"listen address {value!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ConfigError(f"listen address {value!r}: port out of range")
    return host.strip("[]"), number


def _int(env: Mapping[str, str], key: str, default: int, lo: int = 1, hi: int = 65535) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{key}={value} is out of range {lo}..{hi}")
    return value


def _seconds(env: Mapping[str, str], key: str, default: float, lo: float = 0.0, hi: float = 3600.0) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a number of seconds") from None
    if not lo <= value <= hi:  # also refuses nan
        raise ConfigError(f"{key}={value} is out of range {lo:g}..{hi:g}")
    return value


def _absolute(env: Mapping[str, str], key: str) -> str | None:
    raw = (env.get(key) or "").strip()
    if not raw:
        return None
    if not os.path.isabs(raw):
        raise ConfigError(f"{key}={raw!r} is not an absolute path")
    return os.path.normpath(raw)


#: a node name: what a host name (or a Kubernetes node name, ``spec.nodeName``) may hold; it labels
#: metrics and status
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


def _node_name(env: Mapping[str, str]) -> str | None:
    raw = (env.get("HYPEMAN_NODE_NAME") or "").strip()
    if not raw:
        return None
    if not _NODE_NAME.match(raw):
        raise ConfigError(f"HYPEMAN_NODE_NAME={raw!r} is not a node name (letters, digits, '.', '_', '-'; "
                          "at most 253 characters)")
    return raw


def _bool(env: Mapping[str, str], key: str, default: bool) -> bool:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}={raw!r} is not a boolean (true/false)")


_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h|d))+$")
#: a hold / dial duration: one number and a unit (Caddy's ``time.ParseDuration`` reads it as is)
HOLD_DURATION = re.compile(r"^(\d{1,6}(\.\d{1,3})?)(ms|s|m)$")
#: the longest hold a rule or the settings may ask for
HOLD_MAX_SECONDS = 600.0
DNS_PROVIDERS = ("cloudflare", "route53")
CHALLENGES = ("http-01", "tls-alpn-01")


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """Where certificates for ``tls: true`` rules come from. ``issuer`` None means TLS is not configured."""

    issuer: str | None = None  # "acme" | "internal"
    acme_email: str | None = None
    acme_ca: str | None = None  # ACME directory URL; None = Caddy's default (Let's Encrypt production)
    acme_ca_root: str | None = None  # PEM file with the root of a private/staging ACME CA to trust
    challenges: tuple[str, ...] = CHALLENGES
    dns_provider: str | None = None
    cloudflare_api_token: str | None = field(default=None, repr=False)
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_region: str = "us-east-1"
    aws_hosted_zone_id: str | None = None
    dns_propagation_timeout: str | None = None
    dns_propagation_delay: str | None = None
    dns_resolvers: tuple[str, ...] = ()
    #: None (TLS_ALLOWED_DOMAINS unset) = any hostname may use TLS; () (set but empty) = none may
    allowed_domains: tuple[str, ...] | None = None

    @property
    def secrets(self) -> tuple[str, ...]:
        """Secret values, for scrubbing text that might echo them."""
        values = (self.cloudflare_api_token, self.aws_access_key_id, self.aws_secret_access_key)
        return tuple(v for v in values if v)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TLSSettings:
        def get(key: str) -> str | None:
            value = env.get(key, "").strip()
            return value or None

        issuer, email = _issuer(get)
        provider = _dns_provider(get, issuer)
        # unset: any hostname may use TLS; set, even to nothing: only those listed (none when empty)
        domains = env.get("TLS_ALLOWED_DOMAINS")
        return cls(
            issuer=issuer, acme_email=email, acme_ca=get("ACME_CA"),
            acme_ca_root=get("ACME_CA_ROOT"), challenges=_challenges(get),
            dns_provider=provider, cloudflare_api_token=get("CLOUDFLARE_API_TOKEN"),
            aws_access_key_id=get("AWS_ACCESS_KEY_ID"), aws_secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
            aws_region=get("AWS_REGION") or "us-east-1", aws_hosted_zone_id=get("AWS_HOSTED_ZONE_ID"),
            dns_propagation_timeout=_duration(get, "ACME_DNS_PROPAGATION_TIMEOUT"),
            dns_propagation_delay=_duration(get, "ACME_DNS_PROPAGATION_DELAY"),
            dns_resolvers=tuple(r.strip() for r in (get("ACME_DNS_RESOLVERS") or "").split(",") if r.strip()),
            allowed_domains=(tuple(d.strip().lower() for d in domains.split(",") if d.strip())
                             if domains is not None else None),
        )


Get = Callable[[str], "str | None"]


def _issuer(get: Get) -> tuple[str | None, str | None]:
    """(issuer, ACME contact): ``TLS_ISSUER``, or ACME when only ``ACME_EMAIL`` is set."""
    issuer = (get("TLS_ISSUER") or "").lower() or None
    email = get("ACME_EMAIL")
    if issuer is None and email:
        issuer = "acme"
    if issuer not in (None, "acme", "internal"):
        raise ConfigError(f"TLS_ISSUER={issuer!r}: expected 'acme' or 'internal'")
    if issuer == "acme" and not email:
        raise ConfigError("TLS_ISSUER=acme needs ACME_EMAIL (the ACME account contact)")
    return issuer, email


def _dns_provider(get: Get, issuer: str | None) -> str | None:
    provider = (get("ACME_DNS_PROVIDER") or "").lower() or None
    if provider is None:
        return None
    if provider not in DNS_PROVIDERS:
        raise ConfigError(f"ACME_DNS_PROVIDER={provider!r}: expected one of {', '.join(DNS_PROVIDERS)}")
    if issuer != "acme":
        raise ConfigError("ACME_DNS_PROVIDER only applies to ACME (set ACME_EMAIL, or unset ACME_DNS_PROVIDER "
                          "when TLS_ISSUER=internal)")
    if provider == "cloudflare" and not get("CLOUDFLARE_API_TOKEN"):
        raise ConfigError("ACME_DNS_PROVIDER=cloudflare needs CLOUDFLARE_API_TOKEN")
    if provider == "route53" and bool(get("AWS_ACCESS_KEY_ID")) != bool(get("AWS_SECRET_ACCESS_KEY")):
        raise ConfigError("ACME_DNS_PROVIDER=route53: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                          "or neither (then the AWS default credential chain is used)")
    return provider


def _challenges(get: Get) -> tuple[str, ...]:
    challenges = tuple(c.strip().lower() for c in (get("ACME_CHALLENGES") or ",".join(CHALLENGES)).split(",")
                       if c.strip())
    if not challenges or any(c not in CHALLENGES for c in challenges):
        raise ConfigError(f"ACME_CHALLENGES: expected a comma list of {', '.join(CHALLENGES)}")
    return challenges


def _duration(get: Get, key: str) -> str | None:
    value = get(key)
    if value is not None and value != "-1" and not _DURATION.match(value):
        raise ConfigError(f"{key}={value!r} is not a duration (e.g. 2m, 30s)")
    return value


def hold_seconds(text: str) -> float | None:
    """Seconds of a hold duration (``"5s"``, ``"250ms"``, ``"1.5m"``), None when it is not one or is longer
    than :data:`HOLD_MAX_SECONDS`."""
    m = HOLD_DURATION.match(text)
    if m is None:
        return None
    value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(3)]
    return value if value <= HOLD_MAX_SECONDS else None


_DURATION = re.compile(r"^([0-9]{1,6}(\.[0-9]{1,3})?)(ms|s|m|h)$")


def duration_seconds(text: str) -> float | None:
    """Seconds of a manifest's duration (``"250ms"``, ``"10s"``, ``"5m"``, ``"1h"``), None when it is not one."""
    m = _DURATION.match(text)
    if m is None:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[m.group(3)]


def _hold(env: Mapping[str, str], key: str, default: str) -> str:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if hold_seconds(raw) is None:
        raise ConfigError(f"{key}={raw!r} is not a duration of at most {HOLD_MAX_SECONDS:g}s "
                          "(a number and ms, s or m: 5s, 250ms)")
    return raw


def _interval(env: Mapping[str, str]) -> str:
    value = _hold(env, "HYPEMAN_HOLD_INTERVAL", "250ms")
    if hold_seconds(value) == 0:
        raise ConfigError("HYPEMAN_HOLD_INTERVAL must be more than 0 (a request is tried again every interval)")
    return value


def _zone(env: Mapping[str, str]) -> str:
    raw = (env.get("HYPEMAN_DNS_ZONE") or DEFAULT_ZONE).lower().rstrip(".")
    labels = raw.split(".")
    if len(raw) > 200 or not all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", x) for x in labels):
        raise ConfigError(f"HYPEMAN_DNS_ZONE={raw!r} is not a DNS name (e.g. hypeman.internal)")
    return raw


#: ``HYPEMAN_ACCESS_LOGS``: no access logs; only ingresses whose manifest says ``access_log: true``; every
#: ingress unless its manifest says ``access_log: false`` (see reconciler.render: Caddy's cost per request
#: grows with the number of logged hosts, so at scale logs are chosen ingress by ingress)
ACCESS_LOG_MODES = ("off", "opt-in", "all")
#: request headers that carry credentials besides the ones Caddy already redacts (Authorization,
#: Proxy-Authorization, Cookie, Set-Cookie); ``HYPEMAN_ACCESS_LOG_REDACT_HEADERS`` adds to them
REDACTED_HEADERS = ("X-Api-Key", "Api-Key", "X-Auth-Token", "X-Access-Token", "X-Amz-Security-Token",
                    "X-Csrf-Token", "X-Xsrf-Token", "Private-Token", "X-Goog-Api-Key", "X-Vault-Token",
                    "Proxy-Authorization", "Authorization", "Cookie", "Set-Cookie")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")


def canonical_header(name: str) -> str:
    """Go's canonical form of a header name (how Caddy's access log keys its headers): ``x-api-key`` ->
    ``X-Api-Key``."""
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def _access_logs(env: Mapping[str, str]) -> str:
    raw = (env.get("HYPEMAN_ACCESS_LOGS") or "opt-in").strip().lower()
    if raw not in ACCESS_LOG_MODES:
        raise ConfigError(f"HYPEMAN_ACCESS_LOGS={raw!r}: expected one of {', '.join(ACCESS_LOG_MODES)}")
    return raw


def _redact_headers(env: Mapping[str, str]) -> tuple[str, ...]:
    extra = [h.strip() for h in (env.get("HYPEMAN_ACCESS_LOG_REDACT_HEADERS") or "").split(",") if h.strip()]
    for name in extra:
        if not _HEADER_NAME.match(name):
            raise ConfigError(f"HYPEMAN_ACCESS_LOG_REDACT_HEADERS: {name!r} is not a header name")
    return tuple(dict.fromkeys(canonical_header(h) for h in (*REDACTED_HEADERS, *extra)))


def _trusted_proxies(env: Mapping[str, str]) -> tuple[str, ...]:
    """``HYPEMAN_TRUSTED_PROXIES``: the proxies (IPs or CIDRs, comma-separated) whose ``X-Forwarded-For`` is
    believed for a client's address (``allow_ips``, access logs); none by default: the connection's peer."""
    out = []
    for item in (env.get("HYPEMAN_TRUSTED_PROXIES") or "").replace(" ", ",").split(","):
        if not item:
            continue
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ConfigError(f"HYPEMAN_TRUSTED_PROXIES: {item!r} is not an IP address or CIDR range") from None
    return tuple(dict.fromkeys(out))


def domain_allowed(hostname: str, patterns: tuple[str, ...] | None) -> bool:
    """``TLS_ALLOWED_DOMAINS``: exact names, ``*.example.com`` = exactly one label, ``*`` = any; unset
    (None) allows every hostname, set but empty allows none (as hypeman)."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern == "*" or pattern == hostname:
            return True
        if pattern.startswith("*."):
            label, _, rest = hostname.partition(".")
            if label and rest == pattern[2:]:
                return True
    return False


#: the API's path Caddy asks before it obtains a certificate for a host of a TLS pattern
PERMISSION_PATH = "/internal/tls/permission"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable. Build with :meth:`from_env` or directly in tests."""

    data_dir: str = DEFAULT_DATA_DIR
    manifest_dirs: tuple[str, ...] = ()
    instances_dir: str | None = None
    listen_address: str = "0.0.0.0"
    admin_address: str = "127.0.0.1"
    admin_port: int = 2019
    http_port: int = 80
    https_port: int = 443
    stop_caddy_on_shutdown: bool = False
    #: a Caddy that dies sooner than this after its start counts as a failed start (restarts back off)
    caddy_stable_after: float = 30.0
    #: how long a Caddy start may take to answer on its admin API before it is killed and retried
    caddy_start_timeout: float = 30.0
    resync_interval: float = 30.0
    debounce: float = 0.1
    #: quiet period when the burst so far touched at most 3 paths (a single file saved)
    debounce_quick: float = 0.01
    debounce_max: float = 1.0
    max_file_bytes: int = 1024 * 1024
    api_listen: str | None = DEFAULT_API_LISTEN
    #: bearer token required by the API when set (never shown: excluded from repr)
    api_token: str | None = field(default=None, repr=False)
    #: how long POST/DELETE wait for the pass that applies them (then 202 with the current status); 0: never
    api_wait: float = 10.0
    api_max_body: int = 64 * 1024
    tls: TLSSettings = field(default_factory=TLSSettings)
    #: above this many routes on one port, hosts are bucketed (see reconciler.layout)
    bucket_threshold: int = 256
    #: the DNS responder (see reconciler.responder): where it answers and the zone of instance names
    dns_address: str = "127.0.0.1"
    dns_port: int = 5354
    dns_zone: str = DEFAULT_ZONE
    #: how long a request waits for an instance that does not answer (restarting) before its 503, and how
    #: often the dial is tried meanwhile (Caddy's load_balancing try_duration / try_interval); per rule: hold
    hold: str = "5s"
    hold_interval: str = "250ms"
    #: Caddy's dial timeout towards instances, DNS lookup included (a hung responder costs at most this)
    dial_timeout: str = "2s"
    #: keep upstream connections open between requests (faster, but a pooled connection keeps the address
    #: it was opened to: an instance that stops or moves still gets requests on it until it breaks)
    upstream_keepalive: bool = False
    #: how long websockets and other upgraded streams survive a config load (Caddy closes them at once
    #: otherwise; "0s": at once)
    stream_close_delay: str = "5m"
    #: fleet mode: one of several nodes fed by one git source -- the manifests come from ``--manifests``
    #: only (no API-owned dir) and the API is read-only (writes go to git)
    fleet: bool = False
    #: where Caddy keeps certificates, ACME accounts and locks (its ``file_system`` storage); None:
    #: ``{data}/caddy/data``. In a fleet, one directory every node mounts, so that one node orders each
    #: certificate (the others wait on its lock in the storage) and every node serves it
    tls_storage_dir: str | None = None
    #: this node's name in ``/status`` and metrics (None: the host name, looked up by the daemon)
    node_name: str | None = None
    #: Caddy counts requests per host (``apps.http.metrics.per_host``) and our /metrics serves them with an
    #: ``ingress`` label (see reconciler.traffic)
    traffic_metrics: bool = True
    #: which ingresses get a JSON access log file of their own (:data:`ACCESS_LOG_MODES`)
    access_logs: str = "opt-in"
    #: rotation of each access log file: roll at this size, keep this many rolled files, for this many days
    access_log_roll_mb: int = 100
    access_log_roll_keep: int = 5
    access_log_roll_keep_days: int = 14
    #: request and response headers whose values never reach an access log (canonical names)
    access_log_redact_headers: tuple[str, ...] = REDACTED_HEADERS
    #: proxies whose X-Forwarded-For is believed (CIDRs); empty: a client is the connection's peer
    trusted_proxies: tuple[str, ...] = ()
    #: the modules of the Caddy binary (set by the composition roots from ``caddy list-modules``; None:
    #: unknown -- a rule needing a non-standard module is refused)
    caddy_modules: frozenset[str] | None = None
    #: the operator's error pages: a directory of ``404.html``, ``503.txt``... (read at start)
    error_pages_dir: str | None = None
    #: their contents, (status, HTML, text) (set by the composition roots from ``error_pages_dir``)
    error_pages: tuple[tuple[int, str | None, str | None], ...] = ()

    @property
    def access_log_dir(self) -> str:
        return os.path.join(self.data_dir, "logs", "access")

    @property
    def admin_listen(self) -> str:
        return join_hostport(self.admin_address, self.admin_port)

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin_listen}"

    @property
    def api_dir(self) -> str:
        return os.path.join(self.data_dir, "ingresses")

    @property
    def caddy_dir(self) -> str:
        return os.path.join(self.data_dir, "caddy")

    @property
    def storage_dir(self) -> str:
        return self.tls_storage_dir or os.path.join(self.data_dir, "caddy", "data")

    @property
    def shared_storage(self) -> bool:
        """The certificate storage is outside the data dir (say, a mount shared by a fleet)."""
        return self.tls_storage_dir is not None

    @property
    def state_dir(self) -> str:
        return os.path.join(self.data_dir, "state")

    @property
    def dns_dir(self) -> str:
        return os.path.join(self.data_dir, "dns")

    @property
    def dns_listen(self) -> str:
        return join_hostport(self.dns_address, self.dns_port)

    @property
    def permission_endpoint(self) -> str | None:
        """The URL Caddy asks for on-demand certificates (the API's listener; None when the API is off)."""
        if self.api_listen is None:
            return None
        host, port = parse_listen(self.api_listen)
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://{join_hostport(host, port)}{PERMISSION_PATH}"

    @property
    def instances_path(self) -> str:
        return self.instances_dir or os.path.join(self.data_dir, "instances")

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> Settings:
        """Read hypeman's variables (``CADDY_*``) and ours (``HYPEMAN_*``); ``overrides`` win (flags)."""
        values: dict[str, object] = {
            "data_dir": env.get("HYPEMAN_DATA_DIR") or DEFAULT_DATA_DIR,
            "listen_address": env.get("CADDY_LISTEN_ADDRESS") or "0.0.0.0",
            "admin_address": env.get("CADDY_ADMIN_ADDRESS") or "127.0.0.1",
            "admin_port": _int(env, "CADDY_ADMIN_PORT", 2019),
            "http_port": _int(env, "CADDY_HTTP_PORT", 80),
            "https_port": _int(env, "CADDY_HTTPS_PORT", 443),
            "stop_caddy_on_shutdown": _bool(env, "CADDY_STOP_ON_SHUTDOWN", False),
            "caddy_stable_after": _seconds(env, "HYPEMAN_CADDY_STABLE_SECONDS", 30.0, 0.1, 3600.0),
            "caddy_start_timeout": _seconds(env, "HYPEMAN_CADDY_START_TIMEOUT", 30.0, 0.5, 600.0),
            "resync_interval": float(_int(env, "HYPEMAN_RESYNC_SECONDS", 30, 1, 86400)),
            "tls": TLSSettings.from_env(env),
            "bucket_threshold": _int(env, "HYPEMAN_BUCKET_THRESHOLD", 256, 0, 10_000_000),
            "api_wait": _seconds(env, "INGRESS_API_WAIT", 10.0, 0.0, 600.0),
            "dns_address": env.get("HYPEMAN_DNS_ADDRESS") or "127.0.0.1",
            "dns_port": _int(env, "HYPEMAN_DNS_PORT", 5354),
            "dns_zone": _zone(env),
            "hold": _hold(env, "HYPEMAN_HOLD", "5s"),
            "hold_interval": _interval(env),
            "dial_timeout": _hold(env, "HYPEMAN_DIAL_TIMEOUT", "2s"),
            "upstream_keepalive": _bool(env, "HYPEMAN_UPSTREAM_KEEPALIVE", False),
            "stream_close_delay": _hold(env, "HYPEMAN_STREAM_CLOSE_DELAY", "5m"),
            "fleet": _bool(env, "HYPEMAN_FLEET", False),
            "tls_storage_dir": _absolute(env, "HYPEMAN_TLS_STORAGE_DIR"),
            "node_name": _node_name(env),
            "traffic_metrics": _bool(env, "HYPEMAN_TRAFFIC_METRICS", True),
            "access_logs": _access_logs(env),
            "access_log_roll_mb": _int(env, "HYPEMAN_ACCESS_LOG_ROLL_MB", 100, 1, 100_000),
            "access_log_roll_keep": _int(env, "HYPEMAN_ACCESS_LOG_ROLL_KEEP", 5, 1, 10_000),
            "access_log_roll_keep_days": _int(env, "HYPEMAN_ACCESS_LOG_ROLL_KEEP_DAYS", 14, 1, 36_500),
            "access_log_redact_headers": _redact_headers(env),
            "trusted_proxies": _trusted_proxies(env),
            "error_pages_dir": _absolute(env, "HYPEMAN_ERROR_PAGES_DIR"),
        }
        if env.get("HYPEMAN_API_LISTEN"):
            values["api_listen"] = env["HYPEMAN_API_LISTEN"]
        if env.get("INGRESS_API_TOKEN"):
            values["api_token"] = env["INGRESS_API_TOKEN"]
        if env.get("HYPEMAN_INSTANCES_DIR"):
            values["instances_dir"] = env["HYPEMAN_INSTANCES_DIR"]
        if env.get("HYPEMAN_MANIFESTS"):
            values["manifest_dirs"] = tuple(p for p in env["HYPEMAN_MANIFESTS"].split(os.pathsep) if p)
        values.update({k: v for k, v in overrides.items() if v is not None})
        wait = values.get("api_wait")
        if isinstance(wait, (int, float)) and not 0.0 <= wait <= 600.0:  # a flag: same range as the env
            raise ConfigError(f"--api-wait {wait} is out of range 0..600")
        listen = values.get("api_listen")
        if isinstance(listen, str):
            if listen.strip().lower() in ("", "off", "none", "disabled"):
                values["api_listen"] = None
            else:
                parse_listen(listen)
        settings = cls(**values)  # type: ignore[arg-type]
        fleet_problem = settings.fleet_problem()
        if fleet_problem:
            raise ConfigError(fleet_problem)
        return settings

    def fleet_problem(self) -> str | None:
        """Why these settings cannot run a fleet node (None: they can, or this is no fleet node)."""
        if not self.fleet:
            return None
        if not self.manifest_dirs:
            return ("HYPEMAN_FLEET=true needs a manifest source (--manifests or HYPEMAN_MANIFESTS: the git "
                    "checkout every node reads); a fleet node has no API-owned manifest dir")
        if self.tls.issuer == "acme" and self.tls_storage_dir is None:
            return ("HYPEMAN_FLEET=true with ACME_EMAIL set needs HYPEMAN_TLS_STORAGE_DIR: a directory every "
                    "node mounts, so that one node orders each certificate and every node serves it (without "
                    "it, every node would order its own)")
        return None
