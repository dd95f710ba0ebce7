"""Caddy process supervisor: start detached, adopt a running one, restart when it dies, stop on request.

Caddy runs in its own session so it survives the reconciler (a reconciler restart or crash never takes
routes down). It is started with ``{data}/caddy/config.json`` -- the last config we applied -- so a
restarted Caddy comes up serving the last good routes before the first pass even runs. When that config
cannot start any more (say a port it listens on was taken while Caddy was down), Caddy is started with the
admin block only, so the loop can still load what the manifests ask for now instead of crash-looping.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from reconciler.caddy.admin import AdminClient
from reconciler.caddy.binary import binaries_root
from reconciler.errors import CaddyError, CaddyUnavailable
from reconciler.fsutil import atomic_write
from reconciler.render import admin_block
from reconciler.settings import Settings


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


def process_exe(pid: int) -> str | None:
    try:
        return os.path.realpath(f"/proc/{pid}/exe", strict=True)
    except OSError:
        return None


class CaddySupervisor:
    """Owns one Caddy process for one data dir."""

    def __init__(self, settings: Settings, binary: str, *, client: AdminClient | None = None,
                 log: Callable[..., Any] | None = None, ready_timeout: float = 30.0) -> None:
        self.settings = settings
        self.binary = binary
        self.client = client or AdminClient(settings.admin_url)
        self.ready_timeout = ready_timeout
        self._log = log or (lambda *a, **k: None)
        self._popen: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.adopted = False
        self.restarts = 0
        d = settings.caddy_dir
        self.config_path = os.path.join(d, "config.json")
        self.pid_path = os.path.join(d, "caddy.pid")
        self.log_path = os.path.join(d, "caddy.log")

    # -- files ---------------------------------------------------------------------------------
    def prepare_dirs(self) -> None:
        """``{data}/caddy`` and its ``data`` (certificate storage, keys) and ``config`` dirs, private: created
        0700, and repaired at every start when something (an operator's chmod -R, a restore from a backup,
        an older version) left them looser: every dir under them 0700, every file without group or other
        bits (keys 0600). Symlinks are neither followed nor changed."""
        d = self.settings.caddy_dir
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        for sub in ("data", "config"):
            top = os.path.join(d, sub)
            os.makedirs(top, mode=0o700, exist_ok=True)
            os.chmod(top, 0o700)
            refused: list[str] = []
            for root, dirs, files in os.walk(top):  # never descends into symlinked dirs
                for name in (*dirs, *files):
                    path = os.path.join(root, name)
                    try:
                        mode = os.lstat(path).st_mode
                        if stat.S_ISDIR(mode) and stat.S_IMODE(mode) != 0o700:
                            os.chmod(path, 0o700)
                        elif stat.S_ISREG(mode) and stat.S_IMODE(mode) & 0o077:
                            os.chmod(path, stat.S_IMODE(mode) & ~0o077)
                    except FileNotFoundError:  # Caddy may remove a lock file meanwhile
                        continue
                    except OSError:  # someone else's file (say, left by a run as root): reported, not fatal
                        refused.append(path)
            if refused:
                self._log("caddy.storage_not_private", count=len(refused), examples=refused[:5])

    def save_config(self, config: Mapping[str, Any] | bytes) -> None:
        """Persist the config we applied (or its encoded body), so a restarted Caddy starts with it."""
        body = config if isinstance(config, bytes) else json.dumps(config, separators=(",", ":")).encode()
        atomic_write(self.config_path, body)

    def _startup_config(self) -> dict[str, Any]:
        """Make sure config.json exists and its admin block matches the current settings."""
        config: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            with open(self.config_path, encoding="utf-8") as fh:
                loaded = json.load(fh)
            if isinstance(loaded, dict):
                config = loaded
        config["admin"] = admin_block(self.settings)
        self.save_config(config)
        return config

    def _read_pid(self) -> int | None:
        try:
            with open(self.pid_path, encoding="ascii") as fh:
                return int(fh.read().strip())
        except (OSError, ValueError):
            return None

    def _ours(self, pid: int) -> bool:
        exe = process_exe(pid)
        root = os.path.realpath(binaries_root(self.settings.data_dir))
        return exe is not None and (exe.startswith(root + os.sep) or exe == os.path.realpath(self.binary))

    # -- lifecycle -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What status shows about Caddy."""
        return {"pid": self.pid, "running": self.alive(), "adopted": self.adopted, "restarts": self.restarts,
                "binary": self.binary, "admin": self.settings.admin_url}

    def alive(self) -> bool:
        if self._popen is not None:
            return self._popen.poll() is None
        return self.pid is not None and pid_alive(self.pid)

    def ensure_running(self) -> bool:
        """Adopt or start Caddy. Returns True when a new process was started."""
        self.prepare_dirs()
        pid = self._read_pid()
        if pid is not None and pid_alive(pid) and self._ours(pid):
            if self._wait_admin(pid, deadline=time.monotonic() + 5.0):
                self.pid, self._popen, self.adopted = pid, None, True
                self._log("caddy.adopted", pid=pid)
                return False
            self._log("caddy.unresponsive", pid=pid)
            self._kill(pid)
        if self._admin_in_use():
            raise CaddyError(f"another process already listens on Caddy's admin address "
                             f"{self.settings.admin_listen} (not the Caddy of {self.settings.data_dir}); "
                             f"refusing to start a second Caddy: stop it or set CADDY_ADMIN_PORT")
        self.start()
        return True

    def _admin_in_use(self) -> bool:
        """True when anything accepts connections on the admin address. Not only a Caddy answering 2xx:
        a server answering 404/403 (or one that never answers) holds the port too, and with SO_REUSEPORT
        a Caddy started there would share it and get half of our admin requests."""
        host = self.settings.admin_address.strip("[]")  # an IPv6 literal may come bracketed
        try:
            with socket.create_connection((host, self.settings.admin_port), timeout=1.0):
                return True
        except OSError:
            return False

    def start(self) -> None:
        config = self._startup_config()
        try:
            self._spawn(self.config_path)
        except CaddyUnavailable as exc:
            if set(config) <= {"admin"}:
                raise
            # The last applied config no longer starts: come up with the admin API only and let the
            # next pass load the current desired config (config.json keeps the last good one).
            self._log("caddy.start_fallback", error=str(exc))
            bare = os.path.join(self.settings.caddy_dir, "config.bootstrap.json")
            atomic_write(bare, json.dumps({"admin": admin_block(self.settings)}).encode())
            self._spawn(bare)

    def _spawn(self, config_path: str) -> None:
        env = dict(os.environ)
        env["XDG_DATA_HOME"] = os.path.join(self.settings.caddy_dir, "data")
        env["XDG_CONFIG_HOME"] = os.path.join(self.settings.caddy_dir, "config")
        env["HOME"] = self.settings.caddy_dir
        logf = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._popen = subprocess.Popen(
                [self.binary, "run", "--config", config_path],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
                start_new_session=True, close_fds=True, cwd=self.settings.caddy_dir,
            )
        except OSError as exc:
            raise CaddyError(f"cannot start Caddy ({self.binary}): {exc}") from exc
        finally:
            os.close(logf)
        self.pid, self.adopted = self._popen.pid, False
        atomic_write(self.pid_path, f"{self.pid}\n".encode(), 0o644)
        self._log("caddy.started", pid=self.pid, binary=self.binary)
        if not self._wait_admin(self.pid, deadline=time.monotonic() + self.ready_timeout):
            tail = self.log_tail()
            self._kill(self.pid)
            raise CaddyUnavailable(f"Caddy (pid {self.pid}) did not become ready: {tail}")

    def _wait_admin(self, pid: int, *, deadline: float) -> bool:
        delay = 0.01
        while time.monotonic() < deadline:
            if self._popen is not None and self._popen.pid == pid:
                if self._popen.poll() is not None:
                    return False
            elif not pid_alive(pid):
                return False
            if self.client.ping():
                return True
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        return False

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 8192))
                text = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def _kill(self, pid: int, grace: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                if self._popen is not None and self._popen.pid == pid:
                    if self._popen.poll() is not None:
                        return
                elif not pid_alive(pid):
                    return
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop Caddy: ``POST /stop``, then SIGTERM, then SIGKILL."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(CaddyError):
            self.client.stop()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.02)
        if self.alive():
            self._kill(pid)
        with contextlib.suppress(OSError):
            os.unlink(self.pid_path)
        self._log("caddy.stopped", pid=pid)
        self.pid = None
        self._popen = None
