"""One reconcile pass in process, against a Caddy played by ``httpx.MockTransport``: every stage of the
ladder (read -> plan -> apply -> report) and the outer loop's requeue policy, fast and deterministic.
The same behaviour against the real Caddy is in tests/test_daemon.py and tests/test_supervisor.py.

:class:`FakeCaddy` keeps what was loaded (``GET /config/`` returns it), refuses any config that listens on
a port in ``held`` the way Caddy does (400 naming the address), and can be made unreachable."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.caddy.admin import AdminClient
from reconciler.fsutil import StorageHealth
from reconciler.loop.background import Background
from reconciler.loop.changes import ChangeLog
from reconciler.loop.daemon import Housekeeping, Loop, Requeue, Tickets, requeue
from reconciler.loop.reconcile import Reconciler
from reconciler.loop.triggers import Burst, Trigger, Triggers
from reconciler.model import Reason
from reconciler.settings import Settings
from reconciler.state.metrics import Metrics
from reconciler.state.store import StateStore
from reconciler.status import IngressStatus
from tests.helpers import ingress_yaml, instance_yaml, write


class FakeCaddy:
    def __init__(self) -> None:
        self.config: Any = None
        self.requests: list[str] = []
        self.loaded: list[Any] = []  # every config a POST /load offered (accepted or not)
        self.held: set[int] = set()
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        self.requests.append(f"{request.method} {request.url.path}")
        if request.method == "GET" and request.url.path == "/config/":
            return httpx.Response(200, content=json.dumps(self.config).encode(),
                                  headers={"content-type": "application/json"})
        if request.method == "POST" and request.url.path == "/load":
            config = json.loads(request.content)
            self.loaded.append(config)
            for server in config.get("apps", {}).get("http", {}).get("servers", {}).values():
                for listen in server.get("listen", []):
                    port = int(listen.rsplit(":", 1)[1])
                    if port in self.held:
                        message = (f"loading config: loading new config: http app module: start: listening on "
                                   f"{listen}: listen tcp {listen}: bind: address already in use")
                        return httpx.Response(400, json={"error": message})
            self.config = config
            return httpx.Response(200)
        return httpx.Response(404)

    def hosts(self) -> set[str]:
        """Every hostname the live config routes."""
        found: set[str] = set()

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "host" and isinstance(v, list):
                        found.update(v)
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(self.config)
        return found

    def gets(self) -> int:
        return self.requests.count("GET /config/")

    def loads(self) -> int:
        return self.requests.count("POST /load")


class World:
    """Manifests, instances, a data dir, a FakeCaddy and a Reconciler wired to them."""

    def __init__(self, tmp: Path) -> None:
        self.manifests, self.instances = tmp / "manifests", tmp / "instances"
        write(self.instances / "vms.yaml", instance_yaml("vm"))
        self.settings = Settings(data_dir=str(tmp / "data"), manifest_dirs=(str(self.manifests),),
                                 instances_dir=str(self.instances), listen_address="127.0.0.1",
                                 http_port=18080, https_port=18443, admin_port=12019)
        self.caddy = FakeCaddy()
        self.generation = 1
        self.store = StateStore(self.settings.state_dir)
        self.rec = Reconciler(settings=self.settings, include_api=False, store=self.store,
                              client=AdminClient("http://caddy", transport=httpx.MockTransport(self.caddy)),
                              validate=lambda config: None, generation=lambda: self.generation)

    def ingress(self, name: str, port: int = 8001, target: int = 9000) -> Path:
        return write(self.manifests / f"{name}.yaml", ingress_yaml(name, f"{name}.test", port, "vm", target))

    def run(self, trigger: str, changed: set[Path] | None = None) -> Any:
        paths = [str(p) for p in changed] if changed is not None else None
        return self.rec.run_pass(Burst.of(*trigger.split("+"), paths=paths))

    @property
    def statuses(self) -> tuple[IngressStatus, ...]:
        assert self.rec.snapshot is not None
        return self.rec.snapshot.statuses

    def reasons(self) -> dict[str, str]:
        return {st.name: st.reason for st in self.statuses}


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    yield World(tmp_path)


# -- plan: what is trusted, what is read back --------------------------------------------------------------

def test_start_reads_caddy_back_and_loads(world: World) -> None:
    world.ingress("web")
    result = world.run("start")
    assert result.outcome == "applied" and result.loads == 1 and result.converged
    assert world.caddy.requests == ["GET /config/", "POST /load"]
    assert world.caddy.hosts() == {"web.test"}


@pytest.mark.parametrize("trigger", ["watch", "api", "api+watch"])
def test_file_and_api_passes_trust_what_this_process_loaded(world: World, trigger: str) -> None:
    world.ingress("web")
    world.run("start")
    world.caddy.requests.clear()
    changed = world.ingress("web", target=9001)
    assert world.run(trigger, {changed}).outcome == "applied"
    assert world.caddy.requests == ["POST /load"]  # no GET /config/


@pytest.mark.parametrize("trigger", ["resync", "retry", "caddy-restart", "sighup", "start"])
def test_other_passes_read_caddy_back_and_correct_drift(world: World, trigger: str) -> None:
    world.ingress("web")
    world.run("start")
    world.caddy.config = {"admin": world.caddy.config["admin"]}  # drift behind our back
    world.caddy.requests.clear()
    assert world.run(trigger).outcome == "applied"
    assert world.caddy.requests == ["GET /config/", "POST /load"] and world.caddy.hosts() == {"web.test"}


def test_a_restarted_caddy_is_read_back_even_for_a_file_change(world: World) -> None:
    world.ingress("web")
    world.run("start")
    world.generation += 1
    world.caddy.config = {"admin": world.caddy.config["admin"]}
    world.caddy.requests.clear()
    changed = world.ingress("other", port=8002)
    assert world.run("watch", {changed}).outcome == "applied"
    assert world.caddy.requests == ["GET /config/", "POST /load"]
    assert world.caddy.hosts() == {"web.test", "other.test"}


# -- apply: the no-op skip -----------------------------------------------------------------------------------

def test_nothing_changed_loads_nothing(world: World) -> None:
    world.ingress("web")
    world.run("start")
    world.caddy.requests.clear()
    result = world.run("resync")
    assert result.outcome == "unchanged" and result.loads == 0 and result.converged
    assert world.caddy.requests == ["GET /config/"]
    # also when Caddy re-serialised it (sorted keys, re-encoded numbers): compared parsed, never as bytes
    world.caddy.config = json.loads(json.dumps(world.caddy.config, sort_keys=True))
    assert world.run("resync").outcome == "unchanged"


# -- apply: rejection, isolation, culprit memory -----------------------------------------------------------

def test_a_rejected_ingress_is_isolated_and_the_rest_applied(world: World) -> None:
    world.ingress("web", port=8001)
    world.ingress("blocked", port=8002)
    world.caddy.held.add(8002)
    result = world.run("start")
    assert result.outcome == "partial" and result.converged and result.rejected == ("blocked",)
    assert result.loads == 2  # the whole config, then without the culprit
    assert world.caddy.hosts() == {"web.test"}
    assert world.reasons() == {"web": "Applied", "blocked": "CaddyRejected"}
    blocked = next(st for st in world.statuses if st.name == "blocked")
    assert "8002" in blocked.message and not blocked.ready
    assert "blocked" in (result.error or "")


def test_a_culprit_stays_out_until_its_inputs_change_or_a_resync_retries_it(world: World) -> None:
    world.ingress("web", port=8001)
    world.ingress("blocked", port=8002)
    world.caddy.held.add(8002)
    world.run("start")
    offered = len(world.caddy.loaded)
    # another file changes: the culprit is not offered to Caddy again
    changed = world.ingress("web", port=8001, target=9001)
    result = world.run("watch", {changed})
    assert result.outcome == "partial" and result.loads == 1 and result.rejected == ("blocked",)
    assert all("blocked.test" not in json.dumps(c) for c in world.caddy.loaded[offered:])
    assert world.reasons()["blocked"] == "CaddyRejected"
    # a resync retries it (still held: rejected again, the rest stays)
    offered = len(world.caddy.loaded)
    assert world.run("resync").rejected == ("blocked",)
    assert any("blocked.test" in json.dumps(c) for c in world.caddy.loaded[offered:])
    # the port is free: the next resync applies it
    world.caddy.held.clear()
    result = world.run("resync")
    assert result.outcome == "applied" and result.rejected == ()
    assert world.caddy.hosts() == {"web.test", "blocked.test"}
    assert world.reasons() == {"web": "Applied", "blocked": "Applied"}


def test_a_changed_culprit_is_tried_again_at_once(world: World) -> None:
    world.ingress("web", port=8001)
    world.ingress("blocked", port=8002)
    world.caddy.held.add(8002)
    world.run("start")
    fixed = world.ingress("blocked", port=8003)
    result = world.run("watch", {fixed})
    assert result.outcome == "applied" and world.caddy.hosts() == {"web.test", "blocked.test"}


# -- apply: Caddy unreachable -------------------------------------------------------------------------------

def test_an_unreachable_caddy_ends_the_pass_transient_and_is_read_back_next_time(world: World) -> None:
    world.ingress("web")
    world.run("start")
    world.caddy.down = True
    changed = world.ingress("web", target=9001)
    result = world.run("watch", {changed})
    assert result.outcome == "unavailable" and result.transient and not result.converged
    assert "unreachable" in (result.error or "")
    assert world.reasons() == {"web": "Pending"}
    web = world.statuses[0]
    assert web.message.startswith("not applied yet: ") and not web.ready
    world.caddy.down = False
    world.caddy.requests.clear()
    result = world.run("retry")
    assert result.outcome == "applied" and world.caddy.requests == ["GET /config/", "POST /load"]
    # after a failed pass even a file change reads Caddy back (it may have come back with anything)
    world.caddy.down = True
    world.run("watch", {world.ingress("web", target=9002)})
    world.caddy.down = False
    world.caddy.requests.clear()
    world.run("watch", {world.ingress("web", target=9003)})
    assert world.caddy.requests[0] == "GET /config/"


# -- report: the status a pass publishes ---------------------------------------------------------------------

def test_the_status_a_pass_publishes(world: World) -> None:
    world.ingress("web")
    write(world.manifests / "broken.yaml", "name: broken\nrules: nope\n")
    first = world.run("start")
    doc = world.rec.status_document()
    assert doc["revision"]["last_attempted"] == doc["revision"]["last_applied"] == first.revision
    assert doc["last_attempted"]["outcome"] == "applied" and doc["last_attempted"]["trigger"] == "start"
    assert doc["last_error"] is None and doc["counts"] == {"ingresses": 2, "ready": 1}
    assert [i["name"] for i in doc["ingresses"]] == ["broken", "web"]
    assert {i["name"]: i["reason"] for i in doc["ingresses"]} == {"broken": "InvalidManifest", "web": "Applied"}
    assert [p["file"] for p in doc["problems"]] == [str(world.manifests / "broken.yaml")]
    assert doc["sources"][0]["ok"] is True and doc["sources"][0]["files"] == 2
    # idle passes fold into one history entry; a failed one is recorded with its error
    world.run("resync")
    world.run("resync")
    assert world.rec.status_document()["history"][-1]["repeats"] == 2
    world.caddy.down = True
    world.run("watch", {world.ingress("web", target=9001)})
    doc = world.rec.status_document()
    assert doc["last_attempted"]["outcome"] == "unavailable" and doc["last_error"]
    assert doc["revision"]["last_applied"] == first.revision != doc["revision"]["last_attempted"]
    # the same document is what status.json holds
    saved = json.loads(Path(world.settings.state_dir, "status.json").read_text())
    assert saved == json.loads(json.dumps(doc))


# -- the outer loop's requeue policy and tickets -----------------------------------------------------------

def test_requeue_backs_off_after_transient_failures_and_resets_after_a_success(world: World) -> None:
    world.ingress("web")
    world.caddy.down = True
    failures = 0
    for n in range(1, 6):
        result = world.run("retry")
        again = requeue(result, world.statuses, failures, rng=random.Random(n))
        bound = min(30.0, 0.5 * 2 ** n)
        assert again.failures == n and again.backoff and again.delay is not None
        assert bound / 2 <= again.delay <= bound
        failures = again.failures
    world.caddy.down = False
    result = world.run("retry")
    assert requeue(result, world.statuses, failures) == Requeue(0, None)


def test_requeue_looks_again_soon_while_a_certificate_is_pending(world: World) -> None:
    world.ingress("web")
    result = world.run("start")
    pending = [dataclasses.replace(st, reason=Reason.CERTIFICATE_PENDING, ready=False) for st in world.statuses]
    failing = [dataclasses.replace(st, reason=Reason.CERTIFICATE_FAILING, ready=False) for st in world.statuses]
    assert requeue(result, pending, 3) == Requeue(0, 2.0)
    assert requeue(result, failing, 0) == Requeue(0, 15.0)


def test_a_ticket_is_released_by_its_pass_and_says_whether_it_converged() -> None:
    tickets = Tickets()
    assert tickets.wait(1, 0.01, lambda: False) is False  # not served yet: times out
    tickets.done(1, converged=False)
    assert tickets.wait(1, 1.0, lambda: False) is False  # served, not converged (Caddy down, say)
    tickets.done(2, converged=True)
    assert tickets.wait(1, 1.0, lambda: False) is True and tickets.wait(2, 1.0, lambda: False) is True
    assert tickets.wait(3, 5.0, lambda: True) is False  # stopping: no wait


# -- the outer loop in process ------------------------------------------------------------------------------

class _Keeper:
    generation = 1


class _Watcher:
    def refresh(self) -> bool:
        return False


def loop_of(world: World, prefetched: tuple[Any, float] | None) -> tuple[Loop, Background]:
    triggers = Triggers(debounce=0.01, debounce_max=0.1, resync_interval=3600)
    background = Background()
    first = [prefetched]
    loop = Loop(reconciler=world.rec, triggers=triggers, keeper=_Keeper(), watcher=_Watcher(),  # type: ignore[arg-type]
                changes=ChangeLog(Metrics(), {}), background=background,
                housekeeping=Housekeeping(storage=StorageHealth(), background=background, reconciler=world.rec),
                prefetched=lambda: first.pop() if first else None)
    return loop, background


def test_the_first_read_serves_the_first_pass_only_when_nothing_changed_since(world: World) -> None:
    """The daemon reads its inputs while Caddy starts; a file event (or an API write) that joins the first
    burst means those inputs are old: the pass must read them again, or the change waits for a resync."""
    world.ingress("web")
    stale = world.rec.reader.read()  # the first read ...
    changed = world.ingress("web", target=9001)  # ... then a change before the first pass
    loop, background = loop_of(world, (stale, 0.01))
    loop.triggers.notify(Trigger.WATCH, path=str(changed))
    loop.triggers.notify(Trigger.START, immediate=True)
    burst = loop.triggers.wait(timeout=5)
    assert burst is not None and burst.triggers == {Trigger.START, Trigger.WATCH}
    loop._turn(burst)
    background.close()
    assert "9001" in json.dumps(world.caddy.config)  # read again, not the old inputs
    assert loop.tickets.wait(burst.number, 1.0, lambda: False)  # its tickets released, converged


def test_the_first_read_is_used_when_only_start_asked(world: World) -> None:
    world.ingress("web")
    first = world.rec.reader.read()
    loop, background = loop_of(world, (first, 0.25))
    loop.triggers.notify(Trigger.START, immediate=True)
    burst = loop.triggers.wait(timeout=5)
    assert burst is not None
    loop._turn(burst)
    background.close()
    assert loop.passes[-1].phases[0] == ("read", 0.25)  # the prefetched read's time: it was used


def test_a_transient_failure_asks_for_a_retry_with_backoff(world: World) -> None:
    world.ingress("web")
    world.caddy.down = True
    loop, background = loop_of(world, None)
    loop.triggers.notify(Trigger.START, immediate=True)
    burst = loop.triggers.wait(timeout=5)
    assert burst is not None
    loop._turn(burst)
    background.close()
    assert loop.passes[-1].outcome == "unavailable" and loop._requeue.failures == 1
    assert loop.triggers._retry_at is not None  # a retry is due (within backoff(1) <= 1 s)
    assert not loop.tickets.wait(burst.number, 1.0, lambda: False)  # released, not converged
