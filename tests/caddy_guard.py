"""Suite-wide guard: no Caddy config the tests push may let Caddy reach a public ACME CA.

Caddy's defaults are dangerous (README, "TLS"): an automation policy without ``issuers``, an ``acme`` issuer
without ``ca`` (Let's Encrypt production) or a server with host matchers whose automatic HTTPS is on and
whose hosts no policy covers all end at Let's Encrypt or ZeroSSL. :func:`check_config` refuses a config
unless every issuer it names is Caddy's ``internal`` CA or an ``acme`` CA on loopback, every host Caddy
would manage a certificate for is covered by such a policy, and a config with anything TLS in it sets
``http_port`` and ``https_port`` explicitly. :func:`check_log` looks at what a Caddy actually did: a log
record naming a CA or an issuer that is not local fails too (a config pushed by a path the hooks do not
see is caught there).

Hooked where configs reach a real Caddy in tests: :meth:`tests.helpers.CaddyProcess.load` (before the
push), :meth:`tests.helpers.CaddyProcess.stop` (its live config and log) and
:meth:`tests.helpers.Daemon.cleanup` (``{data}/caddy/config.json``, the last config the daemon applied,
and Caddy's log). A violation raises :class:`PublicCAError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: issuer storage keys (CertMagic's ``issuerKey``) of a local CA: Caddy's internal one, or ACME on loopback
#: (in the log ``127.0.0.1:14000-dir``, in the storage ``127.0.0.1-14000-dir``)
_LOCAL_ISSUER_KEY = re.compile(r"^(local|(127\.0\.0\.1|localhost|\[?::1\]?)([:-].*)?)$")
_PUBLIC_NAMES = ("letsencrypt.org", "zerossl.com", "api.pki.goog", "buypass")


class PublicCAError(AssertionError):
    """A test config or a test Caddy could reach a public CA."""


def is_loopback_url(url: str) -> bool:
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and host.lower() in LOOPBACK_HOSTS


def _listen_ports(server: Mapping[str, Any]) -> list[int | None]:
    """The ports of a server's listen addresses (None for one that cannot be read: counted as not HTTP)."""
    out: list[int | None] = []
    for addr in server.get("listen") or []:
        text = str(addr)
        if text.startswith("unix"):
            out.append(None)
            continue
        port = text.rsplit(":", 1)[-1] if ":" in text else ""
        lo, _, hi = port.partition("-")
        if lo.isdigit() and (not hi or hi == lo):
            out.append(int(lo))
        else:
            out.append(None)
    return out


def _hosts(server: Mapping[str, Any]) -> Iterator[str]:
    """Host matcher values of the server's top-level routes (those Caddy's automatic HTTPS looks at)."""
    for route in server.get("routes") or []:
        for match in route.get("match") or []:
            yield from (str(h) for h in match.get("host") or [])


def _covered(host: str, subjects: set[str]) -> bool:
    if host.lower() in subjects:
        return True
    labels = host.lower().split(".")
    return len(labels) > 1 and "*." + ".".join(labels[1:]) in subjects


def config_risks(config: Mapping[str, Any]) -> list[str]:
    """Why ``config`` could make Caddy reach a public CA (empty when it cannot)."""
    risks: list[str] = []
    apps = config.get("apps") or {}
    tls = apps.get("tls") or {}
    http = apps.get("http") or {}
    servers: Mapping[str, Any] = http.get("servers") or {}
    policies = list((tls.get("automation") or {}).get("policies") or [])
    for i, policy in enumerate(policies):
        where = f"apps.tls.automation.policies[{i}]"
        issuers = policy.get("issuers")
        if not issuers:
            risks.append(f"{where} has no issuers: Caddy would use its default public CAs (Let's Encrypt, ZeroSSL)")
            continue
        for j, iss in enumerate(issuers):
            module = iss.get("module")
            if module == "internal":
                continue
            if module != "acme":
                risks.append(f"{where}.issuers[{j}]: module {module!r} (only 'internal' or 'acme' on loopback)")
                continue
            for key in ("ca", "test_ca"):
                ca = iss.get(key)
                if key == "ca" and not ca:
                    risks.append(f"{where}.issuers[{j}]: acme without 'ca' means Let's Encrypt production")
                elif ca and not is_loopback_url(str(ca)):
                    risks.append(f"{where}.issuers[{j}].{key} = {ca!r} is not on loopback")
    subjects = {str(s).lower() for p in policies for s in p.get("subjects") or []}
    catch_all = any(not p.get("subjects") and p.get("issuers") for p in policies)
    http_port = http.get("http_port", 80)
    automatic = False
    for name, server in servers.items():
        auto = server.get("automatic_https") or {}
        if server.get("tls_connection_policies") is not None:
            automatic = True
        if auto.get("disable") or auto.get("disable_certificates"):
            continue
        ports = _listen_ports(server)
        if ports and all(p == http_port for p in ports):
            continue  # Caddy applies no automatic HTTPS to a server on the HTTP port only
        hosts = set(_hosts(server))
        automatic = automatic or bool(hosts)  # without host matchers Caddy manages no certificate for it
        skipped = {str(h).lower() for key in ("skip", "skip_certificates") for h in auto.get(key) or []}
        uncovered = sorted(h for h in hosts if h.lower() not in skipped and not catch_all
                           and not _covered(h, subjects))
        if uncovered:
            risks.append(f"server {name!r} has automatic HTTPS on and no issuer policy covers "
                         f"{', '.join(uncovered[:5])}: Caddy would get their certificates from a public CA")
    if (tls or automatic) and ("http_port" not in http or "https_port" not in http):
        risks.append("a config with TLS must set apps.http.http_port and https_port explicitly")
    return risks


def check_config(config: Mapping[str, Any], where: str) -> None:
    risks = config_risks(config)
    if risks:
        raise PublicCAError(f"PUBLIC CA GUARD ({where}): this config could make Caddy reach a public ACME CA; "
                            "give it an explicit loopback issuer (TLS_ISSUER=internal, or ACME_CA on 127.0.0.1):\n  "
                            + "\n  ".join(risks))


def log_risks(log_path: Path) -> list[str]:
    """Records in a Caddy log that name a CA or an issuer that is not local."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return []
    found: list[str] = []
    for line in text.splitlines():
        lowered = line.lower()
        if any(name in lowered for name in _PUBLIC_NAMES):
            found.append(line)
            continue
        if '"ca"' not in line and '"issuer"' not in line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        ca, issuer = rec.get("ca"), rec.get("issuer")
        public_ca = isinstance(ca, str) and bool(ca) and ca != "local" and not is_loopback_url(ca)
        public_issuer = isinstance(issuer, str) and bool(issuer) and not _LOCAL_ISSUER_KEY.match(issuer.lower())
        if public_ca or public_issuer:
            found.append(line)
    return found


def check_log(log_path: Path, where: str) -> None:
    found = log_risks(log_path)
    if found:
        raise PublicCAError(f"PUBLIC CA GUARD ({where}): Caddy's log {log_path} shows it working with a CA that "
                            "is not local:\n  " + "\n  ".join(line[:400] for line in found[:5]))


def check_config_file(path: Path, where: str) -> None:
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except ValueError as exc:
        raise PublicCAError(f"PUBLIC CA GUARD ({where}): {path} is not JSON ({exc}); cannot check it") from None
    if isinstance(config, dict):
        check_config(config, f"{where}: {path}")


def env_risks(env: Mapping[str, str]) -> list[str]:
    """What in a daemon's environment could make its Caddy talk to a public CA: ACME (chosen by
    ``ACME_EMAIL`` unless ``TLS_ISSUER`` says otherwise) without a loopback ``ACME_CA``."""
    issuer = env.get("TLS_ISSUER", "").strip().lower()
    acme = issuer == "acme" or (not issuer and bool(env.get("ACME_EMAIL", "").strip()))
    ca = env.get("ACME_CA", "").strip()
    if acme and not (ca and is_loopback_url(ca)):
        return [f"ACME is on with ACME_CA={ca or '(unset: a public CA)'}, not a loopback CA"]
    return []


def check_env(env: Mapping[str, str], where: str) -> None:
    """Refuse to start a daemon whose environment could reach a public CA (before it runs, not after)."""
    risks = env_risks(env)
    if risks:
        raise PublicCAError(f"{where}: " + "; ".join(risks))
