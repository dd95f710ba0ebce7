"""Stages 2 and 3 of a pass, *plan* and *apply*.

*Plan*: leave out the ingresses Caddy rejected before (the culprit memory) while their inputs are the
same and the pass is not a resync, and render the config.

*Apply*: compare it with what Caddy runs -- read back with ``GET /config/``, or, for passes caused by file
events and API writes, trusted to be what this process last loaded on the same Caddy (a Caddy restarted
since is always read back) -- and ``POST /load`` only when different. When Caddy refuses the whole config,
:func:`reconciler.loop.isolate.isolate` finds the culprits and loads the rest.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from reconciler import diff
from reconciler.caddy.admin import AdminClient
from reconciler.errors import CaddyBinaryError, CaddyRejected, CaddyUnavailable
from reconciler.loop.isolate import isolate
from reconciler.loop.triggers import Burst
from reconciler.model import Desired, Outcome, ResolvedIngress
from reconciler.render import ConfigEncoder, Renderer, scrub, secret_values
from reconciler.settings import Settings


def fingerprint(ri: ResolvedIngress) -> str:
    """What a culprit is remembered by: its rules and their resolved backends."""
    text = repr((ri.ingress.rules, [r.backend for r in ri.rules]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Culprit(NamedTuple):
    fingerprint: str  # of its inputs when Caddy refused it
    message: str  # Caddy's


class Culprits:
    """Ingresses Caddy rejected: left out of later passes until their inputs change or a resync retries
    them, so one bad ingress costs one refused load, not one per pass."""

    def __init__(self) -> None:
        self._memo: dict[str, Culprit] = {}  # by ingress name

    def still_bad(self, desired: Desired, *, retry: bool) -> dict[str, str]:
        """name -> message of the remembered culprits whose inputs did not change (none when ``retry``)."""
        if retry or not self._memo:
            return {}
        out: dict[str, str] = {}
        for ri in desired.ingresses:
            memo = self._memo.get(ri.ingress.name)
            if memo is not None and memo.fingerprint == fingerprint(ri):
                out[ri.ingress.name] = memo.message
        return out

    def remember(self, desired: Desired, rejected: Mapping[str, str]) -> None:
        by_name = {ri.ingress.name: ri for ri in desired.ingresses}
        self._memo = {n: Culprit(fingerprint(by_name[n]), m) for n, m in rejected.items() if n in by_name}


@dataclass(frozen=True, slots=True)
class Plan:
    desired: Desired
    #: ``desired`` without the remembered culprits: what is rendered and loaded
    target: Desired
    config: dict[str, Any]
    #: the culprits left out, with Caddy's message
    known_bad: Mapping[str, str]
    burst: Burst


def plan(desired: Desired, burst: Burst, culprits: Culprits, render: Renderer) -> Plan:
    known_bad = culprits.still_bad(desired, retry=burst.resync)
    target = desired if not known_bad else replace(
        desired, ingresses=tuple(ri for ri in desired.ingresses if ri.ingress.name not in known_bad))
    return Plan(desired, target, render(target), known_bad, burst)


@dataclass(frozen=True, slots=True)
class Applied:
    """What the apply stage did."""

    outcome: Outcome
    #: the config Caddy runs now (None: nothing was applied)
    config: dict[str, Any] | None = None
    error: str | None = None
    #: ingress name -> why Caddy refused it (this pass's culprits and the remembered ones)
    rejected: Mapping[str, str] = field(default_factory=dict)
    loads: int = 0
    changes: int = 0
    #: seconds Caddy's POST /load took, as seen from here
    load_time: float = 0.0
    #: the config differs from what this process believed Caddy ran before
    new: bool = False


class Applier:
    """Talks to Caddy for the apply stage, and remembers what Caddy runs (``live``) for one generation."""

    def __init__(self, settings: Settings, client: AdminClient, *,
                 validate: Callable[[dict[str, Any]], str | None],
                 on_load: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.client = client
        self._validate = validate
        self._encoder = ConfigEncoder()
        self._body: tuple[dict[str, Any], bytes] | None = None
        self._on_load = on_load
        self._clock = clock
        #: the config Caddy runs as far as this process knows (None: read it back), and its generation
        self.live: dict[str, Any] | None = None
        self.live_generation = 0

    def apply(self, plan: Plan, generation: int, meanwhile: Callable[[], None]) -> Applied:
        """Converge Caddy to ``plan``; ``meanwhile`` runs while Caddy loads (a head start on the report)."""
        trusted = self.live is not None and self.live_generation == generation and plan.burst.trusted
        try:
            applied = self._converge(plan, self.live if trusted else self.client.get_config(), meanwhile)
        except CaddyUnavailable as exc:
            applied = Applied(Outcome.UNAVAILABLE, error=str(exc), rejected=plan.known_bad)
        except CaddyBinaryError as exc:
            applied = Applied(Outcome.FAILED, error=str(exc), rejected=plan.known_bad)
        except CaddyRejected as exc:  # GET /config/ refused: an error of this pass
            applied = Applied(Outcome.FAILED, error=exc.message, rejected=plan.known_bad)
        if applied.config is not None:
            applied = replace(applied, new=self.live != applied.config)
            self.live, self.live_generation = applied.config, generation
        elif applied.outcome == Outcome.UNAVAILABLE:
            self.live = None  # Caddy may come back with anything: read it next time
        return self._scrubbed(applied, plan)

    def _converge(self, plan: Plan, live: Any, meanwhile: Callable[[], None]) -> Applied:
        config, known_bad = plan.config, plan.known_bad
        if diff.same(live, config):
            return Applied(Outcome.PARTIAL if known_bad else Outcome.UNCHANGED, config, rejected=known_bad)
        started = self._clock()
        try:
            self._load_overlapped(self.encoded(config), meanwhile)
        except CaddyRejected as exc:
            return self._isolated(plan, live, exc.message)
        except CaddyUnavailable as exc:  # the load was tried: it counts
            return Applied(Outcome.UNAVAILABLE, error=str(exc), rejected=known_bad, loads=1)
        load_time = self._clock() - started
        return Applied(Outcome.PARTIAL if known_bad else Outcome.APPLIED, config, rejected=known_bad, loads=1,
                       changes=len(diff.diff(live, config)), load_time=load_time)

    def _isolated(self, plan: Plan, live: Any, message: str) -> Applied:
        """Caddy refused the whole config: find the culprits and load the rest."""
        try:
            iso = isolate(plan.target, self.settings, message, load=self.client.load, validate=self._validate)
        except CaddyUnavailable as exc:
            return Applied(Outcome.UNAVAILABLE, error=str(exc), rejected=plan.known_bad, loads=1)
        rejected = {**plan.known_bad, **iso.rejected}
        if iso.config is None:
            return Applied(Outcome.REJECTED, error=iso.error or f"Caddy rejected the config: {message}",
                           rejected=rejected, loads=1 + iso.loads)
        return Applied(Outcome.PARTIAL, iso.config, rejected=rejected, loads=1 + iso.loads,
                       changes=len(diff.diff(live, iso.config)))

    def encoded(self, config: dict[str, Any]) -> bytes:
        """The config as Caddy's body, encoded once per config (the load and ``config.json`` share it)."""
        if self._body is None or self._body[0] is not config:
            self._body = (config, self._encoder(config))
        return self._body[1]

    def forget_body(self) -> None:
        """Megabytes at 10k routes: dropped after each pass (the encoder keeps what the next can reuse)."""
        self._body = None

    def _load_overlapped(self, body: bytes, meanwhile: Callable[[], None]) -> None:
        """``POST /load`` on a helper thread while ``meanwhile`` runs here (seconds at 10k routes, the GIL
        free); raises what the load raised. ``meanwhile`` is only a head start: if it fails, the pass
        does that work again afterwards."""
        if self._on_load is not None:
            self._on_load()
        failure: list[BaseException] = []

        def post() -> None:
            try:
                self.client.load(body)
            except BaseException as exc:  # re-raised in the pass's thread below
                failure.append(exc)

        poster = threading.Thread(target=post, name="caddy-load", daemon=True)
        poster.start()
        with contextlib.suppress(Exception):
            meanwhile()
        poster.join()
        if failure:
            raise failure[0]

    def _scrubbed(self, applied: Applied, plan: Plan) -> Applied:
        """Caddy's messages may quote the config it refused: never a secret (DNS credentials, request header
        auth values) in status or logs."""
        if applied.error is None and not applied.rejected:
            return applied
        secrets = self.settings.tls.secrets + secret_values(plan.target)
        if not secrets:
            return applied
        error = scrub(applied.error, secrets) if applied.error is not None else None
        return replace(applied, error=error, rejected={n: scrub(m, secrets) for n, m in applied.rejected.items()})
