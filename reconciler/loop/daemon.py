"""The daemon: supervise Caddy, watch the sources, and run passes until stopped."""

from __future__ import annotations

import gc
import random
import threading
import time
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

import structlog

from reconciler.caddy.admin import AdminClient
from reconciler.caddy.binary import find_caddy, install_binary
from reconciler.caddy.certs import CertificateTracker, issuer_storage_key
from reconciler.caddy.modules import preflight
from reconciler.caddy.supervisor import CaddySupervisor
from reconciler.caddy.validate import caddy_validate
from reconciler.errors import CaddyError
from reconciler.loop.background import Background
from reconciler.loop.reconcile import Inputs, PassResult, Reconciler
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


def backoff(attempt: int, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None) -> float:
    """Capped exponential backoff with full jitter in [delay/2, delay]."""
    delay = min(cap, base * (2 ** min(max(0, attempt), 64)))  # the exponent capped: no float overflow
    return (rng or random).uniform(delay / 2, delay)


class Daemon:
    """``hypeman-ingress run``. :meth:`stop` (or a signal handler calling it) ends :meth:`run` cleanly."""

    def __init__(self, settings: Settings, *, binary: str | None = None, health_interval: float = 0.5) -> None:
        self.settings = settings
        self.health_interval = health_interval
        self._binary_source = binary
        self.client = AdminClient(settings.admin_url)
        self.triggers = Triggers(debounce=settings.debounce, debounce_max=settings.debounce_max,
                                 resync_interval=settings.resync_interval, quick=settings.debounce_quick)
        self.supervisor: CaddySupervisor | None = None
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
        self._generation = 0  # bumped at every Caddy (re)start by the supervisor loop
        self._pass_generation = 0
        self._converged_generation = -1
        self.metrics = Metrics()
        self.binary: str | None = None
        self._states: dict[str, tuple[Any, Any, Any]] | None = None
        self._last_statuses: dict[str, Any] = {}
        self._caddy_failures = 0
        self._caddy_retry_at = 0.0
        self._tracker: CertificateTracker | None = None
        self.background: Background | None = None
        #: cleared while a pass reads and renders (until its POST /load): reports wait meanwhile
        self._reports_may_run = threading.Event()
        self._reports_may_run.set()
        self._prefetched: tuple[Inputs, float] | None = None

    def stop(self) -> None:
        self.triggers.stop()

    def _on_change(self, path: str) -> None:
        self.triggers.notify("watch", path=path)

    def setup(self, meanwhile: Callable[[], None] | None = None) -> None:
        """Everything before the loop: the state, the parse helper, the watches, the first read (on a
        thread), the Caddy binary and Caddy itself; then ``meanwhile`` (say, starting the API) while the
        first read may still run."""
        s = self.settings
        api_dir_ready(s)
        self.reconciler = Reconciler(settings=s, client=self.client, store=StateStore(s.state_dir),
                                     validate=self._validate_config, save_config=self._save_config,
                                     caddy_state=self._caddy_state, certs=self._certificates,
                                     defer=self._report, on_load=self._reports_may_run.set)
        # the parse helper is a copy of this process: forked now, before the first thread starts
        if threading.active_count() == 1:
            fork_helper(self.reconciler.manifests, self.reconciler.instances)
        self.background = Background(on_error=lambda exc: log.error("report.failed", error=str(exc)),
                                     gate=self._reports_may_run)
        paths = [src.path for src in sources_for(s)] + [s.instances_path]
        self.watcher = Watcher(paths, self._on_change)
        self.watcher.start()
        # Read every input while the binary is checked and Caddy starts: that side mostly hashes, copies
        # and waits (the GIL is free), so the first pass finds its inputs read (~0.4 s less at 10k files).
        prefetch = threading.Thread(target=self._prefetch, name="prefetch", daemon=True)
        prefetch.start()
        try:
            source = self._binary_source or find_caddy()
            binary = install_binary(source, s.data_dir)
            preflight(s, binary)
            self.binary = binary
            self.supervisor = CaddySupervisor(s, binary, client=self.client, log=self._log_event)
            self.supervisor.ensure_running()
            self._tracker = CertificateTracker(s.storage_dir, self.supervisor.log_path,
                                               issuer_key=issuer_storage_key(s.tls))
            if meanwhile is not None:
                meanwhile()
        finally:
            prefetch.join()

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

    def _save_config(self, body: bytes) -> None:
        assert self.supervisor is not None
        self.supervisor.save_config(body)

    def _caddy_state(self) -> dict[str, Any]:
        return self.supervisor.state() if self.supervisor is not None else {}

    def _certificates(self, hosts: list[str]) -> dict[str, dict[str, Any]]:
        if self._tracker is None:
            return {}
        return {h: c.to_dict() for h, c in self._tracker.states(hosts).items()}

    def _log_event(self, event: str, **fields: Any) -> None:
        log.info(event, **fields)

    def _check_caddy(self) -> None:
        sup = self.supervisor
        if sup is None or sup.alive():
            return
        now = time.monotonic()
        if now < self._caddy_retry_at:
            return
        log.warning("caddy.died", pid=sup.pid, log_tail=sup.log_tail(3))
        try:
            sup.ensure_running()
            self._generation += 1
            sup.restarts += 1
            self._caddy_failures = 0
            self.triggers.notify("caddy-restart", immediate=True)
        except CaddyError as exc:
            self._caddy_failures += 1
            delay = backoff(self._caddy_failures)
            self._caddy_retry_at = now + delay
            log.error("caddy.restart_failed", error=str(exc), retry_in=round(delay, 2))

    def run(self, *, max_passes: int | None = None) -> int:
        self.setup()
        return self.loop(max_passes=max_passes)

    def loop(self, *, max_passes: int | None = None) -> int:
        """The main loop (after :meth:`setup`); returns when stopped."""
        assert self.reconciler is not None and self.watcher is not None
        self.triggers.notify("start", immediate=True)
        try:
            while not self.triggers.stopped:
                reason = self.triggers.wait(timeout=self.health_interval)
                self._check_caddy()
                if reason is None:
                    continue
                serving = self.triggers.bursts  # only this thread takes bursts: stable until the next wait
                changed = self.triggers.take_paths()
                burst = self.triggers.burst_started
                self._pass_generation = self._generation
                queued = time.monotonic() - burst if burst is not None else None
                # the inputs read during setup serve the first pass, unless something changed since
                prefetched, self._prefetched = (self._prefetched if reason == "start" else None), None
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
                if max_passes is not None and len(self.passes) >= max_passes:
                    break
        finally:
            self.shutdown()
        return 0

    def _record(self, result: PassResult, queued: float | None = None) -> None:
        """What the loop needs of a pass at once (status for the API, retries, readiness); its log lines
        and metrics go to the report thread, after the pass's state files (same order as they happened)."""
        assert self.reconciler is not None
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
        deadline = time.monotonic() + timeout
        with self._pass_cond:
            while self._served < ticket:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.triggers.stopped:
                    return False
                self._pass_cond.wait(remaining)
        return True

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
        status = self.reconciler.status_document()
        if self.supervisor is not None:
            status["caddy"] = self.supervisor.state()
        return status

    def ready(self) -> tuple[bool, str]:
        if self.supervisor is None or not self.supervisor.alive():
            return False, "Caddy is not running"
        last = self.reconciler.last if self.reconciler is not None else None
        if last is None:
            return False, "no reconcile pass yet"
        if not last.converged:
            return False, f"last pass {last.outcome}: {last.error}"
        if self._converged_generation != self._generation:
            return False, "Caddy was restarted; waiting for a pass to converge it"
        if not self.client.ping():
            return False, "Caddy's admin API does not answer"
        return True, f"last pass {last.outcome} (revision {last.revision})"

    def metrics_text(self) -> bytes:
        if self.supervisor is not None:
            self.metrics.observe_caddy(up=self.supervisor.alive(), restarts=self.supervisor.restarts)
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
        log.info("daemon.stopped", caddy_stopped=self.settings.stop_caddy_on_shutdown)
