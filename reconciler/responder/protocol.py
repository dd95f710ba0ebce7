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
import os
import socket

from reconciler import __version__

#: the responder's code version, in its ``ping`` answer: a responder that answers another one is replaced
#: (after an upgrade, the new code serves; the snapshot carries the records over)
VERSION = f"{__version__}/1"

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
