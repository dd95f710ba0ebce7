"""Stage 4 of a pass, *report*: each ingress's status (with its certificates), the status document, and
the state files -- config.json when Caddy's config changed, the last good versions, status.json -- handed
to the report thread in order."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from reconciler.caddy.configfile import ConfigFile
from reconciler.fleet import Tokens, config_hash
from reconciler.loop.apply import Applied
from reconciler.loop.read import Inputs
from reconciler.model import Desired
from reconciler.state.store import GoodMap, StateStore
from reconciler.status import (
    HISTORY,
    IngressStatus,
    PassRecord,
    StatusDocument,
    StatusMemo,
    ingress_statuses,
    status_document,
    with_certificates,
    with_health,
)
from reconciler.validate import pattern_hosts

Job = Callable[[], None]
Certificates = Callable[[list[str]], Mapping[str, Mapping[str, Any]]]


class AppliedHash:
    """The node-neutral hash (:mod:`reconciler.fleet`) of the config Caddy runs, worked out on the report
    thread from the encoded config of the pass that applied it: the very bytes it loaded (a pass that found
    Caddy running it already encodes it once, reusing every unchanged route's text). ``value`` is None until
    the first applied config is hashed."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        self.value: str | None = None
        self._config: dict[str, Any] | None = None  # the config the value is (being) worked out for

    def update(self, config: dict[str, Any], body: Callable[[], bytes], later: Callable[[Job], None]) -> None:
        if config is self._config:  # the renderer hands back the very same object when nothing changed
            return
        self._config = config
        encoded, tokens = body(), self.tokens

        def work() -> None:
            self.value = config_hash(encoded, tokens)
        later(work)


class Reporter:
    """Builds what a pass reports and persists it. ``defer`` runs the state file writes (default: at
    once; the daemon hands them to its report thread)."""

    def __init__(self, *, store: StateStore | None, config_file: ConfigFile | None,
                 certs: Certificates | None = None, defer: Callable[[Job], None] | None = None,
                 health: Callable[[], dict[str, Any]] | None = None,
                 applied_hash: AppliedHash | None = None,
                 upstreams: Callable[[], Mapping[str, Mapping[str, Any]]] | None = None,
                 zone: str = "hypeman.internal") -> None:
        self.store = store
        self._upstreams = upstreams
        self._zone = zone
        self.applied_hash = applied_hash
        self.config_file = config_file
        self._certs = certs
        self._defer = defer
        self._health = health or (lambda: {})
        self.memo = StatusMemo()
        previous = store.load_status() if store is not None else None
        #: the status persisted by the previous run of the daemon (empty on a fresh data dir)
        self.before: dict[str, Any] = previous or {}
        records = self.before.get("history", [])
        history = tuple(r for r in map(PassRecord.from_dict, records if isinstance(records, list) else [])
                        if r is not None)[-HISTORY:]
        self._previous: tuple[tuple[PassRecord, ...], Mapping[str, Any] | None] = (
            history, self.before.get("last_applied"))

    # -- statuses ----------------------------------------------------------------------------------
    def statuses(self, inputs: Inputs, *, applied: bool, error: str | None,
                 rejected: Mapping[str, str], desired: Desired | None = None) -> list[IngressStatus]:
        """``desired``: what to work them out from instead of the inputs' (rules held by a cutover)."""
        return ingress_statuses(desired or inputs.desired, stale=inputs.manifests.stale,
                                stale_since=inputs.manifests.stale_since, applied=applied, pass_error=error,
                                rejected=rejected, memo=self.memo)

    def certificates(self, desired: Desired, config: dict[str, Any],
                     statuses: list[IngressStatus]) -> tuple[list[IngressStatus], dict[str, Any]]:
        """The statuses with their TLS hostnames' certificate states, and those states."""
        if self._certs is None or "tls" not in config["apps"]:  # only a config with TLS hosts has the app
            return statuses, {}
        tls_hosts = {ri.ingress.name: sorted({r.hostname for r in ri.ingress.rules if r.tls and not r.pattern})
                     for ri in desired.ingresses if any(r.tls for r in ri.ingress.rules)}
        on_demand = pattern_hosts(desired)  # a pattern's hosts: one per instance it reaches
        hosts = sorted({h for names in (*tls_hosts.values(), *on_demand.values()) for h in names})
        if not hosts:
            return statuses, {}
        certificates = {h: dict(c) for h, c in self._certs(hosts).items()}
        return with_certificates(statuses, tls_hosts, certificates, on_demand), certificates

    def upstream_health(self, desired: Desired, statuses: list[IngressStatus]) -> list[IngressStatus]:
        """The statuses with what Caddy says of their health-checked targets (see :func:`with_health`)."""
        if self._upstreams is None:
            return statuses
        return with_health(statuses, desired, self._upstreams(), self._zone)

    # -- the status document and the files -----------------------------------------------------------
    def document(self, record: PassRecord, inputs: Inputs, *, applied: bool, certificates: dict[str, Any],
                 statuses: list[IngressStatus]) -> StatusDocument:
        sources = tuple({"path": h.path, "ok": h.ok, "root": h.root, "commit": h.commit, "files": h.files,
                         "error": h.error} for h in inputs.sources)
        doc = status_document(record, applied=applied, previous=self._previous, commits=inputs.commits,
                              health=self._health(), sources=sources, problems=inputs.desired.problems,
                              certificates=certificates, statuses=statuses)
        self._previous = (doc.history, doc.last_applied)
        return doc

    def persist(self, applied: Applied, body: Callable[[], bytes], good: tuple[GoodMap, GoodMap],
                doc: StatusDocument, statuses: list[IngressStatus]) -> None:
        """Hand the state files to the report thread, in order: config.json (when Caddy's config is new to
        us, or the file is behind: a failed save, a damaged file), lastgood.json, status.json."""
        config_file = self.config_file
        if applied.config is not None and self.applied_hash is not None:
            self.applied_hash.update(applied.config, body, self._later)
        if applied.config is not None and config_file is not None:
            config_file.applied = applied.config  # what a restart of Caddy starts with if the file is behind
            if applied.new or not config_file.in_sync():
                encoded = body()
                self._later(lambda: config_file.save(encoded))
        store = self.store
        if store is None:
            return
        good_m, good_i = good

        def save_lastgood() -> None:
            store.save_lastgood(good_m, good_i)

        # separate jobs: the report thread pauses between jobs while a pass reads
        self._later(save_lastgood)
        self._later(lambda: store.save_status(doc.to_dict(), statuses))

    def rewrite_status(self, doc: StatusDocument, statuses: list[IngressStatus]) -> StatusDocument:
        """Save the status again with fresh health fields (say, once the disk has room again)."""
        fresh = StatusDocument(doc.attempted, doc.last_applied, doc.commits, doc.history, self._health(),
                               doc.sources, doc.problems, doc.certificates, doc.ingresses, doc.ready)
        if self.store is not None:
            store = self.store
            self._later(lambda: store.save_status(fresh.to_dict(), statuses))
        return fresh

    def _later(self, job: Job) -> None:
        if self._defer is not None:
            self._defer(job)
        else:
            job()
