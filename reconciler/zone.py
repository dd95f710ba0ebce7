"""Names of instances in the responder's DNS zone, and hostname patterns. PURE.

Caddy's upstreams dial a *name* (``<label>.<zone>:<port>``) that the DNS responder of
:mod:`reconciler.responder` answers from the instance state, so where an instance is and whether it runs
never needs a config load. The label of an instance reference (``target.instance``: a name or an id) is
the reference itself when it is a lower-case DNS label, else ``xh--`` and 24 hex digits of its SHA-1 (a
label with ``--`` in its third and fourth characters is reserved by RFC 5891, so the two forms never
collide; such references are hashed as well).

Hostname patterns use hypeman's syntax: ``{instance}.example.com`` -- a capture fills a whole label (Caddy's
``*`` of a host matcher: exactly one label) and ``target.instance`` refers to it (``{instance}``, or
``app-{instance}``); Caddy fills it per request from ``{http.request.host.labels.N}``.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from typing import NamedTuple, Protocol


class Instance(Protocol):
    """What the zone needs of an instance (:class:`reconciler.model.Instance`)."""

    @property
    def ip(self) -> str: ...
    @property
    def running(self) -> bool: ...

#: the kinds of answers the responder counts (a label of the reconciler's metric)
ANSWER_KINDS = ("address", "nodata", "nxdomain", "refused", "formerr")

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
#: hypeman's capture syntax (``lib/ingress/types.go``)
CAPTURE = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")


@functools.lru_cache(maxsize=1 << 16)
def label(ref: str) -> str:
    """The DNS label naming instance reference ``ref`` in the zone (kept: many rules name one instance)."""
    if _LABEL.fullmatch(ref) and ref[2:4] != "--":
        return ref
    return "xh--" + hashlib.sha1(ref.encode()).hexdigest()[:24]


def dial_name(ref: str, port: int, zone: str) -> str:
    """The upstream address Caddy dials for instance reference ``ref`` (rooted: never tried with the host's
    resolv.conf search domains first) -- also how Caddy names that upstream in its admin API and metrics."""
    return f"{label(ref)}.{zone}.:{port}"


def records(by_name: Mapping[str, Instance], by_id: Mapping[str, Instance]) -> dict[str, str]:
    """label -> IP of every reference that resolves to a running instance (a name wins over an id, as
    :meth:`reconciler.validate.InstanceIndex.lookup` decides: a stopped instance found by name hides an
    instance whose id is that name)."""
    out: dict[str, str] = {}
    for ref, inst in by_id.items():
        if ref not in by_name and inst.running:
            out[label(ref)] = inst.ip
    for ref, inst in by_name.items():
        key = label(ref)
        if inst.running:
            out[key] = inst.ip
        else:
            out.pop(key, None)
    return out


def is_pattern(hostname: str) -> bool:
    return "{" in hostname and CAPTURE.search(hostname) is not None


class Pattern(NamedTuple):
    """A parsed hostname pattern: Caddy's host matcher and where each capture is in the request's host."""

    wildcard: str  # "*.example.com"
    #: capture name -> index of its label counted from the right (Caddy's ``http.request.host.labels.N``)
    captures: dict[str, int]

    @property
    def stars(self) -> int:
        return self.wildcard.split(".").count("*")


def parse_pattern(hostname: str) -> Pattern | str:
    """The pattern of ``hostname`` (which holds a capture), or why it is refused (hypeman's wording)."""
    labels = hostname.split(".")
    if len(labels) < 2:
        return f"hostname pattern {hostname!r} must have at least two parts"
    captures: dict[str, int] = {}
    out: list[str] = []
    for i, part in enumerate(labels):
        whole = CAPTURE.fullmatch(part)
        if whole is None:
            if CAPTURE.search(part) is not None:
                return f"mixed captures like {part!r} are not supported, use pure captures like {{name}}"
            if "*" in part:
                return ("wildcard hostnames are not supported, use pattern syntax like {instance}.example.com")
            out.append(part)
            continue
        name = whole.group(1)
        if name in captures:
            return f"duplicate capture name {name!r} in pattern"
        captures[name] = len(labels) - 1 - i
        out.append("*")
    return Pattern(".".join(out), captures)


def template(ref: str, pattern: Pattern) -> str | None:
    """``target.instance`` with each capture replaced by Caddy's placeholder of its label; None when it
    names a capture the hostname does not have (see :func:`unknown_capture`)."""
    def fill(m: re.Match[str]) -> str:
        return f"{{http.request.host.labels.{pattern.captures[m.group(1)]}}}"
    if unknown_capture(ref, pattern) is not None:
        return None
    return CAPTURE.sub(fill, ref)


def unknown_capture(ref: str, pattern: Pattern) -> str | None:
    """The first capture ``ref`` refers to that ``pattern`` does not define."""
    for m in CAPTURE.finditer(ref):
        if m.group(1) not in pattern.captures:
            return m.group(1)
    return None
