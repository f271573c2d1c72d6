"""The ring transport (reference §2) over a shared-memory file and eventfds, with the guest side in a thread
or driven by hand; and INTRODUCE of a ring into a daemon process through the file page provider."""
from __future__ import annotations

import gc
import mmap
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.xenstored.client import XsClient
from xenpv.backends.xenstored.connection import Connection
from xenpv.backends.xenstored.core import SERVER_FEATURES, XenstoreCore
from xenpv.backends.xenstored.launch import start_xenstored
from xenpv.xenabi.xs_ring import GuestRing, RingServer, eventfd_doorbells
from xenpv.backends.xenstored.ring_provider import FileRingProvider
from xenpv.xenabi.xs_wire import (
    XENSTORE_CONNECTED, XENSTORE_ERROR_NONE, XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX, XENSTORE_RING_SIZE,
    XSD_SOCKMSG, XenstoreDomainInterface, XsdSockmsgType as T,
)


class RingPair:
    """A RingServer bound to an in-process core as domain 1, and the GuestRing of the same page."""

    def __init__(self, tmp: Path) -> None:
        path = tmp / "ring.page"
        path.write_bytes(b"\0" * 4096)
        self.f = open(path, "r+b")
        self.map = mmap.mmap(self.f.fileno(), 4096)
        server_bell, guest_bell = eventfd_doorbells()
        self.bells = (server_bell, guest_bell)
        self.core = XenstoreCore()
        self.core.handle(Connection("setup", 0, True, lambda m: None), T.WRITE, 0, 0, b"/local/domain/1\0")
        self.core.handle(Connection("setup", 0, True, lambda m: None), T.SET_PERMS, 0, 0,
                         b"/local/domain/1\0n1\0")
        self.conn = Connection("dom1", 1, False, lambda m: self.server.send(m))
        self.server = RingServer("dom1", memoryview(self.map), server_bell, SERVER_FEATURES,
                                 on_message=lambda t, r, x, p: self.core.handle(self.conn, t, r, x, p),
                                 on_reset=lambda: self.core.drop_connection(self.conn),
                                 max_outstanding=20, max_output_bytes=1 << 20)
        self.guest = GuestRing(memoryview(self.map), guest_bell)

    @property
    def intf(self) -> XenstoreDomainInterface:
        return self.guest.intf

    def service(self) -> None:
        self.bells[0].drain()
        self.server.service()

    def request(self, mtype: int, payload: bytes, req_id: int = 1, tx: int = 0) -> tuple[int, int, int, bytes]:
        self.guest.send(mtype, payload, req_id, tx)
        self.service()
        return self.guest.read_message(timeout=2)

    def close(self) -> None:
        del self.server, self.guest
        gc.collect()  # ctypes views of the page hold exports of the mapping until collected
        try:
            self.map.close()
        except BufferError:
            pass  # a view still referenced from a failed test's traceback; unmapped when collected
        self.f.close()
        for b in self.bells:
            b.close()


@pytest.fixture
def ring(tmp_path: Path) -> Iterator[RingPair]:
    pair = RingPair(tmp_path)
    yield pair
    pair.close()


def test_layout_matches_the_abi() -> None:
    assert XenstoreDomainInterface.rsp.offset == 1024 and XenstoreDomainInterface.req_cons.offset == 2048
    assert XenstoreDomainInterface.evtchn_port.offset == 2076 and XenstoreDomainInterface.error.offset == 2072
    import ctypes
    assert ctypes.sizeof(XenstoreDomainInterface) == 2080


def test_server_features_advertised(ring: RingPair) -> None:
    assert ring.intf.server_features == SERVER_FEATURES == 15


def test_request_reply(ring: RingPair) -> None:
    assert ring.request(T.WRITE, b"x\0hello")[3] == b"OK\0"
    mtype, req_id, tx, body = ring.request(T.READ, b"x\0", req_id=99)
    assert (mtype, req_id, tx, body) == (T.READ, 99, 0, b"hello")
    assert ring.request(T.READ, b"/local/domain/0\0")[3] == b"EACCES\0"


def test_guest_is_unprivileged(ring: RingPair) -> None:
    assert ring.request(T.INTRODUCE, b"2\x001\x001\0")[3] == b"EACCES\0"
    assert ring.request(T.WRITE, b"/elsewhere\0x")[3] == b"EACCES\0"


def test_wrap_around(ring: RingPair) -> None:
    # Start both rings just before the 32-bit wrap and off the page boundary.
    for name in ("req_cons", "req_prod", "rsp_cons", "rsp_prod"):
        setattr(ring.intf, name, 0xFFFFFF00)
    value = b"v" * 700
    for i in range(20):
        assert ring.request(T.WRITE, b"w%d\0" % i + value)[3] == b"OK\0"
        assert ring.request(T.READ, b"w%d\0" % i)[3] == value
    assert ring.intf.req_prod < 0x10000, "the indexes wrapped past 2^32"


def test_partial_messages(ring: RingPair) -> None:
    msg = XSD_SOCKMSG.pack(T.WRITE, 5, 0, 9) + b"part\0ial!"
    for i in range(len(msg)):
        ring.guest.write(msg[i:i + 1])
        ring.service()
        if i < len(msg) - 1:
            assert ring.intf.rsp_prod == 0, "no reply before the whole message is there"
    assert ring.guest.read_message(1)[3] == b"OK\0"
    assert ring.request(T.READ, b"part\0")[3] == b"ial!"


def test_large_reply_crosses_the_ring_in_pieces(ring: RingPair) -> None:
    value = bytes(range(256)) * 12  # 3072 bytes: three times the ring (written by dom0: over the guest quota)
    ring.core.handle(Connection("setup", 0, True, lambda m: None), T.WRITE, 0, 0, b"/local/domain/1/big\0" + value)
    ring.guest.send(T.READ, b"big\0", 3)
    ring.service()
    got: list[tuple[int, int, int, bytes]] = []

    def reader() -> None:
        got.append(ring.guest.read_message(timeout=5))

    t = threading.Thread(target=reader)
    t.start()
    for _ in range(50):  # the daemon loop: service on every doorbell
        if not t.is_alive():
            break
        ring.bells[0].wait(0.05)
        ring.server.service()
    t.join(5)
    assert got and got[0][3] == value


def test_many_requests_without_notifications(ring: RingPair) -> None:
    # A guest that only notifies occasionally: the server must re-scan everything on each notification.
    for i in range(10):
        ring.guest.write(XSD_SOCKMSG.pack(T.WRITE, i, 0, 4) + b"n%d\0v" % i, notify=False)
    ring.service()
    replies = [ring.guest.read_message(1) for _ in range(10)]
    assert [r[1] for r in replies] == list(range(10))


@pytest.mark.parametrize("field,value", [("req_prod", 2000), ("rsp_prod", 5000), ("req_cons", 0xFFFFF000)])
def test_bad_indexes_set_ringidx_and_are_ignored(ring: RingPair, field: str, value: int) -> None:
    setattr(ring.intf, field, value)
    ring.service()
    assert ring.intf.error == XENSTORE_ERROR_RINGIDX
    ring.intf.req_prod = ring.intf.req_cons = 0
    ring.guest.write(XSD_SOCKMSG.pack(T.READ, 1, 0, 2) + b"x\0")
    ring.service()
    assert ring.intf.rsp_prod == (5000 if field == "rsp_prod" else 0), "a broken ring is left alone"


def test_oversize_header_sets_proto_error(ring: RingPair) -> None:
    ring.guest.write(XSD_SOCKMSG.pack(T.READ, 1, 0, 4097))
    ring.service()
    assert ring.intf.error == XENSTORE_ERROR_PROTO


def test_reconnect(ring: RingPair) -> None:
    ring.request(T.WATCH, b"w\0tok\0")
    ring.guest.read_message(1)  # the initial event
    tx = int(ring.request(T.TRANSACTION_START, b"\0")[3][:-1])
    ring.guest.write(XSD_SOCKMSG.pack(T.READ, 1, 0, 10) + b"par")  # a partial request in flight
    ring.intf.req_prod = 0x1234  # and corrupt indexes: reconnection recovers from those too
    ring.service()
    assert ring.intf.error == XENSTORE_ERROR_RINGIDX

    t = threading.Thread(target=ring.guest.reconnect, kwargs={"timeout": 5})
    t.start()
    for _ in range(100):
        if not t.is_alive():
            break
        ring.bells[0].wait(0.05)
        ring.server.service()
    t.join(5)
    intf = ring.intf
    assert (intf.req_cons, intf.req_prod, intf.rsp_cons, intf.rsp_prod) == (0, 0, 0, 0)
    assert intf.connection == XENSTORE_CONNECTED and intf.error == XENSTORE_ERROR_NONE
    assert ring.conn.watches == {} and ring.conn.transactions == {}
    assert ring.request(T.READ, b"x\0", tx=tx)[3] == b"ENOENT\0", "transactions are gone"
    assert ring.request(T.WRITE, b"w\0v")[3] == b"OK\0"
    ring.service()
    assert ring.intf.rsp_prod == ring.intf.rsp_cons, "the dropped watch fires no event"


def test_outstanding_quota_applies_back_pressure(ring: RingPair) -> None:
    # 40 requests whose replies the guest does not read: the server stops consuming at the quota,
    # leaving the rest in the request ring, and resumes when the guest reads.
    sent = 0
    for i in range(40):
        msg = XSD_SOCKMSG.pack(T.READ, i, 0, 2) + b"x\0"
        free = XENSTORE_RING_SIZE - ((ring.intf.req_prod - ring.intf.req_cons) & 0xFFFFFFFF)
        if free < len(msg):
            ring.service()
            continue
        ring.guest.write(msg, notify=False)
        sent += 1
        ring.service()
    got = []
    for _ in range(200):
        ring.service()
        try:
            got.append(ring.guest.read_message(0.01))
        except TimeoutError:
            if len(got) == sent:
                break
    assert [g[1] for g in got] == list(range(sent))


# ---- a daemon process with the file page provider --------------------------------------------------

@pytest.fixture
def daemon_with_rings() -> Iterator[tuple[Path, FileRingProvider]]:
    rundir = Path(tempfile.mkdtemp(prefix="xsr", dir="/tmp"))
    provider = FileRingProvider(rundir)
    proc = start_xenstored(rundir / "sock", rundir / "xenstored.log", ring_dir=rundir)
    try:
        yield rundir / "sock", provider
        proc.check_alive("ring tests")
    finally:
        proc.stop()
        shutil.rmtree(rundir, ignore_errors=True)


def test_introduce_ring_into_daemon(daemon_with_rings: tuple[Path, FileRingProvider]) -> None:
    sock, provider = daemon_with_rings
    guest = provider.create_guest(3)
    try:
        ring = GuestRing(guest.page, guest.doorbell)
        # A request queued before INTRODUCE is served once the domain is introduced.
        ring.send(T.GET_DOMAIN_PATH, b"3\0", req_id=1)
        with XsClient(sock) as c:
            c.write("/local/domain/3", "")
            c.set_perms("/local/domain/3", ["n3"])
            c.watch("@introduceDomain", "i")
            assert c.read_event(2) == ("@introduceDomain", "i")
            c.introduce(3, 0xFEFFF, 5)
            assert c.read_event(2) == ("@introduceDomain", "i")
            assert ring.read_message(5) == (T.GET_DOMAIN_PATH, 1, 0, b"/local/domain/3\0")
            assert ring.intf.server_features == SERVER_FEATURES
            ring.send(T.WRITE, b"name\0guest3", req_id=2)
            assert ring.read_message(5)[3] == b"OK\0"
            assert c.read("/local/domain/3/name") == b"guest3"
            ring.send(T.WATCH, b"name\0t\0", req_id=3)
            assert ring.read_message(5)[3] == b"OK\0"
            assert ring.read_message(5)[3] == b"name\0t\0"
            c.write("/local/domain/3/name", "renamed")
            assert ring.read_message(5)[3] == b"name\0t\0"
            c.watch("@releaseDomain", "r")
            assert c.read_event(2) == ("@releaseDomain", "r")
            c.release(3)
            assert c.read_event(2) == ("@releaseDomain", "r")
            assert c.request(T.IS_DOMAIN_INTRODUCED, b"3\0") == b"F\0"
    finally:
        del ring
        guest.close()


def test_introduce_without_a_page_is_einval(daemon_with_rings: tuple[Path, FileRingProvider]) -> None:
    sock, _ = daemon_with_rings
    with XsClient(sock) as c:
        with pytest.raises(Exception, match="EINVAL"):
            c.introduce(9, 1, 5)
        assert c.read("/tool") == b""


def test_reintroduce_restarts_the_ring(daemon_with_rings: tuple[Path, FileRingProvider]) -> None:
    sock, provider = daemon_with_rings
    guest = provider.create_guest(4)
    try:
        ring = GuestRing(guest.page, guest.doorbell)
        with XsClient(sock) as c:
            c.write("/local/domain/4", "")
            c.set_perms("/local/domain/4", ["n4"])
            c.introduce(4, 1, 5)
            ring.send(T.WATCH, b"w\0t\0", req_id=1)
            assert ring.read_message(5)[3] == b"OK\0"
            assert ring.read_message(5)[3] == b"w\0t\0"
            # A resumed guest whose indexes moved on, and the toolstack re-introducing it.
            ring.intf.req_prod = ring.intf.req_cons = 0x777
            c.introduce(4, 1, 6)
            assert ring.intf.connection == XENSTORE_CONNECTED
            assert (ring.intf.req_prod, ring.intf.req_cons, ring.intf.rsp_prod) == (0, 0, 0)
            ring.inbuf = b""
            c.write("/local/domain/4/w", "x")
            assert ring.read_message(5)[3] == b"w\0t\0", "the watch survives a re-INTRODUCE"
    finally:
        del ring
        guest.close()


def test_output_is_bounded_at_its_quota_and_the_count_follows_what_the_guest_takes(ring: RingPair) -> None:
    """RingServer.send queues up to max_output_bytes for a guest that does not read its replies (a message
    that would go past it is dropped, one that reaches it exactly is kept); what the guest takes off the
    ring no longer counts, and a ring error drops the queue and its count."""
    server = ring.server
    server.max_output_bytes = 100
    assert server.out_bytes == 0
    server.send(b"a" * 60)
    server.send(b"b" * 40)
    server.send(b"c")
    assert (len(server.out), server.out_bytes) == (2, 100)
    ring.service()                                   # the ring has room: both go out
    assert (len(server.out), server.out_bytes) == (0, 0)
    server.send(b"d" * 100)
    assert server.out_bytes == 100
    ring.intf.req_prod = ring.intf.req_cons + XENSTORE_RING_SIZE + 1   # a malicious index
    ring.service()
    assert server.broken and (len(server.out), server.out_bytes) == (0, 0)
