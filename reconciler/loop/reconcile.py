"""One level-triggered reconcile pass, with the declarative guarantees of the design:

read every input (incrementally, last-known-good per file, empty-source guard) -> validate -> render ->
``GET /config/`` -> compare parsed JSON -> ``POST /load`` only when different -> on rejection isolate the
culprits and apply the rest -> persist last-good inputs, the applied config and the status, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler import diff
from reconciler.caddy.admin import AdminClient
from reconciler.caddy.configfile import ConfigFile
from reconciler.errors import CaddyBinaryError, CaddyRejected, CaddyUnavailable
from reconciler.loop.isolate import isolate
from reconciler.model import Desired, Ingress, Instance, Problem, ResolvedIngress, Source
from reconciler.render import ConfigEncoder, Renderer, scrub
from reconciler.settings import Settings
from reconciler.sources.inputs import ReadResult, SourceHealth, ingress_reader, instance_reader
from reconciler.sources.snapshot import digest, sources_for
from reconciler.state.store import GoodMap, StateStore, copy_good
from reconciler.status import IngressStatus, StatusMemo, ingress_statuses, with_certificates
from reconciler.validate import Resolver

APPLIED = "applied"
UNCHANGED = "unchanged"
PARTIAL = "partial"  # applied without the ingresses Caddy rejected
REJECTED = "rejected"
UNAVAILABLE = "unavailable"
FAILED = "error"

HISTORY = 20


@dataclass(frozen=True, slots=True)
class PassResult:
    trigger: str
    revision: str
    outcome: str
    duration: float
    changes: int = 0
    error: str | None = None
    problems: tuple[Problem, ...] = field(default=(), repr=False)
    rejected: tuple[str, ...] = ()
    loads: int = 0
    #: seconds per phase: read (inputs + validation), render, load (Caddy's POST /load, as we saw it), apply
    #: (the rest of applying: compare, save), status
    phases: tuple[tuple[str, float], ...] = ()
    #: wall-clock time the pass started (its log line may be written a moment after it finished)
    started_at: float = 0.0

    @property
    def converged(self) -> bool:
        """Caddy runs exactly the config this pass wanted (culprits excluded)."""
        return self.outcome in (APPLIED, UNCHANGED, PARTIAL)

    @property
    def transient(self) -> bool:
        return self.outcome == UNAVAILABLE


@dataclass(frozen=True, slots=True)
class Inputs:
    desired: Desired
    manifests: ReadResult[Ingress]
    instances: ReadResult[Instance]
    revision: str
    commits: dict[str, str]

    @property
    def sources(self) -> list[SourceHealth]:
        return self.manifests.sources + self.instances.sources


def _fingerprint(ri: ResolvedIngress) -> str:
    text = repr((ri.ingress.rules, [r.backend for r in ri.rules]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Reconciler:
    """Runs passes and keeps what must survive between them (caches, last good, status)."""

    def __init__(self, *, settings: Settings, client: AdminClient,
                 validate: Callable[[dict[str, Any]], str | None] | None = None,
                 store: StateStore | None = None,
                 config_file: ConfigFile | None = None,
                 health: Callable[[], dict[str, Any]] | None = None,
                 generation: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 include_api: bool = True,
                 certs: Callable[[list[str]], Mapping[str, Mapping[str, Any]]] | None = None,
                 defer: Callable[[Callable[[], None]], None] | None = None,
                 on_load: Callable[[], None] | None = None) -> None:
        self._certs = certs
        #: runs the state file writes of a pass (default: at once); the daemon hands them to a thread
        self._defer = defer
        #: called when a pass starts its POST /load (the daemon lets its report thread run from then on)
        self._on_load = on_load
        self.settings = settings
        self.include_api = include_api
        self.client = client
        self._validate = validate or (lambda config: None)
        self.store = store
        #: ``{data}/caddy/config.json``: what Caddy accepted, saved after each pass that changed it
        self.config_file = config_file
        #: status fields about the daemon's health (``caddy``, ``storage``), merged into every status
        self._health = health or (lambda: {})
        #: how many times Caddy was (re)started: what a pass trusts about Caddy holds for one generation
        self._generation = generation or (lambda: 0)
        self._clock = clock
        self._wall = wall
        good_m, good_i = store.load_lastgood() if store is not None else ({}, {})
        self.manifests = ingress_reader(max_bytes=settings.max_file_bytes, good=good_m, wall=wall)
        self.instances = instance_reader(max_bytes=settings.max_file_bytes, good=good_i, wall=wall)
        self.resolve = Resolver(settings)
        self.status_memo = StatusMemo()
        self.render = Renderer(settings)
        #: the config Caddy runs as far as this process knows (None: read it back at the next pass), and the
        #: Caddy generation that holds for
        self._saved: Any = None
        self._saved_gen = 0
        #: the last config a pass applied (never forgotten: a restart of Caddy may start with it)
        self.last_applied_config: dict[str, Any] | None = None
        self._body: tuple[dict[str, Any], bytes] | None = None
        self._encode = ConfigEncoder()
        self._culprits: dict[str, tuple[str, str]] = {}  # name -> (fingerprint, message)
        self.loads = 0
        self.last: PassResult | None = None
        self.statuses: list[IngressStatus] = []
        self.certificates: dict[str, Any] = {}  # TLS hostname -> certificate state, from the last pass
        previous = store.load_status() if store is not None else None
        #: the status persisted by the previous run of the daemon (empty on a fresh data dir)
        self.status_before: dict[str, Any] = previous or {}
        #: the status of the last pass without its per-ingress entries (see :meth:`status_document`)
        self.status: dict[str, Any] = {k: v for k, v in self.status_before.items() if k != "ingresses"}
        self.history: list[dict[str, Any]] = list(self.status.get("history", []))[-HISTORY:]
        self.last_applied: dict[str, Any] | None = self.status.get("last_applied")
        self.inputs: Inputs | None = None
        #: the last good file versions as of the last pass (manifests, instances) -- before the first, as
        #: persisted by the previous run: a new tuple per pass, never changed afterwards, so other threads
        #: (the API's writer) may read it at any time
        self.good_snapshot: tuple[GoodMap, GoodMap] = (copy_good(good_m), copy_good(good_i))

    # -- inputs ---------------------------------------------------------------------------------
    def read_inputs(self, changed: frozenset[str] | None = None) -> Inputs:
        """Read every input; ``changed`` (the paths a watch burst reported) limits what is read again."""
        s = self.settings
        manifests = self.manifests.read(sources_for(s, include_api=self.include_api), changed)
        instances = self.instances.read([Source(s.instances_path, 0)], changed)
        desired = self.resolve(manifests.items, instances.items, [*manifests.problems, *instances.problems])
        revision = digest([d.encode() for d in (*manifests.digests, "--instances--", *instances.digests)])
        commits = {h.path: h.commit for h in manifests.sources if h.commit}
        return Inputs(desired, manifests, instances, revision, commits)

    def desired_config(self) -> tuple[Inputs, dict[str, Any]]:
        inputs = self.read_inputs()
        return inputs, self.render(inputs.desired)

    def _encoded(self, config: dict[str, Any]) -> bytes:
        """The config as Caddy's body, encoded once per config (the load and ``config.json`` share it)."""
        if self._body is None or self._body[0] is not config:
            self._body = (config, self._encode(config))
        return self._body[1]

    def _load_overlapped(self, body: bytes, meanwhile: Callable[[], None]) -> None:
        """``POST /load`` on a helper thread while ``meanwhile`` runs here; raises what the load raised.
        ``meanwhile`` is only a head start: if it fails, the pass does that work again afterwards."""
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
        with contextlib.suppress(Exception):  # a head start only: the pass computes it again
            meanwhile()
        poster.join()
        if failure:
            raise failure[0]

    # -- the pass -------------------------------------------------------------------------------
    def run_pass(self, trigger: str, changed: frozenset[str] | None = None,
                 prefetched: tuple[Inputs, float] | None = None) -> PassResult:
        """One pass. ``changed``: the paths a watch burst reported (None: read everything);
        ``prefetched``: inputs already read for this pass (by :meth:`read_inputs`), and how long that took."""
        start, started_at = self._clock(), self._wall()
        inputs = self.read_inputs(changed) if prefetched is None else prefetched[0]
        read_done = self._clock()
        self.inputs = inputs
        desired = inputs.desired
        triggers = set(trigger.split("+"))
        resync = bool(triggers & {"resync", "sighup"})
        generation = self._generation()
        # Culprits Caddy rejected before stay out until their inputs change or a resync retries them.
        known_bad: dict[str, str] = {}
        if not resync:
            for ri in desired.ingresses:
                memo = self._culprits.get(ri.ingress.name)
                if memo is not None and memo[0] == _fingerprint(ri):
                    known_bad[ri.ingress.name] = memo[1]
        target = replace(desired, ingresses=tuple(ri for ri in desired.ingresses
                                                  if ri.ingress.name not in known_bad))
        config = self.render(target)
        render_done = self._clock()
        changes = loads = 0
        load_time = 0.0
        speculative: list[list[IngressStatus]] = []
        spec_args: tuple[bool, str | None, dict[str, str]] | None = None
        rejected: dict[str, str] = dict(known_bad)
        error: str | None = None
        applied_config: dict[str, Any] | None = None
        # Passes caused by a file event or an API write trust that Caddy still runs what this process last
        # applied (skipping GET /config/, ~0.25 s at 10k routes); every other trigger -- start, resync,
        # Caddy restart, retry -- reads the live config, so drift is corrected at the next resync. A Caddy
        # restarted since (another generation) may run anything: it is read back whatever the trigger.
        trusted = (self._saved is not None and self._saved_gen == generation and bool(triggers)
                   and triggers <= {"watch", "api"})
        try:
            live = self._saved if trusted else self.client.get_config()
            if diff.same(live, config):
                outcome = UNCHANGED if not rejected else PARTIAL
                applied_config = config
            else:
                try:
                    loads += 1
                    load_start = self._clock()
                    # while Caddy loads (seconds at 10k routes, the GIL free), work out the statuses this
                    # pass will have if the load succeeds -- off the path to the next change
                    spec_args = (True, None, dict(known_bad))  # (applied, error, rejected) if the load works
                    self._load_overlapped(self._encoded(config), lambda: speculative.append(
                        ingress_statuses(desired, stale=inputs.manifests.stale,
                                         stale_since=inputs.manifests.stale_since, applied=True,
                                         pass_error=None, rejected=dict(known_bad), memo=self.status_memo)))
                    load_time = self._clock() - load_start
                    outcome = APPLIED if not rejected else PARTIAL
                    applied_config = config
                    changes = len(diff.diff(live, config))  # for the log, once the routes are live
                except CaddyRejected as exc:
                    iso = isolate(target, self.settings, exc.message, load=self.client.load,
                                  validate=self._validate)
                    loads += iso.loads
                    rejected.update(iso.rejected)
                    if iso.config is not None:
                        outcome, applied_config = PARTIAL, iso.config
                        changes = len(diff.diff(live, iso.config))
                    else:
                        outcome, error = REJECTED, iso.error or f"Caddy rejected the config: {exc.message}"
        except CaddyUnavailable as exc:
            outcome, error = UNAVAILABLE, str(exc)
        except CaddyBinaryError as exc:
            outcome, error = FAILED, str(exc)
        except CaddyRejected as exc:  # GET /config/ refused: treat as an error of this pass
            outcome, error = FAILED, exc.message
        # Caddy's messages may quote the config it refused: never let a secret through to status or logs
        secrets = self.settings.tls.secrets
        if error is not None:
            error = scrub(error, secrets)
        rejected = {n: scrub(m, secrets) for n, m in rejected.items()}
        self.loads += loads
        by_name = {ri.ingress.name: ri for ri in desired.ingresses}
        self._culprits = {n: (_fingerprint(by_name[n]), m) for n, m in rejected.items() if n in by_name}
        if applied_config is not None:
            config_file = self.config_file
            if config_file is not None and (self._saved != applied_config or not config_file.in_sync()):
                body = self._encoded(applied_config)
                # in order with the pass's other state files (on the report thread in the daemon); a
                # failed save is kept and retried until it lands, and until then the pass saves again
                self._later(lambda: config_file.save(body))
            self._saved, self._saved_gen = applied_config, generation
            self.last_applied_config = applied_config
        elif outcome == UNAVAILABLE:
            self._saved = None  # Caddy may come back with anything: read it next time
        applied = applied_config is not None
        apply_done = self._clock()
        if speculative and spec_args == (applied, error, rejected):
            self.statuses = speculative[0]
        else:
            self.statuses = ingress_statuses(desired, stale=inputs.manifests.stale,
                                             stale_since=inputs.manifests.stale_since, applied=applied,
                                             pass_error=error, rejected=rejected, memo=self.status_memo)
        self.certificates = {}
        if self._certs is not None and "tls" in config["apps"]:  # only a config with TLS hosts has the app
            tls_hosts = {ri.ingress.name: sorted({r.hostname for r in ri.ingress.rules if r.tls})
                         for ri in desired.ingresses if any(r.tls for r in ri.ingress.rules)}
            all_hosts = sorted({h for hosts in tls_hosts.values() for h in hosts})
            if all_hosts:
                self.certificates = {h: dict(c) for h, c in self._certs(all_hosts).items()}
                self.statuses = with_certificates(self.statuses, tls_hosts, self.certificates)
        if rejected and error is None:
            error = "; ".join(f"{n}: {m}" for n, m in sorted(rejected.items()))
        read_time = read_done - start if prefetched is None else prefetched[1]
        phases = (("read", read_time), ("render", render_done - read_done), ("load", load_time),
                  ("apply", apply_done - render_done - load_time))
        result = PassResult(trigger, inputs.revision, outcome, self._clock() - start, changes, error,
                            desired.problems, tuple(sorted(rejected)), loads, phases, started_at)
        self._persist(result, inputs, applied)
        result = replace(result, phases=(*phases, ("status", self._clock() - apply_done)))
        self.last = result
        self._body = None  # megabytes at 10k routes; the encoder keeps what the next pass can reuse
        return result

    # -- status ---------------------------------------------------------------------------------
    def _persist(self, result: PassResult, inputs: Inputs, applied: bool) -> None:
        now = self._wall()
        entry = {"at": now, "trigger": result.trigger, "revision": result.revision, "outcome": result.outcome,
                 "changes": result.changes, "duration_ms": round(result.duration * 1000, 1),
                 "error": result.error}
        last = self.history[-1] if self.history else None
        if (last is not None and result.outcome == UNCHANGED and last.get("outcome") == UNCHANGED
                and last.get("revision") == result.revision and last.get("trigger") == result.trigger):
            # idle passes fold into one entry, so the bounded history keeps the passes that did something
            entry = {**entry, "repeats": int(last.get("repeats", 1)) + 1, "first_at": last.get("first_at", last["at"])}
            self.history = [*self.history[:-1], entry]
        else:
            self.history = [*self.history, entry][-HISTORY:]
        if applied:
            self.last_applied = {"revision": result.revision, "at": now, "commits": inputs.commits}
        self.status = {
            "revision": {"last_attempted": result.revision,
                         "last_applied": (self.last_applied or {}).get("revision"),
                         "commits": inputs.commits},
            "last_attempted": {**entry, "commits": inputs.commits},
            "last_applied": self.last_applied,
            "last_error": result.error,
            "history": self.history,
            **self._health(),
            "sources": [{"path": h.path, "ok": h.ok, "root": h.root, "commit": h.commit, "files": h.files,
                         "error": h.error} for h in inputs.sources],
            "problems": [{"file": p.file, "line": p.line, "reason": p.reason, "ingress": p.ingress,
                          "message": p.message} for p in inputs.desired.problems],
            "certificates": self.certificates,
            "counts": {"ingresses": len(self.statuses), "ready": sum(s.ready for s in self.statuses)},
        }
        # a snapshot: the readers update their last good files in the next pass
        good_m, good_i = copy_good(self.manifests.good), copy_good(self.instances.good)
        self.good_snapshot = (good_m, good_i)
        if self.store is not None:
            store, status, statuses = self.store, self.status, self.statuses

            # separate jobs: the report thread pauses between jobs while a pass reads and renders
            def save_lastgood() -> None:
                store.save_lastgood(good_m, good_i)

            self._later(save_lastgood)
            self._later(lambda: store.save_status(status, statuses))

    def rewrite_status(self) -> None:
        """Save the status again with fresh health fields (say, once the disk has room again), between
        passes (the loop's thread)."""
        if self.store is None or self.last is None:
            return
        self.status = {**self.status, **self._health()}
        store, status, statuses = self.store, self.status, self.statuses
        self._later(lambda: store.save_status(status, statuses))

    def _later(self, job: Callable[[], None]) -> None:
        """Run a state file write after the pass (the daemon's report thread) or, without one, now."""
        if self._defer is not None:
            self._defer(job)
        else:
            job()

    def status_document(self) -> dict[str, Any]:
        """The status as ``status.json`` holds it (per-ingress entries built now: at 10k ingresses keeping
        them as dicts between passes would cost more memory than building them on request)."""
        if self.last is None:
            return dict(self.status_before)
        return {**self.status, "ingresses": [s.to_dict() for s in self.statuses]}

