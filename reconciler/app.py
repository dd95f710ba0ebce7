"""The composition root of ``hypeman-ingress run``: builds every part in order, each given what it needs
when it is made (nothing is patched in later), starts them, runs the loop, stops them.

Order (:meth:`Daemon.setup`): the state and the input readers (the last good versions) -> the parse helper
(forked before any thread) -> the report thread and the watches -> the first read (on a thread) -> the
Caddy binary -> the supervisor and its keeper (Caddy starts on the keeper's thread) -> the reconciler ->
the loop and what the API reads of it -> the API -> then the loop runs (:meth:`Daemon.run`).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import structlog

from reconciler.caddy.admin import AdminClient, AdminContact
from reconciler.caddy.binary import find_caddy, install_binary
from reconciler.caddy.certs import CertificateTracker, issuer_storage_key
from reconciler.caddy.configfile import ConfigFile
from reconciler.caddy.modules import preflight
from reconciler.caddy.supervisor import CaddySupervisor
from reconciler.caddy.traffic import HostMaps, TrafficCollector
from reconciler.caddy.upstreams import read_upstreams
from reconciler.caddy.validate import caddy_validate
from reconciler.errors import ConfigError, StorageError
from reconciler.fsutil import StorageHealth
from reconciler.loop.background import Background
from reconciler.loop.changes import ChangeLog
from reconciler.loop.daemon import Housekeeping, Loop
from reconciler.loop.fastpath import InstanceFastPath
from reconciler.loop.health import HealthWatch, Prober
from reconciler.loop.keeper import Keeper
from reconciler.loop.read import InputReader, Inputs
from reconciler.loop.reconcile import Reconciler
from reconciler.loop.service import Service, health, node_state
from reconciler.loop.signals import SignalPolicy
from reconciler.loop.triggers import Trigger, Triggers
from reconciler.model import Desired
from reconciler.responder.client import Publisher
from reconciler.responder.supervisor import ResponderSupervisor
from reconciler.settings import Settings
from reconciler.sources.dirs import api_dir_ready, sources_for
from reconciler.sources.inputs import detach_helper, drop_helper, fork_helper
from reconciler.sources.watcher import Watcher
from reconciler.state.metrics import Metrics
from reconciler.state.store import StateStore

log = structlog.get_logger("hypeman.ingress")

#: how long setup waits for the first Caddy start before the loop begins anyway (the keeper goes on)
FIRST_START_WAIT = 10.0

#: log level of the events of the Caddy keeper and supervisor (default: info)
_EVENT_LEVELS = {
    "caddy.died": "warning", "caddy.unresponsive": "warning", "caddy.start_fallback": "warning",
    "caddy.pid_file_failed": "warning", "caddy.log_unavailable": "warning", "caddy.dir_unusable": "warning",
    "caddy.storage_not_private": "warning", "caddy.binary_not_installed": "warning",
    "caddy.config_changed_on_disk": "warning", "caddy.config_corrupt": "error", "caddy.config_unreadable": "error",
    "caddy.start_failed": "error", "caddy.restart_failed": "error", "caddy.keeper_error": "error",
    "health.watch_error": "error", "health.prober_error": "error",
}


def log_event(event: str, **fields: Any) -> None:
    getattr(log, _EVENT_LEVELS.get(event, "info"))(event, **fields)


def _storage_changed(path: str, error: StorageError | None) -> None:
    if error is None:
        log.info("storage.write_recovered", file=path)
    else:
        log.error("storage.write_failed", file=path, error=error.reason, no_space=error.no_space,
                  retry="with backoff until it lands")


def _report_failed(exc: BaseException) -> None:
    if isinstance(exc, StorageError):
        return  # logged once per file by the storage health, and retried
    log.error("report.failed", error=f"{type(exc).__name__}: {exc}",
              traceback=traceback.format_exception(exc, limit=-20))


class FirstRead:
    """The first read, made on a thread while the binary is checked and Caddy starts (that side mostly
    hashes, copies and waits: the GIL is free), so the first pass finds its inputs read (~0.4 s less at 10k
    files); shared with the forked parse helper, which is then told to go."""

    def __init__(self, reader: InputReader, background: Background) -> None:
        self.reader = reader
        self.background = background
        self._result: tuple[Inputs, float] | None = None
        self._thread = threading.Thread(target=self._read, name="prefetch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def take(self) -> tuple[Inputs, float] | None:
        result, self._result = self._result, None
        return result

    def _read(self) -> None:
        start = time.monotonic()
        gc.disable()  # as in a pass: collections while 10k files' objects pile up cost ~20 % of the read
        try:
            inputs = self.reader.read()
            self._result = (inputs, time.monotonic() - start)
            log.info("inputs.prefetched", files=sum(h.files for h in inputs.sources),
                     parsed=inputs.manifests.parsed_files + inputs.instances.parsed_files,
                     by_helper=inputs.manifests.helped_files + inputs.instances.helped_files,
                     read_ms=round(self._result[1] * 1000, 1))
        except Exception as exc:  # only a head start: the first pass then reads for itself
            log.warning("prefetch.failed", error=str(exc))
        finally:
            gc.enable()
            self.drop_helper()

    def drop_helper(self) -> None:
        """End the parse helper: later reads are small. It is told to exit at once (its teardown runs on its
        own core) and reaped by the report thread, off the way to the first pass."""
        helper = detach_helper(self.reader.manifests, self.reader.instances)
        if helper is None:
            return
        helper.release()

        def reap() -> None:
            helper.close()
            if helper.last_error:
                log.warning("parse_helper.failed", error=helper.last_error)
            log.info("parse_helper.done", peak_rss_mb=helper.peak_rss_mb)

        self.background.submit(reap)


def shared_storage_ready(path: str) -> None:
    """``HYPEMAN_TLS_STORAGE_DIR`` exists (made 0700 when missing) and this process may write there -- else
    a clear error at start: without it Caddy could neither store a certificate nor take the locks that
    make one order per name (say, a mount left out of systemd's ``ReadWritePaths=``, or not mounted yet)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        probe = os.path.join(path, f".hypeman-ingress-probe.{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"HYPEMAN_TLS_STORAGE_DIR={path} is not writable here ({exc.strerror or exc}): Caddy keeps "
            "certificates, ACME accounts and locks there. Under systemd add it to ReadWritePaths= "
            "(`systemctl edit hypeman-ingress`); in a container, mount it writable for the service's user"
        ) from exc


class Daemon:
    """``hypeman-ingress run``: :meth:`setup`, then :meth:`run` (which stops everything at its end)."""

    def __init__(self, settings: Settings, *, binary: str | None = None) -> None:
        self.settings = settings
        self._binary_source = binary
        self.storage = StorageHealth(on_change=_storage_changed)
        self.triggers = Triggers(debounce=settings.debounce, debounce_max=settings.debounce_max,
                                 resync_interval=settings.resync_interval, quick=settings.debounce_quick)
        self.signals = SignalPolicy(self.triggers)
        self._contact = AdminContact()
        self.client = AdminClient(settings.admin_url, contact=self._contact)
        self.keeper: Keeper | None = None
        self.responder: Keeper | None = None
        self.caddy: CaddySupervisor | None = None
        self.responder_supervisor: ResponderSupervisor | None = None
        self.fastpath: InstanceFastPath | None = None
        self.loop: Loop | None = None
        self.service: Service | None = None
        self._stoppable: list[Callable[[], None]] = []  # the API server, the watcher... (in reverse order)
        self._reader: InputReader | None = None
        self.background: Background | None = None

    def stop(self) -> None:
        self.triggers.stop()

    def _changed(self, path: str) -> None:
        if self.fastpath is not None:
            self.fastpath.changed(path)  # (an instance's address goes to the responder ahead of the pass)
        self.triggers.notify(Trigger.WATCH, path=path)

    def _caddy_started(self) -> None:
        self.triggers.notify(Trigger.CADDY_RESTART, immediate=True)

    def _responder(self, reader: InputReader) -> Keeper:
        """The DNS responder's supervisor and keeper -- started: it starts (or is adopted) on its thread and
        answers from its snapshot until the first read publishes the records."""
        s = self.settings
        publisher = Publisher(s.dns_dir)
        supervisor = self.responder_supervisor = ResponderSupervisor(s, publisher, log=log_event, health=self.storage)
        keeper = self.responder = Keeper(supervisor, log=log_event, stable_after=s.caddy_stable_after,
                                         on_started=publisher.resync)
        fast = self.fastpath = InstanceFastPath(s.instances_path, publisher.publish, max_bytes=s.max_file_bytes,
                                                log=log_event)
        reader.on_instances = fast.baseline
        fast.start()
        self._stoppable.append(fast.stop)
        keeper.start()
        return keeper

    def setup(self) -> None:
        s = self.settings
        if s.shared_storage:
            shared_storage_ready(s.storage_dir)
        store = StateStore(s.state_dir, health=self.storage)
        reader = InputReader(s, good=store.load_lastgood())
        good_before = reader.good()  # (copied before the first read starts updating the reader's maps)
        self._reader = reader
        self._api_dir_ready(reader)
        if threading.active_count() == 1:  # the parse helper: a copy of this process, forked before any thread
            fork_helper(reader.manifests, reader.instances)
        gate = threading.Event()
        gate.set()
        background = self.background = Background(on_error=_report_failed, gate=gate)
        watcher = Watcher([src.path for src in sources_for(s)] + [s.instances_path], self._changed)
        watcher.start()
        self._stoppable.append(watcher.stop)
        responder = self._responder(reader)
        first = FirstRead(reader, background)
        first.start()
        try:
            keeper, supervisor, binary = self._caddy()
            tracker = CertificateTracker(s.storage_dir, supervisor.log_path, issuer_key=issuer_storage_key(s.tls))
            node_name = s.node_name or socket.gethostname()

            def node() -> dict[str, Any]:  # (called once the reconciler below exists)
                return node_state(s, node_name, reconciler.applied_hash)
            watch = self._health_watch(lambda: (snap.rendered or snap.desired)
                                       if (snap := reconciler.snapshot) is not None else None)
            reconciler = Reconciler(
                settings=s, client=self.client, reader=reader, store=store, config_file=supervisor.config,
                validate=lambda config: caddy_validate(binary, config),
                health=lambda: health(keeper, self.storage, responder, node),
                generation=lambda: keeper.generation, defer=background.submit, on_load=background.resume,
                certs=lambda hosts: {h: c.to_dict() for h, c in tracker.states(hosts).items()},
                good_before=good_before, upstreams=watch.states, prober=self._prober())
            watch.start()  # (it reads the reconciler's snapshots)
            metrics = self._metrics(reconciler)
            self.loop = Loop(reconciler=reconciler, triggers=self.triggers, keeper=keeper, watcher=watcher,
                             changes=ChangeLog(metrics, reconciler.reporter.before), background=background,
                             housekeeping=Housekeeping(storage=self.storage, background=background,
                                                       reconciler=reconciler, signals=self.signals),
                             prefetched=first.take)
            self.service = Service(loop=self.loop, storage=self.storage, metrics=metrics, client=self.client,
                                   responder=responder, node=node)
            if s.api_listen:  # imported here: it loads while the first read runs
                from reconciler.api.server import serve

                self._stoppable.append(serve(s, self.service, binary))
        finally:
            first.join()
        if not keeper.wait_first(FIRST_START_WAIT):
            log.warning("caddy.start_pending", waited_s=FIRST_START_WAIT,
                        message="the loop starts now; Caddy is converged once it answers")
        if keeper.first_error is not None:
            raise keeper.first_error

    def _health_watch(self, desired: Callable[[], Desired | None]) -> HealthWatch:
        """Caddy's verdicts on health-checked targets between passes (to start once ``desired`` can be called:
        it reads only while some rule has health checks)."""
        s = self.settings
        client = httpx.Client(base_url=s.admin_url, timeout=2.0, trust_env=False, verify=False)  # (plain HTTP)
        watch = HealthWatch(read=lambda metrics: read_upstreams(client, metrics=metrics), desired=desired,
                            zone=s.dns_zone, notify=lambda: self.triggers.notify(Trigger.HEALTH), log=log_event)
        self._stoppable.append(client.close)  # (stopped in reverse order: the watch first)
        self._stoppable.append(watch.stop)
        return watch

    def _prober(self) -> Prober:
        """The prober of health-gated cutovers (started: idle until a pass holds a rule)."""
        prober = Prober(notify=lambda: self.triggers.notify(Trigger.HEALTH), log=log_event)
        prober.start()
        self._stoppable.append(prober.stop)
        return prober

    def _caddy(self) -> tuple[Keeper, CaddySupervisor, str]:
        """The binary (installed into the data dir, or run from its source when it cannot be copied), the
        supervisor, and the keeper -- started: Caddy starts on its thread."""
        s = self.settings
        source = self._binary_source or find_caddy()
        try:
            binary = install_binary(source, s.data_dir)
        except StorageError as exc:  # a full or read-only data dir: run the source binary itself
            log.warning("caddy.binary_not_installed", error=str(exc), running=source)
            binary = source
        preflight(s, binary)
        config_file = ConfigFile(os.path.join(s.caddy_dir, "config.json"), health=self.storage, log=log_event)
        supervisor = CaddySupervisor(s, binary, client=AdminClient(s.admin_url, contact=self._contact),
                                     log=log_event, ready_timeout=s.caddy_start_timeout, health=self.storage,
                                     source=source, config=config_file)
        self.caddy = supervisor
        keeper = self.keeper = Keeper(supervisor, log=log_event, stable_after=s.caddy_stable_after,
                                      on_started=self._caddy_started)
        keeper.start()
        return keeper, supervisor, binary

    def _metrics(self, reconciler: Reconciler) -> Metrics:
        """The daemon's metrics, with Caddy's per-host traffic series relabelled per ingress of the last pass
        (``HYPEMAN_TRAFFIC_METRICS``)."""
        s, metrics = self.settings, Metrics()
        if s.traffic_metrics:
            traffic = TrafficCollector(s.admin_url, HostMaps(
                lambda: snap.desired.ingresses if (snap := reconciler.snapshot) is not None else None,
                http_port=s.http_port))
            metrics.registry.register(traffic)
            self._stoppable.append(traffic.close)
        return metrics

    def _api_dir_ready(self, reader: InputReader) -> None:
        """Make the API-owned dir on a fresh data dir -- but never in place of one that was lost: when the
        last good state still holds files of it, an empty new dir would make the loop drop them. It stays
        missing then (its ingresses serve from their last good versions, API writes are refused) until the
        operator restores it (``hypeman-ingress restore``) or creates it empty on purpose."""
        s = self.settings
        if s.fleet:
            self._api_dir_ignored()
            return
        if os.path.isdir(s.api_dir):
            return
        kept = reader.manifests.good.get(s.api_dir, {})
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

    def _api_dir_ignored(self) -> None:
        """A fleet node reads git only: ingresses the API wrote here before are not served, said once."""
        api_dir = self.settings.api_dir
        try:
            names = [n for n in os.listdir(api_dir) if not n.startswith(".")]
        except OSError:
            return
        if names:
            log.warning("fleet.api_dir_ignored", dir=api_dir, files=len(names),
                        message="fleet mode reads the manifests from --manifests only; the files the API wrote "
                                "here are not served -- commit them to the git source")

    def run(self, *, max_passes: int | None = None) -> int:
        assert self.loop is not None, "setup() first"
        try:
            return self.loop.run(max_passes=max_passes)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.signals.log_received()
        for keeper in (self.keeper, self.responder):
            if keeper is not None:
                keeper.stop()  # no restart of Caddy or the responder while we stop (nor a start left waiting)
        for stop in reversed(self._stoppable):
            stop()
        self._stoppable.clear()
        if self._reader is not None:  # a setup that failed before the first read could end the helper
            drop_helper(self._reader.manifests, self._reader.instances)
        if self.background is not None:
            self.background.resume()
            self.background.close()  # the last pass's status files and log lines land before we exit
        if self.settings.stop_caddy_on_shutdown:
            for sup in (self.caddy, self.responder_supervisor):
                if sup is not None:
                    sup.stop()
        self.client.close()
        if self.caddy is not None:
            self.caddy.client.close()
        log.info("daemon.stopped", caddy_stopped=self.settings.stop_caddy_on_shutdown)
