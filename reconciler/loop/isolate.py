"""Caddy rejection isolation: when ``/load`` refuses the whole config, find the ingresses that cause it,
apply everything else, and report only the culprits.

1. Caddy names a listener it could not bind (``listen tcp 0.0.0.0:8081: bind: address already in use``):
   every ingress with a rule on that port is a culprit; the config is retried without them.
2. Any other rejection: bisect the ingresses with ``caddy validate`` (a separate process that binds
   nothing and changes nothing), keeping the ones that validate together, until the culprits are found.

Each ``/load`` is atomic, so a refused attempt leaves the previous config serving.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.errors import CaddyRejected
from reconciler.model import Desired, ResolvedIngress
from reconciler.render import render
from reconciler.settings import Settings

_BIND = re.compile(r"listen(?:ing on)? (?:tcp[46]? )?(\S*?):(\d+): (?:listen tcp[46]? \S+: )?bind: ([^\"]+)")


@dataclass(slots=True)
class Isolation:
    config: dict[str, Any] | None  # the config that was finally loaded, None if nothing could be
    rejected: dict[str, str] = field(default_factory=dict)  # ingress name -> Caddy's message
    error: str | None = None  # why nothing could be applied
    loads: int = 0


def bind_port(message: str) -> int | None:
    m = _BIND.search(message)
    return int(m.group(2)) if m else None


def _subset(desired: Desired, keep: list[ResolvedIngress]) -> Desired:
    return replace(desired, ingresses=tuple(keep))


def _bisect(desired: Desired, settings: Settings, group: list[ResolvedIngress], good: list[ResolvedIngress],
            validate: Callable[[dict[str, Any]], str | None]) -> list[tuple[ResolvedIngress, str]]:
    error = validate(render(_subset(desired, good + group), settings))
    if error is None:
        return []
    if len(group) == 1:
        return [(group[0], error)]
    mid = len(group) // 2
    left = _bisect(desired, settings, group[:mid], good, validate)
    bad_left = {id(b) for b, _ in left}
    good_left = [g for g in group[:mid] if id(g) not in bad_left]
    return left + _bisect(desired, settings, group[mid:], good + good_left, validate)


def isolate(desired: Desired, settings: Settings, first_error: str, *,
            load: Callable[[dict[str, Any]], None],
            validate: Callable[[dict[str, Any]], str | None],
            max_rounds: int = 16) -> Isolation:
    """Called after ``/load`` of the full config failed with ``first_error``."""
    result = Isolation(config=None)
    remaining = list(desired.ingresses)
    message = first_error
    for _ in range(max_rounds):
        port = bind_port(message)
        if port is not None:
            culprits = [(ri, f"Caddy cannot listen on port {port}: {message}")
                        for ri in remaining if any(r.rule.port == port for r in ri.rules)]
        else:
            culprits = _bisect(desired, settings, remaining, [], validate)
        if not culprits:
            result.error = f"Caddy rejected the config and no single ingress explains it: {message}"
            return result
        bad = {id(ri) for ri, _ in culprits}
        for ri, why in culprits:
            result.rejected[ri.ingress.name] = why
        remaining = [ri for ri in remaining if id(ri) not in bad]
        config = render(_subset(desired, remaining), settings)
        try:
            result.loads += 1
            load(config)
        except CaddyRejected as exc:
            message = exc.message
            continue
        result.config = config
        return result
    result.error = f"gave up isolating after {max_rounds} rounds: {message}"
    return result
