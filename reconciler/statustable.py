"""``hypeman-ingress status`` as a table: the lines made of a status document. PURE (``now`` is given).

One function per block: the ingresses, the certificates, the revisions and this node, Caddy, the failing
files, the sources, the last error and the problems no ingress owns.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Mapping
from typing import Any

Status = Mapping[str, Any]
_UTC = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)Z")


def status_lines(status: Status, now: float) -> list[str]:
    return [*ingress_lines(status), *certificate_lines(status, now), "", *revision_lines(status, now),
            *caddy_lines(status), *storage_lines(status, now), *source_lines(status), *problem_lines(status)]


def ago(ts: Any, now: float) -> str:
    if not isinstance(ts, (int, float)):
        return "never"
    secs = max(0, int(now - ts))
    if secs < 120:
        return f"{secs}s ago"
    if secs < 7200:
        return f"{secs // 60}m ago"
    return f"{secs // 3600}h ago"


def ingress_lines(status: Status) -> list[str]:
    """A row per ingress, then why each one that is not ready is not."""
    ingresses = status.get("ingresses", [])
    rows = [("NAME", "HOSTS", "TARGETS", "READY", "REASON", "SOURCE")]
    for i in ingresses:
        src = f"{i.get('file', '')}:{i['line']}" if i.get("line") else i.get("file", "")
        rows.append((i.get("name", ""), ",".join(i.get("hosts", [])) or "-", ",".join(i.get("targets", [])) or "-",
                     "yes" if i.get("ready") else "no", i.get("reason", ""), src))
    widths = [max(len(str(r[c])) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines + [f"  {i.get('name')}: {i.get('message')}" for i in ingresses if not i.get("ready")]


def certificate_lines(status: Status, now: float) -> list[str]:
    certs = status.get("certificates") or {}
    if not certs:
        return []
    host_w = max(len(str(h)) for h in certs)
    state_w = max(len(str(c.get("state") or "-")) for c in certs.values())
    lines = ["", "certificates:"]
    for host, c in sorted(certs.items()):
        state, error = str(c.get("state") or "-"), c.get("error")
        line = f"  {str(host).ljust(host_w)}  {state.ljust(state_w)}{_expiry(c.get('not_after'), now)}"
        if error:
            line += f"  {'renewal failing: ' if state == 'issued' else 'error: '}{error}"
        lines.append(line.rstrip())
    return lines


def _expiry(not_after: Any, now: float) -> str:
    if not not_after:
        return ""
    m = _UTC.fullmatch(str(not_after))
    if m is None:
        return f"  expires {not_after}"
    expires = calendar.timegm(tuple(int(g) for g in m.groups()))
    left = expires - now
    days = int(abs(left) // 86400)
    if left > 0:
        return f"  expires {not_after} (in {f'{days}d' if days else '<1d'})"
    return f"  expired {not_after} ({days}d ago)"


def revision_lines(status: Status, now: float) -> list[str]:
    rev = status.get("revision", {})
    attempted, applied = status.get("last_attempted") or {}, status.get("last_applied") or {}
    lines = [f"last applied:   {rev.get('last_applied') or '-'} ({ago(applied.get('at'), now)})",
             f"last attempted: {rev.get('last_attempted') or '-'} ({ago(attempted.get('at'), now)}, "
             f"{attempted.get('outcome', '-')}, trigger {attempted.get('trigger', '-')})"]
    commits = sorted((rev.get("commits") or {}).items())
    return lines + [f"git commit:     {commit} ({source})" for source, commit in commits] + node_lines(status)


def node_lines(status: Status) -> list[str]:
    """Who this node is and the hash of what its Caddy runs (equal on the nodes of a converged fleet)."""
    node = status.get("node") or {}
    if not node:
        return []
    role = "fleet node" if node.get("fleet") else "single node"
    storage = f", certificates in {node.get('tls_storage')}" + (" (shared)" if node.get("shared_storage") else "")
    version = f", hypeman-ingress {node['version']}" if node.get("version") else ""
    return [f"node:           {node.get('name')} ({role}{version}), config hash {node.get('config_hash') or '-'}"
            f"{storage}"]


def caddy_lines(status: Status) -> list[str]:
    """Caddy's process, then the DNS responder's (kept alike)."""
    return [*_process_lines(status, "caddy"), *_process_lines(status, "responder")]


def _process_lines(status: Status, key: str) -> list[str]:
    proc = status.get(key) or {}
    if not proc:
        return []
    state = "running" if proc.get("running") else f"NOT RUNNING ({proc.get('state', 'down')})"
    flags = (", adopted" if proc.get("adopted") else "") + (", FLAPPING" if proc.get("flapping") else "")
    if key == "responder":
        flags += (f", {proc.get('records')} names on {proc.get('listen')}"
                  + ("" if proc.get("in_sync") else ", NOT IN SYNC"))
    lines = [f"{key + ':':<15} {state}, pid {proc.get('pid')}, restarts {proc.get('restarts', 0)}{flags}"]
    if not proc.get("running") and proc.get("last_error"):
        lines.append(f"{key + ' error:':<15} {proc['last_error']}")
    return lines


def storage_lines(status: Status, now: float) -> list[str]:
    return [f"storage:        CANNOT WRITE {f.get('file')}: {f.get('error')} (since {ago(f.get('since'), now)}, "
            f"{f.get('attempts')} attempt(s))" for f in (status.get("storage") or {}).get("failing", [])]


def source_lines(status: Status) -> list[str]:
    return [f"source:         {s.get('path')}: UNAVAILABLE: {s.get('error')}"
            for s in status.get("sources", []) if not s.get("ok")]


def problem_lines(status: Status) -> list[str]:
    lines = [f"last error:     {status['last_error']}"] if status.get("last_error") else []
    loose = [p for p in status.get("problems", []) if not p.get("ingress")]
    if loose:
        lines.append(f"problems ({len(loose)}):")
        lines += [f"  {p.get('file', '')}{':' + str(p['line']) if p.get('line') else ''}: {p.get('message')}"
                  for p in loose[:50]]
    return lines
