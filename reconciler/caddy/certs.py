"""Certificate state of TLS hostnames, from Caddy's storage and Caddy's log (I/O edge).

* ``issued``  — a certificate for the host is in ``{storage}/certificates/<issuer>/<host>/<host>.crt`` and
  has not expired (``not_after`` read from it). ``error`` is set when Caddy logged a failed attempt *after*
  that file was written: a renewal is failing, the current certificate still serves until ``not_after``;
* ``expired`` — the stored certificate is past its ``not_after``: clients refuse it (``error``: the last
  failure logged after it was written, if any);
* ``failing`` — no certificate, and Caddy's log says the last attempt failed (with its error);
* ``pending`` — no certificate yet and no failure logged (issuance in progress or not started).

A failed attempt is Caddy's ``could not get certificate from issuer`` record (one per failed obtain or
renewal, after every challenge type was tried); the intermediate ``challenge failed`` records of one
challenge type while another is still being tried do not count. ``certificate obtained successfully`` and
``certificate renewed successfully`` clear the error. A failure only counts against a stored certificate
when it was logged (``ts``) after the file was last written: the failures that preceded a successful
issuance are history. The log is read incrementally (only what was appended since the previous call).

With ``issuer_key`` (:func:`issuer_storage_key` of the settings) only certificates from the configured
issuer count: after switching issuers (say from the internal CA to ACME) Caddy obtains a new certificate
and ignores the one the old issuer left in storage, so that one must not make the host look ``issued``;
failures logged for another issuer are ignored likewise.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import urlsplit

from reconciler.model import CertificateState
from reconciler.settings import TLSSettings

ISSUED = CertificateState.ISSUED
EXPIRED = CertificateState.EXPIRED
PENDING = CertificateState.PENDING
FAILING = CertificateState.FAILING


@dataclass(frozen=True, slots=True)
class CertState:
    state: str
    not_after: str | None = None
    issuer: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "not_after": self.not_after, "issuer": self.issuer, "error": self.error}


#: what CertMagic names its storage keys after (``safeKey``): lower case, ``:`` -> ``-``, only ``[\w@.-]``
_UNSAFE = re.compile(r"[^\w@.-]", re.ASCII)
_FAILED = "could not get certificate"
_SUCCEEDED = ("certificate obtained successfully", "certificate renewed successfully")


def _safe_key(text: str) -> str:
    text = text.strip().lower()
    for a, b in ((" ", "_"), ("+", "_plus_"), ("*", "wildcard_"), (":", "-"), ("..", "")):
        text = text.replace(a, b)
    return _UNSAFE.sub("", text)


def issuer_storage_key(tls: TLSSettings) -> str | None:
    """The directory under ``{storage}/certificates/`` where Caddy keeps the certificates of the configured
    issuer: ``local`` for the internal CA; for ACME the CA URL's host and path (CertMagic's ``issuerKey``),
    e.g. ``acme-v02.api.letsencrypt.org-directory`` or ``127.0.0.1-14000-dir``. None when TLS is off."""
    if tls.issuer == "internal":
        return "local"
    if tls.issuer != "acme":
        return None
    ca = urlsplit(tls.acme_ca or "https://acme-v02.api.letsencrypt.org/directory")
    key = ca.netloc
    path = ca.path.replace("/", "-").replace("\\", "-").strip("-")
    if path:
        key += "-" + path
    return _safe_key(key)


class CertificateTracker:
    def __init__(self, storage_dir: str, log_path: str, *, max_log_read: int = 4 << 20,
                 issuer_key: str | None = None, clock: Callable[[], float] = time.time) -> None:
        self.storage_dir = storage_dir
        self.log_path = log_path
        self.issuer_key = issuer_key
        self.max_log_read = max_log_read
        self._clock = clock
        self._offset = 0
        self._inode: int | None = None
        self._errors: dict[str, tuple[float | None, str]] = {}  # host -> (logged at, error)
        self._parsed: dict[str, tuple[float, str | None, float | None]] = {}  # path -> (mtime, not_after, its ts)

    def _scan_log(self) -> None:
        try:
            st = os.stat(self.log_path)
        except OSError:
            return
        if self._inode != st.st_ino or st.st_size < self._offset:
            self._inode, self._offset = st.st_ino, max(0, st.st_size - self.max_log_read)
        if st.st_size == self._offset:
            return
        with open(self.log_path, "rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read(self.max_log_read)
        end = chunk.rfind(b"\n")
        if end < 0:
            return
        self._offset += end + 1
        for line in chunk[: end + 1].splitlines():
            if b"identifier" not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            host = rec.get("identifier")
            if not isinstance(host, str):
                continue
            msg = str(rec.get("msg", ""))
            if msg.startswith(_FAILED):
                issuer = rec.get("issuer")
                # the log names the issuer unsanitised (``127.0.0.1:14000-dir``), the storage sanitised
                if self.issuer_key is not None and isinstance(issuer, str) and _safe_key(issuer) != self.issuer_key:
                    continue  # another issuer's failure (say, from before an issuer switch)
                ts = rec.get("ts")
                when = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None
                self._errors[host] = (when, str(rec.get("error") or msg))
            elif msg in _SUCCEEDED:
                self._errors.pop(host, None)

    def _expiry(self, path: str) -> tuple[float | None, str | None, float | None]:
        """(file mtime, not_after as text, not_after as a timestamp) of a stored certificate."""
        try:
            mtime = os.stat(path).st_mtime
        except OSError:
            return None, None, None
        cached = self._parsed.get(path)
        if cached is not None and cached[0] == mtime:
            return cached
        try:
            from cryptography import x509  # here: ~50 ms of start-up otherwise, and only TLS needs it

            with open(path, "rb") as fh:
                cert = x509.load_pem_x509_certificate(fh.read())
            not_after = cert.not_valid_after_utc.astimezone(UTC)
            value: tuple[float, str | None, float | None] = (
                mtime, not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), not_after.timestamp())
        except (OSError, ValueError):
            value = (mtime, None, None)
        self._parsed[path] = value
        return value

    def _stored(self) -> dict[str, tuple[str, str]]:
        """host -> (issuer dir, certificate path), scanning the storage once."""
        root = os.path.join(self.storage_dir, "certificates")
        found: dict[str, tuple[str, str]] = {}
        try:
            issuers = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError:
            return found
        for issuer in issuers:
            if self.issuer_key is not None and issuer.name != self.issuer_key:
                continue
            try:
                hosts = list(os.scandir(issuer.path))
            except OSError:
                continue
            for h in hosts:
                crt = os.path.join(h.path, f"{h.name}.crt")
                if os.path.isfile(crt):
                    found[h.name] = (issuer.name, crt)
        return found

    def states(self, hosts: list[str]) -> dict[str, CertState]:
        self._scan_log()
        stored = self._stored()
        now = self._clock()
        out: dict[str, CertState] = {}
        for host in sorted(set(hosts)):
            failure = self._errors.get(host)
            if host in stored:
                issuer, path = stored[host]
                written, not_after, expires_at = self._expiry(path)
                # a failure logged after the certificate was written is about its renewal; one logged
                # before it (or without a time) preceded this certificate's issuance
                error = failure[1] if failure and failure[0] is not None and written is not None \
                    and failure[0] > written else None
                state = EXPIRED if expires_at is not None and expires_at <= now else ISSUED
                out[host] = CertState(state, not_after, issuer, error)
            elif failure is not None:
                out[host] = CertState(FAILING, error=failure[1])
            else:
                out[host] = CertState(PENDING)
        return out
