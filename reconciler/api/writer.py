"""The API's thin writer onto the API-owned manifest dir ``{data}/ingresses``.

The API is not a second source of truth: a create is validated exactly like a manifest file, against the
whole current desired state read fresh from disk (every source, every instance) -- by
:func:`reconciler.validate.admit`, the resolver's own walk: one set of rules for the loop and the API --,
and the would-be Caddy config must pass ``caddy validate``, all *before* anything is written. Refusals
carry a domain code (:class:`Refusal`, or the :class:`~reconciler.model.Reason` of the broken rule);
:mod:`reconciler.api.app` maps them to HTTP. "The desired state" is the loop's:
a file that is invalid now still counts with the last good version the daemon serves, so before each read
the writer takes the daemon's last good versions -- handed over in process by the daemon, or else followed
through ``{data}/state/lastgood.json`` (re-read only when it changed) -- instead of trusting what this
writer happened to see valid. The manifest is then written
atomically (temp file in the same dir, fsync, rename, mode 0600) and the loop converges as for any file.
One lock serialises writers, so two racing creates for the same ``(hostname, port)`` end in one success
and one ``hostname_in_use``.

The writer never turns "unavailable" into "emptied": while the API-owned dir is missing or unreadable
(its ingresses keep serving from their last good versions), writes are refused with 503
``source_unavailable`` instead of creating a new, empty dir that would make the loop drop them. A write
that the disk refuses answers 507 ``insufficient_storage`` (full disk) or 503 ``storage_unavailable``
(read-only, permissions...), naming the file; nothing is half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import structlog
import yaml

from reconciler.errors import StorageError
from reconciler.fsutil import atomic_write, pid_alive, storage_error
from reconciler.model import Document, GoodFile, HealthCheck, Ingress, Instance, Origin, Problem, Source
from reconciler.parse import ParsedDocument
from reconciler.render import REDACTED, render, scrub, secret_values
from reconciler.schema import FREE_TEXT_FIELDS, control_character_path, format_path
from reconciler.settings import Settings
from reconciler.sources.dirs import sources_for
from reconciler.sources.inputs import ReadResult, ingress_reader, instance_reader
from reconciler.state.store import GoodMap, LastGoodFollower, copy_good
from reconciler.validate import InstanceIndex, admit, ingress_from_document

log = structlog.get_logger("hypeman.ingress.api")

REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # use with fullmatch: "$" also matches before "\n"
#: the temp files of :func:`reconciler.fsutil.atomic_write`: ``.{name}.{pid}.tmp``
_TEMP = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)\.tmp")
#: a temp file older than this is left over from a crash, whoever wrote it
STALE_TEMP_SECONDS = 60.0


class Refusal(StrEnum):
    """Why the writer refused (besides the :class:`reconciler.model.Reason` of a rule the ingress breaks);
    :mod:`reconciler.api.app` says how each is answered over HTTP."""

    BAD_REQUEST = "bad_request"
    INSTANCE_NOT_FOUND = "instance_not_found"
    CONFIG_VALIDATION_FAILED = "config_validation_failed"
    ALREADY_EXISTS = "already_exists"
    AMBIGUOUS = "ambiguous"
    NOT_FOUND = "not_found"
    READ_ONLY_SOURCE = "read_only_source"
    FLEET_READ_ONLY = "fleet_read_only"
    SOURCE_UNAVAILABLE = "source_unavailable"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    INSUFFICIENT_STORAGE = "insufficient_storage"


class Refused(Exception):
    """A write or lookup refused: ``code`` is a :class:`Refusal` or the :class:`Reason` of a broken rule."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def storage_failure(exc: StorageError, what: str) -> Refused:
    """A write the disk refused."""
    if exc.no_space:
        return Refused(Refusal.INSUFFICIENT_STORAGE, f"{what}: {exc}; nothing was written (free space on the "
                                                     "data dir's file system and retry)")
    return Refused(Refusal.STORAGE_UNAVAILABLE, f"{what}: {exc}; nothing was written")


@dataclass(frozen=True, slots=True)
class Found:
    ingress: Ingress
    read_only: bool
    path: str  # the manifest file


def health_body(check: HealthCheck) -> dict[str, Any]:
    """A rule's ``health_check`` as the manifest has it, with its defaults."""
    out: dict[str, Any] = {}
    if check.active:
        active: dict[str, Any] = {"path": check.path, "interval": check.interval, "timeout": check.timeout,
                                  "passes": check.passes, "fails": check.fails,
                                  "cutover_deadline": check.cutover_deadline}
        if check.expect_status is not None:
            active["expect_status"] = check.expect_status
        out["active"] = active
    if check.passive_fails is not None:
        out["passive"] = {"fails": check.passive_fails, "window": check.passive_window}
    return out


def ingress_body(ing: Ingress) -> dict[str, Any]:
    """The ingress object as hypeman's API has it."""
    rules = []
    for r in ing.rules:
        rule: dict[str, Any] = {"match": {"hostname": r.hostname, "port": r.port}}
        if r.targets:
            rule["targets"] = [{"instance": t.instance, "port": t.port, "weight": t.weight} for t in r.targets]
        else:
            rule["target"] = {"instance": r.instance, "port": r.target_port}
        if r.sticky_cookie is not None:
            rule["sticky"] = {"cookie": r.sticky_cookie}
        if r.health is not None:
            rule["health_check"] = health_body(r.health)
        if r.header_auth is not None:  # that it is set, never the value
            rule["request_header_auth"] = {"header": r.header_auth[0], "value": REDACTED}
        if r.basic_auth is not None:
            rule["basic_auth"] = {"realm": r.basic_auth[0],
                                  "users": [{"username": u, "password_hash": REDACTED} for u, _ in r.basic_auth[1]]}
        if r.allow_ips:
            rule["allow_ips"] = list(r.allow_ips)
        if r.limits is not None:
            lim = r.limits
            limits = {k: v for k, v in (("max_body", f"{lim.max_body}B" if lim.max_body is not None else None),
                                        ("max_concurrent", lim.max_concurrent), ("dial_timeout", lim.dial_timeout),
                                        ("response_header_timeout", lim.response_header_timeout),
                                        ("read_timeout", lim.read_timeout)) if v is not None}
            if limits:
                rule["limits"] = limits
            if lim.rate_limit is not None:
                rule["rate_limit"] = {"requests": lim.rate_limit[0], "window": lim.rate_limit[1]}
        if r.tls:
            rule["tls"] = True
        if r.redirect_http:
            rule["redirect_http"] = True
        if r.path is not None:
            rule["match"]["path"] = r.path
            rule["match"]["path_type"] = r.path_type
        if r.strip_prefix:
            rule["strip_prefix"] = True
        if r.hold is not None:
            rule["hold"] = {k: v for k, v in (("duration", r.hold[0]), ("interval", r.hold[1])) if v}
        rules.append(rule)
    body: dict[str, Any] = {"id": ing.id, "name": ing.name, "rules": rules, "created_at": ing.created_at}
    if ing.access_log is not None:
        body["access_log"] = ing.access_log
    if ing.error_pages:
        body["error_pages"] = {str(status): {k: v for k, v in (("html", h), ("text", t)) if v is not None}
                               for status, h, t in ing.error_pages}
    if ing.maintenance is not None:
        m = ing.maintenance
        body["maintenance"] = {"message": m.message, "retry_after": m.retry_after or 0,
                               **({"allow_path": m.allow_path} if m.allow_path else {})}
    return body


def remove_stale_temp_files(directory: str, *, wall: Callable[[], float] = time.time,
                            alive: Callable[[int], bool] = pid_alive) -> list[str]:
    """Remove the temp files an atomic write left behind when its process was killed mid-write
    (``.{name}.{pid}.tmp``, regular files only, top level of ``directory``): those of a process that is
    gone, and any older than :data:`STALE_TEMP_SECONDS` (a pid may have been reused). Returns their names."""
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = wall()
    for name in sorted(names):
        m = _TEMP.fullmatch(name)
        if m is None:
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        pid = int(m["pid"])
        old = now - st.st_mtime > STALE_TEMP_SECONDS
        if old or (pid != os.getpid() and not alive(pid)):
            with contextlib.suppress(OSError):  # gone meanwhile, or a read-only dir: not worth failing a start
                os.unlink(path)
                removed.append(name)
    return removed


class ManifestWriter:
    """Validates and writes API manifests. ``good``: last good versions to start from (used until the
    daemon has written ``{data}/state/lastgood.json``; from then on that file is followed)."""

    def __init__(self, settings: Settings, *, validate_config: Callable[[dict[str, Any]], str | None],
                 good: tuple[dict[str, dict[str, GoodFile]], dict[str, dict[str, GoodFile]]] | None = None,
                 wall: Callable[[], float] = time.time,
                 daemon_good: Callable[[], tuple[GoodMap, GoodMap] | None] | None = None) -> None:
        self.settings = settings
        self._validate = validate_config
        self._wall = wall
        self.lock = threading.Lock()
        good_m, good_i = good if good is not None else ({}, {})
        self._manifests = ingress_reader(max_bytes=settings.max_file_bytes, good=good_m, wall=wall)
        self._instances = instance_reader(max_bytes=settings.max_file_bytes, good=good_i, wall=wall)
        #: the last good versions the loop serves: handed over by the daemon in its own process, else
        #: followed through ``{data}/state/lastgood.json``
        self._daemon_good: Callable[[], tuple[GoodMap, GoodMap] | None] = (
            daemon_good if daemon_good is not None else LastGoodFollower(settings.state_dir, wall=wall).current)
        #: temp files of writes killed mid-way (SIGKILL, power loss), removed at start
        self.removed_temp_files = remove_stale_temp_files(settings.api_dir, wall=wall)
        if self.removed_temp_files:
            log.info("api.temp_files_removed", directory=settings.api_dir, files=self.removed_temp_files)

    # -- reading ------------------------------------------------------------------------------
    def _sources(self) -> list[Source]:
        return sources_for(self.settings)

    def _read(self, sources: list[Source]) -> tuple[ReadResult[Ingress], ReadResult[Instance]]:
        """Every source and the instances as the loop sees them (call with :attr:`lock` held): files that
        are invalid now count with the last good version the daemon serves, not with whatever this
        process happened to see valid (or never saw valid)."""
        daemon = self._daemon_good()
        if daemon is not None:
            self._manifests.good = copy_good(daemon[0])
            self._instances.good = copy_good(daemon[1])
        return (self._manifests.read(sources),
                self._instances.read([Source(self.settings.instances_path, 0)]))

    def _check_api_source(self, manifests: ReadResult[Ingress]) -> None:
        """Refuse a write while the API-owned dir is unavailable (see the module docstring)."""
        api_dir = self.settings.api_dir
        health = next((h for h in manifests.sources if h.path == api_dir), None)
        error = health.error if health is not None and not health.ok else None
        if error is None and not os.path.isdir(api_dir):
            error = "it does not exist"
        if error is None:
            return
        kept = sorted(i.name for i in manifests.items if i.origin.file.startswith(api_dir + os.sep))
        serving = (f"; its {len(kept)} ingress(es) keep serving from their last good versions "
                   f"({', '.join(kept[:5])}{', ...' if len(kept) > 5 else ''})" if kept else "")
        raise Refused(Refusal.SOURCE_UNAVAILABLE,
                       f"the API's manifest dir {api_dir} is unavailable ({error}){serving}. Writes are refused "
                       "so that nothing it held is lost: restore it (`hypeman-ingress restore` writes back the "
                       "last good versions), or create it empty to drop its ingresses")

    def view(self) -> tuple[list[Source], ReadResult[Ingress], ReadResult[Instance]]:
        sources = self._sources()
        with self.lock:
            return sources, *self._read(sources)

    def all(self) -> list[Found]:
        sources, manifests, _ = self.view()
        return [self._found(ing, sources) for ing in sorted(manifests.items, key=lambda i: i.name)]

    def _found(self, ing: Ingress, sources: list[Source]) -> Found:
        src = sources[ing.origin.source_index]
        return Found(ing, src.read_only, ing.origin.file)

    def find(self, ref: str) -> Found:
        check_ref(ref)
        sources, manifests, _ = self.view()
        return self._find(ref, sources, manifests.items)

    def _find(self, ref: str, sources: list[Source], items: list[Ingress]) -> Found:
        """Exact id, then exact name, then a unique id prefix (hypeman's order)."""
        by_id = [i for i in items if i.id == ref]
        if by_id:
            return self._found(by_id[0], sources)
        by_name = [i for i in items if i.name == ref]
        if by_name:
            return self._found(by_name[0], sources)
        prefixed = {i.id: i for i in items if i.id.startswith(ref)}
        if len(prefixed) == 1:
            return self._found(next(iter(prefixed.values())), sources)
        if len(prefixed) > 1:
            names = ", ".join(sorted(i.name for i in prefixed.values())[:5])
            raise Refused(Refusal.AMBIGUOUS, f"{ref!r} is a prefix of {len(prefixed)} ingress ids ({names})")
        raise Refused(Refusal.NOT_FOUND, f"no ingress with name, id or id prefix {ref!r}")

    # -- writing ------------------------------------------------------------------------------
    def check_writable(self) -> None:
        """A fleet node takes no writes: every node must render the same config from the one git source."""
        if self.settings.fleet:
            raise Refused(Refusal.FLEET_READ_ONLY,
                          "this node is one of a fleet (HYPEMAN_FLEET=true): the API is read-only and every node "
                          f"serves the manifests of the git source ({', '.join(self.settings.manifest_dirs)}); "
                          "commit the change to that repository instead")

    def create(self, body: Any) -> Ingress:
        self.check_writable()
        if not isinstance(body, dict):
            raise Refused(Refusal.BAD_REQUEST, "the body must be a JSON object (an ingress)")
        data = dict(body)
        name = data.get("name")
        api_dir = self.settings.api_dir
        sources = self._sources()
        api_index = len(sources) - 1
        relpath = f"{name}.yaml" if isinstance(name, str) else "request"
        path = os.path.join(api_dir, relpath)
        doc = Document(Origin(api_index, relpath, 0, path, 1), ParsedDocument(0, 1, data))
        candidate, problems = ingress_from_document(doc)
        if candidate is None:
            raise Refused(Refusal.BAD_REQUEST, "; ".join(p.message for p in problems))
        _check_text(body)
        # what the client sent is validated as sent (created_at included); the API then stamps its own time
        data["created_at"] = datetime.fromtimestamp(self._wall(), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        candidate = dataclasses.replace(candidate, created_at=data["created_at"])
        with self.lock:
            manifests, instances = self._read(sources)
            self._check_api_source(manifests)
            admission = admit(candidate, manifests.items, instances.items, self.settings)
            if admission.problems:
                raise self._refusal(admission.problems[0], manifests)
            if os.path.lexists(path):
                raise Refused(Refusal.ALREADY_EXISTS, f"{path} already exists (it does not hold a valid ingress "
                                                      "right now; fix or delete it first)")
            index = InstanceIndex(instances.items)
            for r in candidate.rules:  # the API's own rule (as hypeman's): a file may name one yet to come
                for t in () if r.pattern else r.pool:  # (a pattern's: resolved per request)
                    if t.weight and index.lookup(t.instance) is None:  # (weight 0: out of the pool, as in files)
                        raise Refused(Refusal.INSTANCE_NOT_FOUND,
                                      f"rules: instance {t.instance!r} not found (by name or id)")
            error = self._validate(render(admission.desired, self.settings))
            if error is not None:  # Caddy may quote the config it refused: never a secret in the answer
                raise Refused(Refusal.CONFIG_VALIDATION_FAILED,
                              f"Caddy would reject the config: "
                              f"{scrub(error, self.settings.tls.secrets + secret_values(admission.desired))}")
            self._write(path, data, candidate, manifests)
        return candidate

    def _write(self, path: str, data: dict[str, Any], candidate: Ingress, manifests: ReadResult[Ingress]) -> None:
        self._check_api_source(manifests)  # (never makes the dir: see the module docstring)
        try:
            atomic_write(path, self._dump(data).encode(), 0o600)
        except StorageError as exc:
            if not os.path.isdir(self.settings.api_dir):  # it vanished since the read
                self._check_api_source(manifests)
            raise storage_failure(exc, f"ingress {candidate.name!r} not created") from exc

    @staticmethod
    def _refusal(problem: Problem, manifests: ReadResult[Ingress]) -> Refused:
        """The problem :func:`admit` found, as the refusal; a winner whose file is invalid now (serving its
        last good version) says so."""
        message = problem.message
        winner = next((i for i in manifests.items if i.name == problem.winner), None)
        if winner is not None and winner.origin.file in manifests.stale:
            message += ("; that file is invalid now, and its last valid version keeps serving until it is fixed "
                        "or deleted")
        return Refused(problem.reason, message)

    @staticmethod
    def _dump(data: dict[str, Any]) -> str:
        ordered = {k: data[k] for k in ("name", "id", "created_at", "access_log", "rules") if k in data}
        header = "# written by the hypeman-ingress API; edits by hand are picked up like any manifest\n"
        return header + yaml.safe_dump(ordered, sort_keys=False, default_flow_style=False)

    def delete(self, ref: str) -> Found:
        self.check_writable()
        check_ref(ref)
        sources = self._sources()
        with self.lock:
            manifests, _ = self._read(sources)
            found = self._find(ref, sources, manifests.items)
            if found.read_only:
                # a copy in the API dir shadowed by a read-only source (same name) is still ours to delete
                shadowed = [i for i in manifests.items if i.name == found.ingress.name
                            and not sources[i.origin.source_index].read_only]
                if shadowed:
                    found = self._found(shadowed[0], sources)
            if found.read_only:
                raise Refused(Refusal.READ_ONLY_SOURCE,
                              f"ingress {found.ingress.name!r} lives in the read-only source file {found.path}; "
                              "remove it there (e.g. in git)")
            siblings = [i for i in manifests.items if i.origin.file == found.path and i.name != found.ingress.name]
            if siblings:
                raise Refused(Refusal.READ_ONLY_SOURCE,
                              f"{found.path} also defines {', '.join(sorted(i.name for i in siblings))}; "
                              "edit that file by hand")
            self._check_api_source(manifests)
            target = os.path.join(self.settings.api_dir, found.ingress.origin.relpath)
            try:
                os.unlink(target)
            except FileNotFoundError:
                pass
            except OSError as exc:  # a read-only mount, permissions
                raise storage_failure(storage_error(target, exc), f"ingress {found.ingress.name!r} not deleted"
                                      ) from exc
        return found


def _check_text(body: Any) -> None:
    """No control characters in any key or string (the schema's own walk): they never belong in an
    ingress, and a trailing newline slips through the schema's ``$``-anchored patterns (Python's ``$`` also
    matches before a final newline)."""
    path = control_character_path(body, FREE_TEXT_FIELDS)
    if path is not None:
        raise Refused(Refusal.BAD_REQUEST, f"{format_path(path) or 'document'}: control characters are not allowed")


def check_ref(ref: str) -> None:
    if not REF.fullmatch(ref):
        raise Refused(Refusal.BAD_REQUEST, "the ingress reference must be a name, an id or an id prefix "
                                           "(letters, digits, '.', '_', '-')")
