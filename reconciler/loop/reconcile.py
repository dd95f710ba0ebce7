"""One level-triggered reconcile pass: read everything -> render -> compare with live -> load if different."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reconciler import diff
from reconciler.caddy.admin import AdminClient
from reconciler.errors import CaddyRejected, CaddyUnavailable, SourceError
from reconciler.model import Problem
from reconciler.render import render
from reconciler.settings import Settings
from reconciler.sources.snapshot import Snapshot, take_snapshot

APPLIED = "applied"
UNCHANGED = "unchanged"
REJECTED = "rejected"
UNAVAILABLE = "unavailable"
FAILED = "error"


@dataclass(frozen=True, slots=True)
class PassResult:
    trigger: str
    revision: str
    outcome: str
    duration: float
    changes: int = 0
    error: str | None = None
    problems: tuple[Problem, ...] = field(default=(), repr=False)

    @property
    def converged(self) -> bool:
        return self.outcome in (APPLIED, UNCHANGED)

    @property
    def transient(self) -> bool:
        return self.outcome == UNAVAILABLE


class Reconciler:
    """Runs passes. ``save_config`` persists each config Caddy accepted (for restarts)."""

    def __init__(self, *, settings: Settings, client: AdminClient,
                 save_config: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.client = client
        self._save = save_config
        self._clock = clock
        self._saved: Any = None
        self.last: PassResult | None = None
        self.loads = 0

    def desired(self) -> tuple[Snapshot, dict[str, Any]]:
        snap = take_snapshot(self.settings)
        return snap, render(snap.desired, self.settings)

    def run_pass(self, trigger: str) -> PassResult:
        start = self._clock()
        revision = ""
        problems: tuple[Problem, ...] = ()
        changes = 0
        try:
            snap, config = self.desired()
            revision, problems = snap.revision, snap.problems
            live = self.client.get_config()
            if diff.same(live, config):
                outcome = UNCHANGED
            else:
                changes = len(diff.diff(diff.normalise(live), diff.normalise(config)))
                self.client.load(config)
                self.loads += 1
                outcome = APPLIED
            if self._save is not None and self._saved != config:
                self._save(config)
                self._saved = config
            error = None
        except CaddyRejected as exc:
            outcome, error = REJECTED, f"Caddy rejected the config: {exc.message}"
        except CaddyUnavailable as exc:
            outcome, error = UNAVAILABLE, str(exc)
        except (SourceError, OSError) as exc:
            outcome, error = FAILED, str(exc)
        result = PassResult(trigger, revision, outcome, self._clock() - start, changes, error, problems)
        self.last = result
        return result
