"""Per-ingress JSON access logs in Caddy's config: which ingresses log, and the JSON that does it. PURE.

An ingress that logs gets a file ``{data}/logs/access/<name>.log`` of its own, written by Caddy: the
servers of its ports map its hosts to the logger ``http.log.access.<name>`` (``logs.logger_names``; a
hostname pattern by its wildcard, ``*.example.com``), and ``logging.logs.access-<name>`` takes that logger
into a rotated file (``roll_size_mb``/``roll_keep``/``roll_keep_days``) through a ``filter`` encoder that
redacts credentials. Requests to hosts of other ingresses are not logged at all (``skip_unmapped_hosts``),
and Caddy's own log leaves access lines out (``exclude: ["http.log.access"]``).

Why ingress by ingress (``HYPEMAN_ACCESS_LOGS=opt-in``, the default) rather than every ingress: Caddy
walks the whole ``logger_names`` map for *every* request of a server (a wildcard match per entry, before
any handler), and writes a line through a tee of *every* log; each log is an open file. Cost per request
grows with the number of logged hosts (see ``python -m bench --only traffic``), so 50k logged ingresses
are out of reach while a few hundred cost little.

Redaction: Caddy itself writes ``Cookie``, ``Set-Cookie``, ``Authorization`` and ``Proxy-Authorization``
as ``REDACTED`` (unless ``should_log_credentials``, which we never set); the filter replaces those and the
other credential headers of the settings (``X-Api-Key``, ``X-Auth-Token``, ...), in requests and
responses, and the values of credential-like query parameters in the logged URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from reconciler.settings import Settings, canonical_header

#: what a redacted value reads as in an access log (Caddy's own word for the headers it redacts)
REDACTED = "REDACTED"
#: query parameters whose values are credentials often enough to never log them (case-insensitive; ``_`` in
#: a name also matches ``-`` or nothing, so ``api_key`` covers ``api-key`` and ``apikey``; a name that merely
#: starts with one of these counts, e.g. ``token_type``, ``signature_v2``)
SECRET_PARAMS = ("access_token", "refresh_token", "id_token", "token", "api_key", "key", "password", "passwd",
                 "pwd", "pass", "secret", "client_secret", "signature", "sig", "auth", "code", "session", "jwt",
                 "credential", "x_amz_credential", "x_amz_signature", "x_amz_security_token",
                 "x_goog_credential", "x_goog_signature")
#: Go (RE2) regexp over the logged ``request.uri``: a secret parameter's name, then its value up to the next
#: ``&`` or ``#``; the value becomes :data:`REDACTED`
QUERY_SECRET = (r"(?i)([?&](?:" + "|".join(p.replace("_", "[-_]?") for p in SECRET_PARAMS)
                + r")[^=&#]*=)[^&#]*")


def logged(access_log: bool | None, mode: str) -> bool:
    """Does an ingress whose manifest says ``access_log`` (None: nothing) get an access log under
    ``HYPEMAN_ACCESS_LOGS=mode``?"""
    if mode == "all":
        return access_log is not False
    if mode == "opt-in":
        return access_log is True
    return False


def logger_name(ingress: str) -> str:
    """The name (below ``http.log.access``) of the logger of an ingress's requests."""
    return ingress


def log_key(ingress: str) -> str:
    """The key of an ingress's log in ``logging.logs``."""
    return f"access-{ingress}"


def log_path(settings: Settings, ingress: str) -> str:
    return os.path.join(settings.access_log_dir, f"{ingress}.log")


def server_logs(hosts: dict[str, str]) -> dict[str, Any]:
    """A server's ``logs``: matcher host (exact, or a pattern's wildcard) -> its ingress's logger; hosts
    not listed are not logged."""
    return {"logger_names": {host: [logger_name(name)] for host, name in sorted(hosts.items())},
            "skip_unmapped_hosts": True}


def encoder(settings: Settings, secret_headers: Iterable[str] = ()) -> dict[str, Any]:
    """JSON lines with the credentials of :mod:`reconciler.accesslog` redacted (and ``secret_headers``: the
    headers of request header auths)."""
    fields: dict[str, Any] = {}
    for header in dict.fromkeys([*settings.access_log_redact_headers, *map(canonical_header, secret_headers)]):
        for where in ("request>headers", "resp_headers"):
            fields[f"{where}>{header}"] = {"filter": "replace", "value": REDACTED}
    fields["request>uri"] = {"filter": "regexp", "regexp": QUERY_SECRET, "value": "${1}" + REDACTED}
    return {"format": "filter", "wrap": {"format": "json"}, "fields": fields}


def logging_block(settings: Settings, ingresses: list[str], secret_headers: Iterable[str] = ()) -> dict[str, Any]:
    """Caddy's top-level ``logging``: one rotated file per logging ingress, and the default log (Caddy's
    own, on stderr) without access lines."""
    secrets = sorted(set(secret_headers))
    the_encoder = encoder(settings, secrets)
    logs: dict[str, Any] = {"default": {"exclude": ["http.log.access"]}}
    if secrets:  # Caddy's own error lines quote the request's headers: never a request header auth value
        logs["default"]["encoder"] = the_encoder
    for name in sorted(ingresses):
        logs[log_key(name)] = {
            "writer": {"output": "file", "filename": log_path(settings, name),
                       "roll_size_mb": settings.access_log_roll_mb, "roll_keep": settings.access_log_roll_keep,
                       "roll_keep_days": settings.access_log_roll_keep_days},
            "encoder": the_encoder,
            "include": [f"http.log.access.{logger_name(name)}"],
        }
    return {"logs": logs}
