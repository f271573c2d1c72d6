"""PCI through configuration mechanism #1 (0xCF8/0xCFC), as firmware and the OS see the bus.

There is no Python-side device list: everything here is read from QEMU over the port I/O of the vCPU.
`assign_resources` plays the firmware's part (no BIOS runs under accel=qtest): it sizes every BAR and
gives it an address in the PC's I/O and 32-bit MMIO windows, then enables decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC

# Configuration header offsets (PCI Local Bus 3.0, type 0 header).
VENDOR_ID, DEVICE_ID, COMMAND, STATUS = 0x00, 0x02, 0x04, 0x06
REVISION_ID, CLASS_PROG, HEADER_TYPE = 0x08, 0x09, 0x0E
BAR0, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID, INTERRUPT_PIN = 0x10, 0x2C, 0x2E, 0x3D
COMMAND_IO, COMMAND_MEMORY = 0x1, 0x2

# Where a PC's firmware puts BARs for a machine with at most 3 GiB of RAM.
IO_WINDOW = (0xC000, 0x10000)
MMIO_WINDOW = (0xE0000000, 0xFEC00000)


class PortIO(Protocol):
    def inb(self, port: int) -> int: ...
    def inw(self, port: int) -> int: ...
    def inl(self, port: int) -> int: ...
    def outb(self, port: int, value: int) -> None: ...
    def outw(self, port: int, value: int) -> None: ...
    def outl(self, port: int, value: int) -> None: ...
    def out_in(self, out_port: int, value: int, in_port: int, in_size: int) -> int: ...


@dataclass(frozen=True)
class Bar:
    index: int
    kind: str  # "io" or "mem"
    size: int
    address: int
    is_64bit: bool = False
    prefetchable: bool = False

    def __str__(self) -> str:
        flags = ("64-bit " if self.is_64bit else "") + ("prefetchable " if self.prefetchable else "")
        return f"BAR{self.index} {self.kind} {flags}{self.address:#x} size {self.size:#x}"


@dataclass(frozen=True)
class PciFunction:
    bus: int
    slot: int
    function: int
    vendor_id: int
    device_id: int
    revision: int
    class_code: int  # base << 16 | sub << 8 | prog-if
    header_type: int
    subsystem_vendor_id: int
    subsystem_id: int
    interrupt_pin: int
    bars: tuple[Bar, ...] = field(default=())

    @property
    def bdf(self) -> str:
        return f"{self.bus:02x}:{self.slot:02x}.{self.function}"

    @property
    def base_class(self) -> int:
        return self.class_code >> 8  # e.g. 0x0101 IDE, 0x0200 Ethernet, 0xff80 Xen platform

    def __str__(self) -> str:
        return (f"{self.bdf} {self.vendor_id:04x}:{self.device_id:04x} rev {self.revision:02x} "
                f"class {self.class_code:06x} subsys {self.subsystem_vendor_id:04x}:{self.subsystem_id:04x}")


class PciBus:
    """Configuration space of bus 0 through the vCPU's port I/O."""

    def __init__(self, io: PortIO) -> None:
        self.io = io

    @staticmethod
    def _address(slot: int, function: int, offset: int, bus: int = 0) -> int:
        if not (0 <= slot < 32 and 0 <= function < 8 and 0 <= offset < 256 and 0 <= bus < 256):
            raise ValueError(f"bad PCI address {bus:02x}:{slot:02x}.{function} offset {offset:#x}")
        return 0x80000000 | bus << 16 | slot << 11 | function << 8 | (offset & 0xFC)

    def read(self, slot: int, function: int, offset: int, size: int = 4) -> int:
        return self.io.out_in(CONFIG_ADDRESS, self._address(slot, function, offset), CONFIG_DATA + (offset & 3), size)

    def write(self, slot: int, function: int, offset: int, value: int, size: int = 4) -> None:
        self.io.outl(CONFIG_ADDRESS, self._address(slot, function, offset))
        port = CONFIG_DATA + (offset & 3)
        {1: self.io.outb, 2: self.io.outw, 4: self.io.outl}[size](port, value)

    def _probe_bars(self, slot: int, function: int, header_type: int) -> tuple[Bar, ...]:
        if header_type & 0x7F != 0:
            return ()  # bridges are not expected on the PC's bus 0 here
        command = self.read(slot, function, COMMAND, 2)
        # Decoding off while the BARs hold all-ones, as firmware does, so no access lands on a bogus range.
        self.write(slot, function, COMMAND, command & ~(COMMAND_IO | COMMAND_MEMORY), 2)
        bars = []
        index = 0
        while index < 6:
            off = BAR0 + 4 * index
            orig = self.read(slot, function, off)
            self.write(slot, function, off, 0xFFFFFFFF)
            probe = self.read(slot, function, off)
            self.write(slot, function, off, orig)
            if orig & 1:
                mask = probe & 0xFFFFFFFC & 0xFFFF
                if mask:
                    bars.append(Bar(index, "io", (~mask & 0xFFFF) + 1, orig & 0xFFFC))
                index += 1
                continue
            is64 = (orig >> 1) & 3 == 2
            size_mask = probe & 0xFFFFFFF0
            address = orig & 0xFFFFFFF0
            if is64:
                hi_orig = self.read(slot, function, off + 4)
                self.write(slot, function, off + 4, 0xFFFFFFFF)
                hi_probe = self.read(slot, function, off + 4)
                self.write(slot, function, off + 4, hi_orig)
                size_mask |= hi_probe << 32
                address |= hi_orig << 32
                width = 1 << 64
            else:
                width = 1 << 32
            if size_mask:
                bars.append(Bar(index, "mem", (~size_mask & (width - 1)) + 1, address, is64, bool(orig & 8)))
            index += 2 if is64 else 1
        self.write(slot, function, COMMAND, command, 2)
        return tuple(bars)

    def function(self, slot: int, function: int) -> PciFunction:
        ids = self.read(slot, function, VENDOR_ID)
        cls = self.read(slot, function, REVISION_ID)
        header = self.read(slot, function, HEADER_TYPE, 1)
        sub = self.read(slot, function, SUBSYSTEM_VENDOR_ID)
        return PciFunction(
            bus=0, slot=slot, function=function,
            vendor_id=ids & 0xFFFF, device_id=ids >> 16,
            revision=cls & 0xFF, class_code=cls >> 8, header_type=header,
            subsystem_vendor_id=sub & 0xFFFF, subsystem_id=sub >> 16,
            interrupt_pin=self.read(slot, function, INTERRUPT_PIN, 1),
            bars=self._probe_bars(slot, function, header),
        )

    def present_functions(self) -> list[tuple[int, int, int]]:
        """(slot, function, vendor ID) of every function on the bus, from their IDs alone: what a bus
        driver's rescan reads to see what came and went (no BAR is sized)."""
        found = []
        for slot in range(32):
            vendor = self.read(slot, 0, VENDOR_ID, 2)
            if vendor == 0xFFFF:
                continue
            found.append((slot, 0, vendor))
            if self.read(slot, 0, HEADER_TYPE, 1) & 0x80:
                for fn in range(1, 8):
                    if (vendor := self.read(slot, fn, VENDOR_ID, 2)) != 0xFFFF:
                        found.append((slot, fn, vendor))
        return found

    def enumerate(self) -> list[PciFunction]:
        return [self.function(slot, fn) for slot, fn, _ in self.present_functions()]

    def assign_resources(self) -> list[PciFunction]:
        """Give every unassigned BAR an address, largest first, naturally aligned; enable decoding."""
        devices = self.enumerate()
        placed: dict[tuple[int, int, int], int] = {}  # (slot, function, BAR index) -> the address given
        io_next, mmio_next = IO_WINDOW[0], MMIO_WINDOW[0]
        pending = sorted(((d, b) for d in devices for b in d.bars if b.address == 0),
                         key=lambda db: (db[1].kind, -db[1].size))
        for dev, bar in pending:
            if bar.kind == "io":
                base = _align(io_next, bar.size)
                if base + bar.size > IO_WINDOW[1]:
                    raise RuntimeError(f"{dev.bdf} {bar}: the I/O window is full")
                io_next = base + bar.size
                self.write(dev.slot, dev.function, BAR0 + 4 * bar.index, base | 1)
                placed[dev.slot, dev.function, bar.index] = base
            else:
                base = _align(mmio_next, bar.size)
                if base + bar.size > MMIO_WINDOW[1]:
                    raise RuntimeError(f"{dev.bdf} {bar}: the MMIO window is full")
                mmio_next = base + bar.size
                self.write(dev.slot, dev.function, BAR0 + 4 * bar.index, base & 0xFFFFFFFF)
                if bar.is_64bit:
                    self.write(dev.slot, dev.function, BAR0 + 4 * bar.index + 4, base >> 32)
                placed[dev.slot, dev.function, bar.index] = base
        for dev in devices:
            kinds = {b.kind for b in dev.bars}
            enable = (COMMAND_IO if "io" in kinds else 0) | (COMMAND_MEMORY if "mem" in kinds else 0)
            if enable:
                cmd = self.read(dev.slot, dev.function, COMMAND, 2)
                self.write(dev.slot, dev.function, COMMAND, cmd | enable, 2)
        # What was found with the addresses just written, as firmware keeps it, rather than a second
        # enumeration: that sized every BAR again (all-ones written and read back, a qtest round trip each),
        # a good part of a boot's port I/O.
        return [replace(d, bars=tuple(replace(b, address=placed.get((d.slot, d.function, b.index), b.address))
                                      for b in d.bars)) for d in devices]


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)
