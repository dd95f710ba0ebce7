"""A headless Chromium driven over the DevTools protocol through ``--remote-debugging-pipe`` (no websocket
library, no remote port): the browser reads commands on its fd 3 and writes answers and events on its fd 4,
each message one JSON object ended by a NUL byte.

:class:`Browser` starts Chromium in its own session with a throwaway profile and stops it (and every
process of its group) in :meth:`Browser.close`; :meth:`Browser.page` opens a tab and attaches to it in
*flat* mode, so the tab's commands and events travel over the same pipe with a ``sessionId``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.helpers import kill_pid, scrubbed_environ

Event = Callable[[dict[str, Any]], None]

#: the flags of a quiet, self-contained headless browser (root in a container: no sandbox; loopback only)
FLAGS = (
    "--headless=new", "--no-sandbox", "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
    "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-features=Translate",
    "--password-store=basic", "--use-mock-keychain", "--mute-audio", "--hide-scrollbars",
    "--window-size=1400,1000", "about:blank",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class CdpError(Exception):
    """Chromium answered a command with an error, went away, or did not answer in time."""


class Browser:
    def __init__(self, binary: str, *, log_path: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.version = ""
        self.profile = Path(tempfile.mkdtemp(prefix="hypeman-chromium-"))
        self.log_path = log_path
        # two pipes moved to fds >= 10 so bash can put them on 3 and 4 without clobbering either
        to_child_r, to_child_w = self._pipe()
        from_child_r, from_child_w = self._pipe()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        env = {**scrubbed_environ(), "HOME": str(self.profile)}
        cmd = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", cmd, binary, *FLAGS, f"--user-data-dir={self.profile}"],
            pass_fds=(to_child_r, from_child_w), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=env, start_new_session=True)
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = to_child_w
        self._in = from_child_r
        self._lock = threading.Lock()
        self._answers: dict[int, dict[str, Any]] = {}
        self._answered = threading.Condition()
        self._handlers: dict[tuple[str | None, str], Event] = {}
        self._next_id = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="cdp-reader", daemon=True)
        self._reader.start()
        try:
            self.version = self.call("Browser.getVersion")["product"]
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _pipe() -> tuple[int, int]:
        r, w = os.pipe()
        high = (fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10), fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 10))
        os.close(r)
        os.close(w)
        return high

    # -- the wire ----------------------------------------------------------------------------------------

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        """Send a command without waiting for its answer (event handlers run on the reader thread and
        must not block on it); returns its id."""
        with self._lock:
            self._next_id += 1
            msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
            if session is not None:
                msg["sessionId"] = session
            data = json.dumps(msg).encode() + b"\0"
            try:
                while data:
                    data = data[os.write(self._out, data):]
            except OSError as exc:
                raise CdpError(f"chromium is gone ({exc}); see {self.log_path}") from exc
            return self._next_id

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Send a command and wait for its answer's ``result``."""
        ident = self.send(method, params, session)
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._answered:
            while ident not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise CdpError(f"no answer to {method} ({'chromium exited' if self._closed else 'timeout'}); "
                                   f"see {self.log_path}")
                self._answered.wait(left)
            answer = self._answers.pop(ident)
        if "error" in answer:
            raise CdpError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def on(self, method: str, handler: Event, session: str | None = None) -> None:
        """Run ``handler(params)`` on the reader thread for each event ``method`` (of ``session``)."""
        self._handlers[(session, method)] = handler

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(self._in, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                self._dispatch(json.loads(raw))
        with self._answered:
            self._closed = True
            self._answered.notify_all()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "id" in msg:
            with self._answered:
                self._answers[msg["id"]] = msg
                self._answered.notify_all()
            return
        handler = self._handlers.get((msg.get("sessionId"), msg.get("method", "")))
        if handler is not None:
            with contextlib.suppress(CdpError):  # the browser closing under a handler
                handler(msg.get("params", {}))

    # -- pages -------------------------------------------------------------------------------------------

    def page(self) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def close(self) -> None:
        """Stop Chromium: ask politely, then its process and group by id; remove the profile."""
        with contextlib.suppress(CdpError):
            self.send("Browser.close")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            kill_pid(self.proc.pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers (zygote, renderers) left in its session
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: navigation, script evaluation, screenshots, and answers to HTTP auth challenges."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session
        #: console calls, uncaught exceptions and the browser's log entries, as lines
        self.console: list[str] = []
        self.auth_challenges: list[str] = []
        browser.on("Runtime.consoleAPICalled", self._console, session)
        browser.on("Runtime.exceptionThrown", self._exception, session)
        browser.on("Log.entryAdded", self._log, session)  # the browser's own: CSP violations, failed loads
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Page.enable")

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.call(method, params, self.session)

    def _console(self, params: dict[str, Any]) -> None:
        self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))

    def _exception(self, params: dict[str, Any]) -> None:
        details = params.get("exceptionDetails", {})
        self.console.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")

    def _log(self, params: dict[str, Any]) -> None:
        entry = params.get("entry", {})
        self.console.append(f"{entry.get('level')} {entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")

    def answer_auth(self, username: str, password: str) -> None:
        """Answer HTTP auth challenges with these credentials, as a user typing them into the browser's
        prompt would (requests go on untouched; Chromium then keeps the credentials for the realm)."""
        def paused(params: dict[str, Any]) -> None:
            self.browser.send("Fetch.continueRequest", {"requestId": params["requestId"]}, self.session)

        def challenged(params: dict[str, Any]) -> None:
            challenge = params.get("authChallenge", {})
            self.auth_challenges.append(f"{challenge.get('scheme')} {challenge.get('realm')}")
            self.browser.send("Fetch.continueWithAuth", {
                "requestId": params["requestId"],
                "authChallengeResponse": {"response": "ProvideCredentials", "username": username,
                                          "password": password}}, self.session)

        self.browser.on("Fetch.requestPaused", paused, self.session)
        self.browser.on("Fetch.authRequired", challenged, self.session)
        self.call("Fetch.enable", {"handleAuthRequests": True, "patterns": [{"urlPattern": "*"}]})

    def stop_answering_auth(self) -> None:
        """From now on a challenge goes unanswered (headless: the request fails with its 401)."""
        self.call("Fetch.disable")

    def navigate(self, url: str) -> None:
        answer = self.call("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise CdpError(f"navigating to {url}: {answer['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        answer = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in answer:
            details = answer["exceptionDetails"]
            raise CdpError(f"{expression!r}: {details.get('exception', {}).get('description') or details}")
        return answer.get("result", {}).get("value")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (beyond the viewport) at ``path``."""
        size = self.evaluate("[document.documentElement.scrollWidth, document.documentElement.scrollHeight]")
        data = self.call("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size[0], "height": size[1], "scale": 1}})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
