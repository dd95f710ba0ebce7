"""The HTTP API (Starlette, served by uvicorn): ``/ingresses`` as a thin writer, plus status and probes.

Every error is ``{"code": ..., "message": ...}``. When a token is configured every endpoint but
``/healthz`` requires ``Authorization: Bearer <token>`` or Basic with the token as the password (compared in
constant time; :mod:`reconciler.api.auth`). The dashboard is at ``/ui/`` (:mod:`reconciler.api.ui`).
"""

from __future__ import annotations

import ipaddress
import json
import os
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio.to_thread
import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler.api.auth import authorized, cross_origin_write, refusal
from reconciler.api.openapi import openapi_document
from reconciler.api.ui import ui_routes
from reconciler.api.writer import Found, ManifestWriter, Refusal, Refused, check_ref, ingress_body
from reconciler.model import Reason
from reconciler.settings import PERMISSION_PATH, parse_listen
from reconciler.state.store import GoodMap

log = structlog.get_logger("hypeman.ingress.api")


class Backend(Protocol):
    """What the API needs from the daemon."""

    def request_pass(self, path: str | None = None) -> int:
        """Trigger a pass now (``path``: the manifest file written or removed, so the pass need not read
        every file); returns a ticket for :meth:`wait_pass`."""

    def wait_pass(self, ticket: int, timeout: float) -> bool:
        """Block until the pass the ticket asked for finished; True when Caddy then ran the desired config,
        False when that pass did not converge (Caddy down, say) or on timeout."""

    def ingress_status(self, name: str) -> dict[str, Any] | None: ...

    def status(self) -> dict[str, Any]: ...

    def ready(self) -> tuple[bool, str]: ...

    def metrics_text(self) -> bytes: ...

    def good_versions(self) -> tuple[GoodMap, GoodMap] | None:
        """The last good file versions the loop serves (the writer counts with them)."""

    def tls_permission(self, domain: str) -> str | None:
        """Why Caddy may not obtain a certificate for ``domain`` on demand (None: it may)."""


#: how a refusal of the writer is answered: (HTTP status, the ``code`` of the error body)
ANSWERS: dict[str, tuple[int, str]] = {
    Refusal.BAD_REQUEST: (400, "bad_request"),
    Refusal.INSTANCE_NOT_FOUND: (400, "instance_not_found"),
    Refusal.CONFIG_VALIDATION_FAILED: (400, "config_validation_failed"),
    Refusal.ALREADY_EXISTS: (409, "already_exists"),
    Refusal.AMBIGUOUS: (409, "ambiguous"),
    Refusal.READ_ONLY_SOURCE: (409, "read_only_source"),
    Refusal.FLEET_READ_ONLY: (409, "fleet_read_only"),
    Refusal.NOT_FOUND: (404, "not_found"),
    Refusal.SOURCE_UNAVAILABLE: (503, "source_unavailable"),
    Refusal.STORAGE_UNAVAILABLE: (503, "storage_unavailable"),
    Refusal.INSUFFICIENT_STORAGE: (507, "insufficient_storage"),
    # the rules an ingress may break (the loop reports the same as the ingress's reason)
    Reason.NAME_CONFLICT: (409, "already_exists"),
    Reason.HOSTNAME_CONFLICT: (409, "hostname_in_use"),
    Reason.PORT_CONFLICT: (409, "port_conflict"),
    Reason.DOMAIN_NOT_ALLOWED: (400, "domain_not_allowed"),
    Reason.TLS_NOT_CONFIGURED: (400, "bad_request"),  # as hypeman; config_validation_failed: Caddy refuses
}


def answer(refused: Refused) -> tuple[int, str]:
    """(status, code) of a refusal; a rule without its own answer is a 400 ``bad_request``."""
    return ANSWERS.get(refused.code, (400, "bad_request"))


class ApiError(Exception):
    """An error of the HTTP layer itself (a body too large, no such endpoint)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


#: the reasons of an ingress whose routes are in Caddy
ROUTED = frozenset({Reason.APPLIED, Reason.INSTANCE_NOT_FOUND, Reason.INSTANCE_NOT_RUNNING,
                    Reason.CERTIFICATE_PENDING, Reason.CERTIFICATE_FAILING})


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


#: answered without the token: the liveness probe, and Caddy's on-demand TLS question (Caddy cannot send
#: a token; the answer says only whether a name may get a certificate)
OPEN_PATHS = frozenset({"/healthz", PERMISSION_PATH})


class _Auth(BaseHTTPMiddleware):
    def __init__(self, app: Any, token: str | None) -> None:
        super().__init__(app)
        self._token = token.encode() if token else None

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        path, headers = request.url.path, request.headers
        forged = cross_origin_write(request.method, headers.get("host"), headers.get("origin"),
                                    headers.get("sec-fetch-site"))
        if forged is not None:
            log.warning("api.cross_origin_refused", method=request.method, path=path, why=forged)
            return error(403, "cross_origin", f"refused: {forged}; writes come from API clients, not web pages")
        if (self._token is not None and path not in OPEN_PATHS
                and not authorized(headers.get("authorization", ""), self._token, request.method)):
            message, challenge = refusal(path)
            response = error(401, "unauthorized", message)
            response.headers["WWW-Authenticate"] = challenge  # RFC 9110: a 401 names the scheme
            return response
        try:
            return await call_next(request)
        except Exception as exc:
            # the details go to the log only (explicitly: the daemon's log setup renders no exc_info)
            log.error("api.internal_error", method=request.method, path=request.url.path,
                      error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=-20))
            return error(500, "internal_error", "internal error; see the daemon log")


async def _body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "bad_request", f"request body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "bad_request", f"request body larger than {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "bad_request", "empty body: expected a JSON ingress object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "the body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "bad_request", f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
                       ) from None
    except RecursionError:
        raise ApiError(400, "bad_request", "malformed JSON: nesting too deep") from None


def _handled(fn: Callable[[Any, Request], Awaitable[Response]]) -> Callable[[Any, Request], Awaitable[Response]]:
    """Refusals and HTTP errors answered as ``{"code", "message"}``."""
    async def wrapper(self: Any, request: Request) -> Response:
        try:
            return await fn(self, request)
        except ApiError as exc:
            return error(exc.status, exc.code, exc.message)
        except Refused as exc:
            return error(*answer(exc), exc.message)
    return wrapper


class _Endpoints:
    """The handlers of :func:`create_app`: ``/ingresses`` onto the writer, the rest onto the daemon."""

    def __init__(self, writer: ManifestWriter, backend: Backend, *, wait: float, max_body: int) -> None:
        self.writer = writer
        self.backend = backend
        self.wait = wait
        self.max_body = max_body

    def with_status(self, found: Found) -> dict[str, Any]:
        body = ingress_body(found.ingress)
        body["source"] = found.path
        body["read_only"] = found.read_only
        st = self.backend.ingress_status(found.ingress.name)
        if st is not None and st.get("file") and st["file"] != found.path:
            # status is kept per name: this one is about another ingress of the same name, which won
            st = {"ready": False, "reason": Reason.NAME_CONFLICT, "stale_since": None,
                  "message": f"name {found.ingress.name!r} is already used by the ingress in {st['file']}"}
        body["status"] = _short_status(st)
        return body

    async def ingresses(self, request: Request) -> Response:
        return await (self.create if request.method == "POST" else self.list)(request)

    async def ingress(self, request: Request) -> Response:
        return await (self.delete if request.method == "DELETE" else self.get)(request)

    @_handled
    async def list(self, request: Request) -> Response:
        found = await anyio.to_thread.run_sync(self.writer.all)
        return JSONResponse([self.with_status(f) for f in found])

    @_handled
    async def get(self, request: Request) -> Response:
        found = await anyio.to_thread.run_sync(self.writer.find, request.path_params["ref"])
        return JSONResponse(self.with_status(found))

    @_handled
    async def create(self, request: Request) -> Response:
        self.writer.check_writable()  # a fleet node refuses before it reads a body
        body = await _body(request, self.max_body)
        ingress = await anyio.to_thread.run_sync(self.writer.create, body)
        ticket = self.backend.request_pass(os.path.abspath(ingress.origin.file))
        log.info("api.ingress_created", ingress=ingress.name, id=ingress.id)
        # 201 means live: a pass that saw the new file put its routes into Caddy (answering, or 503 for a
        # stopped instance, or waiting for a certificate). Else -- the bounded wait ran out, the pass could
        # not converge (Caddy down), or it left the ingress out (Caddy refused its port, say) -- 202 with the
        # current status: the manifest is written and the loop converges on its own; never a hang
        done = await anyio.to_thread.run_sync(self.backend.wait_pass, ticket, self.wait)
        shown = self.with_status(Found(ingress, False, ingress.origin.file))
        live = done and shown["status"]["reason"] in ROUTED
        if not live:
            log.warning("api.not_live_yet", ingress=ingress.name, operation="create", wait=self.wait,
                        reason=shown["status"]["reason"])
        return JSONResponse(shown, status_code=201 if live else 202)

    @_handled
    async def delete(self, request: Request) -> Response:
        found = await anyio.to_thread.run_sync(self.writer.delete, request.path_params["ref"])
        ticket = self.backend.request_pass(os.path.abspath(found.path))
        log.info("api.ingress_deleted", ingress=found.ingress.name, id=found.ingress.id)
        # 204 once a pass without the file has converged Caddy (its routes are gone); when the wait runs out
        # or the pass could not converge, 202 with the ingress and its current status (the file is gone,
        # the routes may still serve)
        if await anyio.to_thread.run_sync(self.backend.wait_pass, ticket, self.wait):
            return Response(status_code=204)
        log.warning("api.not_live_yet", ingress=found.ingress.name, operation="delete", wait=self.wait)
        return JSONResponse(self.with_status(found), status_code=202)

    @_handled
    async def bad_ref(self, request: Request) -> Response:
        check_ref(request.path_params.get("ref", ""))
        raise ApiError(404, "not_found", "no such endpoint")

    async def status(self, request: Request) -> Response:
        doc = dict(self.backend.status())
        doc.setdefault("ingresses", [])  # before the first pass of a fresh data dir: none yet
        return JSONResponse(doc)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def tls_permission(self, request: Request) -> Response:
        """Caddy's on-demand TLS ``permission`` (module ``http``): 200 lets it obtain a certificate for
        ``domain``, anything else does not."""
        domain = request.query_params.get("domain", "")
        peer = request.client.host if request.client is not None else ""
        if not self._local(peer):  # Caddy runs on this host; nobody else learns which names exist
            log.warning("tls.permission_refused", peer=peer, message="asked from another host")
            return Response("denied\n", status_code=403, media_type="text/plain")
        why = self.backend.tls_permission(domain) if domain else "no domain given"
        if why is None:
            log.info("tls.permission", domain=domain[:253], granted=True)
            return Response("ok\n", media_type="text/plain")
        # (a scanner's handshakes with made-up names land here: not worth a line each at info)
        log.debug("tls.permission", domain=domain[:253], granted=False, reason=why)
        return Response("denied\n", status_code=403, media_type="text/plain")

    def _local(self, peer: str) -> bool:
        """``peer`` is this host: a loopback address, or the address the API listens on."""
        try:
            if ipaddress.ip_address(peer).is_loopback:
                return True
        except ValueError:
            return False
        listen = self.writer.settings.api_listen
        return listen is not None and parse_listen(listen)[0] == peer

    async def readyz(self, request: Request) -> Response:
        ok, why = self.backend.ready()
        return JSONResponse({"ready": ok, "message": why}, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        # on a thread: the traffic series may wait (briefly, bounded) for Caddy's admin API
        text = await anyio.to_thread.run_sync(self.backend.metrics_text)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, "not_found", f"no route for {request.method} {request.url.path}")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    # RFC 9110: a 405 carries Allow (one Route per path below, so it lists every method of the path)
    given = getattr(exc, "headers", None) or {}
    allow = ", ".join(sorted(m.strip() for m in given.get("Allow", "").split(",") if m.strip()))
    response = error(405, "method_not_allowed", f"{request.method} is not allowed on {request.url.path}")
    if allow:
        response.headers["Allow"] = allow
    return response


def create_app(*, writer: ManifestWriter, backend: Backend, token: str | None, wait: float = 10.0,
               max_body: int = 64 * 1024) -> Starlette:
    e = _Endpoints(writer, backend, wait=wait, max_body=max_body)
    routes = [
        Route("/ingresses", e.ingresses, methods=["GET", "POST"]),
        Route("/ingresses/{ref}", e.ingress, methods=["GET", "DELETE"]),
        Route("/ingresses/{ref:path}", e.bad_ref, methods=["GET", "DELETE"]),
        Route("/status", e.status, methods=["GET"]),
        Route("/healthz", e.healthz, methods=["GET"]),
        Route("/readyz", e.readyz, methods=["GET"]),
        Route("/metrics", e.metrics, methods=["GET"]),
        Route("/openapi.json", e.openapi, methods=["GET"]),
        Route(PERMISSION_PATH, e.tls_permission, methods=["GET"]),
        *ui_routes(e.status),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_Auth, token=token)],
                     exception_handlers={404: _not_found, 405: _not_allowed})


def _short_status(st: dict[str, Any] | None) -> dict[str, Any]:
    if st is None:
        return {"ready": False, "reason": Reason.PENDING, "message": "not seen by a reconcile pass yet"}
    out = {k: st.get(k) for k in ("ready", "reason", "message", "stale_since")}
    if st.get("health"):  # (health-checked rules only: what Caddy says of each target)
        out["health"] = st["health"]
    return out
