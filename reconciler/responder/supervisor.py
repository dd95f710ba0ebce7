"""Start, adopt and stop the DNS responder process (the policy of when lives in
:mod:`reconciler.loop.keeper`, shared with Caddy's).

Like Caddy, the responder runs detached (its own session) and is found again by its PID file
``{data}/dns/responder.pid`` after a reconciler restart; a PID is adopted only when its command line is
the responder of this data dir. It is *up* when its control socket answers a ping.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import dns.exception
import dns.message
import dns.query
import dns.rcode

from reconciler.errors import ResponderError, ResponderExited
from reconciler.fsutil import StorageHealth, pid_alive
from reconciler.procutil import Detached
from reconciler.responder.client import Publisher
from reconciler.responder.protocol import LOG, PID, VERSION
from reconciler.settings import Settings

MODULE = "reconciler.responder"
#: how often the keeper asks the responder how it is, and probes its DNS side (seconds)
LOOK_EVERY = 2.0


def probe(settings: Settings, timeout: float = 0.5) -> str | None:
    """Why the responder's DNS side does not answer a query for its zone (None: it does)."""
    query = dns.message.make_query(settings.dns_zone, "SOA")
    try:
        answer = dns.query.udp(query, settings.dns_address.strip("[]"), port=settings.dns_port, timeout=timeout)
    except (OSError, dns.exception.DNSException) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None if answer.rcode() == dns.rcode.NOERROR else f"answered {dns.rcode.to_text(answer.rcode())}"


def process_args(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return []


class ResponderSupervisor(Detached):
    """Owns one responder process for one data dir (one thread -- the keeper -- starts, stops, reaps)."""

    label = "DNS responder"
    event = "responder"
    readiness = "control socket"

    def __init__(self, settings: Settings, publisher: Publisher, *, log: Callable[..., Any] | None = None,
                 ready_timeout: float = 10.0, health: StorageHealth | None = None,
                 replace_changed: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(log=log, health=health)
        self.settings = settings
        #: a responder of this data dir started with other settings (port, zone) is replaced; else refused
        self.replace_changed = replace_changed
        self._clock = clock
        #: the last DNS probe: None while it answered, else why not (see :meth:`tend`)
        self.dns_error: str | None = None
        self._looked = 0.0  # when :meth:`tend` last probed
        self.publisher = publisher
        self.ready_timeout = ready_timeout

    @property
    def dir(self) -> str:
        return self.settings.dns_dir

    @property
    def pid_path(self) -> str:
        return os.path.join(self.dir, PID)

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, LOG)

    def args(self) -> list[str]:
        return [sys.executable, "-m", MODULE, "--dir", self.dir, "--listen", self.settings.dns_listen,
                "--zone", self.settings.dns_zone]

    def _ours(self, pid: int) -> bool:
        args = process_args(pid)
        return MODULE in args and "--dir" in args and args[args.index("--dir") + 1:][:1] == [self.dir]

    # -- what the keeper calls ---------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """(Its counters and serial as of the keeper's last look: at most :data:`LOOK_EVERY` old.)"""
        return {"pid": self.pid, "running": self.running(), "adopted": self.adopted,
                "listen": self.settings.dns_listen, "zone": self.settings.dns_zone, **self.publisher.state(),
                "dns_error": self.dns_error}

    def running(self) -> bool:
        """Its control socket and its DNS port answer (as of the last exchange and the last probe)."""
        return (self.answered and self.process_alive() and self.publisher.ok is not False
                and self.dns_error is None)

    def unresponsive(self) -> str:
        if self.dns_error is not None:
            return f"does not answer DNS queries on {self.settings.dns_listen}: {self.dns_error}"
        return f"its control socket does not answer: {self.publisher.error}"

    def note_exit(self, now: float) -> dict[str, Any]:
        out = super().note_exit(now)
        self.publisher.forget()
        return out

    def adopted_check(self) -> None:
        """(After an adoption: see :meth:`ensure_running`.)"""

    def tend(self) -> None:
        """At each look of the keeper: records a publish could not deliver (a dropped control connection)
        are sent again; every :data:`LOOK_EVERY` seconds, the responder is asked how it is (a serial that is
        not ours: another publisher, say ``hypeman-ingress apply``, replaced the records: ours go back) and
        a real DNS query checks its UDP side."""
        if not self.answered:
            return
        if not self.publisher.delivered():
            self.publisher.resync()
        now = self._clock()
        if now - self._looked < LOOK_EVERY:
            return
        self._looked = now
        reply = self.publisher.ping()
        if reply is not None and reply.get("serial") != self.publisher.serial and self.publisher.wanted is not None:
            self._log("responder.resync", pid=self.pid, serial=reply.get("serial"), ours=self.publisher.serial)
            self.publisher.resync()
        self.dns_error = probe(self.settings)

    def ensure_running(self) -> bool:
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            self._log("responder.dir_unusable", dir=self.dir, error=exc.strerror or str(exc))
        pid = self._adoptable()
        if pid is not None and process_args(pid)[1:] != self.args()[1:]:
            # the responder of this data dir, started with other settings (its port, its zone): replaced
            if not self.replace_changed:
                raise ResponderError(f"the DNS responder of {self.dir} (pid {pid}) runs with other settings "
                                     f"({' '.join(process_args(pid)[3:])}); stop it or use its settings")
            self._log("responder.settings_changed", pid=pid, running=process_args(pid)[1:], wanted=self.args()[1:])
            self._kill(pid)
        elif pid is not None:
            ready = self._wait_ready(pid, time.monotonic() + self.ready_timeout)
            if ready and self.publisher.last.get("version") != VERSION:
                # another version of the code (an upgrade): replaced; its snapshot carries the records over
                self._log("responder.replaced", pid=pid, running=self.publisher.last.get("version"), wanted=VERSION)
                self._kill(pid)
            elif ready:
                self.pid, self._popen, self.adopted = pid, None, True
                self.answered, self.started_at = True, time.monotonic()
                self._log("responder.adopted", pid=pid)
                self.publisher.resync()  # what the reconciler knows now (a snapshot may be older)
                return False
            elif self.cancel.is_set():
                raise ResponderError(f"adopting the DNS responder (pid {pid}) abandoned: the reconciler is stopping")
            else:
                self._log("responder.unresponsive", pid=pid, waited_s=self.ready_timeout)
                self._kill(pid)
        self.start()
        return True

    def _adoptable(self) -> int | None:
        """The running responder of this data dir: the one ``responder.pid`` names, else (that file could
        not be written, or was lost) the one answering on the control socket, if it is ours."""
        pid = self._read_pid()
        if pid is not None and pid_alive(pid) and self._ours(pid):
            return pid
        reply = self.publisher.ping()
        other = reply.get("pid") if reply is not None else None
        if isinstance(other, int) and pid_alive(other) and self._ours(other):
            self._log("responder.found_by_control_socket", pid=other, pid_file=self.pid_path, recorded=pid)
            self._write_pid(other)
            return other
        return None

    def start(self) -> None:
        try:
            popen = self._launch(self.args(), stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise ResponderError(f"cannot start the DNS responder: {exc}") from exc
        self._log("responder.started", pid=popen.pid, listen=self.settings.dns_listen)
        if not self._wait_ready(popen.pid, time.monotonic() + self.ready_timeout):
            if self.cancel.is_set():
                raise ResponderError(f"DNS responder (pid {popen.pid}) start abandoned: the reconciler is stopping")
            code = popen.poll()
            tail = self.log_tail()
            if code is None:
                self._kill(popen.pid)
                self.pid, self._popen = None, None
                raise ResponderError(f"DNS responder (pid {popen.pid}) did not answer on its control socket "
                                       f"within {self.ready_timeout:g}s (killed): {tail or 'no log output'}")
            self.pid, self._popen = None, None
            raise ResponderExited(f"DNS responder (pid {popen.pid}) exited with code {code} before it answered: "
                              f"{tail or 'no log output'}")
        self.answered, self.started_at = True, time.monotonic()
        self.publisher.resync()  # its snapshot may be older than what the reconciler knows

    def _wait_ready(self, pid: int, deadline: float) -> bool:
        delay = 0.005
        while time.monotonic() < deadline and not self.cancel.is_set():
            if self._exited(pid):
                return False
            reply = self.publisher.ping()
            if reply is not None and reply.get("pid") == pid:  # (not another responder on the socket)
                return True
            self.cancel.wait(delay)
            delay = min(delay * 2, 0.1)
        return False

    def log_tail(self, lines: int = 5) -> str:
        return self._tail(lines)

    def stop(self) -> None:
        pid = self.pid
        if pid is None:
            return
        self._kill(pid)
        with contextlib.suppress(OSError):
            os.unlink(self.pid_path)
        self._log("responder.stopped", pid=pid)
        self.pid, self._popen, self.answered = None, None, False
