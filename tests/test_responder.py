"""The DNS responder process (reconciler.responder): answers, control socket, snapshot, restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from reconciler.responder.client import Publisher
from tests.helpers import ROOT, Responder, free_udp_port, wait_for

pytestmark = pytest.mark.caddy  # (real processes)


def ask(port: int, name: str, rdtype: str = "A") -> tuple[str, list[str]]:
    r = dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=port, timeout=2)
    return dns.rcode.to_text(r.rcode()), [rd.to_text() for rrset in r.answer for rd in rrset]


def test_answers_from_the_published_records(responder: Responder) -> None:
    responder.publish({"web": "10.0.0.5", "v6": "fd00::1"})
    p = responder.port
    assert ask(p, "web.hypeman.internal") == ("NOERROR", ["10.0.0.5"])
    assert ask(p, "WEB.Hypeman.Internal") == ("NOERROR", ["10.0.0.5"])  # names are case-insensitive
    assert ask(p, "web.hypeman.internal", "AAAA") == ("NOERROR", [])  # no data: Go's parallel AAAA is answered
    assert ask(p, "v6.hypeman.internal", "AAAA") == ("NOERROR", ["fd00::1"])
    assert ask(p, "gone.hypeman.internal") == ("NXDOMAIN", [])
    assert ask(p, "a.web.hypeman.internal") == ("NXDOMAIN", [])
    assert ask(p, "example.com") == ("REFUSED", [])
    r = dns.query.udp(dns.message.make_query("gone.hypeman.internal", "A"), "127.0.0.1", port=p, timeout=2)
    (soa,) = r.authority
    assert soa.ttl == 0 and soa[0].minimum == 0  # nothing caches the negative answer
    responder.publish({"web": "10.0.0.6"})  # a patch: only what changed is sent
    assert ask(p, "web.hypeman.internal") == ("NOERROR", ["10.0.0.6"])
    assert ask(p, "v6.hypeman.internal", "AAAA") == ("NXDOMAIN", [])
    state = responder.publisher.ping()
    assert state is not None and state["records"] == 1
    assert state["counters"]["address"] >= 4 and state["counters"]["nxdomain"] >= 3
    assert state["counters"]["refused"] == 1


def test_a_restarted_responder_answers_from_its_snapshot(tmp_path: Path) -> None:
    first = Responder(tmp_path / "dns")
    try:
        first.publish({"web": "10.0.0.5"})
        snapshot = tmp_path / "dns" / "zone.json"
        wait_for(lambda: snapshot.exists() and json.loads(snapshot.read_text())["records"] == {"web": "10.0.0.5"},
                 timeout=5, message="snapshot written")
        assert os.stat(snapshot).st_mode & 0o077 == 0
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=5)
    finally:
        first.stop()
    second = Responder(tmp_path / "dns")
    try:
        assert ask(second.port, "web.hypeman.internal") == ("NOERROR", ["10.0.0.5"])  # before any publish
        # a publisher that knew the old process: its patch base is gone, so it sends the whole set
        old = first.publisher
        old.wanted = old.acked = {"web": "10.0.0.5"}
        assert old.publish({"web": "10.0.0.7", "api": "10.0.0.8"})
        assert ask(second.port, "api.hypeman.internal") == ("NOERROR", ["10.0.0.8"])
    finally:
        second.stop()


def test_a_patch_on_an_older_serial_is_refused_and_replaced(responder: Responder) -> None:
    other = Publisher(str(responder.dir))
    assert other.publish({"a": "10.0.0.1"})
    responder.publish({"b": "10.0.0.2"})  # another writer moved the serial on
    assert other.publish({"a": "10.0.0.3"})  # its patch is refused, a replace follows
    assert ask(responder.port, "a.hypeman.internal") == ("NOERROR", ["10.0.0.3"])
    assert ask(responder.port, "b.hypeman.internal") == ("NXDOMAIN", [])


def test_a_port_already_taken_is_a_clear_exit(responder: Responder, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "reconciler.responder", "--dir", str(tmp_path / "other"),
                           "--listen", f"127.0.0.1:{responder.port}", "--zone", "hypeman.internal"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=30)
    assert proc.returncode == 2
    assert "responder.listen_failed" in proc.stderr and str(responder.port) in proc.stderr


def test_garbage_is_answered_or_dropped_and_serving_goes_on(responder: Responder) -> None:
    import socket

    responder.publish({"web": "10.0.0.5"})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(b"\x12\x34" + b"\xff" * 30, ("127.0.0.1", responder.port))
        reply, _ = s.recvfrom(512)
        assert reply[:2] == b"\x12\x34" and reply[3] & 0x0F == dns.rcode.FORMERR
        s.sendto(b"\x00", ("127.0.0.1", responder.port))  # too short to answer
    assert ask(responder.port, "web.hypeman.internal") == ("NOERROR", ["10.0.0.5"])
    assert free_udp_port() != responder.port
