"""What the API needs of the daemon (:class:`reconciler.api.app.Backend`): tickets for writes, status,
readiness and metrics -- all read from what the loop published (the last pass's immutable snapshot, the
keeper's and the storage's state), never from a pass at work."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from reconciler import __version__
from reconciler.caddy.admin import AdminClient
from reconciler.fsutil import StorageHealth
from reconciler.loop.daemon import Loop
from reconciler.loop.keeper import Keeper
from reconciler.loop.report import AppliedHash
from reconciler.loop.triggers import Trigger
from reconciler.model import Desired
from reconciler.settings import Settings
from reconciler.state.metrics import Metrics
from reconciler.state.store import GoodMap
from reconciler.validate import tls_patterns, tls_permission
from reconciler.zone import Pattern


def health(keeper: Keeper, storage: StorageHealth, responder: Keeper | None = None,
           node: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The status fields about Caddy, the DNS responder, the data dir and this node (live, for every status
    document)."""
    failing = storage.snapshot()
    out = {"caddy": keeper.state(), "storage": {"ok": not failing, "failing": failing}}
    if responder is not None:
        out["responder"] = responder.state()
    if node is not None:
        out["node"] = node()
    return out


def node_state(settings: Settings, name: str, applied_hash: AppliedHash) -> dict[str, Any]:
    """``node`` of the status: who this node is, whether it is one of a fleet, where its certificates are,
    and the hash of the config its Caddy runs (equal on every node of a converged fleet)."""
    return {"name": name, "version": __version__, "fleet": settings.fleet, "tls_storage": settings.storage_dir,
            "shared_storage": settings.shared_storage, "config_hash": applied_hash.value}


class Service:
    def __init__(self, *, loop: Loop, storage: StorageHealth, metrics: Metrics, client: AdminClient,
                 responder: Keeper | None = None, node: Callable[[], dict[str, Any]] | None = None) -> None:
        self.loop = loop
        self.node = node
        self.keeper = loop.keeper
        self.responder = responder
        self._patterns: tuple[Desired, list[tuple[Pattern, str]]] | None = None
        self.storage = storage
        self.metrics = metrics
        self.client = client

    def request_pass(self, path: str | None = None) -> int:
        """Ask for a pass now; the ticket is satisfied once the pass that reads ``path`` has finished."""
        # the ticket is the burst the notification joins: the pass that takes that burst reads ``path``
        # (a pass already started took an earlier burst, so it cannot satisfy the ticket)
        return self.loop.triggers.notify(Trigger.API, immediate=True, path=path)

    def wait_pass(self, ticket: int, timeout: float) -> bool:
        triggers = self.loop.triggers
        return self.loop.tickets.wait(ticket, timeout, lambda: triggers.stopped)

    def good_versions(self) -> tuple[GoodMap, GoodMap]:
        return self.loop.reconciler.good_versions()

    def ingress_status(self, name: str) -> dict[str, Any] | None:
        snap = self.loop.reconciler.snapshot
        st = snap.by_name.get(name) if snap is not None else None
        return st.to_dict() if st is not None else None

    def tls_permission(self, domain: str) -> str | None:
        """Why Caddy may not obtain a certificate for ``domain`` on demand now (None: it may), from the last
        pass's resolved ingresses and instances."""
        snap = self.loop.reconciler.snapshot
        if snap is None:
            return "no reconcile pass yet"
        desired = snap.desired
        cached = self._patterns
        if cached is None or cached[0] is not desired:
            cached = self._patterns = (desired, tls_patterns(desired))
        allowed = self.loop.reconciler.reader.settings.tls.allowed_domains
        return tls_permission(domain, cached[1], desired.instances, allowed)

    def status(self) -> dict[str, Any]:
        doc = {**self.loop.reconciler.status_document(),
               **health(self.keeper, self.storage, self.responder, self.node)}
        if self.loop.crash is not None:
            doc["last_error"] = self.loop.crash.error
        return doc

    def ready(self) -> tuple[bool, str]:
        ok, why = self._readiness()
        failing = self.storage.snapshot()
        if failing:
            files = ", ".join(f"{f['file']} ({f['error']})" for f in failing[:3])
            why += f"; {len(failing)} file(s) under the data dir cannot be written: {files}"
        return ok, why

    def _readiness(self) -> tuple[bool, str]:
        problem = self.keeper.problem() or (self.responder.problem() if self.responder is not None else None)
        if problem is not None:
            return False, problem
        if self.loop.crash is not None:
            return False, f"last pass failed: {self.loop.crash.error}"
        snap = self.loop.reconciler.snapshot
        if snap is None:
            return False, "no reconcile pass yet"
        last = snap.result
        if not last.converged:
            return False, f"last pass {last.outcome}: {last.error}"
        if snap.generation != self.keeper.generation:  # (the pass ran before Caddy's last (re)start)
            return False, "Caddy was restarted; waiting for a pass to converge it"
        if not self.client.ping():
            return False, "Caddy's admin API does not answer"
        return True, f"last pass {last.outcome} (revision {last.revision})"

    def metrics_text(self) -> bytes:
        self.metrics.observe_caddy(up=self.keeper.up(), restarts=self.keeper.restarts, flapping=self.keeper.flapping)
        self.metrics.observe_storage(len(self.storage.snapshot()))
        if self.responder is not None:
            state = self.responder.state()
            self.metrics.observe_responder(up=self.responder.up(), restarts=self.responder.restarts,
                                           records=state.get("records"), counters=state.get("counters") or {})
        if self.node is not None:
            node = self.node()
            snap = self.loop.reconciler.snapshot
            applied = snap.document.last_applied if snap is not None else None
            self.metrics.observe_node(name=node["name"], version=node["version"], fleet=node["fleet"],
                                      config_hash=node["config_hash"],
                                      revision=applied.get("revision") if applied else None,
                                      commits=(applied or {}).get("commits", {}).values())
        return self.metrics.render()
