"""Caddy process supervisor: start detached, adopt a running one, stop on request (the policy of when to
restart lives in :mod:`reconciler.loop.keeper`).

Caddy runs in its own session so it survives the reconciler (a reconciler restart or crash never takes
routes down). It is started with the last config we applied -- fed through a pipe (``--config -``), so a
start writes nothing first and works on a full or read-only disk: the body comes from
:meth:`ConfigFile.startup_body` (the last applied config when ``{data}/caddy/config.json`` is behind, else
that file) -- so a restarted Caddy comes up serving the last good routes before the first pass even runs.
When that config cannot start any more (say a port it listens on was taken while Caddy was down), Caddy is
started with the admin block only, so the loop can still load what the manifests ask for now instead of
crash-looping. The PID file and Caddy's log are best effort: a PID file that cannot be written is retried
(see :class:`reconciler.fsutil.StorageHealth`), a log that cannot be opened is replaced by ``/dev/null``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from reconciler.caddy.admin import AdminClient
from reconciler.caddy.binary import binaries_root, install_binary
from reconciler.caddy.configfile import FROM_BOOTSTRAP, ConfigFile, encode
from reconciler.errors import CaddyAdminInUse, CaddyError, CaddyExited, CaddyUnavailable, StorageError
from reconciler.fsutil import StorageHealth, pid_alive
from reconciler.procutil import Detached
from reconciler.render import admin_block, scrub
from reconciler.settings import Settings

#: what Linux appends to ``/proc/PID/exe`` when the file the process runs was replaced or removed
_DELETED = " (deleted)"


def process_exe(pid: int) -> str | None:
    """The path of the binary ``pid`` runs -- also when that file was replaced since (an upgrade copies a
    new build over ``{data}/system/binaries/...``: the running Caddy is still the one started from there)."""
    try:
        target = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    target = target.removesuffix(_DELETED)
    return os.path.realpath(target) if os.path.isabs(target) else None


def process_env(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (empty when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
    except OSError:
        return {}
    pairs = (item.decode("utf-8", "replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def listener_pid(port: int) -> int | None:
    """A process listening on TCP ``port``, any address (Linux ``/proc``; None when none or unknown)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as fh:
                next(fh, None)
                for line in fh:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(fields[9])  # LISTEN sockets on the port (any address: ours is bound once)
        except (OSError, ValueError):
            continue
    if not inodes:
        return None
    targets = {f"socket:[{inode}]" for inode in inodes}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                        return int(entry)
        except OSError:
            continue
    return None


class CaddySupervisor(Detached):
    """Owns one Caddy process for one data dir. Not thread-safe: one thread (the keeper) starts, stops and
    reaps; :meth:`process_alive` and :meth:`state` may be called from any thread."""

    label = "Caddy"
    event = "caddy"
    readiness = "admin API"

    def __init__(self, settings: Settings, binary: str, *, client: AdminClient | None = None,
                 log: Callable[..., Any] | None = None, ready_timeout: float = 30.0,
                 health: StorageHealth | None = None, source: str | None = None,
                 config: ConfigFile | None = None) -> None:
        self.settings = settings
        self.binary = binary
        #: the binary ``binary`` was installed from (reinstalled from it when the copy vanishes)
        self.source = source
        super().__init__(log=log, health=health)
        self.client = client or AdminClient(settings.admin_url)
        self.ready_timeout = ready_timeout
        self.config = config or ConfigFile(self.config_path, health=health, log=self._log)

    # -- files ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> str:
        return os.path.join(self.settings.caddy_dir, "config.json")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.settings.caddy_dir, "caddy.pid")

    @property
    def log_path(self) -> str:
        return os.path.join(self.settings.caddy_dir, "caddy.log")

    def prepare_dirs(self) -> None:
        """``{data}/caddy`` and its ``data`` (certificate storage, keys) and ``config`` dirs, private: created
        0700, and repaired at every start when something (an operator's chmod -R, a restore from a backup,
        an older version) left them looser: every dir under them 0700, every file without group or other
        bits (keys 0600). Symlinks are neither followed nor changed. Best effort: a dir that cannot be
        made or repaired (a read-only or full disk) is reported; Caddy is started anyway."""
        d = self.settings.caddy_dir
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
            if stat.S_IMODE(os.stat(d).st_mode) != 0o700:
                os.chmod(d, 0o700)
        except OSError as exc:
            self._log("caddy.dir_unusable", dir=d, error=exc.strerror or str(exc))
            return
        for sub in ("data", "config"):
            top = os.path.join(d, sub)
            refused: list[str] = []
            try:
                os.makedirs(top, mode=0o700, exist_ok=True)
                if stat.S_IMODE(os.stat(top).st_mode) != 0o700:
                    os.chmod(top, 0o700)
            except OSError as exc:
                self._log("caddy.dir_unusable", dir=top, error=exc.strerror or str(exc))
                continue
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
        if self.settings.shared_storage:
            self._prepare_shared_storage(self.settings.storage_dir)

    def _prepare_shared_storage(self, top: str) -> None:
        """``HYPEMAN_TLS_STORAGE_DIR`` (say, a mount every node of a fleet shares): created 0700 when missing,
        its top made private when it is not; what is under it belongs to every node's Caddy alike and is
        left as it is (other nodes write there meanwhile)."""
        try:
            os.makedirs(top, mode=0o700, exist_ok=True)
            if stat.S_IMODE(os.stat(top).st_mode) & 0o077:
                os.chmod(top, 0o700)
        except OSError as exc:
            self._log("caddy.dir_unusable", dir=top, error=exc.strerror or str(exc))

    def _ours(self, pid: int) -> bool:
        """``pid`` is the Caddy of this data dir: it runs the binary installed under it, or it runs another
        binary (the source, when the copy could not be made) with this data dir's ``XDG_DATA_HOME``."""
        exe = process_exe(pid)
        if exe is None:
            return False
        root = os.path.realpath(binaries_root(self.settings.data_dir))
        if exe.startswith(root + os.sep):
            return True
        known = {os.path.realpath(self.binary)} | ({os.path.realpath(self.source)} if self.source else set())
        return exe in known and process_env(pid).get("XDG_DATA_HOME") == os.path.join(self.settings.caddy_dir,
                                                                                      "data")

    def _binary_ready(self) -> None:
        """The installed copy is there (a removed data dir takes it along): else install it again from its
        source, or run the source itself when the copy cannot be written."""
        if os.path.isfile(self.binary) and os.access(self.binary, os.X_OK):
            return
        if self.source is None or self.source == self.binary:
            return  # Popen will say what is wrong
        try:
            self.binary = install_binary(self.source, self.settings.data_dir)
            self._log("caddy.binary_reinstalled", binary=self.binary)
        except StorageError as exc:
            self._log("caddy.binary_not_installed", error=str(exc), running=self.source)
            self.binary = self.source

    # -- lifecycle -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What status shows about Caddy's process (the keeper adds its view)."""
        return {"pid": self.pid, "running": self.running(), "adopted": self.adopted, "binary": self.binary,
                "admin": self.settings.admin_url, "last_exit": self.last_exit, "config": self.config_path}

    def unresponsive(self) -> str:
        return f"does not answer on its admin API {self.settings.admin_url}: {self.client.contact.error}"

    def tend(self) -> None:
        """(Nothing to do at the keeper's look at a running Caddy: the loop converges it.)"""

    def adopted_check(self) -> None:
        """An adopted Caddy: a config.json damaged meanwhile is noticed (and repaired by a pass)."""
        self.config.check()

    def running(self) -> bool:
        """Caddy is up: its process lives, its admin API answered since it started, and the last request
        to the admin API did not fail."""
        return self.answered and self.process_alive() and self.client.contact.ok is not False

    def ensure_running(self) -> bool:
        """Adopt or start Caddy. Returns True when a new process was started."""
        self.prepare_dirs()
        pid = self._adoptable()
        if pid is not None:
            # as long as a start may take: a Caddy busy with a long /load answers its admin API late
            if self._wait_admin(pid, deadline=time.monotonic() + self.ready_timeout):
                self.pid, self._popen, self.adopted = pid, None, True
                self.answered, self.started_at = True, time.monotonic()
                self._log("caddy.adopted", pid=pid)
                return False
            if self.cancel.is_set():  # stopping: a Caddy we could not look at is left alone
                raise CaddyUnavailable(f"adopting Caddy (pid {pid}) abandoned: the reconciler is stopping")
            self._log("caddy.unresponsive", pid=pid, waited_s=self.ready_timeout)
            self._kill(pid)
        if self._admin_in_use():
            raise CaddyAdminInUse(f"another process already listens on Caddy's admin address "
                                  f"{self.settings.admin_listen} (not the Caddy of {self.settings.data_dir}); "
                                  f"refusing to start a second Caddy: stop it or set CADDY_ADMIN_PORT")
        self.start()
        return True

    def _adoptable(self) -> int | None:
        """The running Caddy of this data dir: the one ``caddy.pid`` names, else -- the PID file could not be
        written (a full disk) or was lost -- the process listening on the admin address, if it is ours."""
        pid = self._read_pid()
        if pid is not None and pid_alive(pid) and self._ours(pid):
            return pid
        holder = listener_pid(self.settings.admin_port)
        if holder is not None and pid_alive(holder) and self._ours(holder):
            self._log("caddy.found_by_admin_port", pid=holder, pid_file=self.pid_path, recorded=pid)
            self._write_pid(holder)
            return holder
        return None

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
        admin = admin_block(self.settings)
        body, origin = self.config.startup_body(admin)
        self._binary_ready()
        try:
            self._spawn(body, origin)
        except CaddyUnavailable as exc:
            if origin == FROM_BOOTSTRAP or self.cancel.is_set():
                raise
            # The last applied config no longer starts: come up with the admin API only and let the
            # next pass load the current desired config (config.json keeps the last good one).
            self._log("caddy.start_fallback", error=str(exc))
            self._spawn(encode({"admin": admin}), FROM_BOOTSTRAP)

    def _spawn(self, body: bytes, origin: str) -> None:
        env = dict(os.environ)
        env["XDG_DATA_HOME"] = os.path.join(self.settings.caddy_dir, "data")
        env["XDG_CONFIG_HOME"] = os.path.join(self.settings.caddy_dir, "config")
        env["HOME"] = self.settings.caddy_dir
        cwd = self.settings.caddy_dir if os.path.isdir(self.settings.caddy_dir) else "/"
        try:
            popen = self._launch([self.binary, "run", "--config", "-"], stdin=subprocess.PIPE, env=env, cwd=cwd)
        except OSError as exc:
            raise CaddyError(f"cannot start Caddy ({self.binary}): {exc}") from exc
        _feed(popen, body)
        self._log("caddy.started", pid=self.pid, binary=self.binary, config=origin, config_bytes=len(body))
        if not self._wait_admin(popen.pid, deadline=time.monotonic() + self.ready_timeout):
            if self.cancel.is_set():  # stopping: leave it be (the next reconciler adopts or replaces it)
                raise CaddyUnavailable(f"Caddy (pid {popen.pid}) start abandoned: the reconciler is stopping")
            code = popen.poll()
            tail = self.log_tail()
            if code is None:
                self._kill(popen.pid)
                problem = (f"did not answer on its admin API {self.settings.admin_listen} within "
                           f"{self.ready_timeout:g}s (killed)")
            else:
                problem = (f"exited with code {code}" if code >= 0 else f"was killed by signal {-code}")
                self.pid, self._popen = None, None
                raise CaddyExited(f"Caddy (pid {popen.pid}) {problem} before its admin API answered: "
                                  f"{tail or 'no log output'}")
            self.pid, self._popen = None, None
            raise CaddyUnavailable(f"Caddy (pid {popen.pid}) {problem}: {tail or 'no log output'}")
        self.answered, self.started_at = True, time.monotonic()

    def _wait_admin(self, pid: int, *, deadline: float) -> bool:
        delay = 0.01
        while time.monotonic() < deadline and not self.cancel.is_set():
            if self._exited(pid):
                return False
            if self.client.ping():
                return True
            self.cancel.wait(delay)
            delay = min(delay * 2, 0.2)
        return False

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of Caddy's log, secrets scrubbed (Caddy may quote the config it was given)."""
        return scrub(self._tail(lines), self.settings.tls.secrets)

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
        self.answered = False


def _feed(popen: subprocess.Popen[bytes], body: bytes) -> None:
    """Write the config to Caddy's stdin on a thread: a Caddy that hangs before reading it must not block
    us (a pipe holds 64 KiB); a Caddy that dies first only breaks the pipe."""
    stdin = popen.stdin
    if stdin is None:
        return

    def write() -> None:
        with contextlib.suppress(OSError, ValueError):
            stdin.write(body)
        with contextlib.suppress(OSError, ValueError):
            stdin.close()

    threading.Thread(target=write, name="caddy-stdin", daemon=True).start()
