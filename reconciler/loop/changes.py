"""What a pass changed, told to the operator: the canonical ``reconcile.finished`` line, each new or
resolved input problem, each ingress whose state changed (``ingress.state``, or one ``ingress.states``
summary for a mass change), and the per-ingress metrics. Runs on the report thread, after the pass's
state files."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping
from typing import Any

import structlog

from reconciler.loop.reconcile import PassResult
from reconciler.model import Reason
from reconciler.state.metrics import Metrics
from reconciler.status import IngressStatus

log = structlog.get_logger("hypeman.ingress")

#: more ingress state changes than this in one pass are logged as one ``ingress.states`` summary
STATE_EVENTS_MAX = 200

State = tuple[Any, Any, Any]  # (ready, reason, message)


class ChangeLog:
    """Remembers what it told last time. ``before``: the status the previous run persisted (so a restart
    does not announce every ingress again)."""

    def __init__(self, metrics: Metrics, before: Mapping[str, Any]) -> None:
        self.metrics = metrics
        self._before = before
        self._problems: set[str] = set()
        self._states: dict[str, State] | None = None
        self._last: dict[str, IngressStatus] = {}

    def report(self, result: PassResult, statuses: tuple[IngressStatus, ...], *, retry_in: float | None,
               queued: float | None) -> None:
        self._problems_changed(result)
        self._ingresses_changed(statuses)
        self.metrics.observe_ingresses(statuses)
        self._finished(result, retry_in, queued)

    def _problems_changed(self, result: PassResult) -> None:
        current = {p.format(): p for p in result.problems}
        for text in sorted(set(current) - self._problems):
            p = current[text]
            log.warning("input.problem", file=p.file, line=p.line, reason=p.reason, ingress=p.ingress,
                        message=p.message)
        for text in sorted(self._problems - set(current)):
            log.info("input.problem_resolved", problem=text)
        self._problems = set(current)

    @staticmethod
    def _finished(result: PassResult, retry_in: float | None, queued: float | None) -> None:
        fields: dict[str, Any] = {
            "trigger": result.trigger, "revision": result.revision, "outcome": result.outcome,
            "changes": result.changes, "problems": len(result.problems),
            "duration_ms": round(result.duration * 1000, 1),
            "phases_ms": {name: round(seconds * 1000, 1) for name, seconds in result.phases},
            "started_at": round(result.started_at, 3),
        }
        if queued is not None:  # from the first event of the burst to the start of the pass (debounce included)
            fields["queued_ms"] = round(queued * 1000, 1)
        if result.error:
            fields["error"] = result.error
        if result.rejected:
            fields["rejected"] = list(result.rejected)
        if result.loads:
            fields["loads"] = result.loads
        if retry_in is not None:
            fields["retry_in"] = round(retry_in, 2)
            log.warning("reconcile.finished", **fields)
        else:
            (log.info if result.converged else log.error)("reconcile.finished", **fields)

    def _ingresses_changed(self, statuses: tuple[IngressStatus, ...]) -> None:
        """One ``ingress.state`` event per ingress whose (ready, reason, message) changed, or that appeared
        or disappeared."""
        if self._states is None:
            previous = self._before.get("ingresses", [])
            self._states = {i["name"]: (i.get("ready"), i.get("reason"), i.get("message"))
                            for i in previous if isinstance(i, dict) and "name" in i}
        states = self._states
        now = {s.name: s for s in statuses}
        # only names whose status object is new this pass can have changed (statuses are memoised)
        touched = [n for n, st in now.items() if self._last.get(n) is not st] + [n for n in states if n not in now]
        events: list[tuple[str, str | None, IngressStatus | None]] = []  # (name, previous reason, status)
        for name in sorted(touched):
            old, st = states.get(name), now.get(name)
            new = (st.ready, st.reason, st.message) if st is not None else None
            if new is None:
                states.pop(name, None)
            else:
                states[name] = new
            if old != new:
                events.append((name, old[1] if old else None, st))
        self._last = now
        if len(events) > STATE_EVENTS_MAX:
            # a first start or a mass change of thousands of ingresses: a summary, not thousands of lines
            # (every state is in status.json and GET /status)
            by_reason = Tally(Reason.REMOVED if st is None else st.reason for _, _, st in events)
            log.info("ingress.states", changed=len(events), reasons=dict(sorted(by_reason.items())),
                     examples=[name for name, _, _ in events[:5]])
            return
        for name, previous, st in events:
            if st is None:
                log.info("ingress.state", ingress=name, ready=False, reason=Reason.REMOVED,
                         previous_reason=previous, message="no longer defined")
                continue
            (log.info if st.ready else log.warning)(
                "ingress.state", ingress=name, ready=st.ready, reason=st.reason,
                previous_reason=previous, message=st.message, file=st.file)
