"""The daemon: supervise Caddy, watch the sources, and run passes until stopped."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import threading
import time
import traceback
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

import structlog

from reconciler.caddy.admin import AdminClient, AdminContact
from reconciler.caddy.binary import find_caddy, install_binary
from reconciler.caddy.certs import CertificateTracker, issuer_storage_key
from reconciler.caddy.configfile import ConfigFile
from reconciler.caddy.modules import preflight
from reconciler.caddy.supervisor import CaddySupervisor
from reconciler.caddy.validate import caddy_validate
from reconciler.errors import StorageError
from reconciler.fsutil import StorageHealth
from reconciler.loop.background import Background
from reconciler.loop.keeper import CaddyKeeper, backoff
from reconciler.loop.reconcile import FAILED, Inputs, PassResult, Reconciler
from reconciler.loop.triggers import Triggers
from reconciler.settings import Settings
from reconciler.sources.inputs import detach_helper, fork_helper
from reconciler.sources.snapshot import api_dir_ready, sources_for
from reconciler.sources.watcher import Watcher
from reconciler.state.metrics import Metrics
from reconciler.state.store import GoodMap, StateStore
from reconciler.status import IngressStatus

log = structlog.get_logger("hypeman.ingress")

#: more ingress state changes than this in one pass are logged as one ``ingress.states`` summary
STATE_EVENTS_MAX = 200

#: how long setup waits for the first Caddy start before the loop begins anyway (the keeper goes on)
FIRST_START_WAIT = 10.0

#: signals and what they do (every other signal keeps its default action)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RESYNC_SIGNALS = (signal.SIGHUP,)
#: signals whose default action would kill the daemon for no reason of ours: logged and ignored
#: (SIGXFSZ too: a write over the file size limit then fails with EFBIG like a full disk)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF,
                   signal.SIGXFSZ, signal.SIGXCPU, signal.SIGPWR, signal.SIGPOLL)

#: log level of the events of the Caddy keeper and supervisor (default: info)
_EVENT_LEVELS = {
    "caddy.died": "warning", "caddy.unresponsive": "warning", "caddy.start_fallback": "warning",
    "caddy.pid_file_failed": "warning", "caddy.log_unavailable": "warning", "caddy.dir_unusable": "warning",
    "caddy.storage_not_private": "warning", "caddy.binary_not_installed": "warning",
    "caddy.config_corrupt": "error", "caddy.config_unreadable": "error", "caddy.start_failed": "error",
    "caddy.restart_failed": "error", "caddy.keeper_error": "error",
}


class Daemon:
    """``hypeman-ingress run``. :meth:`stop` (or a signal handler calling it) ends :meth:`run` cleanly."""

    def __init__(self, settings: Settings, *, binary: str | None = None, health_interval: float = 0.5) -> None:
        self.settings = settings
        self.health_interval = health_interval
        self._binary_source = binary
        #: which files under the data dir fail to be written (logged once per change, retried, shown)
        self.storage = StorageHealth(on_change=self._storage_changed)
        self._contact = AdminContact()
        self.client = AdminClient(settings.admin_url, contact=self._contact)
        self.config_file = ConfigFile(os.path.join(settings.caddy_dir, "config.json"), health=self.storage,
                                      log=self._log_event)
        self.triggers = Triggers(debounce=settings.debounce, debounce_max=settings.debounce_max,
                                 resync_interval=settings.resync_interval, quick=settings.debounce_quick)
        self.supervisor: CaddySupervisor | None = None
        self.keeper: CaddyKeeper | None = None
        self.reconciler: Reconciler | None = None
        self.watcher: Watcher | None = None
        self.passes: list[PassResult] = []
        self.converged_once = threading.Event()
        self._failures = 0
        self._problems: set[str] = set()
        self._pass_cond = threading.Condition()
        #: the last burst (see Triggers.bursts) whose pass has finished: API tickets wait for theirs
        self._served = 0
        self._status_index: dict[str, IngressStatus] = {}
        self._pass_generation = 0
        self._converged_generation = -1
        self.metrics = Metrics()
        self.binary: str | None = None
        self._states: dict[str, tuple[Any, Any, Any]] | None = None
        self._last_statuses: dict[str, Any] = {}
        self._tracker: CertificateTracker | None = None
        self.background: Background | None = None
        #: cleared while a pass reads and renders (until its POST /load): reports wait meanwhile
        self._reports_may_run = threading.Event()
        self._reports_may_run.set()
        self._prefetched: tuple[Inputs, float] | None = None
        self._storage_failed = False
        #: the last pass, when it raised (a pass that did not: None)
        self._crash: PassResult | None = None
        #: signals received, logged by the loop (a signal handler must not log: it could deadlock)
        self._signals: list[int] = []

    def stop(self) -> None:
        self.triggers.stop()

    # -- signals ---------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGTERM, SIGINT, SIGQUIT: a clean stop. SIGHUP: a full resync now (every input read again,
        Caddy's live config read back, rejected ingresses retried). The stray signals of
        :data:`IGNORED_SIGNALS` are logged and ignored. The handlers take no lock and do no I/O."""
        for sig in (*STOP_SIGNALS, *RESYNC_SIGNALS, *IGNORED_SIGNALS):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)
        if signum in STOP_SIGNALS:
            self.triggers.stop_from_signal()
        elif signum in RESYNC_SIGNALS:
            self.triggers.notify_from_signal("sighup")
        else:
            self.triggers.wake_from_signal()  # only to log it: no pass, no timer disturbed

    def _log_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            action = ("stop" if signum in STOP_SIGNALS else "resync" if signum in RESYNC_SIGNALS else "ignored")
            log.info("daemon.signal", signal=signal.Signals(signum).name, action=action)

    def _caddy_started(self) -> None:
        self.triggers.notify("caddy-restart", immediate=True)

    def _on_change(self, path: str) -> None:
        self.triggers.notify("watch", path=path)

    def _storage_changed(self, path: str, error: StorageError | None) -> None:
        if error is None:
            log.info("storage.write_recovered", file=path)
        else:
            log.error("storage.write_failed", file=path, error=error.reason, no_space=error.no_space,
                      retry="with backoff until it lands")

    def setup(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Everything before the loop: the state, the parse helper, the watches, the first read (on a
        thread), the Caddy binary and Caddy's keeper (which starts Caddy on its own thread); then
        ``meanwhile`` (say, starting the API) while the first read and Caddy's start may still run."""
        s = self.settings
        self.reconciler = Reconciler(settings=s, client=self.client,
                                     store=StateStore(s.state_dir, health=self.storage),
                                     validate=self._validate_config, config_file=self.config_file,
                                     health=self._health, generation=self._generation,
                                     certs=self._certificates, defer=self._report,
                                     on_load=self._reports_may_run.set)
        self._api_dir_ready()
        # the parse helper is a copy of this process: forked now, before the first thread starts
        if threading.active_count() == 1:
            fork_helper(self.reconciler.manifests, self.reconciler.instances)
        self.background = Background(on_error=self._report_failed, gate=self._reports_may_run)
        paths = [src.path for src in sources_for(s)] + [s.instances_path]
        self.watcher = Watcher(paths, self._on_change)
        self.watcher.start()
        # Read every input while the binary is checked and Caddy starts: that side mostly hashes, copies
        # and waits (the GIL is free), so the first pass finds its inputs read (~0.4 s less at 10k files).
        prefetch = threading.Thread(target=self._prefetch, name="prefetch", daemon=True)
        prefetch.start()
        try:
            source = self._binary_source or find_caddy()
            try:
                binary = install_binary(source, s.data_dir)
            except StorageError as exc:  # a full or read-only data dir: run the source binary itself
                log.warning("caddy.binary_not_installed", error=str(exc), running=source)
                binary = source
            preflight(s, binary)
            self.binary = binary
            self.supervisor = CaddySupervisor(s, binary, client=AdminClient(s.admin_url, contact=self._contact),
                                              log=self._log_event, ready_timeout=s.caddy_start_timeout,
                                              health=self.storage, source=source, config=self.config_file)
            reconciler = self.reconciler
            self.keeper = CaddyKeeper(self.supervisor, log=self._log_event, stable_after=s.caddy_stable_after,
                                      on_started=self._caddy_started,
                                      memory=lambda: reconciler.last_applied_config)
            self.keeper.start()
            self._tracker = CertificateTracker(s.storage_dir, self.supervisor.log_path,
                                               issuer_key=issuer_storage_key(s.tls))
            if meanwhile is not None:
                meanwhile()
        finally:
            prefetch.join()
        if not self.keeper.wait_first(FIRST_START_WAIT):
            log.warning("caddy.start_pending", waited_s=FIRST_START_WAIT,
                        message="the loop starts now; Caddy is converged once it answers")
        if self.keeper.first_error is not None:
            raise self.keeper.first_error

    def _api_dir_ready(self) -> None:
        """Make the API-owned dir on a fresh data dir -- but never in place of one that was lost: when the
        last good state still holds files of it, an empty new dir would make the loop drop them. It stays
        missing then (its ingresses serve from their last good versions, API writes are refused) until
        the operator restores it (``hypeman-ingress restore``) or creates it empty on purpose."""
        assert self.reconciler is not None
        s = self.settings
        if os.path.isdir(s.api_dir):
            return
        kept = self.reconciler.good_snapshot[0].get(s.api_dir, {})
        if kept:
            log.error("api.dir_missing", dir=s.api_dir, ingress_files=len(kept),
                      message="its ingresses keep serving from their last good versions and API writes are "
                              "refused; restore it with `hypeman-ingress restore` (or create it empty to drop "
                              "them)")
            return
        try:
            api_dir_ready(s)
        except OSError as exc:  # a read-only or full data dir: the API source is reported unavailable
            log.error("api.dir_unavailable", dir=s.api_dir, error=exc.strerror or str(exc))

    def _prefetch(self) -> None:
        assert self.reconciler is not None
        start = time.monotonic()
        gc.disable()  # as in a pass: collections while 10k files' objects pile up cost ~20 % of the read
        try:
            inputs = self.reconciler.read_inputs()
            self._prefetched = (inputs, time.monotonic() - start)
            log.info("inputs.prefetched", files=sum(h.files for h in inputs.sources),
                     parsed=inputs.manifests.parsed_files + inputs.instances.parsed_files,
                     by_helper=inputs.manifests.helped_files + inputs.instances.helped_files,
                     read_ms=round(self._prefetched[1] * 1000, 1))
        except Exception as exc:  # only a head start: the first pass then reads for itself
            log.warning("prefetch.failed", error=str(exc))
        finally:
            gc.enable()
            self._drop_helper()

    def _drop_helper(self) -> None:
        """End the parse helper: later reads are small (only what changed), or full reads of files the
        cache mostly knows. It is told to exit at once (its teardown runs on its own core) and reaped by
        the report thread, off the way to the first pass."""
        assert self.reconciler is not None
        helper = detach_helper(self.reconciler.manifests, self.reconciler.instances)
        if helper is None:
            return
        helper.release()

        def reap() -> None:
            helper.close()
            if helper.last_error:
                log.warning("parse_helper.failed", error=helper.last_error)
            log.info("parse_helper.done", peak_rss_mb=helper.peak_rss_mb)

        self._report(reap)

    def _validate_config(self, config: dict[str, Any]) -> str | None:
        assert self.binary is not None
        return caddy_validate(self.binary, config)

    def _generation(self) -> int:
        return self.keeper.generation if self.keeper is not None else 0

    def _health(self) -> dict[str, Any]:
        """The status fields about Caddy and the data dir (live, for every status document)."""
        caddy = self.keeper.state() if self.keeper is not None else {}
        failing = self.storage.snapshot()
        return {"caddy": caddy, "storage": {"ok": not failing, "failing": failing}}

    def _certificates(self, hosts: list[str]) -> dict[str, dict[str, Any]]:
        if self._tracker is None:
            return {}
        return {h: c.to_dict() for h, c in self._tracker.states(hosts).items()}

    def _log_event(self, event: str, **fields: Any) -> None:
        getattr(log, _EVENT_LEVELS.get(event, "info"))(event, **fields)

    def _report_failed(self, exc: BaseException) -> None:
        if isinstance(exc, StorageError):
            return  # logged once per file by the storage health, and retried
        log.error("report.failed", error=f"{type(exc).__name__}: {exc}",
                  traceback=traceback.format_exception(exc, limit=-20))

    def run(self, *, max_passes: int | None = None) -> int:
        self.setup()
        return self.loop(max_passes=max_passes)

    def loop(self, *, max_passes: int | None = None) -> int:
        """The main loop (after :meth:`setup`); returns when stopped. Nothing a pass raises ends it: an
        unexpected error is logged with its traceback and the pass is retried with backoff."""
        assert self.reconciler is not None and self.watcher is not None
        self.triggers.notify("start", immediate=True)
        try:
            while not self.triggers.stopped:
                reason = self.triggers.wait(timeout=self.health_interval)
                try:
                    self._tick()
                except Exception as exc:  # bookkeeping only: never worth ending the loop
                    self._log_safely("daemon.tick_failed", error=f"{type(exc).__name__}: {exc}")
                if reason is None or self.triggers.stopped:
                    continue
                self._turn(reason)
                if max_passes is not None and len(self.passes) >= max_passes:
                    break
        finally:
            self.shutdown()
        return 0

    def _tick(self) -> None:
        """Between passes: log the signals received, hand the retries of failed file writes to the report
        thread (in order with the passes' own writes)."""
        self._log_signals()
        for job in self.storage.due():
            self._report(job)
        failing = self.storage.failing()
        if self._storage_failed and not failing and self.reconciler is not None:
            self.reconciler.rewrite_status()  # status.json said the disk failed: say it is fine again
        self._storage_failed = failing

    def _turn(self, reason: str) -> None:
        """One pass for the burst ``reason`` and its bookkeeping."""
        assert self.reconciler is not None and self.watcher is not None
        serving = self.triggers.bursts  # only this thread takes bursts: stable until the next wait
        changed = self.triggers.take_paths()
        burst = self.triggers.burst_started
        self._pass_generation = self._generation()
        queued = time.monotonic() - burst if burst is not None else None
        # the inputs read during setup serve the first pass, unless something changed since
        prefetched, self._prefetched = (self._prefetched if reason == "start" else None), None
        try:
            try:
                # no cyclic GC inside a pass: at 10k ingresses its collections cost ~30 % of a pass
                # (the pass's garbage is acyclic and freed by refcounting; the rest waits a moment)
                gc.disable()
                self._reports_may_run.clear()
                try:
                    result = self.reconciler.run_pass(reason, changed=changed, prefetched=prefetched)
                finally:
                    self._reports_may_run.set()
                    gc.enable()
            except Exception as exc:
                self._crashed(reason, exc)
                return
            self._record(result, queued)
        finally:
            with self._pass_cond:
                self._served = serving
                self._pass_cond.notify_all()
        if changed is None:
            # after a full read, park what is long-lived out of the collector's way (later
            # collections only walk what changed since); unfreeze first so nothing leaks
            gc.unfreeze()
            gc.collect()
            gc.freeze()
        if self.watcher.refresh():
            self.triggers.notify("watch")

    def _crashed(self, trigger: str, exc: Exception) -> None:
        """A pass raised what no stage expected (a bug, or an I/O edge failing in a new way): logged with its
        traceback, counted as an ``error`` pass, and retried with backoff (reading everything again)."""
        self._failures += 1
        retry_in = backoff(self._failures)
        self.triggers.retry_in(retry_in)
        error = f"internal error: {type(exc).__name__}: {exc}"
        result = PassResult(trigger, "-", FAILED, 0.0, error=error, started_at=time.time())
        self._crash = result
        self.passes.append(result)
        del self.passes[:-100]
        self.metrics.observe_pass(result, converged=False, problems=0, wall=time.time())
        self._log_safely("reconcile.crashed", trigger=trigger, error=error, retry_in=round(retry_in, 2),
                         traceback=traceback.format_exception(exc, limit=-20))

    @staticmethod
    def _log_safely(event: str, **fields: Any) -> None:
        with contextlib.suppress(Exception):  # (stderr itself may be what fails)
            log.error(event, **fields)

    def _record(self, result: PassResult, queued: float | None = None) -> None:
        """What the loop needs of a pass at once (status for the API, retries, readiness); its log lines
        and metrics go to the report thread, after the pass's state files (same order as they happened)."""
        assert self.reconciler is not None
        self._crash = None
        statuses = self.reconciler.statuses
        self._status_index = {st.name: st for st in statuses}
        self.passes.append(result)
        del self.passes[:-100]
        retry_in: float | None = None
        if result.transient:
            self._failures += 1
            retry_in = backoff(self._failures)
            self.triggers.retry_in(retry_in)
        else:
            self._failures = 0
            reasons = {st.reason for st in statuses}
            if "CertificatePending" in reasons:
                self.triggers.retry_in(2.0)  # look again soon: issuance usually takes seconds
            elif "CertificateFailing" in reasons:
                self.triggers.retry_in(15.0)  # Caddy retries with backoff; notice its success in time
        self.metrics.observe_pass(result, converged=result.converged, problems=len(result.problems),
                                  wall=time.time())
        if result.converged:
            self.converged_once.set()
            self._converged_generation = self._pass_generation
        self._report(lambda: self._log_pass(result, statuses, retry_in, queued))

    def _log_pass(self, result: PassResult, statuses: list[IngressStatus], retry_in: float | None,
                  queued: float | None) -> None:
        current = {p.format(): p for p in result.problems}
        for text in sorted(set(current) - self._problems):
            p = current[text]
            log.warning("input.problem", file=p.file, line=p.line, reason=p.reason, ingress=p.ingress,
                        message=p.message)
        for text in sorted(self._problems - set(current)):
            log.info("input.problem_resolved", problem=text)
        self._problems = set(current)
        self._log_ingress_changes(statuses)
        self.metrics.observe_ingresses(statuses)
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

    def _report(self, job: Callable[[], None]) -> None:
        if self.background is not None:
            self.background.submit(job)
        else:
            job()

    # -- what the API needs (reconciler.api.app.Backend) ----------------------------------------
    def request_pass(self, path: str | None = None) -> int:
        """Ask for a pass now; the ticket is satisfied once the pass that reads ``path`` has finished."""
        # the ticket is the burst the notification joins: the pass that takes that burst reads ``path``
        # (a pass already started took an earlier burst, so it cannot satisfy the ticket)
        return self.triggers.notify("api", immediate=True, path=path)

    def wait_pass(self, ticket: int, timeout: float) -> bool:
        """Wait until the pass that took ``ticket`` has finished; True when it (or a later one) converged
        Caddy, False when it did not or ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._pass_cond:
            while self._served < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.triggers.stopped:
                    return False
                self._pass_cond.wait(remaining)
        last = self.passes[-1] if self.passes else None
        return last is not None and last.converged

    def good_versions(self) -> tuple[GoodMap, GoodMap] | None:
        """The last good file versions the loop serves, as of its last pass (before the first: as the
        previous run left them)."""
        return self.reconciler.good_snapshot if self.reconciler is not None else None

    def ingress_status(self, name: str) -> dict[str, Any] | None:
        st = self._status_index.get(name)
        return st.to_dict() if st is not None else None

    def status(self) -> dict[str, Any]:
        if self.reconciler is None:
            return {}
        doc = {**self.reconciler.status_document(), **self._health()}
        if self._crash is not None:
            doc["last_error"] = self._crash.error
        return doc

    def ready(self) -> tuple[bool, str]:
        ok, why = self._readiness()
        failing = self.storage.snapshot()
        if failing:
            files = ", ".join(f"{f['file']} ({f['error']})" for f in failing[:3])
            why += f"; {len(failing)} file(s) under the data dir cannot be written: {files}"
        return ok, why

    def _readiness(self) -> tuple[bool, str]:
        keeper = self.keeper
        if keeper is None:
            return False, "Caddy is not running"
        problem = keeper.problem()
        if problem is not None:
            return False, problem
        if self._crash is not None:
            return False, f"last pass failed: {self._crash.error}"
        last = self.reconciler.last if self.reconciler is not None else None
        if last is None:
            return False, "no reconcile pass yet"
        if not last.converged:
            return False, f"last pass {last.outcome}: {last.error}"
        if self._converged_generation != keeper.generation:
            return False, "Caddy was restarted; waiting for a pass to converge it"
        if not self.client.ping():
            return False, "Caddy's admin API does not answer"
        return True, f"last pass {last.outcome} (revision {last.revision})"

    def metrics_text(self) -> bytes:
        if self.keeper is not None:
            self.metrics.observe_caddy(up=self.keeper.up(), restarts=self.keeper.restarts,
                                       flapping=self.keeper.flapping)
        self.metrics.observe_storage(len(self.storage.snapshot()))
        return self.metrics.render()

    def _log_ingress_changes(self, statuses: list[IngressStatus]) -> None:
        """One ``ingress.state`` event per ingress whose (ready, reason, message) changed, or that appeared
        or disappeared. The previous states come from the persisted status after a restart."""
        assert self.reconciler is not None
        if self._states is None:
            previous = self.reconciler.status_before.get("ingresses", [])
            self._states = {i["name"]: (i.get("ready"), i.get("reason"), i.get("message"))
                            for i in previous if isinstance(i, dict) and "name" in i}
        now = {s.name: s for s in statuses}
        same = self._last_statuses
        states = self._states
        # only names whose status object is new this pass can have changed (statuses are memoised)
        touched = [n for n, st in now.items() if same.get(n) is not st]
        touched += [n for n in states if n not in now]
        events: list[tuple[str, str | None, IngressStatus | None]] = []  # (name, previous reason, status)
        for name in sorted(touched):
            old = states.get(name)
            st = now.get(name)
            new = (st.ready, st.reason, st.message) if st is not None else None
            if st is None:
                states.pop(name, None)
            else:
                states[name] = (st.ready, st.reason, st.message)
            if old != new:
                events.append((name, old[1] if old else None, st))
        self._last_statuses = now
        if len(events) > STATE_EVENTS_MAX:
            # a first start or a mass change of thousands of ingresses: a summary, not thousands of lines
            # (every state is in status.json and GET /status)
            by_reason = Tally("Removed" if st is None else st.reason for _, _, st in events)
            log.info("ingress.states", changed=len(events), reasons=dict(sorted(by_reason.items())),
                     examples=[name for name, _, _ in events[:5]])
            return
        for name, previous, st in events:
            if st is None:
                log.info("ingress.state", ingress=name, ready=False, reason="Removed",
                         previous_reason=previous, message="no longer defined")
                continue
            (log.info if st.ready else log.warning)(
                "ingress.state", ingress=name, ready=st.ready, reason=st.reason,
                previous_reason=previous, message=st.message, file=st.file)

    def shutdown(self) -> None:
        self._log_signals()
        if self.keeper is not None:
            self.keeper.stop()  # no restart of Caddy while we stop (nor a start left waiting)
        if self.reconciler is not None:
            self._drop_helper()
        if self.watcher is not None:
            self.watcher.stop()
        if self.background is not None:
            self._reports_may_run.set()
            self.background.close()  # the last pass's status files and log lines land before we exit
        if self.settings.stop_caddy_on_shutdown and self.supervisor is not None:
            self.supervisor.stop()
        self.client.close()
        if self.supervisor is not None:
            self.supervisor.client.close()
        log.info("daemon.stopped", caddy_stopped=self.settings.stop_caddy_on_shutdown)
