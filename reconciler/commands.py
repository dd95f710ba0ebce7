"""What each ``hypeman-ingress`` command does, once :mod:`reconciler.cli` has parsed its flags: ``run``
(the daemon, built by :mod:`reconciler.app`), ``validate``, ``render``, ``diff``, ``apply``, ``status`` and
``restore``. Each returns the exit code."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from reconciler import diff
from reconciler.caddy.admin import AdminClient
from reconciler.caddy.binary import find_caddy
from reconciler.caddy.configfile import ConfigFile
from reconciler.caddy.modules import preflight
from reconciler.caddy.validate import caddy_validate
from reconciler.errors import CaddyError, ConfigError, ResponderError, StorageError
from reconciler.loop.reconcile import Reconciler
from reconciler.model import Ingress, Problem, Reason, Source
from reconciler.render import REDACTED, redact, to_json
from reconciler.responder.client import Publisher
from reconciler.responder.supervisor import ResponderSupervisor
from reconciler.settings import Settings, parse_listen
from reconciler.sources.dirs import sources_for
from reconciler.sources.inputs import ingress_reader
from reconciler.state.store import StateStore, lastgood_from, restore_files
from reconciler.statustable import status_lines
from reconciler.validate import resolve, zone_records


def _print_problems(problems: Sequence[Problem], out: Any) -> None:
    for p in sorted(problems, key=lambda p: (p.file, p.line or 0, p.message)):
        print(p.format(), file=out)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler.app import Daemon

    daemon = Daemon(settings)
    daemon.signals.install()
    try:
        daemon.setup()
    except BaseException:  # the API address is unusable, another server holds Caddy's admin port...
        daemon.shutdown()
        raise
    return daemon.run()


def validate(args: argparse.Namespace, settings: Settings) -> int:
    """Files and dirs read as the daemon reads a source (one reader for both), resolved across them."""
    reader = ingress_reader(max_bytes=settings.max_file_bytes)
    ingresses: list[Ingress] = []
    problems: list[Problem] = []
    if args.paths:
        for i, path in enumerate(args.paths):
            if os.path.isdir(path) or not os.path.lexists(path):
                got = reader.read([Source(path, i)])
                ingresses += got.items
                problems += got.problems
            else:
                items, file_problems = reader.read_file(path, i)
                ingresses += items
                problems += file_problems
    else:
        got = reader.read(sources_for(settings, include_api=False))
        ingresses, problems = got.items, got.problems
    desired = resolve(ingresses, [], settings, problems)
    all_problems = list(desired.problems)
    if settings.tls.dns_provider is not None or settings.tls.acme_ca_root is not None:
        try:
            preflight(settings, find_caddy())
        except (CaddyError, ConfigError) as exc:
            all_problems.append(Problem("(settings)", None, str(exc), Reason.INVALID_SETTINGS))
    _print_problems(all_problems, sys.stdout)
    if not args.quiet:
        verdict = "invalid" if all_problems else "valid"
        print(f"{len(desired.ingresses)} ingress(es) accepted, {len(all_problems)} problem(s): {verdict}",
              file=sys.stderr)
    return 1 if all_problems else 0


def _offline_reconciler(settings: Settings, client: AdminClient) -> Reconciler:
    """A reconciler that sees what the daemon sees (including last-known-good versions of broken files
    from ``{data}/state``) without writing anything."""
    store = StateStore(settings.state_dir) if os.path.isdir(settings.state_dir) else None
    return Reconciler(settings=settings, client=client, store=store, include_api=False)


def render(args: argparse.Namespace, settings: Settings) -> int:
    with AdminClient(settings.admin_url) as client:
        inputs, config = _offline_reconciler(settings, client).desired_config()
    _print_problems(inputs.desired.problems, sys.stderr)
    sys.stdout.write(to_json(config if args.show_secrets else redact(config)))
    return 1 if inputs.desired.problems else 0


def diff_(args: argparse.Namespace, settings: Settings) -> int:
    with AdminClient(settings.admin_url) as client:
        _inputs, desired = _offline_reconciler(settings, client).desired_config()
        try:
            live = client.get_config()
        except CaddyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if diff.same(live, desired):
        print("no differences", file=sys.stderr)
        return 0
    # compared with secrets, printed without them
    live_shown, desired_shown = redact(diff.normalise(live)), redact(desired)
    if args.unified:
        a = to_json(live_shown).splitlines(keepends=True) if live is not None else []
        b = to_json(desired_shown).splitlines(keepends=True)
        sys.stdout.writelines(difflib.unified_diff(a, b, "live", "desired"))
    else:
        changes = diff.diff(diff.normalise(live), diff.normalise(desired))
        shown = {c.path: c for c in diff.diff(live_shown, desired_shown)}
        for change in changes:
            print(shown.get(change.path, diff.Change("~", change.path, REDACTED, REDACTED)).format())
    return 1


def apply(args: argparse.Namespace, settings: Settings) -> int:
    config_path = os.path.join(settings.caddy_dir, "config.json")
    config_file = ConfigFile(config_path) if os.path.isdir(settings.caddy_dir) else None
    store = StateStore(settings.state_dir) if os.path.isdir(settings.data_dir) else None
    binary = find_caddy()
    # the data plane's other half: the routes dial instance names the DNS responder answers (adopted when
    # it runs -- a daemon's, or one an earlier apply started --, else started detached)
    publisher = Publisher(settings.dns_dir)
    try:
        ResponderSupervisor(settings, publisher, replace_changed=False).ensure_running()
    except ResponderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with AdminClient(settings.admin_url) as client:
        reconciler = Reconciler(settings=settings, client=client, store=store, config_file=config_file,
                                validate=lambda config: caddy_validate(binary, config), include_api=False)
        reconciler.reader.on_instances = lambda items: publisher.publish(zone_records(items))
        result = reconciler.run_pass("apply")
    if not publisher.delivered():
        print(f"error: the DNS responder did not take the instances' addresses: {publisher.error}", file=sys.stderr)
        return 1
    _print_problems(result.problems, sys.stderr)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"{result.outcome} (revision {result.revision}, {result.changes} change(s), "
          f"{result.duration * 1000:.0f} ms)")
    return 0 if result.converged else 1


def restore(args: argparse.Namespace, settings: Settings) -> int:
    path = os.path.join(settings.state_dir, "lastgood.json")
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except (OSError, ValueError) as exc:
        print(f"error: cannot read the last good versions from {path}: {exc}", file=sys.stderr)
        return 1
    good, _ = lastgood_from(data)
    files = good.get(settings.api_dir, {})
    if not files:
        print(f"nothing to restore: {path} holds no file of {settings.api_dir}", file=sys.stderr)
        return 0
    missing = {rel: kept for rel, kept in sorted(files.items())
               if not os.path.lexists(os.path.join(settings.api_dir, *rel.split("/")))}
    for rel in sorted(set(files) - set(missing)):
        print(f"kept     {os.path.join(settings.api_dir, *rel.split('/'))} (exists)")
    if args.dry_run:
        for rel in missing:
            print(f"would write {os.path.join(settings.api_dir, *rel.split('/'))}")
        return 0
    try:
        written = restore_files(settings.api_dir, {rel: kept.text for rel, kept in missing.items()},
                                owner_of=settings.data_dir)
    except StorageError as exc:
        print(f"error: {exc}; nothing was restored", file=sys.stderr)
        return 1
    for file in written:
        print(f"restored {file}")
    return 0


def _read_status(settings: Settings) -> dict[str, Any] | None:
    """From the running daemon's API (``GET /status``) when it answers, else from ``{data}/state``."""
    if settings.api_listen:
        host, port = parse_listen(settings.api_listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/status"
        headers = {"Authorization": f"Bearer {settings.api_token}"} if settings.api_token else {}
        try:
            resp = httpx.get(url, headers=headers, timeout=5.0)
            if resp.status_code == 200:
                data = resp.json()
                if isinstance(data, dict) and data:
                    return data
            if resp.status_code == 401:
                print(f"warning: the API at {settings.api_listen} refused the token (INGRESS_API_TOKEN); "
                      f"showing the last status written to {settings.state_dir}", file=sys.stderr)
        except (httpx.HTTPError, ValueError):
            pass
    return StateStore(settings.state_dir).load_status()


def status(args: argparse.Namespace, settings: Settings) -> int:
    doc = _read_status(settings)
    if doc is None:
        print(f"no status yet in {settings.state_dir} (is the daemon running with this --data-dir?)",
              file=sys.stderr)
        return 1
    if args.output == "json":
        json.dump(doc, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print("\n".join(status_lines(doc, time.time())))
    ingresses = doc.get("ingresses", [])
    healthy = not doc.get("last_error") and (doc.get("storage") or {}).get("ok", True)
    return 0 if all(i.get("ready") for i in ingresses) and healthy else 1




COMMANDS = {"run": run, "validate": validate, "render": render, "diff": diff_, "apply": apply, "status": status,
            "restore": restore}
