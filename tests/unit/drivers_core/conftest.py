"""A fake PC for the XEN/XENFILT/XENBUS core unit tests: port I/O only, no QEMU.

`FakeMachine` answers the vCPU's port I/O the way the real machine does for the parts the core touches:
PCI configuration space through 0xCF8/0xCFC (functions without BARs), the Xen platform unplug ports
0x10/0x12 (present only with a Xen platform PCI device, as xenhv serves them), Xen's debug port 0xE9,
and the two legacy IDE channels with IDENTIFY DEVICE and PIO READ SECTORS. Unplugging does what the
harness's xenhv does on the real QEMU: NICs leave configuration space; IDE disks lose their medium but
keep answering IDENTIFY. `FakePlatform` stands in for XenPlatform with a xenstore `device` directory
and its watch events. `rig.boot(machine)` is stack.drivers.boot.boot_stack over these fakes.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import ctypes
import threading
from types import SimpleNamespace

import pytest

import xenpv.stack.drivers.boot as boot_module
from xenpv.stack.drivers.boot import BootedStack, boot_stack
from xenpv.stack.kernel import Registry
from xenpv.stack.kernel.debuglog import DebugLog, current_log, set_current_log
from xenpv.stack.kernel.irql import Processor, current_processor, set_current_processor
from xenpv.stack.kernel.mm import set_current_mm
from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.stack.vcpu.pages import PageAllocator
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import unplug as U
from xenpv.xenabi import xen as X

XEN_VERSION = (4, 17)
ATA_IDENTIFY_DEVICE, ATA_READ_SECTORS = 0xEC, 0x20
ST_DRDY_DSC, ST_DRQ, ST_ABORTED, ERR_ABRT = 0x50, 0x08, 0x41, 0x04  # ABORTED: DRDY|ERR, as QEMU


@dataclass
class FakeFunction:
    slot: int
    vendor_id: int
    device_id: int
    class_code: int
    revision: int = 1
    subsystem_vendor_id: int = 0x5853
    subsystem_id: int = 0x0001
    command: int = 0

    def config(self, offset: int) -> int:
        """One byte of configuration space; BARs read 0, so the function has no resources."""
        words = {0x00: self.vendor_id | self.device_id << 16, 0x04: self.command,
                 0x08: self.revision | self.class_code << 8, 0x0C: 0,
                 0x2C: self.subsystem_vendor_id | self.subsystem_id << 16, 0x3C: 1 << 8}
        return words.get(offset & 0xFC, 0) >> 8 * (offset & 3) & 0xFF


def xen_platform(slot: int, device_id: int) -> FakeFunction:
    subsys = device_id if device_id == 0xC000 else 0x0001
    return FakeFunction(slot, 0x5853, device_id, 0xFF8000, subsystem_id=subsys)


def piix_ide(slot: int = 1) -> FakeFunction:
    return FakeFunction(slot, 0x8086, 0x7010, 0x010180, revision=0, subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)


def rtl8139(slot: int) -> FakeFunction:
    return FakeFunction(slot, 0x10EC, 0x8139, 0x020000, revision=0x20, subsystem_vendor_id=0x1AF4,
                        subsystem_id=0x1100)


def qemu_nvme(slot: int) -> FakeFunction:
    return FakeFunction(slot, 0x1B36, 0x0010, 0x010802, revision=2, subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)


@dataclass
class FakeDrive:
    model: str
    cdrom: bool = False
    medium: bool = True


@dataclass
class FakeChannel:
    drives: dict[int, FakeDrive]
    selected: int = 0
    status: dict[int, int] = field(default_factory=dict)
    error: int = 0
    data: deque[int] = field(default_factory=deque)

    def command(self, cmd: int) -> None:
        drive = self.drives.get(self.selected)
        if drive is None:
            return
        ok = (cmd == ATA_IDENTIFY_DEVICE and not drive.cdrom) or (cmd == ATA_READ_SECTORS and drive.medium
                                                                  and not drive.cdrom)
        if not ok:
            self.status[self.selected], self.error = ST_ABORTED, ERR_ABRT
            return
        self.error = 0
        self.status[self.selected] = ST_DRDY_DSC | ST_DRQ
        if cmd == ATA_IDENTIFY_DEVICE:
            model = drive.model.ljust(40).encode()
            words = [0] * 27 + [int.from_bytes(model[i:i + 2], "big") for i in range(0, 40, 2)]
            self.data = deque(words + [0] * (256 - len(words)))
        else:
            self.data = deque([0] * 256)

    def read_status(self) -> int:
        if self.selected not in self.drives:
            return 0  # QEMU: no drive selected there
        return self.status.get(self.selected, ST_DRDY_DSC)

    def read_data(self) -> int:
        word = self.data.popleft() if self.data else 0xFFFF
        if not self.data:
            self.status[self.selected] = ST_DRDY_DSC
        return word


CHANNEL_BASES = (0x1F0, 0x170)


class FakeHypervisor:
    """Only what xen.sys asks of it: the hypervisor's version."""

    def hypercall(self, nr: int, *args: int) -> int:
        if nr == X.HYPERCALL_NUMBERS["xen_version"]:
            return XEN_VERSION[0] << 16 | XEN_VERSION[1]
        raise AssertionError(f"unexpected hypercall {nr}")


@dataclass
class FakeMachine:
    functions: list[FakeFunction]
    channels: tuple[FakeChannel, FakeChannel] = field(
        default_factory=lambda: (FakeChannel({0: FakeDrive("QEMU HARDDISK")}), FakeChannel({0: FakeDrive("QEMU DVD-ROM", cdrom=True)})))
    xen: bool = True
    # What port 0x10 reads: QEMU never blacklists, a device model that did would answer 0xd249.
    magic: int = U.UNPLUG_MAGIC
    config_address: int = 0
    unplug_writes: list[int] = field(default_factory=list)
    product: int | None = None
    build: int | None = None
    qemu_log: list[str] = field(default_factory=list)
    xen_console: list[str] = field(default_factory=list)
    _qemu_buf: bytearray = field(default_factory=bytearray)
    _xen_buf: bytearray = field(default_factory=bytearray)
    # The vCPU's relocation line (stack.vcpu.relocation): this machine's vCPU never moves.
    relocation: Any = field(default_factory=lambda: SimpleNamespace(waiting=None, report=lambda error: None))

    @property
    def hv(self) -> FakeHypervisor | None:
        return FakeHypervisor() if self.xen else None

    def hypercall(self, nr: int, *args: int) -> int:
        assert self.hv is not None
        return self.hv.hypercall(nr, *args)

    def write_phys(self, gpa: int, data: bytes) -> None:
        """Page zeroing by the memory manager; nothing in these tests reads guest RAM back."""

    # -- the unplug ports --------------------------------------------------------------------------

    @property
    def has_platform(self) -> bool:
        return self.xen and any(f.vendor_id == U.XEN_PLATFORM_VENDOR_ID for f in self.functions)

    def _unplug(self, mask: int) -> None:
        self.unplug_writes.append(mask)
        if mask & U.UNPLUG_ALL_NICS:
            self.functions = [f for f in self.functions if f.class_code >> 8 != 0x0200]
        if mask & (U.UNPLUG_ALL_IDE_DISKS | U.UNPLUG_AUX_IDE_DISKS):
            aux_only = not mask & U.UNPLUG_ALL_IDE_DISKS
            for number, channel in enumerate(self.channels):
                for target, drive in channel.drives.items():
                    if not drive.cdrom and not (aux_only and (number, target) == (0, 0)):
                        drive.medium = False

    @staticmethod
    def _line(buf: bytearray, value: int, out: list[str]) -> None:
        if value == ord("\n"):
            out.append(buf.decode("latin-1"))
            buf.clear()
        else:
            buf.append(value)

    # -- port I/O ----------------------------------------------------------------------------------

    def _channel(self, port: int) -> tuple[FakeChannel, int] | None:
        for base, channel in zip(CHANNEL_BASES, self.channels):
            if base <= port < base + 8:
                return channel, port - base
        return None

    def _config_function(self) -> FakeFunction | None:
        if not self.config_address & 0x80000000 or self.config_address >> 16 & 0xFF or self.config_address >> 8 & 7:
            return None
        slot = self.config_address >> 11 & 0x1F
        return next((f for f in self.functions if f.slot == slot), None)

    def _in(self, port: int, size: int) -> int:
        if 0xCFC <= port < 0xD00:
            function = self._config_function()
            if function is None:
                return (1 << 8 * size) - 1
            offset = (self.config_address & 0xFC) + port - 0xCFC
            return sum(function.config(offset + i) << 8 * i for i in range(size))
        if self.has_platform and port == U.UNPLUG_PORT_MAGIC and size == 2:
            return self.magic
        if self.has_platform and port == U.UNPLUG_PORT_VERSION and size == 1:
            return U.UNPLUG_PROTOCOL_VERSION
        if (found := self._channel(port)) is not None:
            channel, register = found
            if register == 0 and size == 2:
                return channel.read_data()
            if register == 7:
                return channel.read_status()
            if register == 1:
                return channel.error
            return 0
        return (1 << 8 * size) - 1

    def _out(self, port: int, size: int, value: int) -> None:
        if port == 0xCF8 and size == 4:
            self.config_address = value
            return
        if 0xCFC <= port < 0xD00:
            function = self._config_function()
            if function is not None and (self.config_address & 0xFC) == 0x04 and port == 0xCFC:
                function.command = value & 0xFFFF
            return
        if port == 0xE9 and size == 1:
            self._line(self._xen_buf, value, self.xen_console)
            return
        if self.has_platform and port == U.UNPLUG_PORT_MASK and size == 2:
            self._unplug(value)
            return
        if self.has_platform and port == U.UNPLUG_PORT_BUILD and size == 4:
            self.build = value
            return
        if self.has_platform and port == U.UNPLUG_PORT_PRODUCT and size == 2:
            self.product = value
            return
        if self.has_platform and port == U.UNPLUG_PORT_LOG and size == 1:
            self._line(self._qemu_buf, value, self.qemu_log)
            return
        if (found := self._channel(port)) is not None and size == 1:
            channel, register = found
            if register == 6:
                channel.selected = value >> 4 & 1
            elif register == 7:
                channel.command(value)

    def inb(self, port: int) -> int:
        return self._in(port, 1)

    def inw(self, port: int) -> int:
        return self._in(port, 2)

    def inl(self, port: int) -> int:
        return self._in(port, 4)

    def outb(self, port: int, value: int) -> None:
        self._out(port, 1, value)

    def outw(self, port: int, value: int) -> None:
        self._out(port, 2, value)

    def outl(self, port: int, value: int) -> None:
        self._out(port, 4, value)

    def out_in(self, out_port: int, value: int, in_port: int, in_size: int) -> int:
        self._out(out_port, 4, value)
        return self._in(in_port, in_size)


@dataclass
class FakeStore:
    """The guest's view of its xenstore home: `device/<class>` names, the `device` and `control/shutdown`
    watches, and the keys the FDO writes (control/feature-suspend) in `values`."""

    classes: list[str]
    watches: list[tuple[str, str]] = field(default_factory=list)
    events: deque[tuple[str, str]] = field(default_factory=deque)
    handlers: dict = field(default_factory=dict)
    values: dict[str, bytes] = field(default_factory=dict)
    doorbell: Any = None  # the store event channel; nothing rings it here

    def read(self, path: str, tx: int = 0) -> bytes:
        if path not in self.values:
            raise XenstoreError("read", path, "ENOENT")
        return self.values[path]

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        self.values[path] = value.encode() if isinstance(value, str) else value

    def rm(self, path: str, tx: int = 0) -> None:
        self.values.pop(path, None)

    def forget(self, token: str) -> None:
        self.handlers.pop(token, None)

    def held(self) -> threading.RLock:
        return threading.RLock()

    def directory(self, path: str) -> list[str]:
        assert path == "device"
        if not self.classes:
            raise XenstoreError("directory", path, "ENOENT")
        return list(self.classes)

    def watch(self, path: str, token: str, handler=None) -> None:
        if handler is not None:
            self.handlers[token] = handler
        self.watches.append((path, token))
        self.events.append((path, token))  # xenstored fires a new watch once

    def unwatch(self, path: str, token: str) -> None:
        self.watches.remove((path, token))
        self.handlers.pop(token, None)

    def pump(self) -> None:
        kept = []
        while self.events:
            path, token = self.events.popleft()
            if token in self.handlers:
                self.handlers[token](path, token)
            else:
                kept.append((path, token))
        self.events.extend(kept)

    def wait_event(self, timeout: float) -> tuple[str, str] | None:
        return self.events.popleft() if self.events else None

    def remove(self, device_class: str) -> None:
        self.classes.remove(device_class)
        self.events.extend(("device/" + device_class, token) for _, token in self.watches)


class FakeVcpu:
    """Pages as bytearrays and a hypervisor that answers event channel ops: what the XENBUS FDO's own
    interfaces (EVTCHN, SHARED_INFO, CONSOLE) touch when it goes D0."""

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.next_port = 10
        self.relocation = SimpleNamespace(waiting=None, report=lambda error: None)

    def page(self, gfn: int) -> memoryview:
        return memoryview(self.memory.setdefault(gfn, bytearray(4096)))

    def read_phys(self, gpa: int, length: int) -> bytes:
        return bytes(self.page(gpa >> 12)[gpa & 0xFFF:(gpa & 0xFFF) + length])

    def write_phys(self, gpa: int, data: bytes) -> None:
        self.page(gpa >> 12)[gpa & 0xFFF:(gpa & 0xFFF) + len(data)] = data

    def send_by_doorbell(self, port: int) -> bool:
        return False  # this fake hypervisor hands out no doorbells: every send traps

    def hypercall(self, nr: int, cmd: int, gpa: int, *_: int) -> int:
        if nr != X.HYPERCALL_NUMBERS["event_channel_op"]:
            return -X.XEN_ENOSYS
        layout = E.EVTCHNOP_ARGUMENTS[cmd]
        op = layout.from_buffer_copy(self.read_phys(gpa, ctypes.sizeof(layout)))
        if cmd in (E.EVTCHNOP_alloc_unbound, E.EVTCHNOP_bind_interdomain, E.EVTCHNOP_bind_virq):
            setattr(op, "local_port" if cmd == E.EVTCHNOP_bind_interdomain else "port", self.next_port)
            self.next_port += 1
        self.write_phys(gpa, bytes(op))
        return 0


@dataclass
class FakeUpcalls:
    handlers: dict[int, Callable[[int], None]] = field(default_factory=dict)

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        self.handlers[port] = handler

    def unbind(self, port: int) -> None:
        self.handlers.pop(port, None)

    def scan(self) -> None:
        pass


PLATFORM_BAR = 0xF000_0000


@dataclass
class FakePlatform:
    store: FakeStore
    closed: bool = False
    vcpu: FakeVcpu = field(default_factory=FakeVcpu)
    upcalls: FakeUpcalls = field(default_factory=FakeUpcalls)
    pages: PageAllocator = field(default_factory=lambda: PageAllocator(0x400))
    device: Any = field(default_factory=lambda: SimpleNamespace(
        bars=(SimpleNamespace(kind="mem", address=PLATFORM_BAR, size=0x100000),)))
    grants: GrantTableFrontend = field(init=False)

    def __post_init__(self) -> None:
        self.grants = GrantTableFrontend([self.vcpu.page((PLATFORM_BAR >> 12) + 1)])

    def close(self) -> None:
        self.closed = True


@dataclass
class Rig:
    """Boots the stack over a FakeMachine; everything booted is closed at teardown."""

    monkeypatch: pytest.MonkeyPatch
    platforms: list[FakePlatform] = field(default_factory=list)
    booted: list[BootedStack] = field(default_factory=list)
    xenstore_classes: list[str] = field(default_factory=lambda: ["vbd", "vif"])

    def boot(self, machine: FakeMachine, registry: Registry | None = None, **kwargs: Any) -> BootedStack:
        def start(vcpu: Any, ram_pages: int, **_: Any) -> FakePlatform:
            platform = FakePlatform(FakeStore(list(self.xenstore_classes)))
            self.platforms.append(platform)
            return platform

        self.monkeypatch.setattr(boot_module.XenPlatform, "start", start)
        booted = boot_stack(machine, 256, registry=registry if registry is not None else Registry(),  # type: ignore[arg-type]
                            **kwargs)
        self.booted.append(booted)
        return booted


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    """A fresh processor and debug log per test (a booted Kernel activates its own), so a bugcheck in
    one test cannot leak into the next."""
    processor, debug_log = current_processor(), current_log()
    fresh = Processor()
    set_current_processor(fresh)
    set_current_log(DebugLog())
    yield fresh
    set_current_processor(processor)
    set_current_log(debug_log)
    set_current_mm(None)


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    rig = Rig(monkeypatch)
    yield rig
    for booted in rig.booted:
        booted.close()


MachineFactory = Callable[..., FakeMachine]


@pytest.fixture
def machine() -> MachineFactory:
    """`machine(0x0001, 0xC000)`: the PIIX IDE controller in slot 1, one platform device per ID from
    slot 2 on, in that order, then an RTL8139 NIC."""
    def build(*platform_ids: int, nic: bool = True, xen: bool = True) -> FakeMachine:
        functions = [piix_ide()] + [xen_platform(2 + i, d) for i, d in enumerate(platform_ids)]
        if nic:
            functions.append(rtl8139(2 + len(platform_ids)))
        return FakeMachine(functions, xen=xen)
    return build
