"""Where the inputs are: the manifest sources in their order, the API-owned dir; and the digest that
names a set of inputs (a revision). I/O edge."""

from __future__ import annotations

import hashlib
import os

from reconciler.model import Source
from reconciler.settings import Settings


def sources_for(settings: Settings, *, include_api: bool = True) -> list[Source]:
    """``--manifests`` dirs in the order given (read-only), then the API-owned dir (last, writable).

    ``include_api=False`` leaves the API dir out when it does not exist (offline commands). A fleet node
    never reads it: every node must render the same config from the one git source.
    """
    out = [Source(path, i, read_only=True) for i, path in enumerate(settings.manifest_dirs)]
    if settings.fleet:
        return out
    if include_api or os.path.isdir(settings.api_dir):
        out.append(Source(settings.api_dir, len(out), read_only=False))
    return out


def api_dir_ready(settings: Settings) -> None:
    """Create the API-owned manifest dir (0700) so it is always a readable source."""
    os.makedirs(settings.api_dir, mode=0o700, exist_ok=True)


def digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()[:16]
