"""Our vhost-user back-end against QEMU's own vhost-user front-end (stock qemu-system-x86_64).

QEMU connects to the back-end while realizing `vhost-user-blk-pci` and runs its init handshake. The
test then plays the guest driver over qtest (legacy virtio-pci: BAR, queue PFN, DRIVER_OK) and lets
the machine run, which makes QEMU start the device: it hands over guest RAM (SET_MEM_TABLE, or
ADD_MEM_REG with CONFIGURE_MEM_SLOTS) and the vring. Bytes written through qtest must then be
visible through the back-end's mapping and the other way round, as in QEMU's vhost-user-test.c.
The firmware is a one-instruction `hlt` loop, so nothing but the test touches the device.
"""
from __future__ import annotations

import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.vhost_user import BackendDevice, BackendSession, ProtocolFeature, Request, VhostUserBackend
from xenpv.base.process import Supervised, wait_for
from xenpv.base.qmp import QmpSession

QEMU_NAME = "qemu-system-x86_64"  # the stock build (package qemu-system-x86), found on PATH
SLOT = 4
IO_BAR = 0xC000
VIRTIO_F_VERSION_1 = 1 << 32
VIRTIO_STATUS_ACK_DRIVER = 0x3
VIRTIO_STATUS_DRIVER_OK = 0x4
# Legacy virtio-pci I/O BAR registers.
REG_GUEST_FEATURES, REG_QUEUE_PFN, REG_QUEUE_NUM, REG_QUEUE_SEL, REG_STATUS = 0x04, 0x08, 0x0C, 0x0E, 0x12
CAPACITY_SECTORS = 2048


@pytest.fixture(scope="module")
def qemu_binary() -> str:
    # ci/bootstrap.sh installs it: its absence is a broken set-up, not a reason to skip.
    path = shutil.which(QEMU_NAME)
    if path is None:
        pytest.fail(f"{QEMU_NAME} is not on PATH (package qemu-system-x86; ci/bootstrap.sh installs it)",
                    pytrace=False)
    return path


class BlkDevice(BackendDevice):
    """Just enough of a vhost-user-blk back-end for QEMU to realize and start the device."""

    features = VIRTIO_F_VERSION_1
    num_queues = 1

    def get_config(self, session: BackendSession, offset: int, size: int) -> bytes:
        cfg = bytearray(256)
        struct.pack_into("=Q", cfg, 0, CAPACITY_SECTORS)  # virtio_blk_config.capacity
        struct.pack_into("=I", cfg, 20, 512)  # virtio_blk_config.blk_size
        return bytes(cfg[offset : offset + size])


class BlkDeviceWithSlots(BlkDevice):
    protocol_features = BackendDevice.protocol_features | ProtocolFeature.CONFIG


class BlkDeviceMemTable(BlkDevice):
    protocol_features = ProtocolFeature.REPLY_ACK | ProtocolFeature.MQ | ProtocolFeature.CONFIG


class Qtest:
    """The qtest line protocol: one command per line, answered by "OK [value]"; IRQ lines are skipped."""

    def __init__(self, path: Path, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rw")

    def cmd(self, line: str) -> str:
        self.file.write(line + "\n")
        self.file.flush()
        while True:
            answer = self.file.readline()
            if not answer:
                raise ConnectionError(f"qtest closed while answering {line!r}")
            if not answer.startswith("IRQ"):
                break
        assert answer.startswith("OK"), f"qtest {line!r} answered {answer!r}"
        return answer[2:].strip()

    def pci_config(self, offset: int) -> int:
        return 0x80000000 | (SLOT << 11) | offset

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def rundir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: sockets live in a short directory under /tmp.
    path = Path(tempfile.mkdtemp(prefix="vuq", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def launch(qemu: str, rundir: Path, log_dir: Path, device: type[BlkDevice]) -> tuple[VhostUserBackend, Supervised]:
    backend = VhostUserBackend(rundir / "vu.sock", device, name="conformance-blk").start()
    bios = rundir / "bios.bin"
    image = bytearray(0x10000)
    image[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"  # reset vector: hlt; jmp back to hlt
    bios.write_bytes(image)
    argv = [
        qemu, "-accel", "tcg", "-S", "-nodefaults", "-display", "none", "-machine", "pc", "-bios", str(bios),
        "-object", "memory-backend-memfd,id=mem,size=64M,share=on", "-machine", "memory-backend=mem", "-m", "64M",
        "-chardev", f"socket,id=vu,path={rundir / 'vu.sock'}",
        "-device", f"vhost-user-blk-pci,chardev=vu,disable-modern=on,addr={SLOT}",
        "-qtest", f"unix:{rundir / 'qtest.sock'},server=on,wait=off",
        "-qmp", f"unix:{rundir / 'qmp.sock'},server=on,wait=off",
    ]  # fmt: skip
    return backend, Supervised("qemu", argv, log_dir / "qemu.log").start()


def names(session: BackendSession) -> list[str]:
    return [Request(r).name for r in session.requests]


@pytest.mark.parametrize(
    "device, memory_request",
    [(BlkDeviceWithSlots, Request.ADD_MEM_REG), (BlkDeviceMemTable, Request.SET_MEM_TABLE)],
    ids=["configure-mem-slots", "set-mem-table"],
)
def test_qemu_frontend_handshake_and_memory(
    qemu_binary: str, rundir: Path, tmp_path: Path, device: type[BlkDevice], memory_request: Request
) -> None:
    backend, qemu = launch(qemu_binary, rundir, tmp_path, device)
    qmp = QmpSession("vhost-user-conformance")
    qtest: Qtest | None = None
    try:
        session = wait_for(
            lambda: next((s for s in backend.sessions if Request.GET_CONFIG in s.requests), None),
            timeout=10, what="QEMU's vhost-user init handshake", alive=[qemu],
        )  # fmt: skip
        init = names(session)
        expected_prefix = ["GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM"]
        if memory_request is Request.ADD_MEM_REG:
            expected_prefix.append("GET_MAX_MEM_SLOTS")
        expected_prefix += ["SET_OWNER", "GET_FEATURES"]
        assert init[: len(expected_prefix)] == expected_prefix, init
        assert "SET_VRING_CALL" in init and init[-1] == "GET_CONFIG", init
        assert session.protocol_features & ProtocolFeature.REPLY_ACK
        assert session.protocol_features & ProtocolFeature.CONFIG
        assert session.owner

        wait_for(lambda: (rundir / "qtest.sock").exists(), timeout=5, what="qtest socket", alive=[qemu])
        qtest = Qtest(rundir / "qtest.sock")
        qtest.cmd(f"outl 0xcf8 {qtest.pci_config(0x00):#x}")
        assert int(qtest.cmd("inl 0xcfc"), 16) == 0x1001_1AF4  # transitional virtio-blk
        qtest.cmd(f"outl 0xcf8 {qtest.pci_config(0x10):#x}")
        qtest.cmd(f"outl 0xcfc {IO_BAR:#x}")
        qtest.cmd(f"outl 0xcf8 {qtest.pci_config(0x04):#x}")
        qtest.cmd("outw 0xcfc 0x5")  # I/O space and bus master
        qtest.cmd(f"outb {IO_BAR + REG_STATUS:#x} {VIRTIO_STATUS_ACK_DRIVER:#x}")
        qtest.cmd(f"outl {IO_BAR + REG_GUEST_FEATURES:#x} 0x0")
        qtest.cmd(f"outw {IO_BAR + REG_QUEUE_SEL:#x} 0x0")
        queue_size = int(qtest.cmd(f"inw {IO_BAR + REG_QUEUE_NUM:#x}"), 16)
        qtest.cmd(f"outl {IO_BAR + REG_QUEUE_PFN:#x} 0x100")  # the ring at guest 1 MiB
        qtest.cmd(f"outb {IO_BAR + REG_STATUS:#x} {VIRTIO_STATUS_ACK_DRIVER | VIRTIO_STATUS_DRIVER_OK:#x}")
        # A vhost device starts only while the VM runs.
        qmp.connect(str(rundir / "qmp.sock"))
        qmp.command("cont")
        # Wait for the handled state, not the request's arrival: a request is recorded before its handler runs.
        wait_for(lambda: (vr := session.vrings.get(0)) is not None and vr.started and vr.kick_fd is not None,
                 timeout=10, what="QEMU starting the vhost-user device", alive=[qemu])  # fmt: skip

        started = names(session)[len(init) :]
        assert memory_request.name in started, started
        assert "SET_FEATURES" in started and "SET_VRING_KICK" in started, started
        vring = session.vrings[0]
        assert vring.num == queue_size and vring.started and vring.kick_fd is not None
        regions = session.memory.regions
        assert regions and sum(r.size for r in regions) <= 64 << 20
        assert any(r.gpa <= 0x100000 < r.end for r in regions)

        # Guest writes through qtest are visible in our mapping, at the same guest-physical address...
        for gpa, pattern in ((0x1234, "5a"), (0x200000, "0123456789abcdef"), ((64 << 20) - 4, "deadbeef")):
            qtest.cmd(f"write {gpa:#x} {len(pattern) // 2} 0x{pattern}")
            assert session.memory.read(gpa, len(pattern) // 2).hex() == pattern
        # ...and ours are visible to the guest.
        session.memory.write(0x300000, b"\xc0\xff\xee")
        assert qtest.cmd("read 0x300000 3") == "0xc0ffee"
        assert session in backend.sessions and not backend.closed_sessions  # nothing was dropped
    finally:
        if qtest is not None:
            qtest.close()
        qmp.close()
        qemu.stop()
        backend.stop()
    assert not (rundir / "vu.sock").exists()
