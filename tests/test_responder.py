"""The DNS responder process (reconciler.responder): answers, control socket, snapshot, restarts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from reconciler.responder.client import Publisher
from tests.helpers import ROOT, Responder, free_udp_port, kill_pid, wait_for

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


def test_a_malformed_query_never_poisons_the_answer_to_a_good_one(responder: Responder) -> None:
    import socket

    responder.publish({"web": "10.0.0.5"})
    good = dns.message.make_query("web.hypeman.internal", "A", use_edns=0)  # (Go sends an EDNS OPT too)
    wire = good.to_wire()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        s.sendto(wire[:-3], ("127.0.0.1", responder.port))  # the same question, its OPT record cut short
        reply, _ = s.recvfrom(512)
        assert reply[3] & 0x0F == dns.rcode.FORMERR
    r = dns.query.udp(good, "127.0.0.1", port=responder.port, timeout=2)
    assert r.rcode() == dns.rcode.NOERROR and [rd.to_text() for rs in r.answer for rd in rs] == ["10.0.0.5"]


def test_the_snapshot_is_written_when_it_stops(tmp_path: Path) -> None:
    r = Responder(tmp_path / "dns")
    try:
        r.publish({"web": "10.0.0.5"})
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(timeout=10) == 0
    finally:
        r.stop()
    snapshot = json.loads((tmp_path / "dns" / "zone.json").read_text())
    assert snapshot["records"] == {"web": "10.0.0.5"}
    assert not (tmp_path / "dns" / "control.sock").exists()


def test_the_supervisor_finds_adopts_and_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from reconciler.errors import ResponderError
    from reconciler.fsutil import pid_alive
    from reconciler.responder import supervisor as module
    from reconciler.responder.supervisor import ResponderSupervisor
    from reconciler.settings import Settings

    settings = Settings(data_dir=str(tmp_path / "data"), dns_port=free_udp_port())
    started: list[int] = []
    try:
        first = ResponderSupervisor(settings, Publisher(settings.dns_dir))
        assert first.ensure_running() is True and first.pid is not None
        started.append(first.pid)
        assert first.running() and first.state()["listen"] == settings.dns_listen
        Path(first.pid_path).unlink()  # lost (a full disk when it was written, say)
        second = ResponderSupervisor(settings, Publisher(settings.dns_dir))
        assert second.ensure_running() is False and second.pid == first.pid  # found by its control socket
        assert Path(second.pid_path).read_text().strip() == str(first.pid)
        # apply's supervisor never replaces a responder started with other settings
        other = Settings(data_dir=settings.data_dir, dns_port=free_udp_port())
        with pytest.raises(ResponderError, match="other settings"):
            ResponderSupervisor(other, Publisher(other.dns_dir), replace_changed=False).ensure_running()
        assert pid_alive(first.pid)
        # another version of the code answers: replaced by this one (its snapshot carries the records over)
        monkeypatch.setattr(module, "VERSION", "0.0.0/0")
        third = ResponderSupervisor(settings, Publisher(settings.dns_dir))
        assert third.ensure_running() is True and third.pid not in (None, first.pid)
        started.append(third.pid)  # type: ignore[arg-type]
        wait_for(lambda: not pid_alive(started[0]), timeout=10, message="the old one stopped")
    finally:
        for pid in started:
            kill_pid(pid)


def test_the_code_version_follows_the_responders_source(tmp_path: Path) -> None:
    """An upgrade that changes the responder's code (even without a version bump) makes it another version,
    so the running one is replaced; a change elsewhere in the package does not."""
    from reconciler.responder import protocol

    pkg = Path(protocol.__file__).parent
    copy = tmp_path / "reconciler"
    shutil.copytree(pkg.parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    here = str(copy / "responder")
    assert protocol.code_digest(here) == protocol.code_digest() and protocol.VERSION.endswith(protocol.code_digest())
    (copy / "render.py").write_text((copy / "render.py").read_text() + "\n# not the responder's\n")
    assert protocol.code_digest(here) == protocol.code_digest()
    (copy / "responder" / "server.py").write_text((copy / "responder" / "server.py").read_text() + "\n# a fix\n")
    assert protocol.code_digest(here) != protocol.code_digest()
