"""Serve the API with uvicorn in a background thread of the daemon process."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
import uvicorn
from starlette.applications import Starlette

from reconciler.errors import ConfigError
from reconciler.settings import Settings, parse_listen

if TYPE_CHECKING:
    from reconciler.api.app import Backend


class ApiServer:
    def __init__(self, app: Starlette, listen: str) -> None:
        host, port = parse_listen(listen)
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.listen = listen
        self._thread = threading.Thread(target=self.server.run, name="api", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive():
                raise ConfigError(f"the API could not listen on {self.listen} (address in use?)")
            if time.monotonic() > deadline:
                raise ConfigError(f"the API did not start on {self.listen} within {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout=10)


def serve(settings: Settings, backend: Backend, binary: str) -> Callable[[], None]:
    """Build the API on ``backend`` (its writer validates with ``binary``), start it on
    ``settings.api_listen`` and return what stops it."""
    from reconciler.api.app import create_app
    from reconciler.api.writer import ManifestWriter
    from reconciler.caddy.validate import caddy_validate

    assert settings.api_listen
    writer = ManifestWriter(settings, validate_config=lambda config: caddy_validate(binary, config),
                            daemon_good=backend.good_versions)
    app = create_app(writer=writer, backend=backend, token=settings.api_token, wait=settings.api_wait,
                     max_body=settings.api_max_body)
    server = ApiServer(app, settings.api_listen)
    server.start()
    structlog.get_logger("hypeman.ingress").info("api.listening", address=settings.api_listen,
                                                  auth=bool(settings.api_token))
    return server.stop
