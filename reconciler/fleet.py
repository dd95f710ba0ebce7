"""The config hash a fleet compares: SHA-256 of the config a node loaded into Caddy, with the values that are
this node's own -- its admin, listen, DNS and API addresses and its data dir -- written as placeholders.
Nodes of one fleet that read the same git source then report equal hashes, whatever their addresses; any
other difference in the config (a manifest, a setting that changes routing, a version of this program that
renders differently) shows. The version itself is reported beside the hash (``node.version``).
PURE.

The placeholders are replaced in the encoded text (compact JSON, see ``reconciler.render.ConfigEncoder``)
where each value is a whole JSON string or a string's prefix, so no other text can match: an upstream dial
is a name (``<label>.hypeman.internal.:port``), never an address, and hostnames hold no ``:`` or ``/``.
"""

from __future__ import annotations

import hashlib
import json

from reconciler.settings import Settings, join_hostport

#: (this node's text, what it becomes), in the order they are replaced
Tokens = tuple[tuple[bytes, bytes], ...]


def _string(value: str) -> bytes:
    return json.dumps(value).encode()


def node_tokens(settings: Settings) -> Tokens:
    """What of ``settings`` differs between the nodes of a fleet, as it appears in the encoded config."""
    out: list[tuple[bytes, bytes]] = [
        (_string(settings.admin_listen), b'"{admin}"'),
        (_string(f"udp/{settings.dns_listen}"), b'"udp/{dns}"'),
        # a server's listen address: the address, then its port (kept: nodes share their ports)
        (_string(join_hostport(settings.listen_address, 0))[:-2], b'"{listen}:'),
        # where ACME challenge solvers bind (the listen address when it is not the wildcard)
        (b'"bind_host":' + _string(settings.listen_address), b'"bind_host":"{listen}"'),
    ]
    endpoint = settings.permission_endpoint
    if endpoint is not None:
        out.append((_string(endpoint), b'"{permission}"'))
    data = settings.data_dir.rstrip("/")
    if data:
        out.append((_string(data + "/")[:-1], b'"{data}/'))
    return tuple(out)


def config_hash(body: bytes, tokens: Tokens) -> str:
    """The hash nodes compare (16 hex digits, as the revision's)."""
    for mine, neutral in tokens:
        body = body.replace(mine, neutral)
    return hashlib.sha256(body).hexdigest()[:16]
