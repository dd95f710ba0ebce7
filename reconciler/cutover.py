"""Health-gated cutover: a rule's new target gets traffic only once it passes the rule's health check. PURE.

A rule with an active health check (``health_check.active``) that serves some targets and is changed to
others (a new instance, a new port: the set of ``(instance, port)`` with a weight) keeps serving the old
ones -- the config rendered for it holds the old targets -- while the new ones are probed (by the
reconciler, ``GET path`` on each new target's address, as Caddy's check would). Once every new target has
passed ``passes`` times in a row, the rule renders its new targets (one config load; in-flight requests to
the old ones finish: Caddy's loads are graceful). Meanwhile its status is ``Progressing`` with what it waits
for, then ``Stalled`` with the probe's last answer once ``cutover_deadline`` has passed (the old targets
still serving). A weights-only change, a rule seen for the first time, or a rule none of whose old targets
runs any more, switches at once: there is nothing to protect.

Declarative: the manifest says where traffic should go; the status says where it goes and why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace

from reconciler.model import (
    Desired,
    HealthCheck,
    Ingress,
    Reason,
    ResolvedIngress,
    ResolvedRule,
    Rule,
    Upstream,
    path_display,
)
from reconciler.settings import duration_seconds

#: the backend a held rule's status counts with: its old targets serve (one of them runs, or it is not held)
HELD = Upstream("(held by a cutover: its previous targets serve)")

#: a rule across passes: (ingress name, hostname, port, path key) -- a rule whose match changes is a new one
RuleKey = tuple[str, str, int, str]
#: what is probed: (instance reference, port, health path, expected status)
ProbeKey = tuple[str, int, str, int | None]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The prober's last answers for one :data:`ProbeKey`."""

    ok: bool
    streak: int  # answers in a row with this ``ok``
    answer: str  # the last answer, as statuses quote it ("HTTP 500", "connection refused"...)


@dataclass(frozen=True, slots=True)
class Gate:
    """A rule held on its old targets while its new ones are probed."""

    serving: Rule  # what renders for it meanwhile (the rule with its old targets)
    wanted: frozenset[tuple[str, int]]  # the new pool it waits to switch to
    since: float  # when the change was first seen (the pass's monotonic clock)


@dataclass(frozen=True, slots=True)
class Progress:
    """What a held rule waits for, for its ingress's status."""

    ingress: str
    reason: str  # Progressing or Stalled
    message: str


def rule_key(ingress: str, rule: Rule) -> RuleKey:
    return (ingress, rule.hostname, rule.port, rule.path_key)


def pool_of(rule: Rule) -> frozenset[tuple[str, int]]:
    """The targets that take requests: ``(instance, port)`` of weight > 0."""
    return frozenset((t.instance, t.port) for t in rule.pool if t.weight)


def gated(rule: Rule) -> bool:
    return rule.health is not None and rule.health.active and not rule.pattern


def probe_key(target: tuple[str, int], check: HealthCheck) -> ProbeKey:
    assert check.path is not None
    return (target[0], target[1], check.path, check.expect_status)


def _targets_text(targets: list[tuple[str, int]] | frozenset[tuple[str, int]]) -> str:
    return ", ".join(f"{i}:{p}" for i, p in sorted(targets))


@dataclass(frozen=True, slots=True)
class Decision:
    """One pass's cutover decisions."""

    desired: Desired  # what to render: held rules on their old targets
    gates: dict[RuleKey, Gate]  # the rules held now
    probes: dict[ProbeKey, HealthCheck]  # what the prober should probe (and how)
    progress: tuple[Progress, ...]
    #: seconds until the first held rule's deadline (None: no rule is Progressing)
    next_deadline: float | None = None
    #: what statuses are worked out from: the manifests' rules, held ones counted as served (None: ``desired``)
    status: Desired | None = None

    @property
    def for_status(self) -> Desired:
        return self.status if self.status is not None else self.desired


class Cutover:
    """The cutover state between passes: what each health-checked rule serves (as last applied) and the
    rules held. :meth:`decide` is pure given its arguments; :meth:`served` records a successful apply."""

    def __init__(self) -> None:
        self.serving: dict[RuleKey, Rule] = {}
        self.gates: dict[RuleKey, Gate] = {}
        #: id(original ingress) -> (original, the held rules, the ResolvedIngress rendered instead)
        self._memo: dict[int, tuple[ResolvedIngress, tuple[Rule, ...], ResolvedIngress, ResolvedIngress]] = {}
        #: id(ingress) -> (it, whether it has a rule with an active check): most have none, and a pass at 10k
        #: ingresses must not look at every rule to learn that
        self._kinds: dict[int, tuple[ResolvedIngress, bool]] = {}
        #: the last decision's ingresses with active checks, as it rendered them
        self._checked: list[ResolvedIngress] = []

    def decide(self, desired: Desired, *, now: float, probes: Mapping[ProbeKey, ProbeResult],
               alive: Callable[[str], bool]) -> Decision:
        """``alive(ref)``: the instance is known and running (a held rule whose old targets all stopped
        switches at once)."""
        gates: dict[RuleKey, Gate] = {}
        wanted: dict[ProbeKey, HealthCheck] = {}
        progress: list[Progress] = []
        out: list[ResolvedIngress] = []
        memo: dict[int, tuple[ResolvedIngress, tuple[Rule, ...], ResolvedIngress, ResolvedIngress]] = {}
        kinds: dict[int, tuple[ResolvedIngress, bool]] = {}
        checked: list[ResolvedIngress] = []  # the ingresses with active checks, as rendered
        shown: list[ResolvedIngress] = []  # every ingress as its status is worked out
        same = True
        known = self._kinds.get
        for ri in desired.ingresses:
            kind = known(id(ri))
            if kind is None or kind[0] is not ri:
                kind = (ri, any(gated(r) for r in ri.ingress.rules))
            kinds[id(ri)] = kind
            if not kind[1]:
                out.append(ri)
                shown.append(ri)
                continue
            name = ri.ingress.name
            held: list[Rule] = []
            for rule in ri.ingress.rules:
                serving = self._hold(name, rule, now, probes, alive, gates, wanted, progress)
                held.append(serving)
            if all(a is b for a, b in zip(held, ri.ingress.rules, strict=True)):
                out.append(ri)
                shown.append(ri)
                checked.append(ri)
                continue
            key = tuple(held)
            hit = self._memo.get(id(ri))
            if hit is None or hit[0] is not ri or hit[1] != key:
                ing: Ingress = replace(ri.ingress, rules=key)
                pairs = list(zip(key, ri.rules, strict=True))
                rendered = ResolvedIngress(ing, tuple(ResolvedRule(r, rr.index, rr.backend) for r, rr in pairs))
                # its status: the manifest's rules, a held one served (an old target runs) whatever its new
                # targets' state -- the progress says what they wait for
                shown_rules = tuple(rr if r is rr.rule else ResolvedRule(rr.rule, rr.index, HELD) for r, rr in pairs)
                hit = (ri, key, rendered, ResolvedIngress(ri.ingress, shown_rules))
            memo[id(ri)] = hit
            out.append(hit[2])
            shown.append(hit[3])
            checked.append(hit[2])
            same = False
        self._memo, self._kinds, self._checked = memo, kinds, checked
        self.gates = gates
        result = desired if same else replace(desired, ingresses=tuple(out))
        status = desired if same else replace(desired, ingresses=tuple(shown))
        left = [(duration_seconds(g.serving.health.cutover_deadline) or 0.0) - (now - g.since)
                for g in gates.values() if g.serving.health is not None]
        pending = [x for x in left if x > 0]
        return Decision(result, gates, wanted, tuple(progress), min(pending) if pending else None, status)

    def _hold(self, name: str, rule: Rule, now: float, probes: Mapping[ProbeKey, ProbeResult],
              alive: Callable[[str], bool], gates: dict[RuleKey, Gate], wanted: dict[ProbeKey, HealthCheck],
              progress: list[Progress]) -> Rule:
        """The rule to render for ``rule`` this pass (itself, or the rule with its old targets)."""
        if not gated(rule):
            return rule
        key = rule_key(name, rule)
        old = self.serving.get(key)
        new_pool = pool_of(rule)
        if old is None or pool_of(old) == new_pool:
            return rule
        check = rule.health
        assert check is not None and check.path is not None
        waiting = sorted(new_pool - pool_of(old))
        if not waiting or not any(alive(i) for i, _ in pool_of(old)):
            return rule  # only targets removed, or nothing of the old pool serves: nothing to protect
        results = {t: probes.get(probe_key(t, check)) for t in waiting}
        if all(r is not None and r.ok and r.streak >= check.passes for r in results.values()):
            return rule
        for t in waiting:
            wanted[probe_key(t, check)] = check
        previous = self.gates.get(key)
        since = previous.since if previous is not None and previous.wanted == new_pool else now
        serving = replace(rule, instance=old.instance, target_port=old.target_port, targets=old.targets)
        gates[key] = Gate(serving, new_pool, since)
        progress.append(_progress(name, rule, old, check, results, now - since))
        return serving

    def served(self, left_out: Collection[str] = ()) -> None:
        """What the last :meth:`decide` rendered is what Caddy runs now, but for the ingresses ``left_out``
        (culprits Caddy refused)."""
        self.serving = {rule_key(ri.ingress.name, r): r for ri in self._checked if ri.ingress.name not in left_out
                        for r in ri.ingress.rules if gated(r)}


def _progress(name: str, rule: Rule, old: Rule, check: HealthCheck,
              results: Mapping[tuple[str, int], ProbeResult | None], waited: float) -> Progress:
    where = f"{rule.hostname}:{rule.port}{path_display(rule.path_key)}"
    waiting = _targets_text(list(results))
    answers = "; ".join(f"{i}:{p}: {r.answer if r is not None else 'not probed yet'}"
                        for (i, p), r in sorted(results.items()))
    serving = _targets_text(pool_of(old))
    deadline = duration_seconds(check.cutover_deadline) or 0.0
    if waited >= deadline:
        return Progress(name, Reason.STALLED,
                        f"{where}: {waiting} did not pass GET {check.path} within {check.cutover_deadline} "
                        f"(last answer: {answers}); {serving} still serves")
    return Progress(name, Reason.PROGRESSING,
                    f"{where}: waiting for {waiting} to pass GET {check.path} before moving traffic from "
                    f"{serving} (last answer: {answers})")

