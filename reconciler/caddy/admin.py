"""Caddy admin API client (httpx). httpx errors are mapped to :mod:`reconciler.errors` here and only here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import httpx

from reconciler.errors import CaddyRejected, CaddyUnavailable
from reconciler.jsonutil import compact_bytes


@dataclass(slots=True)
class AdminContact:
    """How the last request to Caddy's admin API went, shared by the clients of one daemon (each field is
    replaced whole, so any thread may read it): ``ok`` None before the first request."""

    ok: bool | None = None
    error: str | None = None

    def record(self, error: str | None) -> None:
        self.ok, self.error = error is None, error


class AdminClient:
    """Synchronous client for the endpoints we use: ``GET /config/``, ``POST /load``, ``POST /stop``."""

    def __init__(self, base_url: str, *, timeout: float = 10.0, load_timeout: float = 120.0,
                 transport: httpx.BaseTransport | None = None, contact: AdminContact | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.load_timeout = load_timeout
        # plain HTTP to Caddy's admin address: no CA bundle loaded (~4 MB of memory per client)
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, transport=transport, verify=False)
        #: how the last request went (any answer, even a refusal, means the admin API answers)
        self.contact = contact if contact is not None else AdminContact()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._client.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            error = f"Caddy admin API at {self.base_url} timed out ({method} {path})"
            self.contact.record(error)
            raise CaddyUnavailable(error) from exc
        except httpx.HTTPError as exc:
            error = f"Caddy admin API at {self.base_url} unreachable: {exc}"
            self.contact.record(error)
            raise CaddyUnavailable(error) from exc
        self.contact.record(None)
        if resp.status_code >= 500:
            raise CaddyUnavailable(f"Caddy admin API {method} {path}: HTTP {resp.status_code}: "
                                   f"{_error_text(resp)}")
        if resp.status_code >= 400:
            raise CaddyRejected(_error_text(resp), status_code=resp.status_code)
        return resp

    def ping(self) -> bool:
        try:
            self._request("GET", "/config/admin", timeout=2.0)  # a small subtree: cheap at any config size
        except (CaddyUnavailable, CaddyRejected):
            return False
        return True

    def get_config(self) -> Any:
        resp = self._request("GET", "/config/")
        try:
            return resp.json()
        except ValueError as exc:
            raise CaddyUnavailable(f"Caddy returned invalid JSON from GET /config/: {exc}") from exc

    def load(self, config: dict[str, Any] | bytes, *, force: bool = False) -> None:
        """``POST /load`` of a config (or the body :func:`encode` made of it). Raises :class:`CaddyRejected` on 400
        (the old config keeps serving)."""
        body = config if isinstance(config, bytes) else encode(config)
        headers = {"Content-Type": "application/json"}
        if force:
            headers["Cache-Control"] = "must-revalidate"
        self._request("POST", "/load", content=body, headers=headers, timeout=self.load_timeout)

    def stop(self) -> None:
        self._request("POST", "/stop", timeout=5.0)


encode = compact_bytes  #: the compact JSON body Caddy gets (and ``config.json`` holds)


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text.strip()[:2000] or f"HTTP {resp.status_code}"
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])
    return json.dumps(data)[:2000]
