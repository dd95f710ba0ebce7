"""Per-ingress status from a pass: ready, machine reason, message, source. PURE.

Reasons, in order of precedence for an ingress that made it into the desired state:
``CaddyRejected`` (Caddy refused its routes; the rest was applied) > ``Pending`` (the pass did not get
its config into Caddy) > ``Stale`` (its file is invalid now; the last valid version is served) >
``InstanceNotFound`` / ``InstanceNotRunning`` (routes answer 503) > ``Applied``.
Ingresses that were refused before rendering keep the reason of their problem (``InvalidManifest``,
``NameConflict``, ``HostnameConflict``...). An ``Applied`` ingress with TLS rules then becomes
``CertificateFailing`` (a certificate failing or expired) or ``CertificatePending`` (:func:`with_certificates`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from reconciler.memo import IdentityMemo
from reconciler.model import (
    CertificateState,
    Desired,
    Outcome,
    Problem,
    Reason,
    ResolvedIngress,
    Rule,
    Target,
    Unavailable,
    Upstream,
    path_display,
)
from reconciler.zone import dial_name

#: every ``reason`` an ingress status can carry (README "Revisions and status"; the OpenAPI
#: ``IngressReason`` enum lists exactly these)
INGRESS_REASONS: tuple[str, ...] = (
    Reason.APPLIED, Reason.PENDING, Reason.STALE, Reason.INVALID_MANIFEST, Reason.NAME_CONFLICT,
    Reason.HOSTNAME_CONFLICT, Reason.PORT_CONFLICT, Reason.INSTANCE_NOT_FOUND, Reason.INSTANCE_NOT_RUNNING,
    Reason.CADDY_REJECTED, Reason.TLS_NOT_CONFIGURED, Reason.DOMAIN_NOT_ALLOWED, Reason.CERTIFICATE_PENDING,
    Reason.CERTIFICATE_FAILING, Reason.TARGET_UNHEALTHY, Reason.PROGRESSING, Reason.STALLED,
)


@dataclass(frozen=True, slots=True)
class IngressStatus:
    name: str
    ready: bool
    reason: str
    message: str
    file: str
    line: int | None = None
    id: str | None = None
    hosts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    stale_since: float | None = None
    problems: tuple[str, ...] = field(default=())
    #: TLS hostname -> certificate state (``state``, ``not_after``, ``issuer``, ``error``)
    certificates: Mapping[str, Mapping[str, Any]] | None = None
    #: the targets of its health-checked rules as Caddy sees them (see :func:`with_health`)
    health: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        # by hand: dataclasses.asdict deep-copies every value, ~70 us per status at 10k ingresses
        return {
            "name": self.name, "ready": self.ready, "reason": self.reason, "message": self.message,
            "file": self.file, "line": self.line, "id": self.id, "hosts": list(self.hosts),
            "targets": list(self.targets), "stale_since": self.stale_since, "problems": list(self.problems),
            "certificates": {h: dict(c) for h, c in self.certificates.items()} if self.certificates else None,
            "health": [dict(h) for h in self.health],
        }


def health_targets(desired: Desired, zone: str) -> dict[str, list[tuple[int, Target, str]]]:
    """ingress name -> (rule index, target, Caddy's name of its upstream) of each target of its
    health-checked rules (a target of weight 0 is not an upstream)."""
    out: dict[str, list[tuple[int, Target, str]]] = {}
    for ri in desired.ingresses:
        for i, r in enumerate(ri.ingress.rules):
            if r.health is not None and not r.pattern:
                out.setdefault(ri.ingress.name, []).extend(
                    (i, t, dial_name(t.instance, t.port, zone)) for t in r.pool if t.weight)
    return out


def with_health(statuses: list[IngressStatus], desired: Desired, upstreams: Mapping[str, Mapping[str, Any]],
                zone: str) -> list[IngressStatus]:
    """Attach what Caddy says of each target of a health-checked rule (``upstreams``: Caddy's upstream
    address -> ``healthy`` (True, False, None: not reported yet), ``fails`` (failed requests counted by
    passive checks), ``requests`` (in flight)). An applied ingress one of whose health-checked rules has
    no healthy target is not ready (``TargetUnhealthy``, naming the targets and the check); a target out
    while others serve is named in the message."""
    targets = health_targets(desired, zone)
    if not targets:
        return statuses
    rules = {ri.ingress.name: ri.ingress.rules for ri in desired.ingresses}
    out = []
    for st in statuses:
        mine = targets.get(st.name)
        if not mine:
            out.append(st)
            continue
        rows: list[dict[str, Any]] = []
        by_rule: dict[int, list[tuple[str, bool | None]]] = {}
        for i, t, dial in mine:
            seen = upstreams.get(dial) or {}
            healthy = seen.get("healthy")
            rule = rules[st.name][i]
            rows.append({"rule": i, "host": f"{rule.hostname}:{rule.port}{path_display(rule.path_key)}",
                         "target": f"{t.instance}:{t.port}", "upstream": dial, "healthy": healthy,
                         "fails": int(seen.get("fails", 0)), "requests": int(seen.get("requests", 0))})
            by_rule.setdefault(i, []).append((f"{t.instance}:{t.port}", healthy))
        st = replace(st, health=tuple(rows))
        if st.reason == Reason.APPLIED:
            st = _health_verdict(st, rules[st.name], by_rule)
        out.append(st)
    return out


def _health_verdict(st: IngressStatus, rules: tuple[Rule, ...],
                    by_rule: Mapping[int, list[tuple[str, bool | None]]]) -> IngressStatus:
    for i, seen in by_rule.items():
        rule, check = rules[i], rules[i].health
        what = f"GET {check.path}" if check is not None and check.path else "failed requests"
        where = f"{rule.hostname}:{rule.port}{path_display(rule.path_key)}"
        if seen and all(h is False for _, h in seen):
            return replace(st, ready=False, reason=Reason.TARGET_UNHEALTHY,
                           message=f"{where}: no target passes its health checks ({what}): "
                                   + ", ".join(t for t, _ in seen) + " unhealthy")
    out = [f"{t} fails its health checks, left out" for seen in by_rule.values() for t, h in seen if h is False]
    return replace(st, message=st.message + "; " + "; ".join(out)) if out else st


class Progress(Protocol):
    """A rule held by a cutover (:class:`reconciler.cutover.Progress`)."""

    @property
    def ingress(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def message(self) -> str: ...


def with_progress(statuses: list[IngressStatus], progress: Iterable[Progress]) -> list[IngressStatus]:
    """Rules held on their old targets by a health-gated cutover (see :mod:`reconciler.cutover`): their
    ingress is not ready -- ``Progressing``, or ``Stalled`` past the deadline -- and says what it waits for
    and which targets still serve (a reason of its own, say a conflict, is kept)."""
    by_name: dict[str, list[Progress]] = {}
    for p in progress:
        by_name.setdefault(p.ingress, []).append(p)
    if not by_name:
        return statuses
    out = []
    for st in statuses:
        mine = by_name.get(st.name)
        if mine and st.reason in (Reason.APPLIED, Reason.TARGET_UNHEALTHY):
            reason = Reason.STALLED if any(p.reason == Reason.STALLED for p in mine) else Reason.PROGRESSING
            st = replace(st, ready=False, reason=reason, message="; ".join(p.message for p in mine))
        out.append(st)
    return out


def with_certificates(statuses: list[IngressStatus], tls_hosts: Mapping[str, list[str]],
                      certs: Mapping[str, Mapping[str, Any]],
                      on_demand: Mapping[str, list[str]] | None = None) -> list[IngressStatus]:
    """Attach certificate states (see :mod:`reconciler.caddy.certs`) to the ingresses that serve them.

    An applied ingress is not ready while one of its certificates is ``failing`` or ``expired``
    (``CertificateFailing``: clients cannot get a valid certificate) or ``pending`` (``CertificatePending``).
    An ``issued`` certificate whose renewal fails (``error`` set) keeps the ingress ready — the current
    certificate is valid — and the message says until when and why the renewal fails.

    ``on_demand``: the hosts of TLS hostname patterns (certificates obtained at a name's first handshake):
    shown with the others, but they never decide readiness (a VM nobody visited has no certificate yet)."""
    out = []
    extra = on_demand or {}
    for st in statuses:
        hosts = tls_hosts.get(st.name, [])
        more = extra.get(st.name, [])
        if not hosts and not more:
            out.append(st)
            continue
        mine = {h: certs.get(h, {"state": CertificateState.PENDING}) for h in hosts}
        st = replace(st, certificates={**{h: certs.get(h, {"state": CertificateState.PENDING}) for h in more},
                                       **mine})
        if st.reason == Reason.APPLIED:
            broken = [(h, c) for h, c in mine.items()
                      if c.get("state") in (CertificateState.FAILING, CertificateState.EXPIRED)]
            pending = [h for h, c in mine.items() if c.get("state") == CertificateState.PENDING]
            renewing = [(h, c) for h, c in mine.items() if c.get("state") == CertificateState.ISSUED and c.get("error")]
            if broken:
                h, c = broken[0]
                if c.get("state") == CertificateState.EXPIRED:
                    why = f": {c.get('error')}" if c.get("error") else " (no renewal failure logged yet)"
                    message = f"routes are live but the certificate for {h} expired at {c.get('not_after')}{why}"
                else:
                    message = f"routes are live but the certificate for {h} fails: {c.get('error')}"
                st = replace(st, ready=False, reason=Reason.CERTIFICATE_FAILING, message=message)
            elif pending:
                st = replace(st, ready=False, reason=Reason.CERTIFICATE_PENDING,
                             message=f"routes are live; waiting for the certificate of {', '.join(pending)}")
            elif renewing:
                h, c = renewing[0]
                st = replace(st, message=f"routes are live; renewing the certificate for {h} fails (the current one "
                                         f"is valid until {c.get('not_after')}): {c.get('error')}")
        out.append(st)
    return out


def _accepted(ri: ResolvedIngress, *, problems: list[Problem], stale: Mapping[str, tuple[Problem, ...]],
              stale_since: Mapping[str, float], applied: bool, pass_error: str | None,
              rejected: Mapping[str, str]) -> IngressStatus:
    ing = ri.ingress
    hosts = tuple(f"{r.hostname}:{r.port}{path_display(r.path_key)}" for r in ing.rules)
    targets = tuple(", ".join(target_text(r, t) for t in r.pool) for r in ing.rules)
    base = {"name": ing.name, "id": ing.id, "file": ing.origin.file, "line": ing.origin.line,
            "hosts": hosts, "targets": targets, "problems": tuple(p.format() for p in problems)}
    file_stale = stale.get(ing.origin.file)
    since = stale_since.get(ing.origin.file) if file_stale else None
    if ing.name in rejected:
        return IngressStatus(ready=False, reason=Reason.CADDY_REJECTED, message=rejected[ing.name],
                             stale_since=since, **base)  # type: ignore[arg-type]
    if not applied:
        msg = f"not applied yet: {pass_error}" if pass_error else "waiting for the next pass"
        return IngressStatus(ready=False, reason=Reason.PENDING, message=msg, stale_since=since,
                             **base)  # type: ignore[arg-type]
    if file_stale:
        why = "; ".join(p.format() for p in file_stale[:3])
        return IngressStatus(ready=False, reason=Reason.STALE, stale_since=since,
                             message=f"serving the last valid version of {ing.origin.file}; it is invalid now: {why}",
                             **base)  # type: ignore[arg-type]
    for r in ri.rules:
        if isinstance(r.backend, Unavailable):
            return IngressStatus(ready=False, reason=r.backend.reason,
                                 message=f"{r.rule.hostname}:{r.rule.port} answers 503: {r.backend.message}",
                                 **base)  # type: ignore[arg-type]
    down = [f"{r.rule.hostname}:{r.rule.port}{path_display(r.rule.path_key)}: {why}, left out of the pool"
            for r in ri.rules if isinstance(r.backend, Upstream) for why in r.backend.down]
    m = ing.maintenance
    if m is not None:
        down.insert(0, "in maintenance: requests answer 503" + (f" (Retry-After: {m.retry_after} s)" if m.retry_after
                                                                else "")
                    + (f", but {m.allow_path} reaches the instance" if m.allow_path else ""))
    message = "routes are live" + ("; " + "; ".join(down) if down else "")
    return IngressStatus(ready=True, reason=Reason.APPLIED, message=message, **base)  # type: ignore[arg-type]


def target_text(rule: Rule, target: Target) -> str:
    """A target as statuses show it: ``web:8080``; in a pool, with its weight when weights differ."""
    if len({t.weight for t in rule.targets}) > 1:
        return f"{target.instance}:{target.port} (weight {target.weight})"
    return f"{target.instance}:{target.port}"


class StatusMemo(IdentityMemo[ResolvedIngress, IngressStatus]):
    """Memory between passes for :func:`ingress_statuses`: an ingress whose resolved object and status
    inputs are unchanged gets the very same status object as in the previous pass (10k ingresses: one
    changed file no longer rebuilds 10k statuses, and callers can tell what changed by identity)."""

    __slots__ = ()


def ingress_statuses(desired: Desired, *, stale: Mapping[str, tuple[Problem, ...]] | None = None,
                     stale_since: Mapping[str, float] | None = None, applied: bool = True,
                     pass_error: str | None = None, rejected: Mapping[str, str] | None = None,
                     memo: StatusMemo | None = None) -> list[IngressStatus]:
    """One status per ingress name, sorted by name."""
    stale = stale or {}
    stale_since = stale_since or {}
    rejected = rejected or {}
    by_name: dict[str, list[Problem]] = {}
    for p in desired.problems:
        if p.ingress:
            by_name.setdefault(p.ingress, []).append(p)
    out: dict[str, IngressStatus] = {}
    memo = memo if memo is not None else StatusMemo()
    plain = (applied, pass_error, None, None, None, ())  # the key of an ingress nothing is wrong with
    special = bool(rejected or stale or by_name)
    for ri in desired.ingresses:
        name, file = ri.ingress.name, ri.ingress.origin.file
        problems = by_name.get(name, []) if special else []
        key = plain if not special else (applied, pass_error, rejected.get(name), stale.get(file),
                                         stale_since.get(file), tuple(problems))
        out[name] = memo.get(ri, lambda ri=ri, problems=problems: _accepted(  # type: ignore[misc]
            ri, problems=problems, stale=stale, stale_since=stale_since, applied=applied, pass_error=pass_error,
            rejected=rejected), key)
    memo.round()
    for name, problems in by_name.items():
        if name in out:
            continue
        first = problems[0]
        out[name] = IngressStatus(name=name, ready=False, reason=first.reason, message=first.message,
                                  file=first.file, line=first.line,
                                  problems=tuple(p.format() for p in problems))
    return [out[k] for k in sorted(out)]


# -- the status document ------------------------------------------------------------------------------------

#: passes kept in the status's ``history``
HISTORY = 20


@dataclass(frozen=True, slots=True)
class PassRecord:
    """One pass in the status's ``history`` (and its ``last_attempted``). Idle passes -- same trigger,
    same revision, ``unchanged`` -- fold into one record with ``repeats`` and ``first_at``."""

    at: float
    trigger: str
    revision: str
    outcome: str
    changes: int
    duration_ms: float
    error: str | None
    repeats: int = 1
    first_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"at": self.at, "trigger": self.trigger, "revision": self.revision,
                               "outcome": self.outcome, "changes": self.changes, "duration_ms": self.duration_ms,
                               "error": self.error}
        if self.repeats > 1:
            out["repeats"], out["first_at"] = self.repeats, self.first_at
        return out

    @classmethod
    def from_dict(cls, data: Any) -> PassRecord | None:
        """A record as a status file holds it; None when it is not one."""
        try:
            return cls(data["at"], str(data["trigger"]), str(data["revision"]), str(data["outcome"]),
                       data.get("changes", 0), data.get("duration_ms", 0.0), data.get("error"),
                       int(data.get("repeats", 1)), data.get("first_at"))
        except (KeyError, TypeError, ValueError, AttributeError):  # not a record at all (a foreign file)
            return None


def fold(history: tuple[PassRecord, ...], record: PassRecord) -> tuple[tuple[PassRecord, ...], PassRecord]:
    """``history`` with ``record`` added (folded into the last one when both are the same idle pass), and
    the record as added; at most :data:`HISTORY` records are kept."""
    last = history[-1] if history else None
    if (last is not None and record.outcome == Outcome.UNCHANGED and last.outcome == Outcome.UNCHANGED
            and last.revision == record.revision and last.trigger == record.trigger):
        record = replace(record, repeats=last.repeats + 1, first_at=last.first_at if last.repeats > 1 else last.at)
        return (*history[:-1], record), record
    return (*history, record)[-HISTORY:], record


@dataclass(frozen=True, slots=True)
class StatusDocument:
    """The daemon's status after a pass: ``status.json`` and ``GET /status`` (plus ``ingresses``, made on
    request from the per-ingress statuses). Built by :func:`status_document`; :meth:`to_dict` is the JSON."""

    attempted: PassRecord
    last_applied: Mapping[str, Any] | None
    commits: Mapping[str, str]
    history: tuple[PassRecord, ...]
    #: ``caddy`` and ``storage``: what the daemon knows of its own health
    health: Mapping[str, Any]
    sources: tuple[Mapping[str, Any], ...]
    problems: tuple[Problem, ...]
    certificates: Mapping[str, Any]
    ingresses: int
    ready: int

    def to_dict(self) -> dict[str, Any]:
        applied = self.last_applied
        return {
            "revision": {"last_attempted": self.attempted.revision,
                         "last_applied": applied.get("revision") if applied else None, "commits": dict(self.commits)},
            "last_attempted": {**self.attempted.to_dict(), "commits": dict(self.commits)},
            "last_applied": dict(applied) if applied is not None else None,
            "last_error": self.attempted.error,
            "history": [r.to_dict() for r in self.history],
            **self.health,
            "sources": [dict(s) for s in self.sources],
            "problems": [{"file": p.file, "line": p.line, "reason": p.reason, "ingress": p.ingress,
                          "message": p.message} for p in self.problems],
            "certificates": self.certificates,
            "counts": {"ingresses": self.ingresses, "ready": self.ready},
        }


def status_document(record: PassRecord, *, applied: bool,
                    previous: tuple[tuple[PassRecord, ...], Mapping[str, Any] | None],
                    commits: Mapping[str, str], health: Mapping[str, Any],
                    sources: tuple[Mapping[str, Any], ...], problems: tuple[Problem, ...],
                    certificates: Mapping[str, Any], statuses: list[IngressStatus]) -> StatusDocument:
    """The status document of a pass. ``previous``: the history and last applied record so far."""
    history, last_applied = previous
    history, record = fold(history, record)
    if applied:
        last_applied = {"revision": record.revision, "at": record.at, "commits": dict(commits)}
    return StatusDocument(record, last_applied, commits, history, health, sources, problems, certificates,
                          len(statuses), sum(s.ready for s in statuses))
