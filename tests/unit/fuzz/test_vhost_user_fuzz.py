"""Hypothesis fuzz of the vhost-user back-end library (backends/vhost_user/) with hostile message bodies.

A front-end connects to a real VhostUserBackend (its event-loop thread, in this process) and sends a few
messages, each possibly hostile: any request id, flags, a declared size that matches its payload or not,
payloads of the right size with hostile contents or of the wrong size, fds of the wrong count or kind, a
message cut short by a disconnect. What must hold:
- a message the library refuses ends that connection with a clear reason (`protocol error: ...`, or the
  peer's own disconnect): never `internal error` (a defect the guard caught) and never a dead loop thread;
- every fd the front-end sent is either kept for a purpose or closed: once the connection is gone this
  process holds no more fds than before;
- the server still serves a fresh connection.
"""
from __future__ import annotations

import os
import random
import select
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from xenpv.backends.vhost_user import BackendDevice, ProtocolFeature, Request, VhostUserBackend, VhostUserFrontend
from xenpv.backends.vhost_user.backend import _FIXED_SIZES
from xenpv.backends.vhost_user.messages import (CONFIG_HEADER, FLAG_NEED_REPLY, FLAG_REPLY, HEADER, MAX_PAYLOAD,
                                                MEM_REGION,
                                                MEM_TABLE_HEADER, U64, VERSION, VRING_ADDR,
                                                VRING_NOFD, VRING_STATE)

MiB = 1 << 20
CLEAR_REASONS = ("protocol error: ", "peer closed the connection", "socket or fd error: ")


class Device(BackendDevice):
    protocol_features = BackendDevice.protocol_features | ProtocolFeature.CONFIG

    def get_config(self, session: object, offset: int, size: int) -> bytes:
        return bytes(256)[offset:offset + size]

    def set_config(self, session: object, offset: int, data: bytes, flags: int) -> None:
        pass


@dataclass
class Server:
    backend: VhostUserBackend
    path: Path


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory(prefix="vufz") as d:
        path = Path(d) / "vu.sock"
        backend = VhostUserBackend(path, Device, name="fuzz", message_timeout=0.3).start()
        try:
            yield Server(backend, path)
        finally:
            backend.stop()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass(frozen=True)
class Msg:
    request: int
    flags: int
    payload: bytes
    declared: int | None  # the header's size when it lies about the payload
    fds: tuple[str, ...]  # kinds of fd to attach: memfd, eventfd, pipe
    cut: bool  # the front-end disconnects halfway through this message


U32S = [0, 1, 2, 3, 255, 256, 32768, 32769, 0xFFFFFFFF]
U64S = [0, 1, 3, VRING_NOFD, VRING_NOFD | 3, VRING_NOFD | 255, 0x10000, 1 << 30, 1 << 63, (1 << 64) - 1]


def pick(rng: random.Random, menu: list[int], bits: int) -> int:
    return rng.choice(menu) if rng.random() < 0.85 else rng.getrandbits(bits)


def a_region(rng: random.Random) -> bytes:
    gpa = pick(rng, [0, 0x1000, MiB, 4 * MiB, (1 << 64) - 4096], 64)
    return MEM_REGION.pack(gpa, pick(rng, [4096, MiB, 2 * MiB, 0, 1 << 63], 64), (0x7F0000000000 + gpa) % (1 << 64),
                           pick(rng, [0, 4096, MiB, 2 * MiB], 64))


def a_payload(rng: random.Random, req: int) -> bytes:
    """A payload shaped for `req` with hostile values (mostly), or any bytes."""
    if rng.random() < 0.15:
        return rng.randbytes(rng.choice([0, 1, 7, 8, 9, 40, 80]))
    def u32() -> int:
        return pick(rng, U32S, 32)

    def u64() -> int:
        return pick(rng, U64S, 64)

    if req in (Request.SET_FEATURES, Request.SET_PROTOCOL_FEATURES, Request.SET_VRING_KICK,
               Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        return U64.pack(u64())
    if req in (Request.SET_VRING_NUM, Request.SET_VRING_BASE, Request.GET_VRING_BASE, Request.SET_VRING_ENABLE):
        return VRING_STATE.pack(u32(), u32())
    if req == Request.SET_VRING_ADDR:
        return VRING_ADDR.pack(u32(), u32(), u64(), u64(), u64(), u64())
    if req == Request.SET_MEM_TABLE:
        n = rng.choice([0, 1, 2, 8, 9, 10])
        count = n if rng.random() < 0.7 else rng.choice([0, 1, 8, 9])
        return MEM_TABLE_HEADER.pack(n, 0) + b"".join(a_region(rng) for _ in range(count))
    if req in (Request.ADD_MEM_REG, Request.REM_MEM_REG):
        return U64.pack(0) + a_region(rng)
    if req in (Request.GET_CONFIG, Request.SET_CONFIG):
        size = rng.choice([0, 4, 60, 256, 0xFFFFFFFF])
        body = rng.randbytes(size if size <= 256 and rng.random() < 0.7 else rng.choice([0, 3, 64]))
        return CONFIG_HEADER.pack(rng.choice([0, 8, 255, 256]), size, 0) + body
    return b""


FD_REQUESTS = (Request.SET_MEM_TABLE, Request.ADD_MEM_REG, Request.REM_MEM_REG, Request.SET_VRING_KICK,
               Request.SET_VRING_CALL, Request.SET_VRING_ERR)


# The requests the library serves; others (and unknown ids) are refused at once, so they are drawn less.
SERVED = sorted(set(_FIXED_SIZES) | {Request.SET_MEM_TABLE, Request.GET_CONFIG, Request.SET_CONFIG})


def a_message(rng: random.Random) -> Msg:
    r = rng.random()
    req = rng.choice(SERVED) if r < 0.85 else rng.choice(list(Request)) if r < 0.95 else rng.choice(
        [0, 44, 60, 0xFFFFFFFF])
    flags = VERSION if rng.random() < 0.85 else rng.choice([VERSION | FLAG_NEED_REPLY, 0, 2, VERSION | FLAG_REPLY,
                                                          VERSION | 0x10, 0xFFFFFFFF])
    payload = a_payload(rng, int(req))
    declared = None if rng.random() < 0.9 else rng.choice([0, 7, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFFFFFF,
                                                            rng.randrange(200)])
    fds: tuple[str, ...] = ()
    if req in FD_REQUESTS or rng.random() < 0.1:
        fds = tuple(rng.choice(["memfd", "memfd", "eventfd", "pipe"]) for _ in range(rng.choice([0, 1, 1, 2, 3, 9])))
    return Msg(int(req), flags, payload, declared, fds, rng.random() < 0.05)


def make_fd(kind: str, keep: list[int]) -> int:
    if kind == "memfd":
        fd = os.memfd_create("fz")
        os.ftruncate(fd, 2 * MiB)
    elif kind == "eventfd":
        fd = os.eventfd(0, os.EFD_NONBLOCK)
    else:
        fd, w = os.pipe()
        keep.append(w)
    keep.append(fd)
    return fd


def send(sock: socket.socket, m: Msg) -> bool:
    """Send one message; False once the peer is gone."""
    size = len(m.payload) if m.declared is None else m.declared
    data = HEADER.pack(m.request & 0xFFFFFFFF, m.flags, size) + m.payload
    if m.cut:
        data = data[:max(1, len(data) // 2)]
    ours: list[int] = []
    try:
        fds = [make_fd(kind, ours) for kind in m.fds]
        if fds:
            socket.send_fds(sock, [data], fds)
        else:
            sock.sendall(data)
        return True
    except OSError:  # the back-end dropped us already (a reset, or EPIPE)
        return False
    finally:
        for fd in ours:  # the back-end has its own copies of what it received
            os.close(fd)


def drain(sock: socket.socket) -> bool:
    """Read whatever replies came; False once the back-end closed the connection."""
    while select.select([sock], [], [], 0.02)[0]:
        try:
            if not sock.recv(4096):
                return False
        except OSError:
            return False
    return True


def wait_gone(server: Server, before: int) -> None:
    deadline = time.monotonic() + 5
    while server.backend.sessions or open_fds() > before:
        assert time.monotonic() < deadline, (f"{len(server.backend.sessions)} sessions left, "
                                             f"{open_fds() - before} fds more than before")
        time.sleep(0.005)


# Hypothesis draws the seed of each connection (derandomized: the same cases in every CI run); the seeded
# Random shapes its messages. Hypothesis's own draw of each field rarely got a message past the framing
# checks into the handlers within the budget.
@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, (1 << 64) - 1), handshake=st.booleans())
def test_hostile_messages_end_only_their_connection_with_a_clear_reason(server: Server, seed: int,
                                                                        handshake: bool) -> None:
    rng = random.Random(seed)
    msgs = [a_message(rng) for _ in range(rng.randint(1, 12))]
    before = open_fds()
    earlier = {s.name for s in server.backend.closed_sessions}
    if handshake:  # a connection that negotiated and mapped memory first, so later messages get deeper
        fe = VhostUserFrontend.connect(server.path, timeout=2)
        fe.negotiate()
        sock = fe.sock
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(server.path))
    try:
        for m in msgs:
            if not send(sock, m) or not drain(sock) or m.cut:
                break
    finally:
        sock.close()
    wait_gone(server, before)
    assert server.backend._thread is not None and server.backend._thread.is_alive()
    reasons = [s.closed_reason or "" for s in server.backend.closed_sessions if s.name not in earlier]
    assert reasons and all(r.startswith(CLEAR_REASONS) for r in reasons), reasons
    fresh = VhostUserFrontend.connect(server.path, timeout=2)
    try:
        fresh.negotiate()
        assert fresh.get_queue_num() == Device.num_queues
    finally:
        fresh.close()
    wait_gone(server, before)


def test_a_kick_fd_that_cannot_be_polled_ends_only_its_connection(server: Server) -> None:
    """Found by the fuzz: a memfd as kick fd made epoll refuse it after the vring had taken it, and the
    session's cleanup then unregistered an fd never registered: the KeyError ended the server's loop."""
    before = open_fds()
    fe = VhostUserFrontend.connect(server.path, timeout=2)
    try:
        fe.negotiate()
        assert send(fe.sock, Msg(Request.SET_VRING_KICK, VERSION, U64.pack(3), None, ("memfd",), False))
        assert not drain_until_closed(fe.sock)
    finally:
        fe.close()
    wait_gone(server, before)
    assert server.backend._thread is not None and server.backend._thread.is_alive()
    assert server.backend.closed_sessions[-1].closed_reason.startswith(
        "protocol error: kick fd of vring 3 cannot be watched")
    fresh = VhostUserFrontend.connect(server.path, timeout=2)
    fresh.negotiate()
    fresh.close()
    wait_gone(server, before)


def drain_until_closed(sock: socket.socket, timeout: float = 2.0) -> bool:
    """True if the connection is still open after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not drain(sock):
            return False
        time.sleep(0.01)
    return True
