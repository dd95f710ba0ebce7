"""reconciler.loop.isolate: find the ingresses that make Caddy refuse a config, apply the rest.

Fake ``load`` / ``validate`` callables stand in for Caddy: they look at the rendered config (hosts, listen
ports) the way Caddy would, and count their calls.
"""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.errors import CaddyRejected
from reconciler.loop.isolate import bind_port, isolate
from reconciler.model import Desired, Ingress, Origin, ResolvedIngress, ResolvedRule, Rule, Upstream
from reconciler.render import render
from reconciler.settings import Settings

SETTINGS = Settings(data_dir="/srv/hypeman", admin_port=2019, listen_address="127.0.0.1",
                    http_port=18080, https_port=18443)


def bind_error(port: int) -> str:
    """Caddy 2.11's message when a listener's port is taken (measured)."""
    return (f"loading config: loading new config: http app module: start: listening on 127.0.0.1:{port}: "
            f"listen tcp 127.0.0.1:{port}: bind: address already in use")


def ing(name: str, *rules: tuple[str, int], pos: int = 0) -> ResolvedIngress:
    rules = rules or ((f"{name}.test", 8000),)
    i = Ingress(name, f"id-{name}", tuple(Rule(h, p, "vm", 9000) for h, p in rules),
                Origin(0, f"{pos:03d}-{name}.yaml", 0, f"/m/{pos:03d}-{name}.yaml", 1))
    return ResolvedIngress(i, tuple(ResolvedRule(r, n, Upstream(f"127.0.0.1:{9000 + n}"))
                                    for n, r in enumerate(i.rules)))


def desired(*ings: ResolvedIngress) -> Desired:
    return Desired(tuple(ings))


def hosts(config: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for server in config["apps"]["http"]["servers"].values():
        for route in server["routes"]:
            for m in route.get("match", []):
                out.update(m.get("host", []))
    return out


def ports(config: dict[str, Any]) -> set[int]:
    return {int(listen.rsplit(":", 1)[1]) for server in config["apps"]["http"]["servers"].values()
            for listen in server["listen"]}


class FakeCaddy:
    """``load`` refuses configs that listen on a taken port (with Caddy's bind message) or contain a host
    it dislikes (with a generic message); ``validate`` knows only about the disliked hosts (it binds
    nothing), as ``caddy validate`` does."""

    def __init__(self, *, taken: set[int] | None = None, bad_hosts: set[str] | None = None,
                 bad_pairs: set[frozenset[str]] | None = None, validate_blind: bool = False) -> None:
        self.taken = taken or set()
        self.bad_hosts = bad_hosts or set()
        self.bad_pairs = bad_pairs or set()
        self.validate_blind = validate_blind
        self.loaded: list[dict[str, Any]] = []
        self.load_calls = 0
        self.validate_calls = 0

    def _problem(self, config: dict[str, Any]) -> str | None:
        h = hosts(config)
        bad = sorted(h & self.bad_hosts)
        if bad:
            return f"loading config: provisioning route for {bad[0]}: something Caddy dislikes"
        for pair in self.bad_pairs:
            if pair <= h:
                return "loading config: two routes that cannot live together"
        return None

    def load(self, config: dict[str, Any]) -> None:
        self.load_calls += 1
        for port in sorted(ports(config) & self.taken):
            raise CaddyRejected(bind_error(port))
        problem = self._problem(config)
        if problem is not None:
            raise CaddyRejected(problem)
        self.loaded.append(config)

    def validate(self, config: dict[str, Any]) -> str | None:
        self.validate_calls += 1
        return None if self.validate_blind else self._problem(config)


def run(d: Desired, caddy: FakeCaddy) -> Any:
    """As the pass does: load the whole config first, isolate on rejection."""
    config = render(d, SETTINGS)
    try:
        caddy.load(config)
    except CaddyRejected as exc:
        return isolate(d, SETTINGS, exc.message, load=caddy.load, validate=caddy.validate)
    pytest.fail("the full config was expected to be rejected")


# --- bind errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "port"), [
    (bind_error(8081), 8081),
    ("listening on :8081: listen tcp :8081: bind: address already in use", 8081),
    ("loading new config: http app module: start: listening on [::1]:9443: listen tcp6 [::1]:9443: bind: "
     "cannot assign requested address", 9443),
    ("listen tcp 0.0.0.0:80: bind: permission denied", 80),
    ("loading config: json: cannot unmarshal string into Go value of type int", None),
    ("dial tcp 127.0.0.1:8081: connect: connection refused", None),
])
def test_bind_port(message: str, port: int | None) -> None:
    assert bind_port(message) == port


def test_bind_error_takes_out_exactly_the_ingresses_on_that_port() -> None:
    d = desired(ing("a", ("a.test", 8000)), ing("b", ("b.test", 8081)),
                ing("both", ("both.test", 8000), ("both.test", 8081)),  # one rule on the port: the whole ingress
                ing("c", ("c.test", 8002)))
    caddy = FakeCaddy(taken={8081})
    iso = run(d, caddy)
    assert set(iso.rejected) == {"b", "both"}
    assert all("port 8081" in m and "address already in use" in m for m in iso.rejected.values())
    assert iso.error is None and iso.loads == 1
    assert iso.config is not None and iso.config == caddy.loaded[-1]
    assert hosts(iso.config) == {"a.test", "c.test"}
    assert 8081 not in ports(iso.config)
    assert caddy.validate_calls == 0  # the message named the port: no bisecting needed
    assert iso.config == render(desired(d.ingresses[0], d.ingresses[3]), SETTINGS)


def test_two_taken_ports_are_found_one_after_the_other() -> None:
    d = desired(ing("a", ("a.test", 8000)), ing("b", ("b.test", 8081)), ing("c", ("c.test", 8082)))
    caddy = FakeCaddy(taken={8081, 8082})
    iso = run(d, caddy)
    assert set(iso.rejected) == {"b", "c"}
    assert "8081" in iso.rejected["b"] and "8082" in iso.rejected["c"]
    assert iso.loads == 2 and hosts(iso.config) == {"a.test"}


def test_every_ingress_on_the_taken_port_leaves_an_empty_but_valid_config() -> None:
    d = desired(ing("a", ("a.test", 8081)), ing("b", ("b.test", 8081)))
    iso = run(d, FakeCaddy(taken={8081}))
    assert set(iso.rejected) == {"a", "b"} and iso.error is None
    assert iso.config is not None and iso.config["apps"]["http"]["servers"] == {}
    assert iso.config["admin"] == render(d, SETTINGS)["admin"]  # the admin block is always there


# --- other errors: bisect with validate --------------------------------------------------------------------


@pytest.mark.parametrize("bad", [{"i03"}, {"i00"}, {"i11"}, {"i02", "i09"}, {"i00", "i01", "i11"}])
def test_other_errors_bisect_finds_exactly_the_bad_ones(bad: set[str]) -> None:
    d = desired(*(ing(f"i{n:02d}", pos=n) for n in range(12)))
    caddy = FakeCaddy(bad_hosts={f"{b}.test" for b in bad})
    iso = run(d, caddy)
    assert set(iso.rejected) == bad
    assert all("something Caddy dislikes" in m for m in iso.rejected.values())
    assert iso.error is None and iso.loads == 1
    assert hosts(iso.config) == {f"i{n:02d}.test" for n in range(12)} - {f"{b}.test" for b in bad}
    # bisecting, not trying every ingress alone
    assert caddy.validate_calls <= 2 * len(bad) * 4 + 1


def test_bisect_blames_the_later_of_two_ingresses_that_fail_only_together() -> None:
    d = desired(*(ing(f"i{n}", pos=n) for n in range(6)))
    caddy = FakeCaddy(bad_pairs={frozenset({"i1.test", "i4.test"})})
    iso = run(d, caddy)
    assert set(iso.rejected) == {"i4"}
    assert hosts(iso.config) == {f"i{n}.test" for n in range(6)} - {"i4.test"}


def test_bind_error_then_another_error_in_the_next_round() -> None:
    d = desired(ing("a", ("a.test", 8000)), ing("b", ("b.test", 8081)), ing("c", ("c.test", 8000)))
    caddy = FakeCaddy(taken={8081}, bad_hosts={"c.test"})
    iso = run(d, caddy)
    assert set(iso.rejected) == {"b", "c"}
    assert "8081" in iso.rejected["b"] and "dislikes" in iso.rejected["c"]
    assert iso.loads == 2 and hosts(iso.config) == {"a.test"}


# --- nothing explains it -------------------------------------------------------------------------------------


def test_nothing_explains_it_gives_an_error_and_no_config() -> None:
    d = desired(ing("a"), ing("b", ("b.test", 8001)))
    caddy = FakeCaddy(bad_hosts={"a.test"}, validate_blind=True)  # validate accepts everything
    iso = run(d, caddy)
    assert iso.config is None and iso.rejected == {} and iso.loads == 0
    assert iso.error is not None and "no single ingress explains it" in iso.error
    assert "something Caddy dislikes" in iso.error
    assert caddy.loaded == []


def test_bind_error_naming_a_port_no_ingress_uses() -> None:
    d = desired(ing("a", ("a.test", 8000)))
    caddy = FakeCaddy()
    iso = isolate(d, SETTINGS, bind_error(2020), load=caddy.load, validate=caddy.validate)
    assert iso.config is None and iso.rejected == {} and iso.error is not None
    assert "2020" in iso.error and caddy.load_calls == 0


def test_still_refused_after_removing_culprits_reports_what_it_found() -> None:
    """The culprits are found, but the rest is still refused for a reason nobody can pin down."""
    d = desired(ing("a", ("a.test", 8000)), ing("b", ("b.test", 8081)))
    caddy = FakeCaddy(taken={8081}, bad_hosts={"a.test"}, validate_blind=True)
    iso = run(d, caddy)
    assert iso.config is None and caddy.loaded == []
    assert set(iso.rejected) == {"b"}
    assert iso.error is not None and "dislikes" in iso.error


def test_gives_up_after_max_rounds() -> None:
    n = 5
    d = desired(*(ing(f"i{k}", (f"i{k}.test", 8100 + k)) for k in range(n)))
    caddy = FakeCaddy(taken={8100 + k for k in range(n)})
    iso = isolate(d, SETTINGS, bind_error(8100), load=caddy.load, validate=caddy.validate, max_rounds=3)
    assert iso.config is None and iso.loads == 3
    assert iso.error is not None and "gave up" in iso.error
    assert set(iso.rejected) == {"i0", "i1", "i2"}
