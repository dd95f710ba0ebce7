"""Runtime settings with the seed's environment variable names and defaults. PURE."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.errors import ConfigError

DEFAULT_DATA_DIR = "/var/lib/hypeman"
DEFAULT_API_LISTEN = "127.0.0.1:8190"


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
    resync_interval: float = 30.0
    debounce: float = 0.1
    debounce_max: float = 1.0
    max_file_bytes: int = 1024 * 1024
    api_listen: str | None = DEFAULT_API_LISTEN
    #: bearer token required by the API when set (never shown: excluded from repr)
    api_token: str | None = field(default=None, repr=False)
    api_wait: float = 10.0
    api_max_body: int = 64 * 1024
    extra_env: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def admin_listen(self) -> str:
        host = self.admin_address
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.admin_port}"

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
        return os.path.join(self.data_dir, "caddy", "data")

    @property
    def state_dir(self) -> str:
        return os.path.join(self.data_dir, "state")

    @property
    def instances_path(self) -> str:
        return self.instances_dir or os.path.join(self.data_dir, "instances")

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: object) -> Settings:
        """Read the seed's variables (``CADDY_*``) and ours (``HYPEMAN_*``); ``overrides`` win (flags)."""
        values: dict[str, object] = {
            "data_dir": env.get("HYPEMAN_DATA_DIR") or DEFAULT_DATA_DIR,
            "listen_address": env.get("CADDY_LISTEN_ADDRESS") or "0.0.0.0",
            "admin_address": env.get("CADDY_ADMIN_ADDRESS") or "127.0.0.1",
            "admin_port": _int(env, "CADDY_ADMIN_PORT", 2019),
            "http_port": _int(env, "CADDY_HTTP_PORT", 80),
            "https_port": _int(env, "CADDY_HTTPS_PORT", 443),
            "stop_caddy_on_shutdown": _bool(env, "CADDY_STOP_ON_SHUTDOWN", False),
            "resync_interval": float(_int(env, "HYPEMAN_RESYNC_SECONDS", 30, 1, 86400)),
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
        listen = values.get("api_listen")
        if isinstance(listen, str):
            if listen.strip().lower() in ("", "off", "none", "disabled"):
                values["api_listen"] = None
            else:
                parse_listen(listen)
        return cls(**values)  # type: ignore[arg-type]
