"""Pebble (Let's Encrypt's ACME test CA) and pebble-challtestsrv as test fixtures, plus TLS client helpers.

* :func:`make_ca` writes a throw-away CA and a ``localhost``/``127.0.0.1`` certificate for Pebble's own
  HTTPS listener (the ACME directory); the daemon trusts that CA through ``ACME_CA_ROOT``.
* :class:`Pebble` runs ``pebble-challtestsrv`` (mock DNS: every name resolves to 127.0.0.1) and ``pebble``
  on free loopback ports, with the challenge ports it validates against (``httpPort`` / ``tlsPort``) set to
  the daemon's ``CADDY_HTTP_PORT`` / ``CADDY_HTTPS_PORT``. Pebble's issuing root (``/roots/0``) is new on
  every start.
* :class:`GatedProxy` is a TCP pass-through whose connections hang until :meth:`GatedProxy.release`: put in
  front of Pebble, it holds issuance at "pending" for as long as a test needs to look.
* :func:`https_get` makes a real HTTPS request to ``127.0.0.1:port`` with SNI and ``Host`` set to a name
  (``curl --resolve`` in Python), verifying against exactly the roots it is given.

Processes are started in their own session and stopped by PID; nothing here binds a fixed port.
"""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import free_port, kill_pid, wait_for


def _which(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    fallback = Path("/usr/bin") / name
    return str(fallback) if fallback.is_file() and os.access(fallback, os.X_OK) else None


PEBBLE = _which("pebble")
CHALLTESTSRV = _which("pebble-challtestsrv")


#: set (to anything but "" or "0") by `make test`: a missing Pebble fails the ACME tests instead of skipping them
REQUIRE_ENV = "HYPEMAN_REQUIRE_PEBBLE"


def missing_reason() -> str | None:
    """Why the Pebble tests cannot run here, or None."""
    absent = [n for n, p in (("pebble", PEBBLE), ("pebble-challtestsrv", CHALLTESTSRV)) if p is None]
    if absent:
        return f"{' and '.join(absent)} not installed (Debian package 'pebble'; `make test` installs it)"
    return None


def require_pebble(reason: str | None, env: Mapping[str, str] | None = None) -> None:
    """Nothing when Pebble is there (``reason`` None); else skip the test — or fail it when
    ``HYPEMAN_REQUIRE_PEBBLE`` is set, as `make test` does, so the end-to-end ACME tests can never pass
    vacuously there."""
    if reason is None:
        return
    env = os.environ if env is None else env
    if env.get(REQUIRE_ENV, "").strip() not in ("", "0"):
        pytest.fail(f"{reason}; {REQUIRE_ENV}={env[REQUIRE_ENV]} demands the end-to-end ACME tests run",
                    pytrace=False)
    pytest.skip(f"{reason}: end-to-end ACME tests skipped")


# -- certificates ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ListenerCA:
    ca_pem: Path  # what ACME_CA_ROOT points at
    cert_pem: Path  # Pebble's listener certificate (localhost, 127.0.0.1)
    key_pem: Path


def make_ca(directory: Path) -> ListenerCA:
    """A fresh CA and a leaf for ``localhost`` / ``127.0.0.1`` signed by it (EC P-256, one day)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hypeman-ingress test Pebble listener CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out = ListenerCA(directory / "listener-ca.pem", directory / "listener-cert.pem", directory / "listener-key.pem")
    out.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    out.key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    os.chmod(out.key_pem, 0o600)
    return out


# -- processes ------------------------------------------------------------------------------------------

@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        return ""

    def stop(self) -> None:
        kill_pid(self.popen.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)


def _spawn(name: str, args: list[str], workdir: Path, env: dict[str, str]) -> _Proc:
    log = workdir / f"{name}.log"
    with open(log, "ab") as fh:
        popen = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                 cwd=str(workdir), start_new_session=True)
    return _Proc(name, popen, log)


@dataclass
class Pebble:
    """``pebble`` + ``pebble-challtestsrv`` on free loopback ports. Use :meth:`start` / :meth:`stop`."""

    workdir: Path
    http_port: int  # where Pebble's VA sends HTTP-01 validation requests (the daemon's CADDY_HTTP_PORT)
    tls_port: int  # where it sends TLS-ALPN-01 validation handshakes (the daemon's CADDY_HTTPS_PORT)
    env: dict[str, str] = field(default_factory=dict)
    #: where every name resolves for Pebble's validations (the address the daemon's Caddy listens on)
    answer_ip: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    management_port: int = field(default_factory=free_port)
    dns_port: int = field(default_factory=free_port)
    challtestsrv_management_port: int = field(default_factory=free_port)
    procs: list[_Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.listener = make_ca(self.workdir / "listener")

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    @property
    def ca_root(self) -> Path:
        """The CA of Pebble's HTTPS listener (for ``ACME_CA_ROOT``), not the CA that issues certificates."""
        return self.listener.ca_pem

    def _client(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca_root)), timeout=5.0)

    def start(self) -> Pebble:
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.listener.cert_pem),
            "privateKey": str(self.listener.key_pem),
            "httpPort": self.http_port,
            "tlsPort": self.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }}
        cfg = self.workdir / "pebble-config.json"
        cfg.write_text(json.dumps(config, indent=2))
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("PEBBLE_")}
        assert CHALLTESTSRV is not None and PEBBLE is not None, missing_reason()
        self.procs.append(_spawn("challtestsrv", [
            CHALLTESTSRV, "-defaultIPv4", self.answer_ip, "-defaultIPv6", "",
            "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "", "-tlsalpn01", "",
            "-management", f"127.0.0.1:{self.challtestsrv_management_port}"], self.workdir, base_env))
        pebble_env = {**base_env, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", **self.env}
        self.procs.append(_spawn("pebble", [PEBBLE, "-config", str(cfg), "-dnsserver",
                                            f"127.0.0.1:{self.dns_port}"], self.workdir, pebble_env))
        try:
            with self._client() as client:
                wait_for(lambda: self._alive() and client.get(self.directory).status_code == 200,
                         timeout=20, message="Pebble's ACME directory")
        except AssertionError as exc:
            logs = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in self.procs)
            self.stop()
            raise AssertionError(f"{exc}\n{logs}") from None
        return self

    def _alive(self) -> bool:
        dead = [p for p in self.procs if p.popen.poll() is not None]
        if dead:
            raise AssertionError(f"{dead[0].name} exited with {dead[0].popen.returncode}: {dead[0].tail()}")
        return True

    def root_pem(self) -> str:
        """Pebble's issuing root, from the management API (regenerated on every start)."""
        with self._client() as client:
            resp = client.get(f"https://127.0.0.1:{self.management_port}/roots/0")
        resp.raise_for_status()
        assert "BEGIN CERTIFICATE" in resp.text, resp.text[:200]
        return resp.text

    def orders(self) -> int:
        """New-order requests Pebble received so far (its log has a line per request)."""
        pebble = next(p for p in self.procs if p.name == "pebble")
        return pebble.log.read_text(errors="replace").count("POST /order-plz")

    def log_text(self) -> str:
        return "\n".join(f"--- {p.name}:\n{p.tail(60)}" for p in self.procs)

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.procs.clear()


class GatedProxy:
    """TCP pass-through from a free loopback port to ``target``; connections hang until :meth:`release`."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.gate = threading.Event()
        self.accepted = 0
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def release(self) -> None:
        self.gate.set()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.append(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            self._track(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        while not self.gate.wait(0.1):
            if self._closed:
                return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            conn.close()
            return
        upstream.settimeout(None)
        self._track(upstream)
        threading.Thread(target=self._pipe, args=(upstream, conn), daemon=True).start()
        self._pipe(conn, upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()


# -- TLS client -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TLSResponse:
    status: int
    headers: dict[str, str]
    body: str
    peer_cert: x509.Certificate


def client_context(cafile: Path | str | None) -> ssl.SSLContext:
    """Verify against exactly ``cafile`` (no system roots); ``None``: no verification at all."""
    if cafile is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=str(cafile))


def https_get(port: int, host: str, path: str = "/", *, cafile: Path | str | None, timeout: float = 5.0,
              address: str = "127.0.0.1") -> TLSResponse:
    """GET ``https://host:port/path`` with the connection going to ``address`` (SNI and Host are ``host``)."""
    ctx = client_context(cafile)
    raw = socket.create_connection((address, port), timeout=timeout)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=host)
    except BaseException:
        raw.close()
        raise
    der = tls.getpeercert(binary_form=True)
    assert der is not None
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = tls
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        body = resp.read().decode("utf-8", "replace")
        return TLSResponse(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body,
                           x509.load_der_x509_certificate(der))
    finally:
        conn.close()
        tls.close()
