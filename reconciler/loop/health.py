"""Health of the targets of health-checked rules, as Caddy sees it, between passes.

Caddy checks the targets (``health_checks`` in the config); :class:`HealthWatch` reads its verdicts
(:func:`reconciler.caddy.upstreams.read_upstreams`) every ``interval`` seconds while the last pass has
health-checked rules, keeps the latest for the next pass's statuses, and asks for a pass (``health``: it
reads no file) when a target turned healthy or unhealthy -- so ``TargetUnhealthy`` shows within an interval
of Caddy's own verdict (Caddy refreshes it every 10 s), and a node with no health checks never asks Caddy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from reconciler.errors import CaddyError
from reconciler.model import Desired
from reconciler.status import health_targets

Upstreams = dict[str, dict[str, Any]]


class HealthWatch:
    def __init__(self, *, read: Callable[[], Upstreams], desired: Callable[[], Desired | None],
                 notify: Callable[[], object], zone: str, interval: float = 2.0) -> None:
        self._read = read
        self._desired = desired
        self._notify = notify
        self._zone = zone
        self.interval = interval
        self._states: Upstreams = {}
        self._wanted: tuple[Desired | None, frozenset[str]] = (None, frozenset())
        self._verdicts: dict[str, bool | None] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reads = 0  # answers read from Caddy (tests, metrics)

    def states(self) -> Mapping[str, Mapping[str, Any]]:
        """What Caddy said last of its upstreams (empty before the first read)."""
        return self._states

    def wanted(self) -> frozenset[str]:
        """Caddy's names of the upstreams of the last pass's health-checked rules (kept per pass)."""
        desired = self._desired()
        if desired is not self._wanted[0]:
            dials = frozenset() if desired is None else frozenset(
                dial for rows in health_targets(desired, self._zone).values() for _, _, dial in rows)
            self._wanted = (desired, dials)
        return self._wanted[1]

    def poll(self) -> bool:
        """One look (while health-checked rules exist); True when a verdict changed and a pass was asked."""
        wanted = self.wanted()
        if not wanted:
            return False
        try:
            states = self._read()
        except CaddyError:  # Caddy restarting: its next start triggers a pass anyway
            return False
        self._states = states
        self.reads += 1
        verdicts = {dial: states.get(dial, {}).get("healthy") for dial in wanted}
        changed = verdicts != {d: self._verdicts.get(d) for d in wanted}
        self._verdicts = verdicts
        if changed:
            self._notify()
        return changed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
