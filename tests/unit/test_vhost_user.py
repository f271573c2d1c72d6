"""Our vhost-user front-end against our back-end, in two processes over a real unix socket, with
guest memory in a memfd that both sides map.

The back-end process runs this file as a script (`serve`), with an "xor-copy" device: a kick on
channel N makes it read a command record for N from guest memory, copy `length` bytes from `src`
to `dst` inverted, write a status (and the error text on failure), and notify channel N.
"""
from __future__ import annotations

import logging
import mmap
import os
import random
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpv.backends.vhost_user import (
    F_PROTOCOL_FEATURES,
    BackendDevice,
    BackendSession,
    GuestMemoryError,
    ProtocolFeature,
    Region,
    Request,
    VhostUserBackend,
    VhostUserError,
    VhostUserFrontend,
    VhostUserRequestFailed,
)
from xenpv.backends.vhost_user.messages import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    MEM_REGION,
    MEM_TABLE_HEADER,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_NOFD,
    VRING_STATE,
)
from xenpv.base.process import Supervised, wait_for

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
RAM_SIZE = 2 * MiB
LOW = (0x0, MiB, 0x0)  # gpa, size, offset in the memfd
HIGH = (0x1000_0000, MiB, MiB)
CMD_BASE = 0xF0000  # per-channel command records, in LOW
CMD = struct.Struct("=IIQQ")  # op, length, src, dst
STATUS_OFFSET = 0x40
OP_XOR_COPY = 1
CONFIG = b"xenpv-echo-config".ljust(32, b"\0")
MESSAGE_TIMEOUT = 0.5


class XorCopyDevice(BackendDevice):
    features = 1 << 3  # an arbitrary device feature bit, to see it negotiated
    protocol_features = BackendDevice.protocol_features | ProtocolFeature.CONFIG
    num_queues = 4

    def on_kick(self, session: BackendSession, index: int) -> None:
        record = CMD_BASE + index * 0x100
        try:
            op, length, src, dst = CMD.unpack(session.memory.read(record, CMD.size))
        except GuestMemoryError as exc:
            logging.getLogger("xorcopy").warning("channel %d: no command record: %s", index, exc)
            return
        status, text = 0, b""
        try:
            if op != OP_XOR_COPY:
                raise ValueError(f"bad op {op}")
            data = session.memory.read(src, length)
            session.memory.write(dst, bytes(b ^ 0xFF for b in data))
        except (GuestMemoryError, ValueError) as exc:
            status, text = 1, str(exc).encode()[:0xB0]
        session.memory.write(record + STATUS_OFFSET, struct.pack("=I", status) + text + b"\0")
        session.notify(index)

    def get_config(self, session: BackendSession, offset: int, size: int) -> bytes:
        return CONFIG.ljust(256, b"\0")[offset : offset + size]


def serve(socket_path: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # the loop thread inherits the mask
    backend = VhostUserBackend(socket_path, XorCopyDevice, message_timeout=MESSAGE_TIMEOUT).start()
    signal.sigwait({signal.SIGTERM})
    backend.stop()


# --- fixtures ----------------------------------------------------------------------------------
@dataclass
class Server:
    proc: Supervised
    socket_path: Path

    def log_size(self) -> int:
        return self.proc.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.proc.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    sockdir = Path(tempfile.mkdtemp(prefix="vuu", dir="/tmp"))  # AF_UNIX path limit
    log_path = tmp_path_factory.mktemp("vhost_user") / "backend.log"
    sock = sockdir / "backend.sock"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = Supervised("vhost-user-backend", [sys.executable, __file__, "serve", str(sock)], log_path, env=env)
    proc.start()
    try:
        wait_for(sock.exists, timeout=10, what="the back-end's socket", alive=[proc])
        yield Server(proc, sock)
        assert proc.alive(), "the back-end died during the tests"
    finally:
        proc.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
    assert proc.returncode == 0, proc.log_tail()
    assert not sock.exists()


class Guest:
    """A guest's RAM (a memfd, mapped here too) and its front-end connection to the back-end."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, RAM_SIZE)
        self.ram = mmap.mmap(self.fd, RAM_SIZE)
        self.fe = VhostUserFrontend.connect(server.socket_path, timeout=5)
        self.channels: dict[int, tuple[int, int]] = {}

    def region(self, spec: tuple[int, int, int]) -> Region:
        gpa, size, offset = spec
        return Region(gpa, size, self.fd, offset)

    def offset(self, gpa: int) -> int:
        for base, size, off in (LOW, HIGH):
            if base <= gpa < base + size:
                return off + gpa - base
        raise AssertionError(f"gpa {gpa:#x} outside the test's regions")

    def write(self, gpa: int, data: bytes) -> None:
        o = self.offset(gpa)
        self.ram[o : o + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        o = self.offset(gpa)
        return self.ram[o : o + length]

    def bind(self, index: int) -> None:
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        self.channels[index] = (kick, call)
        self.fe.set_channel(index, kick, call)

    def kick(self, index: int) -> None:
        os.eventfd_write(self.channels[index][0], 1)

    def called(self, index: int, timeout: float) -> bool:
        call = self.channels[index][1]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.server.proc.check_alive("waiting for a call eventfd")
            if select.select([call], [], [], 0.05)[0]:
                os.eventfd_read(call)
                return True
        return False

    def xor_copy(self, index: int, src: int, dst: int, length: int) -> tuple[int, str]:
        record = CMD_BASE + index * 0x100
        self.write(record, CMD.pack(OP_XOR_COPY, length, src, dst) + bytes(STATUS_OFFSET - CMD.size) + b"\xff" * 4)
        self.kick(index)
        assert self.called(index, timeout=5), f"no call on channel {index}"
        status = struct.unpack("=I", self.read(record + STATUS_OFFSET, 4))[0]
        text = self.read(record + STATUS_OFFSET + 4, 0xB0).split(b"\0")[0].decode()
        return status, text

    def close(self) -> None:
        self.fe.close()
        for kick, call in self.channels.values():
            os.close(kick)
            os.close(call)
        self.ram.close()
        os.close(self.fd)


@pytest.fixture
def guest_factory(server: Server) -> Iterator[Callable[[], Guest]]:
    guests: list[Guest] = []

    def make() -> Guest:
        guests.append(Guest(server))
        return guests[-1]

    yield make
    for g in guests:
        g.close()


def ready_guest(make: Callable[[], Guest], channel: int = 3) -> Guest:
    g = make()
    g.fe.negotiate()
    g.fe.set_mem_table([g.region(LOW), g.region(HIGH)])
    g.bind(channel)
    return g


def check_round_trip(g: Guest, channel: int, rng: random.Random) -> None:
    pattern = rng.randbytes(64)
    g.write(0x1000, pattern)
    assert g.xor_copy(channel, 0x1000, HIGH[0] + 0x800, len(pattern)) == (0, "")
    assert g.read(HIGH[0] + 0x800, len(pattern)) == bytes(b ^ 0xFF for b in pattern)


# --- negotiation, memory, channels -------------------------------------------------------------
def test_feature_negotiation(guest_factory: Callable[[], Guest]) -> None:
    g = guest_factory()
    g.fe.negotiate(features=(1 << 3) | (1 << 5))
    assert g.fe.backend_features == (1 << 3) | F_PROTOCOL_FEATURES
    assert g.fe.features == (1 << 3) | F_PROTOCOL_FEATURES  # bit 5 was not offered, so not acked
    assert g.fe.protocol_features == (
        ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.MQ
    )
    assert g.fe.backend_protocol_features & ProtocolFeature.CONFIG
    assert g.fe.get_queue_num() == XorCopyDevice.num_queues
    assert g.fe.get_max_mem_slots() == XorCopyDevice.max_mem_slots
    assert g.fe.get_config(0, 32) == CONFIG
    assert g.fe.get_config(6, 4) == CONFIG[6:10]

    minimal = guest_factory()
    minimal.fe.negotiate(protocol_features=ProtocolFeature.REPLY_ACK)
    assert minimal.fe.protocol_features == ProtocolFeature.REPLY_ACK
    with pytest.raises(VhostUserError, match="CONFIGURE_MEM_SLOTS"):
        minimal.fe.get_max_mem_slots()


def test_mem_table_pattern_read_and_written_back(guest_factory: Callable[[], Guest]) -> None:
    rng = random.Random(4)
    g = ready_guest(guest_factory)
    check_round_trip(g, 3, rng)
    pattern = rng.randbytes(4096)
    g.write(HIGH[0] + 0x100, pattern)
    assert g.xor_copy(3, HIGH[0] + 0x100, 0x8000, len(pattern)) == (0, "")
    assert g.read(0x8000, len(pattern)) == bytes(b ^ 0xFF for b in pattern)

    status, text = g.xor_copy(3, LOW[1] - 8, 0x8000, 16)
    assert status == 1 and "straddles the end of region 0x0+0x100000" in text
    status, text = g.xor_copy(3, 0x4000_0000, 0x8000, 16)
    assert status == 1 and "0x40000000+0x10: not mapped" in text


def test_channels_are_independent_and_get_vring_base_stops_one(guest_factory: Callable[[], Guest]) -> None:
    rng = random.Random(5)
    g = ready_guest(guest_factory, channel=0)
    g.bind(200)  # any 8-bit slot, far beyond the device's virtqueues
    g.fe.set_vring_kick(7, None)  # polling mode: accepted, nothing to watch
    check_round_trip(g, 200, rng)
    assert not g.called(0, timeout=0.05)
    check_round_trip(g, 0, rng)

    assert g.fe.get_vring_base(200) == 0
    g.kick(200)
    assert not g.called(200, timeout=0.3), "a stopped ring answered a kick"
    kick, call = g.channels[200]
    g.fe.set_channel(200, kick, call)  # a new kick fd starts it again...
    assert g.called(200, timeout=5), "the kick left pending while stopped was not delivered on restart"
    check_round_trip(g, 200, rng)


def test_add_and_remove_mem_regions(guest_factory: Callable[[], Guest]) -> None:
    rng = random.Random(6)
    g = guest_factory()
    g.fe.negotiate()
    g.fe.set_mem_table([g.region(LOW)])
    g.bind(1)
    status, text = g.xor_copy(1, 0x1000, HIGH[0], 16)
    assert status == 1 and "not mapped" in text
    g.fe.add_mem_region(g.region(HIGH))
    check_round_trip(g, 1, rng)
    g.fe.remove_mem_region(g.region(HIGH))
    status, text = g.xor_copy(1, 0x1000, HIGH[0] + 0x800, 16)
    assert status == 1 and "not mapped" in text
    with pytest.raises(VhostUserRequestFailed, match="REM_MEM_REG"):
        g.fe.remove_mem_region(g.region(HIGH))
    g.fe.add_mem_region(g.region(HIGH))  # the slot is free again
    check_round_trip(g, 1, rng)


# --- hostile peers -----------------------------------------------------------------------------
def region_table(*regions: tuple[int, int, int, int]) -> bytes:
    return MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(MEM_REGION.pack(*r) for r in regions)


def msg(request: int, payload: bytes = b"", flags: int = VERSION, size: int | None = None) -> bytes:
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


# name -> (bytes to send, how many copies of the 1 MiB memfd to attach, reason in the back-end's log)
HOSTILE: dict[str, tuple[bytes, int, str]] = {
    "bad-version": (msg(Request.GET_FEATURES, flags=0x2), 0, "bad flags 0x2"),
    "unknown-flag-bit": (msg(Request.GET_FEATURES, flags=VERSION | 0x40), 0, "bad flags 0x41"),
    "reply-flag-on-request": (msg(Request.GET_FEATURES, flags=VERSION | FLAG_REPLY), 0, "REPLY flag set"),
    "size-too-big": (msg(Request.SET_FEATURES, size=1 << 20), 0, "payload size 1048576 too big"),
    "size-not-matching": (msg(Request.SET_FEATURES, b"\0" * 4), 0, "payload size 4, expected 8 (SET_FEATURES)"),
    "unknown-request": (msg(999), 0, "unknown request (request 999)"),
    "unsupported-request": (msg(Request.SET_LOG_BASE, b"\0" * 16), 0, "unsupported request"),
    "fd-on-fdless-request": (msg(Request.SET_OWNER), 1, "carries 1 fds, expected 0 (SET_OWNER)"),
    "kick-missing-fd": (msg(Request.SET_VRING_KICK, U64.pack(1)), 0, "carries 0 fds, expected 1"),
    "nofd-kick-with-fd": (msg(Request.SET_VRING_KICK, U64.pack(1 | VRING_NOFD)), 1, "carries 1 fds, expected 0"),
    "too-many-fds": (msg(Request.SET_MEM_TABLE, region_table((0, 4096, 0, 0))), 9, "too many fds"),
    "fewer-fds-than-regions": (
        msg(Request.SET_MEM_TABLE, region_table((0, 4096, 0, 0), (0x10000, 4096, 0, 4096))), 1,
        "carries 1 fds, expected 2",
    ),
    "region-size-zero": (msg(Request.SET_MEM_TABLE, region_table((0x1000, 0, 0, 0))), 1, "has size 0"),
    "region-overflow": (
        msg(Request.SET_MEM_TABLE, region_table(((1 << 64) - 4096, 8192, 0, 0))), 1, "overflows 64 bits"
    ),
    "region-beyond-fd": (msg(Request.SET_MEM_TABLE, region_table((0, 4096, 0, MiB))), 1, "beyond the end of its fd"),
    "regions-overlap": (
        msg(Request.SET_MEM_TABLE, region_table((0, 8192, 0, 0), (4096, 4096, 0, 0))), 2, "overlaps region"
    ),
    "too-many-regions": (msg(Request.SET_MEM_TABLE, region_table(*[(i << 20, 4096, 0, 0) for i in range(9)])), 0,
                         "9 regions (limit 8)"),  # fmt: skip
    "mem-table-size-mismatch": (msg(Request.SET_MEM_TABLE, region_table((0, 4096, 0, 0))[:-8]), 1, "does not fit"),
    "add-region-without-fd": (msg(Request.ADD_MEM_REG, SINGLE_MEM_REGION.pack(0, 0, 4096, 0, 0)), 0,
                              "carries 0 fds, expected 1 (ADD_MEM_REG)"),  # fmt: skip
    "vring-index-out-of-range": (msg(Request.SET_VRING_NUM, VRING_STATE.pack(300, 8)), 0, "vring index 300"),
    "vring-reserved-bits": (msg(Request.SET_VRING_CALL, U64.pack(0x10000 | VRING_NOFD)), 0, "reserved bits"),
    "unoffered-feature": (msg(Request.SET_FEATURES, U64.pack(1 << 0)), 0, "include bits not offered"),
    "config-size-mismatch": (msg(Request.GET_CONFIG, struct.pack("=III", 0, 60, 0)), 0, "does not match payload"),
    "stalls-mid-message": (msg(Request.SET_FEATURES, size=8), 0, "mid-message"),
}


def assert_dropped(sock: socket.socket) -> None:
    """The back-end closed `sock`: EOF, or a reset when it closed with our bytes unread."""
    try:
        assert sock.recv(64) == b""
    except ConnectionResetError:
        pass


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_message_drops_only_that_connection(
    case: str, server: Server, guest_factory: Callable[[], Guest]
) -> None:
    data, nfds, reason = HOSTILE[case]
    bystander = ready_guest(guest_factory)
    log_start = server.log_size()
    fd = os.memfd_create("hostile")
    os.ftruncate(fd, MiB)
    hostile = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    hostile.settimeout(5)
    try:
        hostile.connect(str(server.socket_path))
        if nfds:
            socket.send_fds(hostile, [data], [fd] * nfds)
        else:
            hostile.sendall(data)
        assert_dropped(hostile)
        logged = wait_for(
            lambda: next((line for line in server.log_since(log_start).splitlines() if "dropping connection" in line),
                         None),
            timeout=5, what="the drop to be logged", alive=[server.proc],
        )  # fmt: skip
        assert logged.startswith("vhost_user WARNING") and reason in logged, logged
    finally:
        hostile.close()
        os.close(fd)
    check_round_trip(bystander, 3, random.Random(case))
    fresh = ready_guest(guest_factory, channel=9)
    check_round_trip(fresh, 9, random.Random(case))


def test_back_end_leaks_no_fds(server: Server) -> None:
    """Every fd a peer sends is either kept for a purpose or closed, whatever the message."""

    def open_fds() -> int:
        return len(os.listdir(f"/proc/{server.proc.pid}/fd"))

    def settled_at(baseline: int) -> bool:
        return open_fds() == baseline

    # Connections of earlier tests may still be closing: take the baseline once the count is steady.
    readings: list[int] = []

    def steady() -> int | None:
        readings.append(open_fds())
        return readings[-1] if len(readings) >= 5 and len(set(readings[-5:])) == 1 else None

    baseline = wait_for(steady, timeout=5, what="a steady fd count in the back-end", alive=[server.proc],
                        interval=0.02, max_interval=0.02)  # fmt: skip
    for case in ("fd-on-fdless-request", "too-many-fds", "region-beyond-fd", "regions-overlap", "fewer-fds-than-regions"):
        data, nfds, _ = HOSTILE[case]
        fd = os.memfd_create("leak")
        os.ftruncate(fd, MiB)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(server.socket_path))
            socket.send_fds(s, [data], [fd] * nfds)
            assert_dropped(s)
        os.close(fd)
    g = Guest(server)
    g.fe.negotiate()
    g.fe.set_mem_table([g.region(LOW), g.region(HIGH)])
    g.bind(3)
    g.fe.add_mem_region(Region(0x4000_0000, 4096, g.fd))
    # Before QEMU 7.1 REM_MEM_REG carried the region's fd: accepted, and closed.
    g.fe.request(Request.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, 0x4000_0000, 4096, 0x4000_0000, 0), [g.fd])
    check_round_trip(g, 3, random.Random(8))
    assert open_fds() > baseline  # the mappings' fds and the channel's eventfds are held
    g.close()
    wait_for(lambda: settled_at(baseline), timeout=5, what=f"the back-end back at {baseline} fds", alive=[server.proc])


def test_reply_ack_reports_failure_without_dropping(guest_factory: Callable[[], Guest]) -> None:
    g = ready_guest(guest_factory)
    g.fe.sock.sendall(msg(Request.REM_MEM_REG, SINGLE_MEM_REGION.pack(0, 0x7000_0000, 4096, 0, 0),
                          flags=VERSION | FLAG_NEED_REPLY))  # fmt: skip
    reply = g.fe.sock.recv(64)
    assert HEADER.unpack_from(reply) == (Request.REM_MEM_REG, VERSION | FLAG_REPLY, 8)
    assert U64.unpack_from(reply, HEADER.size)[0] != 0
    check_round_trip(g, 3, random.Random(7))


# --- message order -----------------------------------------------------------------------------
OPERATIONS = ["queue_num", "mem_table", "add_high", "remove_high", "bind", "stop", "vring_num", "enable",
              "disable", "round_trip", "config"]  # fmt: skip


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.sampled_from(OPERATIONS), max_size=12))
def test_any_order_of_valid_messages_is_served(server: Server, ops: list[str]) -> None:
    """Valid requests in any order either succeed or fail with a non-zero ack; never a drop. A
    round trip works exactly when the channel is started, enabled and both regions are mapped."""
    g = Guest(server)  # one connection per example: the server caps concurrent sessions
    try:
        run_operations(g, ops)
    finally:
        g.close()


def run_operations(g: Guest, ops: list[str]) -> None:
    g.fe.negotiate()
    mapped: set[str] = set()
    started = enabled = pending_kick = False
    for op in ops:
        if op == "queue_num":
            assert g.fe.get_queue_num() == XorCopyDevice.num_queues
        elif op == "mem_table":
            g.fe.set_mem_table([g.region(LOW)])
            mapped = {"low"}
        elif op == "add_high" and "high" not in mapped:  # an overlapping region is hostile: dropped
            g.fe.add_mem_region(g.region(HIGH))
            mapped = mapped | {"high"}
        elif op == "remove_high":
            try:
                g.fe.remove_mem_region(g.region(HIGH))
                mapped = mapped - {"high"}
            except VhostUserRequestFailed:
                assert "high" not in mapped
        elif op == "bind":
            if 2 in g.channels:
                g.fe.set_channel(2, *g.channels[2])
            else:
                g.bind(2)
            started = enabled = True
            if pending_kick:  # a kick left in the eventfd while stopped is delivered on restart
                assert g.called(2, timeout=2) == ("low" in mapped)
                pending_kick = False
        elif op == "stop":
            g.fe.get_vring_base(2)
            started = False
        elif op == "vring_num":
            g.fe.set_vring_num(2, 256)
        elif op in ("enable", "disable"):
            g.fe.set_vring_enable(2, op == "enable")
            enabled = op == "enable"
        elif op == "config":
            assert g.fe.get_config(0, 8) == CONFIG[:8]
        elif op == "round_trip" and 2 in g.channels:
            if started and enabled and mapped == {"low", "high"}:
                check_round_trip(g, 2, random.Random(len(ops)))
                continue
            g.write(CMD_BASE + 2 * 0x100, CMD.pack(OP_XOR_COPY, 16, 0x1000, HIGH[0]))
            g.kick(2)
            expected = started and enabled and "low" in mapped  # the command record must be readable
            assert g.called(2, timeout=2 if expected else 0.05) == expected
            pending_kick = pending_kick or not started
    assert g.fe.get_queue_num() == XorCopyDevice.num_queues  # still connected


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(sys.argv[2])
