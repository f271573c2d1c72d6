"""The qtest client against a scripted peer: validation before sending, reply parsing, IRQ routing,
and the -qtest-log transcript. The real QEMU is exercised in tests/integration."""
from __future__ import annotations

import io
import socket
import threading
from typing import Iterator

import pytest

from xenpv.base.errors import QtestError
from xenpv.stack.timescale import TIME_SCALE_ENV, HarnessTooSlow
from xenpv.stack.vcpu.qtest import Qtest, QtestTooSlow, parse_transcript


class Peer:
    """Answers each request line with the next scripted reply lines; records what it received."""

    def __init__(self, replies: list[list[str]]) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.received: list[str] = []
        self.replies = replies
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        f = self.theirs.makefile("rwb", buffering=0)
        for lines in self.replies:
            req = f.readline()
            if not req:
                return
            self.received.append(req.decode().rstrip("\n"))
            f.write("".join(line + "\n" for line in lines).encode())

    def close(self) -> None:
        self.theirs.close()


@pytest.fixture
def make() -> Iterator:
    peers: list[Peer] = []

    def _make(*replies: list[str], **kw) -> tuple[Qtest, Peer, io.StringIO]:
        peer = Peer(list(replies))
        peers.append(peer)
        log = io.StringIO()
        return Qtest(peer.ours, transcript=log, timeout=2.0, **kw), peer, log

    yield _make
    for p in peers:
        p.close()


@pytest.mark.parametrize("call", [
    lambda q: q.inb(0x10000),
    lambda q: q.outw(-1, 0),
    lambda q: q.outb(0x80, 0x100),
    lambda q: q.outl(0xCF8, 1 << 32),
    lambda q: q.read(0x1000, 0),
    lambda q: q.readq(0xFFFFFFFFFFFFFFFC),
    lambda q: q.write(0xFFFFFFFFFFFFFFFF, b"ab"),
    lambda q: q.writew(0, 0x10000),
    lambda q: q.memset(0, 1, 256),
    lambda q: q.set_irq_in("/machine/ioapic", "two words", 0, 1),
    lambda q: q.inb(True),
], ids=["port>0xffff", "negative port", "outb value", "outl value", "zero-size read", "readq wraps",
        "write wraps", "writew value", "memset value", "space in word", "bool port"])
def test_bad_arguments_are_refused_before_sending(make, call) -> None:
    q, peer, _ = make()
    with pytest.raises(QtestError):
        call(q)
    assert peer.received == []


def test_replies_are_parsed(make) -> None:
    q, peer, _ = make(["OK 0x49d2"], ["OK"], ["OK 0x00000000deadbeef"], ["OK AQID"], ["OK little"])
    assert q.inw(0x10) == 0x49D2
    q.outw(0x10, 3)
    assert q.readq(0x1000) == 0xDEADBEEF
    assert q.read(0x2000, 3) == b"\x01\x02\x03"
    assert q.endianness() == "little"
    assert peer.received == ["inw 0x10", "outw 0x10 0x3", "readq 0x1000", "b64read 0x2000 0x3", "endianness"]


@pytest.mark.parametrize("reply", ["FAIL Unknown command 'frob'", "ERR invalid argument size"])
def test_fail_and_err_raise_with_qemus_words(make, reply: str) -> None:
    q, _, _ = make([reply])
    with pytest.raises(QtestError, match=reply.split()[1]):
        q.command("frob")


def test_irq_lines_are_routed_wherever_they_appear(make) -> None:
    seen: list[tuple[int, bool]] = []
    q, _, log = make(["IRQ raise 11", "OK 0x0001", "IRQ lower 11"], ["IRQ raise 4", "OK"],
                     on_irq=lambda n, level: seen.append((n, level)))
    assert q.inb(0x60) == 1
    q.outb(0x61, 0)
    assert seen == [(11, True), (11, False), (4, True)]
    assert q.irq_levels == {11: False, 4: True}
    entries = parse_transcript(log.getvalue().splitlines())
    assert ("S", "IRQ lower 11") in entries


def test_malformed_async_line_is_an_error(make) -> None:
    q, _, _ = make(["IRQ sideways 3", "OK"])
    with pytest.raises(QtestError, match="malformed"):
        q.outb(0x80, 0)


def test_peer_closing_is_reported_through_on_dead(make) -> None:
    q, peer, _ = make(on_dead=lambda during, lost: RuntimeError(f"gone {during} lost={lost}"))
    peer.close()
    with pytest.raises(RuntimeError, match="gone .* lost=True"):
        q.inb(0x80)


def test_a_live_qemu_that_does_not_answer_in_time_is_the_harness_too_slow(monkeypatch) -> None:
    """Not a QtestError a driver could take for a device's answer: the harness fell behind."""
    monkeypatch.setenv(TIME_SCALE_ENV, "2")
    ours, theirs = socket.socketpair()
    try:
        q = Qtest(ours, timeout=0.1, on_dead=lambda during, lost: None)  # QEMU is alive, just silent
        with pytest.raises(QtestTooSlow, match=r"no qtest reply from QEMU \(waiting for the reply to 'inb "
                                               r"0x1f7'\) within 0\.2s") as late:
            q.inb(0x1F7)
        assert isinstance(late.value, HarnessTooSlow) and not isinstance(late.value, Exception)
    finally:
        ours.close()
        theirs.close()


def test_transcript_is_in_qtest_log_format(make) -> None:
    q, _, log = make(["OK 0x0000"], ["OK"])
    q.inb(0x80)
    q.outb(0x80, 0x12)
    q.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("[I 0.") and lines[0].endswith("] OPENED")
    assert [(d, t) for d, t in parse_transcript(lines)] == [
        ("I", "OPENED"), ("R", "inb 0x80"), ("S", "OK 0x0000"), ("R", "outb 0x80 0x12"), ("S", "OK"), ("I", "CLOSED")]
    assert all(line.startswith(("[R +", "[S +")) for line in lines[1:-1])


def test_transcript_parser_rejects_foreign_lines() -> None:
    with pytest.raises(QtestError, match="line 2"):
        parse_transcript(["[R +0.1] inb 0x80", "garbage"])


def test_out_in_sends_both_requests_before_it_reads_a_reply() -> None:
    """PCI configuration reads as one round trip (stack/vcpu/pci.py): this peer answers nothing until it has
    both requests, so a client that waited for the first reply before sending the second would time out.
    An IRQ line between the replies is still routed, and the data is the second reply's."""
    ours, theirs = socket.socketpair()
    received: list[str] = []

    def peer() -> None:
        f = theirs.makefile("rwb", buffering=0)
        received.extend(f.readline().decode().rstrip("\n") for _ in range(2))
        f.write(b"OK\nIRQ raise 5\nOK 0x12345678\n")

    thread = threading.Thread(target=peer, daemon=True)
    thread.start()
    log = io.StringIO()
    q = Qtest(ours, transcript=log, timeout=2.0)
    seen: list[tuple[int, bool]] = []
    q.on_irq = lambda n, level: seen.append((n, level))
    try:
        assert q.out_in(0xCF8, 0x80000800, 0xCFC, 4) == 0x12345678
        thread.join(5)
        assert received == ["outl 0xcf8 0x80000800", "inl 0xcfc"]
        assert seen == [(5, True)]
        directions = [d for d, _ in parse_transcript(log.getvalue().splitlines())]
        assert directions == ["I", "R", "R", "S", "S", "S"]  # I: the connection opened
    finally:
        ours.close()
        theirs.close()


def test_a_refused_first_request_still_reads_the_second_reply(make) -> None:
    q, peer, _ = make(["ERR bad port"], ["OK 0x1"], ["OK 0x7"])
    with pytest.raises(QtestError, match=r"QEMU refused 'outl 0xcf8 0x1': ERR bad port"):
        q.commands(["outl 0xcf8 0x1", "inl 0xcfc"])
    assert q.inl(0x80) == 0x7  # in step: the reply to inl 0xcfc was consumed with its request
