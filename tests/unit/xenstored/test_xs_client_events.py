"""XsClient.wait_event, the wait of every back-end's main loop: events that came in the same recv as a
reply are not lost behind a socket that is no longer readable.

The peer here is a scripted unix-socket server, so that a reply and the watch event after it leave in
one sendall and reach the client in one recv, every time (a real xenstored does so only by chance, which
is how netback once sat in InitWait until its test gave up)."""
from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.backends.xenstored.client import XsClient
from xenpv.xenabi.xs_wire import XSD_SOCKMSG, XsdSockmsgType as T


def _msg(mtype: int, payload: bytes) -> bytes:
    return XSD_SOCKMSG.pack(mtype, 0, 0, len(payload)) + payload


class ScriptedStore:
    """Accepts one client; answers its first request with `answer` (bytes sent in one sendall)."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.answer = answer
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            hdr = conn.recv(XSD_SOCKMSG.size, socket.MSG_WAITALL)
            length = XSD_SOCKMSG.unpack(hdr)[3]
            if length:
                conn.recv(length, socket.MSG_WAITALL)
            conn.sendall(self.answer)
            self.done.wait(10)  # the connection stays open: no EOF makes the socket readable

    def close(self) -> None:
        self.done.set()
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def store_with(tmp_path: Path) -> Iterator:
    servers: list[ScriptedStore] = []

    def make(answer: bytes) -> XsClient:
        servers.append(ScriptedStore(tmp_path / "xs.sock", answer))
        return XsClient(tmp_path / "xs.sock", timeout=5)

    yield make
    for s in servers:
        s.close()


def test_an_event_read_with_the_reply_before_it_is_returned(store_with) -> None:
    c = store_with(_msg(T.READ, b"v") + _msg(T.WATCH_EVENT, b"/fe/state\0fe 1 0\0"))
    with c:
        assert c.read("/x") == b"v"
        assert not select.select([c.sock], [], [], 0.2)[0], "the event was expected in the client's buffer"
        assert c.wait_event(0.2) == ("/fe/state", "fe 1 0")
        assert c.wait_event(0.1) is None


def test_two_events_read_with_the_reply_come_in_order(store_with) -> None:
    c = store_with(_msg(T.READ, b"v") + _msg(T.WATCH_EVENT, b"/a\0t\0") + _msg(T.WATCH_EVENT, b"/b\0t\0"))
    with c:
        c.read("/x")
        assert [c.wait_event(0.2), c.wait_event(0.2)] == [("/a", "t"), ("/b", "t")]


def test_half_an_event_in_the_buffer_is_not_taken_for_a_whole_one(store_with) -> None:
    event = _msg(T.WATCH_EVENT, b"/a\0t\0")
    c = store_with(_msg(T.READ, b"v") + event[:-3])
    with c:
        c.read("/x")
        assert c.wait_event(0.1) is None  # no wait for the rest (read_event would time out as a lost link)


def test_wait_event_returns_when_the_wake_fd_is_readable(store_with) -> None:
    c = store_with(_msg(T.READ, b"v"))
    r, w = os.pipe()
    try:
        with c:
            c.read("/x")
            os.write(w, b"x")
            t0 = time.monotonic()
            assert c.wait_event(30.0, wake=r) is None
            assert time.monotonic() - t0 < 10, "wait_event slept through the wake fd"
    finally:
        os.close(r)
        os.close(w)
