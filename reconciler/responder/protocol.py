"""What the responder and the reconciler share: file names under ``{data}/dns`` and the control protocol.

Control: a Unix stream socket ``{data}/dns/control.sock`` (0600: only the reconciler's user may steer
traffic). One JSON object per line each way:

* ``{"op": "ping"}`` -> ``{"ok": true, "serial": S, "records": N, "counters": {...}, "pid": P, ...}``
* ``{"op": "replace", "serial": S, "records": {label: ip}}`` -> ``{"ok": true, "serial": S}``
* ``{"op": "patch", "after": S0, "serial": S, "set": {label: ip}, "delete": [label]}`` -> ``{"ok": true,
  "serial": S}``, or ``{"ok": false, "serial": current}`` when the responder is not at ``S0`` (it
  restarted from an older snapshot): the reconciler then sends a ``replace``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket

from reconciler import __version__

#: the modules the responder process runs (of this package's and the shared ones)
_CODE = ("__main__.py", "server.py", "protocol.py", "../zone.py", "../fsutil.py", "../errors.py")


def code_digest(here: str = os.path.dirname(os.path.abspath(__file__))) -> str:
    """A digest of the responder's own source (in ``here``, this package's dir): an upgrade that changes its
    code replaces it even when the package version stays the same (a fix released without a version bump,
    a development checkout)."""
    h = hashlib.sha256()
    for name in _CODE:
        try:
            with open(os.path.join(here, name), "rb") as fh:
                h.update(name.encode() + b"\0" + fh.read())
        except OSError:  # (a zipped or frozen install: the package version alone decides)
            h.update(name.encode() + b"\0?")
    return h.hexdigest()[:12]


#: the responder's code version, in its ``ping`` answer: a responder that answers another one is replaced
#: (after an upgrade, the new code serves; the snapshot carries the records over)
VERSION = f"{__version__}/1/{code_digest()}"

SNAPSHOT = "zone.json"
CONTROL = "control.sock"
PID = "responder.pid"
LOG = "responder.log"


def unix_path(directory: str, name: str) -> tuple[str, int | None]:
    """A path to ``directory/name`` short enough for a Unix socket address (108 bytes): the path itself,
    or one through ``/proc/self/fd`` of an open descriptor of the directory (returned, to be closed)."""
    path = os.path.join(directory, name)
    if len(path.encode()) < 100:
        return path, None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


def connect(directory: str, timeout: float) -> socket.socket:
    """A connected control socket (raises OSError)."""
    path, fd = unix_path(directory, CONTROL)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
    return sock
