"""reconciler.status: per-ingress status from one pass -- reasons, messages and their precedence. PURE."""

from __future__ import annotations

import json

import pytest

from reconciler.model import (
    Desired,
    Ingress,
    Instance,
    Origin,
    Problem,
    Reason,
    ResolvedIngress,
    ResolvedRule,
    Rule,
    Unavailable,
    Upstream,
    derive_ingress_id,
)
from reconciler.settings import Settings
from reconciler.status import IngressStatus, ingress_statuses
from reconciler.validate import resolve

SETTINGS = Settings(data_dir="/srv/hypeman", admin_port=2019, listen_address="127.0.0.1",
                    http_port=18080, https_port=18443)

UP = Upstream("10.0.0.1:8080")
NOT_FOUND = Unavailable(Reason.INSTANCE_NOT_FOUND, "instance 'vm' not found")
NOT_RUNNING = Unavailable(Reason.INSTANCE_NOT_RUNNING, "instance 'vm' is not running (state: Stopped)")
VM = Instance("vm", None, "10.0.0.1", "Running", Origin(0, "vms.yaml", 0, "/i/vms.yaml", 1))


def ingress(name: str, *hosts: str, file: str | None = None, line: int = 1, port: int = 80,
            source: int = 0) -> Ingress:
    file = file or f"/m/{name}.yaml"
    rules = tuple(Rule(h, port, "vm", 8080) for h in (hosts or (f"{name}.test",)))
    return Ingress(name, derive_ingress_id(name), rules, Origin(source, file.rsplit("/", 1)[-1], 0, file, line))


def resolved(ing: Ingress, *backends: Upstream | Unavailable) -> ResolvedIngress:
    backends = backends or (UP,) * len(ing.rules)
    return ResolvedIngress(ing, tuple(ResolvedRule(r, i, b) for i, (r, b) in enumerate(zip(ing.rules, backends,
                                                                                         strict=True))))


def one(desired: Desired, **kw: object) -> IngressStatus:
    [st] = ingress_statuses(desired, **kw)  # type: ignore[arg-type]
    return st


STALE_PROBLEM = Problem("/m/web.yaml", 3, "YAML syntax error: oops")


# --- single reasons ----------------------------------------------------------------------------------


def test_applied() -> None:
    ing = ingress("web", "web.test", "www.web.test", line=4)
    st = one(Desired((resolved(ing),)))
    assert st == IngressStatus(name="web", ready=True, reason=Reason.APPLIED, message="routes are live",
                               file="/m/web.yaml", line=4, id=ing.id, hosts=("web.test:80", "www.web.test:80"),
                               targets=("vm:8080", "vm:8080"))
    assert st.stale_since is None and st.problems == ()


@pytest.mark.parametrize("backend", [NOT_FOUND, NOT_RUNNING], ids=["not-found", "not-running"])
def test_instance_unavailable_names_the_host_and_the_instance(backend: Unavailable) -> None:
    ing = ingress("web", "ok.test", "down.test")
    st = one(Desired((resolved(ing, UP, backend),)))
    assert not st.ready
    assert st.reason == backend.reason
    assert st.message == f"down.test:80 answers 503: {backend.message}"


def test_stale_names_the_file_and_the_error_and_since() -> None:
    ing = ingress("web")
    st = one(Desired((resolved(ing),)), stale={"/m/web.yaml": (STALE_PROBLEM,)},
             stale_since={"/m/web.yaml": 1234.5})
    assert not st.ready and st.reason == Reason.STALE
    assert "/m/web.yaml" in st.message and "/m/web.yaml:3: YAML syntax error: oops" in st.message
    assert st.message.startswith("serving the last valid version of /m/web.yaml")
    assert st.stale_since == 1234.5


def test_stale_message_lists_at_most_three_problems() -> None:
    problems = tuple(Problem("/m/web.yaml", n, f"problem {n}") for n in range(1, 6))
    st = one(Desired((resolved(ingress("web")),)), stale={"/m/web.yaml": problems})
    assert "problem 3" in st.message and "problem 4" not in st.message


def test_stale_only_for_ingresses_of_the_stale_file() -> None:
    web, other = ingress("web"), ingress("other")
    sts = ingress_statuses(Desired((resolved(web), resolved(other))), stale={"/m/web.yaml": (STALE_PROBLEM,)},
                           stale_since={"/m/web.yaml": 1.0})
    assert [(s.name, s.reason, s.stale_since) for s in sts] == [("other", Reason.APPLIED, None),
                                                                ("web", Reason.STALE, 1.0)]


def test_pending_when_the_pass_did_not_apply() -> None:
    st = one(Desired((resolved(ingress("web")),)), applied=False, pass_error="Caddy unreachable")
    assert not st.ready and st.reason == Reason.PENDING
    assert st.message == "not applied yet: Caddy unreachable"
    st = one(Desired((resolved(ingress("web")),)), applied=False)
    assert st.message == "waiting for the next pass"


def test_caddy_rejected_carries_caddys_message() -> None:
    st = one(Desired((resolved(ingress("web")),)), rejected={"web": "Caddy cannot listen on port 8081: ..."})
    assert not st.ready and st.reason == Reason.CADDY_REJECTED
    assert st.message == "Caddy cannot listen on port 8081: ..."


# --- precedence ----------------------------------------------------------------------------------------

# CaddyRejected > Pending > Stale > InstanceNotFound/InstanceNotRunning > Applied
LADDER = [Reason.CADDY_REJECTED, Reason.PENDING, Reason.STALE, Reason.INSTANCE_NOT_RUNNING, Reason.APPLIED]


@pytest.mark.parametrize("top", range(len(LADDER)), ids=LADDER)
def test_precedence(top: int) -> None:
    """Every condition from ``LADDER[top]`` down holds at once; the highest one is reported."""
    active = set(LADDER[top:])
    ing = ingress("web")
    backend = NOT_RUNNING if Reason.INSTANCE_NOT_RUNNING in active else UP
    st = one(Desired((resolved(ing, backend),)),
             stale={"/m/web.yaml": (STALE_PROBLEM,)} if Reason.STALE in active else None,
             applied=Reason.PENDING not in active,
             rejected={"web": "refused"} if Reason.CADDY_REJECTED in active else None)
    assert st.reason == LADDER[top]
    assert st.ready == (LADDER[top] == Reason.APPLIED)


def test_not_found_and_not_running_the_first_unavailable_rule_speaks() -> None:
    ing = ingress("web", "a.test", "b.test")
    assert one(Desired((resolved(ing, NOT_RUNNING, NOT_FOUND),))).reason == Reason.INSTANCE_NOT_RUNNING
    assert one(Desired((resolved(ing, NOT_FOUND, NOT_RUNNING),))).reason == Reason.INSTANCE_NOT_FOUND


def test_stale_since_is_kept_under_higher_reasons() -> None:
    st = one(Desired((resolved(ingress("web")),)), stale={"/m/web.yaml": (STALE_PROBLEM,)},
             stale_since={"/m/web.yaml": 7.0}, rejected={"web": "refused"})
    assert st.reason == Reason.CADDY_REJECTED and st.stale_since == 7.0


# --- ingresses refused before rendering ------------------------------------------------------------------


def test_refused_ingress_keeps_the_reason_of_its_first_problem() -> None:
    p1 = Problem("/m/bad.yaml", 2, "rules: [] should be non-empty", Reason.INVALID_MANIFEST, "bad")
    p2 = Problem("/m/bad.yaml", 5, "another one", Reason.INVALID_MANIFEST, "bad")
    loose = Problem("/m/junk.yaml", 1, "YAML syntax error")  # no ingress name: no status row
    sts = ingress_statuses(Desired((resolved(ingress("web")),), (p1, p2, loose)))
    assert [s.name for s in sts] == ["bad", "web"]
    bad = sts[0]
    assert bad == IngressStatus(name="bad", ready=False, reason=Reason.INVALID_MANIFEST,
                                message="rules: [] should be non-empty", file="/m/bad.yaml", line=2,
                                problems=(p1.format(), p2.format()))


def test_hostname_conflict_loser_names_the_winner_through_resolve() -> None:
    winner = ingress("alpha", "shared.test", file="/m/a.yaml", line=1)
    loser = ingress("beta", "shared.test", file="/m/b.yaml", line=7)
    for order in ([winner, loser], [loser, winner]):
        desired = resolve(order, [VM], SETTINGS)
        sts = {s.name: s for s in ingress_statuses(desired)}
        assert sts["alpha"].reason == Reason.APPLIED
        assert sts["beta"].reason == Reason.HOSTNAME_CONFLICT and not sts["beta"].ready
        assert "/m/a.yaml:1" in sts["beta"].message and "'alpha'" in sts["beta"].message
        assert sts["beta"].file == "/m/b.yaml" and sts["beta"].line == 7


def test_name_conflict_keeps_the_winner_applied() -> None:
    winner = ingress("web", "one.test", file="/m/a.yaml")
    loser = ingress("web", "two.test", file="/m/b.yaml")
    desired = resolve([loser, winner], [VM], SETTINGS)
    [st] = ingress_statuses(desired)
    assert st.file == "/m/a.yaml" and st.hosts == ("one.test:80",)
    # the loser's problem is listed with the winner, whose own state does not change
    assert st.reason == Reason.APPLIED and st.ready
    assert any("/m/b.yaml" in p and "already used" in p for p in st.problems)


def test_sorted_by_name_and_serialisable() -> None:
    ings = [resolved(ingress(n)) for n in ("zeta", "alpha", "mid")]
    sts = ingress_statuses(Desired(tuple(ings)))
    assert [s.name for s in sts] == ["alpha", "mid", "zeta"]
    d = sts[0].to_dict()
    assert d["hosts"] == ["alpha.test:80"] and d["targets"] == ["vm:8080"] and d["problems"] == []
    assert json.loads(json.dumps(d)) == d


def test_empty() -> None:
    assert ingress_statuses(Desired(())) == []
