"""Serve the API with uvicorn in a background thread of the daemon process."""

from __future__ import annotations

import contextlib
import threading
import time

import uvicorn
from starlette.applications import Starlette

from reconciler.errors import ConfigError
from reconciler.settings import parse_listen


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
