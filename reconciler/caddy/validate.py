"""``caddy validate``: check a config without applying it (separate process, binds nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from typing import Any

from reconciler.errors import CaddyBinaryError
from reconciler.jsonutil import compact_bytes


def caddy_validate(binary: str, config: dict[str, Any], *, timeout: float = 120.0) -> str | None:
    """None when Caddy accepts ``config``; otherwise Caddy's error message. The config goes through a pipe
    (``--config -``): no temp file, so a full or read-only temp dir cannot fail a validation."""
    body = compact_bytes(config)
    env = {**os.environ, "HOME": tempfile.gettempdir()}
    try:
        proc = subprocess.run([binary, "validate", "--config", "-"], input=body, capture_output=True,
                              timeout=timeout, env=env, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CaddyBinaryError(f"cannot run {binary} validate: {exc}") from exc
    if proc.returncode == 0:
        return None
    stderr = proc.stderr.decode("utf-8", "replace")
    return _last_error(stderr) or f"caddy validate exited with {proc.returncode}"


def _last_error(stderr: str) -> str:
    for line in reversed(stderr.strip().splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            return line.removeprefix("Error: ")
        if isinstance(rec, dict) and rec.get("level") in ("error", "fatal"):
            return str(rec.get("error") or rec.get("msg"))
    return ""
