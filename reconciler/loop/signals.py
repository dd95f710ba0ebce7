"""What signals do to the daemon. SIGTERM, SIGINT, SIGQUIT: a clean stop. SIGHUP: a full resync now
(every input read again, Caddy's live config read back, rejected ingresses retried). The stray signals of
:data:`IGNORED` -- whose default action would kill the daemon for no reason of ours -- are logged and
ignored. The handlers take no lock and do no I/O (they run in the main thread, which may hold any lock
at that moment): they note the signal and wake the loop, which logs it."""

from __future__ import annotations

import signal
from typing import Any

import structlog

from reconciler.loop.triggers import Trigger, Triggers

log = structlog.get_logger("hypeman.ingress")

STOP = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RESYNC = (signal.SIGHUP,)
#: (SIGXFSZ too: a write over the file size limit then fails with EFBIG, like a full disk)
IGNORED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGXFSZ,
           signal.SIGXCPU, signal.SIGPWR, signal.SIGPOLL)


class SignalPolicy:
    def __init__(self, triggers: Triggers) -> None:
        self.triggers = triggers
        self._received: list[int] = []

    def install(self) -> None:
        for sig in (*STOP, *RESYNC, *IGNORED):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._received.append(signum)
        if signum in STOP:
            self.triggers.stop_from_signal()
        elif signum in RESYNC:
            self.triggers.notify_from_signal(Trigger.SIGHUP)
        else:
            self.triggers.wake_from_signal()  # only to log it: no pass, no timer disturbed

    def log_received(self) -> None:
        """Log the signals received since the last call (from the loop's thread)."""
        while self._received:
            signum = self._received.pop(0)
            action = "stop" if signum in STOP else "resync" if signum in RESYNC else "ignored"
            log.info("daemon.signal", signal=signal.Signals(signum).name, action=action)
