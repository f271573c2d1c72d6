"""The unix-socket transport of a real daemon process: framing, hostile headers, disconnects, shutdown."""
from __future__ import annotations

import signal
import socket
import time
from typing import Iterator

import pytest

from xenpv.backends.xenstored.client import XsClient, XsConnectionError, XsRequestError
from xenpv.xenabi.xs_wire import XSD_SOCKMSG, XsdSockmsgType as T

from .daemon_fixture import RunningDaemon, running_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[RunningDaemon]:
    yield from running_daemon("xss")


@pytest.fixture
def c(daemon: RunningDaemon) -> Iterator[XsClient]:
    with XsClient(daemon.sock, timeout=5) as client:
        yield client
    daemon.proc.check_alive("socket tests")


def _msg(mtype: int, payload: bytes, req_id: int = 0, tx: int = 0) -> bytes:
    return XSD_SOCKMSG.pack(mtype, req_id, tx, len(payload)) + payload


def test_oversize_length_disconnects_only_that_client(daemon: RunningDaemon, c: XsClient) -> None:
    c.write("/s/keep", "1")
    c.watch("/s", "bystander")
    assert c.read_event() == ("/s", "bystander")
    with XsClient(daemon.sock, timeout=5) as bad:
        bad.send_raw(XSD_SOCKMSG.pack(T.WRITE, 0, 0, 4097) + b"/s/evil\0" + b"x" * 4089)
        with pytest.raises(XsConnectionError, match="closed"):
            bad.read_message()
    assert c.read("/s/keep") == b"1"
    assert not c.exists("/s/evil")
    c.write("/s/after", "")
    assert c.read_event() == ("/s/after", "bystander")
    c.unwatch("/s", "bystander")


def test_payload_of_exactly_4096_is_accepted(c: XsClient) -> None:
    path = b"/s/max\0"
    c.send_raw(_msg(T.WRITE, path + b"v" * (4096 - len(path))))
    assert c.read_message()[3] == b"OK\0"
    assert len(c.read("/s/max")) == 4096 - len(path)


def test_reply_over_4096_is_e2big(c: XsClient) -> None:
    c.write("/s/huge", b"x" * 3000)
    for i in range(300):
        c.write(f"/s/wide/child-number-{i:05d}", "")
    with pytest.raises(XsRequestError, match="E2BIG"):
        c.request(T.DIRECTORY, b"/s/wide\0")
    assert len(c.directory("/s/wide")) == 300, "the client falls back to DIRECTORY_PART"


def test_message_split_into_single_bytes(c: XsClient) -> None:
    data = _msg(T.WRITE, b"/s/split\0value", req_id=42)
    for b in data:
        c.send_raw(bytes([b]))
        time.sleep(0.0005)
    assert c.read_message() == (T.WRITE, 42, 0, b"OK\0")


def test_pipelined_replies_in_order(c: XsClient) -> None:
    c.send_raw(b"".join(_msg(T.WRITE, b"/s/p%d\0%d" % (i, i), req_id=i) for i in range(100)))
    c.send_raw(b"".join(_msg(T.READ, b"/s/p%d\0" % i, req_id=1000 + i) for i in range(100)))
    replies = [c.read_message() for _ in range(200)]
    assert [r[1] for r in replies] == list(range(100)) + list(range(1000, 1100))
    assert [r[3] for r in replies[100:]] == [b"%d" % i for i in range(100)]


def test_client_vanishing_mid_message_and_with_watches(daemon: RunningDaemon, c: XsClient) -> None:
    for _ in range(20):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.sock))
        s.sendall(_msg(T.WATCH, b"/s/v\0t\0") + _msg(T.WRITE, b"/s/v\0x")[:20])
        s.close()
    c.write("/s/v/child", "fires at nobody")
    assert c.read("/s/v/child") == b"fires at nobody"


def test_read_event_ordering_with_interleaved_replies(c: XsClient) -> None:
    c.watch("/s/ev", "t")
    assert c.read_event() == ("/s/ev", "t")
    c.write("/s/ev/a", "1")
    c.write("/s/ev/b", "2")
    assert [c.read_event(), c.read_event()] == [("/s/ev/a", "t"), ("/s/ev/b", "t")]
    c.unwatch("/s/ev", "t")


def test_sigterm_exits_cleanly_and_removes_socket() -> None:
    gen = running_daemon("xst")
    d = next(gen)
    try:
        with XsClient(d.sock) as client:
            client.write("/x", "")
            d.proc.signal_group(signal.SIGTERM)
            assert d.proc.popen is not None
            assert d.proc.popen.wait(5) == 0
        assert not d.sock.exists()
        assert "stopped" in (d.rundir / "xenstored.log").read_text()
    finally:
        gen.close()
