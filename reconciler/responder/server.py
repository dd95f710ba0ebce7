"""The DNS responder process: answers ``<label>.<zone>`` with the address of a running instance.

Built on dnspython (parsing and building messages; the mature, typed DNS library of the Python world):
one UDP socket served by one thread (~50 us a query: ~20k queries a second, and Caddy asks only when
it opens a new upstream connection), a control socket (see :mod:`reconciler.responder.protocol`) on
which the reconciler pushes the records, and a writer that persists them to ``{data}/dns/zone.json`` so
a restarted responder answers from its last snapshot before the reconciler has said anything.

Answers (authoritative, TTL 0: Go's resolver in Caddy caches nothing anyway):

* a name holding a record: ``A`` (IPv4) or ``AAAA`` (IPv6); the other type: no data (NOERROR, empty);
* a name in the zone without a record (unknown or not running instance): NXDOMAIN with the zone's SOA
  (minimum 0: nothing caches the negative answer), so Caddy's dial fails at once and retries (holds);
* a name outside the zone: REFUSED; a message that does not parse: FORMERR when its id can be read.

The process is independent of the reconciler: it runs in its own session, survives the reconciler's
restart or ``kill -9``, and keeps answering from what it knows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from reconciler.errors import StorageError
from reconciler.fsutil import atomic_write
from reconciler.responder.protocol import CONTROL, PID, SNAPSHOT, VERSION, unix_path
from reconciler.zone import ANSWER_KINDS

#: the kinds of answers counted (exported by the reconciler as a metric label)
ANSWERS = ANSWER_KINDS


def log(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "at": round(time.time(), 3), **fields}, default=str)
    with contextlib.suppress(OSError, ValueError):
        print(line, file=sys.stderr, flush=True)


class Zone:
    """The records and counters (records swapped as a whole: lookups never take a lock)."""

    def __init__(self, zone: str, directory: str) -> None:
        self.origin = dns.name.from_text(zone)
        self.directory = directory
        self.records: dict[str, str] = {}
        self.serial = 0
        self.counters: Counter[str] = Counter({kind: 0 for kind in ANSWERS})  # (every key there from the start)
        #: (flags, additional count, question as sent) -> (kind, response without its id): the answers of
        #: the current records (a new dict whenever they change), so a repeated question costs a lookup
        self._cache: dict[bytes, tuple[str, bytes]] = {}
        self._last_kind = "formerr"
        self._cacheable = False  # the last query's answer may be kept for its question (see answer())
        self.started = time.time()
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        soa = f"ns.{zone}. hostmaster.{zone}. 1 60 60 60 0"
        self.soa = dns.rrset.from_text(self.origin, 0, "IN", "SOA", soa)

    # -- snapshot ----------------------------------------------------------------------------------
    @property
    def snapshot_path(self) -> str:
        return os.path.join(self.directory, SNAPSHOT)

    def load(self) -> None:
        try:
            with open(self.snapshot_path, encoding="utf-8") as fh:
                data = json.load(fh)
            records = data["records"]
            if not isinstance(records, dict) or not all(isinstance(v, str) for v in records.values()):
                raise ValueError("records is not a map of strings")
            self.records, self.serial = {str(k): v for k, v in records.items()}, int(data.get("serial", 0))
            log("responder.snapshot_loaded", records=len(self.records), serial=self.serial)
        except FileNotFoundError:
            log("responder.no_snapshot", file=self.snapshot_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log("responder.snapshot_unreadable", file=self.snapshot_path, error=str(exc))

    def persist(self) -> None:
        """Write the snapshot now (at exit: what the last changes said survives a restart)."""
        with self._lock:
            body = json.dumps({"serial": self.serial, "records": self.records}, sort_keys=True).encode()
        try:
            atomic_write(self.snapshot_path, body, 0o600, durable=False)
        except StorageError as exc:
            log("responder.snapshot_failed", file=self.snapshot_path, error=exc.reason)

    def persist_forever(self, stop: threading.Event) -> None:
        """Write the snapshot whenever the records changed (coalesced); a failed write is retried."""
        delay = 1.0
        while not stop.is_set():
            if not self._dirty.wait(0.5):
                continue
            self._dirty.clear()
            with self._lock:
                body = json.dumps({"serial": self.serial, "records": self.records}, sort_keys=True).encode()
            try:
                atomic_write(self.snapshot_path, body, 0o600, durable=False)
                delay = 1.0
            except StorageError as exc:
                log("responder.snapshot_failed", file=self.snapshot_path, error=exc.reason, retry_in=delay)
                self._dirty.set()
                stop.wait(delay)
                delay = min(delay * 2, 30.0)

    # -- control -----------------------------------------------------------------------------------
    def control(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "ping":
            return {"ok": True, "serial": self.serial, "records": len(self.records), "pid": os.getpid(),
                    "version": VERSION,
                    "counters": dict(self.counters), "uptime_seconds": round(time.time() - self.started, 1)}
        if op == "replace":
            records = msg.get("records")
            if not isinstance(records, dict):
                return {"ok": False, "error": "replace: records must be a map"}
            with self._lock:
                self.records, self.serial = {str(k): str(v) for k, v in records.items()}, int(msg["serial"])
                self._cache = {}
            self._dirty.set()
            return {"ok": True, "serial": self.serial}
        if op == "patch":
            with self._lock:
                if msg.get("after") != self.serial:
                    return {"ok": False, "serial": self.serial}
                records = dict(self.records)
                for key in msg.get("delete", []):
                    records.pop(str(key), None)
                records.update({str(k): str(v) for k, v in msg.get("set", {}).items()})
                self.records, self.serial = records, int(msg["serial"])
                self._cache = {}
            self._dirty.set()
            return {"ok": True, "serial": self.serial}
        return {"ok": False, "error": f"unknown op {op!r}"}

    # -- DNS ---------------------------------------------------------------------------------------
    def answer(self, wire: bytes) -> bytes | None:
        """The response to one query (None: nothing to send back)."""
        cache = self._cache  # (taken before the records: an answer never lands in a newer cache)
        key = _question_key(wire)
        if key is not None:
            hit = cache.get(key)
            if hit is not None:
                self.counters[hit[0]] += 1
                return wire[:2] + hit[1]
        self._cacheable = False
        out = self._answer(wire)
        if out is not None and key is not None and self._cacheable:
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[key] = (self._last_kind, out[2:])
        return out

    def _count(self, kind: str) -> None:
        self.counters[kind] += 1
        self._last_kind = kind

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            self._count("formerr")
            if len(wire) < 12:
                return None
            # id and opcode of the query, QR + FORMERR, no sections
            return wire[:2] + bytes([0x80 | (wire[2] & 0x78), dns.rcode.FORMERR]) + b"\0" * 8
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if len(query.question) != 1:
            self._count("formerr")
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        q = query.question[0]
        # the answer depends on the question alone when nothing else came with it (an EDNS OPT aside)
        self._cacheable = not query.additional
        if q.rdclass != dns.rdataclass.IN or not q.name.is_subdomain(self.origin):
            self._count("refused")
            response.flags &= ~dns.flags.AA
            response.set_rcode(dns.rcode.REFUSED)
            return response.to_wire()
        relative = q.name.relativize(self.origin)
        ip = None
        if len(relative.labels) == 1:
            ip = self.records.get(relative.labels[0].decode("ascii", "replace").lower())
        if ip is None:
            if relative.labels:  # the apex itself exists (empty): no data
                self._count("nxdomain")
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                self._count("nodata")
            response.authority.append(self.soa)
            return response.to_wire()
        kind = dns.rdatatype.AAAA if ":" in ip else dns.rdatatype.A
        if q.rdtype in (kind, dns.rdatatype.ANY):
            self._count("address")
            response.answer.append(dns.rrset.from_text(q.name, 0, "IN", kind, ip))
        else:
            self._count("nodata")
            response.authority.append(self.soa)
        return response.to_wire()


#: most distinct questions the answer cache holds (then it starts again)
CACHE_MAX = 100_000


def _question_key(wire: bytes) -> bytes | None:
    """What decides the answer to a plain query -- its flags, its additional count (an EDNS OPT record is
    echoed) and its one question as sent --, or None for anything else (then dnspython reads it)."""
    if len(wire) < 17 or wire[2] & 0xFE or wire[4:10] != b"\0\1\0\0\0\0" or wire[10] or wire[11] > 1:
        return None
    i = 12
    while True:
        if i >= len(wire):
            return None
        n = wire[i]
        if n == 0:
            break
        if n > 63:  # a compression pointer in a question: not ours to guess
            return None
        i += n + 1
    end = i + 5
    if end > len(wire):
        return None
    return wire[2:4] + wire[10:12] + wire[12:end]


def serve_control(zone: Zone, directory: str, stop: threading.Event) -> socket.socket:
    path, fd = unix_path(directory, CONTROL)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
        if fd is not None:
            os.close(fd)
    sock.listen(8)

    def client(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as fh:
            for line in fh:
                try:
                    msg = json.loads(line)
                    reply = zone.control(msg) if isinstance(msg, dict) else {"ok": False, "error": "not an object"}
                except (ValueError, TypeError, KeyError) as exc:
                    reply = {"ok": False, "error": f"bad message: {exc}"}
                try:
                    fh.write(json.dumps(reply).encode() + b"\n")
                    fh.flush()
                except OSError:  # the reconciler gave up waiting (it reconnects and sends again)
                    return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                if stop.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=client, args=(conn,), name="control-client", daemon=True).start()

    threading.Thread(target=accept, name="control", daemon=True).start()
    return sock


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.responder", description=__doc__.split("\n")[0])
    parser.add_argument("--dir", required=True, help="state dir ({data}/dns): snapshot, control socket")
    parser.add_argument("--listen", required=True, help="UDP address to answer on, e.g. 127.0.0.1:5354")
    parser.add_argument("--zone", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    zone = Zone(args.zone, args.dir)
    zone.load()
    host, port = parse_listen(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        udp.bind((host, port))
    except OSError as exc:
        log("responder.listen_failed", listen=args.listen, error=exc.strerror or str(exc))
        return 2
    stop = threading.Event()
    control = serve_control(zone, args.dir, stop)
    control_inode = os.stat(os.path.join(args.dir, CONTROL)).st_ino
    writer = threading.Thread(target=zone.persist_forever, args=(stop,), name="snapshot", daemon=True)
    writer.start()

    def finish(signum: int, _frame: object) -> None:
        stop.set()
        with contextlib.suppress(OSError):
            udp.close()

    signal.signal(signal.SIGTERM, finish)
    signal.signal(signal.SIGINT, finish)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal or a stray HUP is no reason to stop
    log("responder.started", pid=os.getpid(), listen=args.listen, zone=args.zone, records=len(zone.records))
    while not stop.is_set():
        try:
            wire, peer = udp.recvfrom(4096)
        except OSError:
            if stop.is_set():
                break
            continue
        try:
            out = zone.answer(wire)
        except Exception as exc:  # never let one odd query end the responder
            zone.counters["formerr"] += 1
            log("responder.query_failed", error=f"{type(exc).__name__}: {exc}")
            continue
        if out is not None:
            with contextlib.suppress(OSError):
                udp.sendto(out, peer)
    control.close()
    zone.persist()
    # only our own files: a newer responder may have taken their place meanwhile
    with contextlib.suppress(OSError):
        if os.stat(os.path.join(args.dir, CONTROL)).st_ino == control_inode:
            os.unlink(os.path.join(args.dir, CONTROL))
    with contextlib.suppress(OSError, ValueError), open(os.path.join(args.dir, PID), encoding="ascii") as fh:
        if int(fh.read().strip()) == os.getpid():
            os.unlink(os.path.join(args.dir, PID))
    log("responder.stopped", pid=os.getpid())
    return 0
