"""In-process tests of the parts that keep the daemon alive and honest under host faults: the storage
health registry and its retries, config.json's bookkeeping, signal-safe triggers, the keeper's restart
policy, and a pass's trust in Caddy's config across Caddy restarts (``httpx.MockTransport`` as Caddy).
The same faults against the real daemon and Caddy are in ``tests/test_faults.py``."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.caddy.admin import AdminClient
from reconciler.caddy.configfile import FROM_BOOTSTRAP, FROM_FILE, FROM_MEMORY, FROM_PENDING, ConfigFile
from reconciler.errors import CaddyAdminInUse, CaddyUnavailable, StorageError
from reconciler.fsutil import StorageHealth, atomic_write
from reconciler.loop.keeper import DOWN, RUNNING, Keeper
from reconciler.loop.reconcile import Reconciler
from reconciler.loop.triggers import Burst, Trigger, Triggers
from reconciler.settings import Settings
from tests.helpers import FakeClock, ingress_yaml, instance_yaml, write
from tests.test_pass import FakeCaddy

# -- StorageHealth ------------------------------------------------------------------------------------------


def blocked_path(tmp_path: Path) -> tuple[Path, Path]:
    """A path whose parent is a regular file: every write fails (ENOTDIR), as root too."""
    blocker = tmp_path / "blocker"
    blocker.write_text("not a dir")
    return blocker, blocker / "file.json"


def test_a_failed_write_names_the_file_and_is_recorded_once_until_it_recovers(tmp_path: Path) -> None:
    changes: list[tuple[str, str | None]] = []
    health = StorageHealth(on_change=lambda p, e: changes.append((p, e.reason if e else None)))
    blocker, path = blocked_path(tmp_path)
    for _ in range(3):
        with pytest.raises(StorageError) as info:
            atomic_write(str(path), b"{}", health=health)
        assert info.value.path == str(path) and str(path) in str(info.value)
    assert changes == [(str(path), "Not a directory")]  # logged once, not at every attempt
    [entry] = health.snapshot()
    assert entry["file"] == str(path) and entry["attempts"] == 3 and entry["no_space"] is False
    assert health.failing(str(path)) and health.failing()
    blocker.unlink()
    atomic_write(str(path), b"{}", health=health, make_dir=True)
    assert changes[-1] == (str(path), None) and not health.failing() and health.snapshot() == []


def test_retries_back_off_and_an_old_retry_never_overwrites_newer_content(tmp_path: Path) -> None:
    clock = FakeClock()
    health = StorageHealth(clock=clock)
    blocker, path = blocked_path(tmp_path)
    with pytest.raises(StorageError):
        atomic_write(str(path), b"old", health=health)
    assert health.due() == []
    clock.advance(1.0)
    [retry] = health.due()
    assert health.due() == []  # handed out once
    retry()  # fails again: the next one waits twice as long
    clock.advance(1.9)
    assert health.due() == []
    clock.advance(0.2)
    [retry] = health.due()
    blocker.unlink()
    path.parent.mkdir()
    atomic_write(str(path), b"new", health=health)  # a newer write lands first
    retry()  # the stale retry is dropped
    assert path.read_bytes() == b"new" and not health.failing()


def test_retries_are_capped_at_thirty_seconds(tmp_path: Path) -> None:
    clock = FakeClock()
    health = StorageHealth(clock=clock)
    _, path = blocked_path(tmp_path)
    with pytest.raises(StorageError):
        atomic_write(str(path), [b"{", b"}"], health=health)  # pieces are retried too
    waited = []
    for _ in range(8):
        step = 0.0
        while not (jobs := health.due()):
            clock.advance(0.5)
            step += 0.5
        waited.append(step)
        jobs[0]()
    assert waited == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


# -- ConfigFile ----------------------------------------------------------------------------------------------

ADMIN = {"listen": "127.0.0.1:1", "config": {"persist": False}}


def test_startup_body_prefers_unsaved_then_file_then_memory_then_bare(tmp_path: Path) -> None:
    logged: list[tuple[str, dict[str, Any]]] = []
    health = StorageHealth()
    cf = ConfigFile(str(tmp_path / "caddy" / "config.json"), health=health,
                    log=lambda event, **kw: logged.append((event, kw)))
    memory = {"admin": {"listen": "old"}, "apps": {"m": 1}}
    # nothing on disk, nothing applied: the admin block alone
    body, origin = cf.startup_body(ADMIN)
    assert origin == FROM_BOOTSTRAP and json.loads(body) == {"admin": ADMIN}
    # the file (its admin block replaced by the current one)
    cf.save(json.dumps({"admin": {"listen": "x"}, "apps": {"f": 1}}).encode())
    cf.applied = memory
    body, origin = cf.startup_body(ADMIN)
    assert origin == FROM_FILE and json.loads(body) == {"admin": ADMIN, "apps": {"f": 1}}
    assert cf.in_sync()
    # damaged: reported, dirty, and the config this process applied wins
    Path(cf.path).write_text("{not json")
    body, origin = cf.startup_body(ADMIN)
    assert origin == FROM_MEMORY and json.loads(body) == {"admin": ADMIN, "apps": {"m": 1}}
    assert [e for e, _ in logged] == ["caddy.config_corrupt"] and logged[0][1]["file"] == cf.path
    assert not cf.in_sync()
    # a save that fails keeps its body: it is what a restart uses until it lands
    os.chmod(tmp_path / "caddy", 0o700)
    os.rename(tmp_path / "caddy", tmp_path / "moved")
    (tmp_path / "caddy").write_text("a file where the dir was")
    unsaved = json.dumps({"admin": ADMIN, "apps": {"u": 1}}).encode()
    with pytest.raises(StorageError):
        cf.save(unsaved)
    assert cf.startup_body(ADMIN) == (unsaved, FROM_PENDING)
    assert not cf.in_sync()
    (tmp_path / "caddy").unlink()
    for job in _all_due(health):
        job()
    assert cf.unsaved() is None and Path(cf.path).read_bytes() == unsaved


def _all_due(health: StorageHealth) -> list[Callable[[], None]]:
    # the registry's own clock: wait out the first delay without sleeping in the test
    health._clock = lambda: float("inf")  # type: ignore[method-assign]
    return health.due()


# -- Triggers from signal handlers -------------------------------------------------------------------------

def test_signal_handlers_never_block_on_the_triggers_lock() -> None:
    """Another thread holds the lock (say, an API write notifying) when the signal arrives: the handler
    returns at once, and the waiter picks the reasons up when it next looks."""
    t = Triggers(debounce=0.1, debounce_max=1.0, resync_interval=3600)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with t._cond:
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(5)
    done = threading.Event()

    def handler() -> None:
        t.notify_from_signal(Trigger.SIGHUP)
        t.wake_from_signal()
        t.stop_from_signal()
        done.set()

    threading.Thread(target=handler).start()
    try:
        assert done.wait(2), "a signal handler blocked on the triggers' lock"
    finally:
        release.set()
        holder.join(5)
    assert t.stopped


def test_a_signalled_reason_becomes_an_immediate_full_pass() -> None:
    t = Triggers(debounce=1.0, debounce_max=50.0, resync_interval=3600)
    t.notify(Trigger.WATCH, path="/x")
    got: list[Burst | None] = []
    waiter = threading.Thread(target=lambda: got.append(t.wait(timeout=20)))
    waiter.start()
    t.notify_from_signal(Trigger.SIGHUP)
    waiter.join(20)
    [burst] = got
    assert burst is not None and burst.name == "sighup+watch" and burst.resync
    assert burst.paths is None  # a resync reads everything


# -- the keeper's restart policy ---------------------------------------------------------------------------

class StubSupervisor:
    """Just enough of a supervisor for the keeper's policy: processes that live until told to die."""

    label = "Caddy"
    event = "caddy"
    readiness = "admin API"

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.pid: int | None = None
        self.answered = False
        self.started_at: float | None = None
        self.last_exit: dict[str, Any] | None = None
        self.cancel = threading.Event()
        self.fail_with: Exception | None = None
        self.starts = 0
        self._alive = False
        self.client = AdminClient("http://127.0.0.1:1")
        self.config_path = "config.json"

    def ensure_running(self) -> bool:
        self.starts += 1
        if self.fail_with is not None:
            raise self.fail_with
        self.pid, self._alive, self.answered, self.started_at = 1000 + self.starts, True, True, self.clock()
        return True

    def die(self) -> None:
        self._alive = False

    def alive(self) -> bool:
        return self._alive

    def process_alive(self) -> bool:
        return self._alive

    def running(self) -> bool:
        return self._alive and self.answered

    def note_exit(self, now: float) -> dict[str, Any]:
        uptime = now - self.started_at if self.started_at is not None else None
        self.last_exit = {"pid": self.pid, "code": 1, "uptime_seconds": uptime}
        self.pid, self.answered, self.started_at = None, False, None
        return self.last_exit

    def state(self) -> dict[str, Any]:
        return {"pid": self.pid}

    def log_tail(self, lines: int = 5) -> str:
        return ""

    def unresponsive(self) -> str:
        return "does not answer"

    def adopted_check(self) -> None:
        pass

    def tend(self) -> None:
        pass


def keeper_with(clock: FakeClock, sup: StubSupervisor) -> tuple[Keeper, list[str], list[dict[str, Any]]]:
    started: list[str] = []
    events: list[dict[str, Any]] = []
    keeper = Keeper(sup, on_started=lambda: started.append("x"),
                    log=lambda event, **kw: events.append({"event": event, **kw}), stable_after=30.0, clock=clock)
    return keeper, started, events


def test_quick_deaths_back_off_and_flap_until_caddy_stays_up() -> None:
    clock = FakeClock()
    sup = StubSupervisor(clock)
    keeper, started, events = keeper_with(clock, sup)
    keeper._attempt(first=True)
    assert keeper.phase == RUNNING and keeper.generation == 1 and started == []  # the first pass follows anyway
    delays = []
    for n in range(1, 6):
        clock.advance(1.0)
        sup.die()
        keeper._tick()  # sees the death
        assert keeper.phase == DOWN and keeper.failures == n
        delay = keeper.record.retry_at - clock()
        delays.append(delay)
        assert min(30.0, 0.5 * 2 ** n) / 2 <= delay <= min(30.0, 0.5 * 2 ** n)
        keeper._tick()
        assert sup.starts == n  # not before the delay
        clock.advance(delay)
        keeper._tick()
        assert sup.starts == n + 1 and keeper.phase == RUNNING
        assert keeper.flapping is (n >= 2)
    assert keeper.problem() is not None and keeper.problem().startswith("Caddy is flapping")  # type: ignore[union-attr]
    assert keeper.restarts == 5 and keeper.generation == 6
    # it stays up: after stable_after the count is gone and a later death restarts at once
    clock.advance(30.0)
    keeper._tick()
    assert keeper.failures == 0 and not keeper.flapping and keeper.problem() is None
    assert [e["event"] for e in events].count("caddy.stable") == 1
    clock.advance(100.0)
    sup.die()
    keeper._tick()
    assert keeper.failures == 0 and keeper.record.retry_at == clock()
    keeper._tick()
    assert sup.starts == 7


def test_a_failing_start_is_retried_with_backoff_and_never_raises() -> None:
    clock = FakeClock()
    sup = StubSupervisor(clock)
    keeper, started, events = keeper_with(clock, sup)
    sup.fail_with = OSError(28, "No space left on device")
    keeper._attempt(first=True)
    assert keeper.phase == DOWN and keeper.failures == 1 and keeper.first_error is None
    assert events[-1]["event"] == "caddy.start_failed" and "No space" in events[-1]["error"]
    assert keeper.problem() == (f"Caddy is not running: {sup.fail_with}; next attempt in "
                                f"{keeper.state()['next_attempt_in']}s")
    sup.fail_with = CaddyUnavailable("hung")
    clock.advance(5.0)
    keeper._tick()
    assert keeper.failures == 2 and events[-1]["event"] == "caddy.restart_failed"
    sup.fail_with = None
    clock.advance(5.0)
    keeper._tick()
    assert keeper.phase == RUNNING and started == ["x"] and keeper.up() is True  # a pass is asked for


def test_another_admin_server_at_the_first_start_is_handed_to_setup() -> None:
    clock = FakeClock()
    sup = StubSupervisor(clock)
    keeper, _, _ = keeper_with(clock, sup)
    sup.fail_with = CaddyAdminInUse("another process already listens")
    keeper._attempt(first=True)
    assert keeper.first_error is sup.fail_with


def test_the_first_start_is_announced_only_when_its_waiter_gave_up() -> None:
    clock = FakeClock()
    sup = StubSupervisor(clock)
    keeper, started, _ = keeper_with(clock, sup)
    keeper.start()
    assert keeper.wait_first(5.0) is True
    keeper.stop()
    assert started == []  # the caller runs the first pass itself
    late, late_started, _ = keeper_with(clock, StubSupervisor(clock))
    assert late.wait_first(0.01) is False  # (its thread not even started: the start takes "too long")
    late._attempt(first=True)
    assert late_started == ["x"]  # so the keeper asks for the pass once Caddy is up


# -- a pass trusts Caddy's config only within one Caddy generation -----------------------------------------

def one_ingress(tmp: Path) -> tuple[Path, Settings]:
    """A manifest dir with ``web.test`` -> vm:9000, and settings reading it."""
    manifests, instances = tmp / "manifests", tmp / "instances"
    write(instances / "vms.yaml", instance_yaml("vm"))
    write(manifests / "web.yaml", ingress_yaml("web", "web.test", 8080, "vm", 9000))
    return manifests, Settings(data_dir=str(tmp / "data"), manifest_dirs=(str(manifests),),
                               instances_dir=str(instances), http_port=18080, https_port=18443, admin_port=12019)


def test_a_pass_reads_caddy_back_after_a_restart_whatever_its_trigger(tmp_path: Path) -> None:
    manifests, settings = one_ingress(tmp_path)
    caddy = FakeCaddy()
    generation = [1]
    rec = Reconciler(settings=settings, client=AdminClient("http://caddy", transport=httpx.MockTransport(caddy)),
                     generation=lambda: generation[0], include_api=False)
    assert rec.run_pass("start").outcome == "applied"
    assert caddy.requests == ["GET /config/", "POST /load"]
    caddy.requests.clear()

    write(manifests / "web.yaml", ingress_yaml("web", "web.test", 8080, "vm", 9001))
    assert rec.run_pass("watch").outcome == "applied"
    assert caddy.requests == ["POST /load"]  # same Caddy: what we loaded is trusted
    caddy.requests.clear()

    generation[0] += 1  # Caddy restarted (it came up with its admin block only)
    caddy.config = {"admin": caddy.config["admin"]}
    assert rec.run_pass("watch").outcome == "applied"
    assert caddy.requests == ["GET /config/", "POST /load"]  # read back, found bare, loaded
    assert "9001" in json.dumps(caddy.config)


def test_a_config_json_that_could_not_be_saved_is_saved_by_the_next_pass(tmp_path: Path) -> None:
    _, settings = one_ingress(tmp_path)
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data dir goes")
    config_file = ConfigFile(str(blocker / "caddy" / "config.json"), health=StorageHealth())
    failures: list[BaseException] = []

    def defer(job: Callable[[], None]) -> None:
        try:
            job()
        except StorageError as exc:
            failures.append(exc)

    rec = Reconciler(settings=settings, client=AdminClient("http://caddy", transport=httpx.MockTransport(FakeCaddy())),
                     config_file=config_file, defer=defer, include_api=False)
    assert rec.run_pass("start").outcome == "applied"
    assert failures and not config_file.in_sync()
    blocker.unlink()
    assert rec.run_pass("resync").outcome == "unchanged"  # nothing changed, but the file is behind
    saved = json.loads(Path(config_file.path).read_text())
    assert "web.test" in json.dumps(saved) and config_file.in_sync()


def test_a_stray_signal_wakes_the_loop_without_a_pass_or_touching_a_retry() -> None:
    clock = FakeClock()
    t = Triggers(debounce=0.1, debounce_max=1.0, resync_interval=3600, clock=clock)
    t.retry_in(5.0)
    t.wake_from_signal()
    assert t.wait(timeout=0) is None and t.bursts == 0
    clock.advance(5.0)
    retry = t.wait(timeout=0)
    assert retry is not None and retry.name == "retry"  # the pending retry still fires


# -- hypeman-ingress restore ---------------------------------------------------------------------------------

def test_restore_writes_the_last_good_api_files_back_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    from reconciler.cli import main
    from reconciler.state.store import StateStore

    data = tmp_path / "data"
    api = data / "ingresses"
    assert main(["restore", "--data-dir", str(data)]) == 1  # no lastgood.json: nothing can be restored
    assert "cannot read the last good versions" in capsys.readouterr().err
    (data / "state").mkdir(parents=True)
    (data / "state" / "lastgood.json").write_text("{damaged")
    assert main(["restore", "--data-dir", str(data)]) == 1
    from reconciler.model import GoodFile
    good = {str(api): {"b.yaml": GoodFile(str(api / "b.yaml"), "d1", "name: b\n", 1.0),
                       "team/c.yaml": GoodFile(str(api / "team/c.yaml"), "d2", "name: c\n", 1.0)},
            "/elsewhere": {"x.yaml": GoodFile("/elsewhere/x.yaml", "d3", "name: x\n", 1.0)}}
    StateStore(str(data / "state")).save_lastgood(good, {})
    assert main(["restore", "--data-dir", str(data), "--dry-run"]) == 0
    assert not api.exists() and "would write" in capsys.readouterr().out
    assert main(["restore", "--data-dir", str(data)]) == 0
    assert (api / "b.yaml").read_text() == "name: b\n" and (api / "team" / "c.yaml").read_text() == "name: c\n"
    assert oct(api.stat().st_mode & 0o777) == "0o700" and oct((api / "b.yaml").stat().st_mode & 0o777) == "0o600"
    assert not [p for p in data.iterdir() if ".restore." in p.name]  # the temp dir was renamed into place
    (api / "b.yaml").write_text("name: b  # edited since\n")
    (api / "team" / "c.yaml").unlink()
    assert main(["restore", "--data-dir", str(data)]) == 0
    assert (api / "b.yaml").read_text() == "name: b  # edited since\n"  # never overwritten
    assert (api / "team" / "c.yaml").read_text() == "name: c\n"
