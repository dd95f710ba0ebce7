"""The reconciler's side of the responder's control socket: publish the records, ask how it is.

:class:`Publisher` keeps what it last asked for (``wanted``) and what the responder acknowledged
(``acked``, at ``serial``). A publish sends only the difference (a ``patch`` based on the acknowledged
serial); a new connection, a refused patch (the responder restarted from an older snapshot) or a
responder the keeper (re)started gets the whole set (``replace``). Every call is short (timeouts below a
second) and never raises: a responder that cannot be reached is reported (``ok``/``error``) and caught up
by the next publish or :meth:`resync`.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from typing import Any

from reconciler.responder.protocol import connect

TIMEOUT = 0.5


class Publisher:
    def __init__(self, directory: str, *, timeout: float = TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self.wanted: dict[str, str] | None = None
        self.acked: dict[str, str] | None = None
        self.serial = int(time.time() * 1000)  # above any serial an older reconciler used
        #: the last exchange worked (None: none yet)
        self.ok: bool | None = None
        self.error: str | None = None
        self.last: dict[str, Any] = {}  # the last ping's answer
        self.published = 0  # changes sent

    # -- the wire ----------------------------------------------------------------------------------
    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._sock is None:
            self._sock = connect(self.directory, self.timeout)
            self._reader = self._sock.makefile("rb")
            self.acked = None  # a new connection may be a new responder
        payload = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        try:
            # a whole zone at 50k names is ~2 MB: its exchange may take longer than a ping's
            self._sock.settimeout(self.timeout + len(payload) / 5e6)
            self._sock.sendall(payload)
            line = self._reader.readline()
            if not line:
                raise OSError("the responder closed the control connection")
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise ValueError("not an object")
        except (OSError, ValueError):
            self._drop()
            raise
        return reply

    def _drop(self) -> None:
        if self._reader is not None:
            with contextlib.suppress(OSError):
                self._reader.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._sock, self._reader, self.acked = None, None, None

    def _failed(self, exc: Exception) -> None:
        self.ok, self.error = False, f"{type(exc).__name__}: {exc}" if not isinstance(exc, OSError) else (
            exc.strerror or str(exc))

    # -- what callers use --------------------------------------------------------------------------
    def publish(self, records: dict[str, str]) -> bool:
        """Make the responder answer ``records``; True when it acknowledged them."""
        with self._lock:
            self.wanted = records
            return self._sync()

    def resync(self) -> bool:
        """Send the whole set again (a responder was just (re)started or adopted)."""
        with self._lock:
            self.acked = None
            return self._sync()

    def delivered(self) -> bool:
        """The responder acknowledged what was asked last (or nothing was asked yet)."""
        return self.wanted is None or self.acked is self.wanted

    def forget(self) -> None:
        """The responder process is gone: the next exchange starts from scratch."""
        with self._lock:
            self._drop()

    def _sync(self) -> bool:
        wanted = self.wanted
        if wanted is None:
            return True
        try:
            if self._sock is not None and self.acked is not None:
                if self.acked is wanted:
                    return True
                acked = self.acked
                delete = [k for k in acked if k not in wanted]
                changed = {k: v for k, v in wanted.items() if acked.get(k) != v}
                self.serial += 1
                reply = self._call({"op": "patch", "after": self.serial - 1, "serial": self.serial,
                                    "set": changed, "delete": delete})
                if reply.get("ok"):
                    self.acked, self.ok, self.error = wanted, True, None
                    self.published += 1
                    return True
            self.serial += 1
            reply = self._call({"op": "replace", "serial": self.serial, "records": wanted})
            if not reply.get("ok"):
                raise ValueError(f"replace refused: {reply.get('error')}")
            self.acked, self.ok, self.error = wanted, True, None
            self.published += 1
            return True
        except (OSError, ValueError) as exc:
            self._failed(exc)
            return False

    def ping(self) -> dict[str, Any] | None:
        """The responder's own account (serial, records, counters), None when it does not answer."""
        with self._lock:
            try:
                reply = self._call({"op": "ping"})
            except (OSError, ValueError) as exc:
                self._failed(exc)
                return None
            self.ok, self.error, self.last = True, None, reply
            return reply

    def state(self) -> dict[str, Any]:
        last = self.last
        return {"records": last.get("records"), "serial": last.get("serial"),
                "in_sync": self.delivered(),
                "counters": last.get("counters", {}), "last_error": self.error}
