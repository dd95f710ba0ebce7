"""The status dashboard at ``/ui/``: the files of ``static/`` shipped in the package (HTML, vanilla
JavaScript, CSS -- no build step, nothing from a CDN) and ``/ui/status``, the status document they render.

The data sits under ``/ui/`` so that a browser that logged in to the page (HTTP Basic, see
:mod:`reconciler.api.auth`) sends the same credentials with the page's requests. Every answer carries a
strict Content-Security-Policy: scripts, styles and requests only from this origin, nothing inline.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from reconciler.api.auth import UI_PREFIX

Endpoint = Callable[[Request], Awaitable[Response]]

#: the files of ``static/`` served, by name, with their media types
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


@functools.cache
def asset(name: str) -> bytes:
    """The bytes of ``static/<name>`` (one of :data:`ASSETS`), read once from the installed package."""
    return resources.files("reconciler.api").joinpath("static", name).read_bytes()


def _secured(response: Response, cache: str) -> Response:
    response.headers.update(HEADERS)
    response.headers["Cache-Control"] = cache
    return response


def _file(name: str) -> Endpoint:
    async def serve(request: Request) -> Response:
        # no-cache: revalidated each time, so a daemon upgraded under an open tab serves the new page
        return _secured(Response(asset(name), media_type=ASSETS[name]), "no-cache")
    return serve


async def _to_index(request: Request) -> Response:
    # relative, so the page also works behind a proxy that serves the API under a path prefix
    return _secured(Response(status_code=308, headers={"Location": "ui/"}), "no-cache")


def ui_routes(status: Endpoint) -> list[BaseRoute]:
    """The dashboard's routes; ``status`` answers ``GET /status`` (the page's data, served again under
    ``/ui/status``)."""
    async def data(request: Request) -> Response:
        return _secured(await status(request), "no-store")

    return [
        Route(UI_PREFIX, _to_index, methods=["GET"]),
        Route(f"{UI_PREFIX}/", _file("index.html"), methods=["GET"]),
        *(Route(f"{UI_PREFIX}/{name}", _file(name), methods=["GET"]) for name in ASSETS if name != "index.html"),
        Route(f"{UI_PREFIX}/status", data, methods=["GET"]),
    ]
