"""S4 as the model's Windows does it (ARCHITECTURE.md section 7; reference windows-pv-drivers.md 7).

Hibernate (`power S4`):
1. QUERY_POWER and SET_POWER(S4) down the device tree: XENVIF and XENVBD close their frontends and release
   every XENBUS interface; the XENBUS FDO goes D0 -> D3 and releases its own; then FdoS3ToS4 BUGs on any
   reference still held (a leak is the 0xDEAD STOP it always was).
2. The hibernation image: the guest RAM pages in use (the page allocator's; free pages hold nothing Windows
   needs), written through XENVBD's crash path (xencrsh: one ring, grant references 8-31, its own
   hypercalls) into the hiberfile area of the system disk (xenabi.hiberfile).
3. PM1a_CNT gets the S4 sleep type: QEMU emits SUSPEND_DISK and shuts down. The vCPU is powered off.

Power on (`lifecycle poweron`, once the harness made a new QEMU and a new domain): the vCPU moves there
(stack.vcpu.relocation), the firmware step assigns PCI resources as at first boot, and the resume loader
reads the hiberfile through the EMULATED IDE disk (ATA IDENTIFY, READ DMA through the PIIX bus master),
checks it and puts the pages back into guest RAM, then marks it used (WRITE SECTORS over its header);
SET_POWER(S0) goes up the tree: FdoS4ToS3 (LogResume, UnplugDevices, the platform mapped in the new domain),
D3 -> D0, the children reconnect. A missing or corrupt image means a fresh boot, with a log line that says
why, as Windows' loader does.

What survives the power cycle besides the image is the agent process itself (the Python state of the
kernel and drivers stands for the rest of guest RAM): the resumed drivers are the same objects.
"""
from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

from xenpv.base.errors import QtestError
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.drivers.atapi import (ATA_IDENTIFY_DEVICE, ATA_READ_SECTORS, CHANNEL_PORTS, DEVICE_LBA, STATUS_DRQ,
                                       STATUS_ERR, _command, _wait_not_busy)
from xenpv.stack.drivers.xenvbd.adapter import ParseVbd
from xenpv.stack.drivers.xenvbd.crash import CrashFrontend, CrashPathError
from xenpv.stack.kernel import S0, S4, Registry
from xenpv.stack.kernel.system import Kernel
from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.stack.vcpu.pci import PciBus, PciFunction
from xenpv.stack.vcpu.relocation import WAITING_POWERED_OFF, MachineContext, relocate
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import machine as M
from xenpv.xenabi.hiberfile import (MAX_RECORD, SECTOR, HiberfileError, HiberHeader, hiberfile_area, pack_records,
                                    unpack_records)

log = logging.getLogger("stack.agent.hibernate")

PAGE = 4096
SCRATCH_PAGES = 32  # the loader's DMA buffer: one PRD table page and 31 data pages (124 KiB per command)
PIIX_IDE = (0x8086, 0x7010)
DMA_SECONDS = 5.0


class HibernateError(Exception):
    """Hibernation could not complete; the guest went back to S0."""


@dataclass
class Hibernated:
    records: int
    bytes: int
    lba: int


def _print(rt: GuestRuntime, text: str) -> None:
    rt.kernel.log.print("HIBERNATE", text)


def _system_disk(platform) -> int:
    """The devid of the PV disk that is target 0 (the boot disk)."""
    try:
        devids = [int(d) for d in platform.store.directory("device/vbd") if d.isdigit()]
    except XenstoreError:
        devids = []
    for devid in devids:
        if ParseVbd(devid) == 0:
            return devid
    raise HibernateError("no PV system disk (no device/vbd that is target 0)")


def _records(rt: GuestRuntime) -> list[tuple[int, bytes]]:
    """The in-use pages, in records of contiguous pages of at most MAX_RECORD bytes."""
    assert rt.kernel.mm is not None
    pages = rt.kernel.mm.pages.in_use()
    runs: list[list[int]] = []
    for gfn in pages:
        if runs and gfn == runs[-1][-1] + 1 and len(runs[-1]) * PAGE < MAX_RECORD:
            runs[-1].append(gfn)
        else:
            runs.append([gfn])
    return [(run[0] * PAGE, rt.vcpu.read_phys(run[0] * PAGE, len(run) * PAGE)) for run in runs]


def hibernate(rt: GuestRuntime) -> str:
    """`power S4` (see the module docstring); what the console prints."""
    fdo = rt.drivers.xenbus.active_fdo if rt.drivers is not None else None
    if fdo is None or fdo.platform is None:
        return "error: hibernation writes its image through XENVBD's crash path: this guest has no active XENBUS"
    with rt.kernel.cpu.lock:
        if not rt.kernel.power.set_system_state(S4):
            return f"power S4: vetoed ({rt.kernel.power.last_veto})"
        try:
            done = _write_image(rt, fdo.platform)
        except (HibernateError, CrashPathError, XenstoreError) as exc:
            _print(rt, f"hibernation failed: {exc}; back to S0")
            rt.kernel.power.set_system_state(S0)
            return f"error: hibernation failed, the guest is back in S0: {exc}"
        _print(rt, f"hiberfile written: {done.records} records, {done.bytes} bytes at sector {done.lba}; "
                   "PM1a_CNT: S4")
        rt.vcpu.relocation.waiting = WAITING_POWERED_OFF
        _sleep(rt, M.SLP_TYP_S4)
    return (f"power S4: hibernated ({done.records} records, {done.bytes} bytes in the hiberfile at sector "
            f"{done.lba}); the machine is off")


def _write_image(rt: GuestRuntime, platform) -> Hibernated:
    records = _records(rt)
    pages = rt.kernel.mm.pages
    scratch = pages.alloc(SCRATCH_PAGES)  # free now, so in no record: the loader may read into them
    pages.free(scratch)
    data = pack_records(records)
    header = HiberHeader(rt.config.guest.memory_mib << 20, len(data), len(records), zlib.crc32(data), scratch[0],
                         SCRATCH_PAGES)
    image = header.pack() + data + bytes(-len(data) % SECTOR)
    crash = CrashFrontend(platform, _system_disk(platform))
    try:
        crash.connect()
        start, sectors = hiberfile_area(crash.sectors)
        if len(image) > sectors * SECTOR:
            raise HibernateError(f"the image ({len(image)} bytes) does not fit the hiberfile area "
                                 f"({sectors * SECTOR} bytes)")
        crash.write(start, image)
    finally:
        crash.close()
    return Hibernated(len(records), len(image), start)


def _sleep(rt: GuestRuntime, sleep_type: int) -> None:
    """The firmware's PM I/O set up, then SLP_TYP|SLP_EN to PM1a_CNT: QEMU acts on it at once (for S4,
    SUSPEND_DISK and shutdown), so the write's own reply may never come."""
    bus = PciBus(rt.vcpu)
    bus.write(M.PIIX4_PM_DEVICE, M.PIIX4_PM_FUNCTION, M.PIIX4_PMBA, M.PM_IO_BASE | 1)
    misc = bus.read(M.PIIX4_PM_DEVICE, M.PIIX4_PM_FUNCTION, M.PIIX4_PMREGMISC, 1)
    bus.write(M.PIIX4_PM_DEVICE, M.PIIX4_PM_FUNCTION, M.PIIX4_PMREGMISC, misc | M.PIIX4_PMIOSE, 1)
    try:
        rt.vcpu.outw(M.PM_IO_BASE + M.PM1A_CNT, M.pm1_cnt_sleep(sleep_type))
    except (QtestError, OSError) as exc:
        log.info("PM1a_CNT write: QEMU went away before answering (%s)", exc)


# -- power on: firmware, the resume loader, S0 --------------------------------------------------------------

class _Ide:
    """The primary IDE channel's master through port I/O and the PIIX bus master (the loader's disk)."""

    def __init__(self, rt: GuestRuntime, functions: list[PciFunction], scratch_gfn: int | None) -> None:
        self.rt = rt
        self.io = rt.vcpu
        self.base = CHANNEL_PORTS[0][0]
        ide = next((f for f in functions if (f.vendor_id, f.device_id) == PIIX_IDE), None)
        if ide is None:
            raise HiberfileError("no PIIX IDE controller to read the hiberfile from")
        bm = next((b for b in ide.bars if b.index == 4 and b.kind == "io"), None)
        if bm is None or not bm.address:
            raise HiberfileError("the IDE controller has no bus-master I/O block")
        self.bm = bm.address
        bus = PciBus(rt.vcpu)
        command = bus.read(ide.slot, ide.function, 0x04, 2)
        bus.write(ide.slot, ide.function, 0x04, command | M.PCI_COMMAND_IO | M.PCI_COMMAND_MASTER, 2)
        self.scratch_gfn = scratch_gfn

    def sectors(self) -> int:
        """ATA IDENTIFY DEVICE's LBA28 capacity of the primary master (0 if no disk answers)."""
        status = _command(self.io, 0, 0, ATA_IDENTIFY_DEVICE, {}, "IDENTIFY DEVICE")
        if status & STATUS_ERR or not status & STATUS_DRQ:
            return 0
        words = [self.io.inw(self.base) for _ in range(256)]
        return words[M.ATA_IDENTIFY_LBA28_SECTORS] | words[M.ATA_IDENTIFY_LBA28_SECTORS + 1] << 16

    def read_pio(self, lba: int) -> bytes:
        status = _command(self.io, 0, 0, ATA_READ_SECTORS, _lba_registers(lba, 1), "READ SECTORS")
        if status & STATUS_ERR or not status & STATUS_DRQ:
            raise HiberfileError(f"READ SECTORS of sector {lba} failed (status {status:#04x})")
        return b"".join(self.io.inw(self.base).to_bytes(2, "little") for _ in range(256))

    def write_pio(self, lba: int, data: bytes) -> None:
        status = _command(self.io, 0, 0, M.ATA_WRITE_SECTORS, _lba_registers(lba, 1), "WRITE SECTORS")
        if status & STATUS_ERR or not status & STATUS_DRQ:
            raise HiberfileError(f"WRITE SECTORS of sector {lba} refused (status {status:#04x})")
        for i in range(0, SECTOR, 2):
            self.io.outw(self.base, int.from_bytes(data[i:i + 2], "little"))
        _wait_not_busy(self.io, 0, 0, "after WRITE SECTORS")

    def read_dma(self, lba: int, count: int) -> bytes:
        """READ DMA of `count` sectors (at most what the scratch buffer holds) into the scratch pages."""
        assert self.scratch_gfn is not None
        prd, buffer = self.scratch_gfn * PAGE, (self.scratch_gfn + 1) * PAGE
        length = count * SECTOR
        entries, at = [], 0
        while at < length:
            n = min(M.PRD_MAX_BYTES, length - at)
            entries.append((buffer + at, n & 0xFFFF, 0))
            at += n
        table = b"".join(M.PRD_ENTRY.pack(a, n, M.PRD_EOT if i == len(entries) - 1 else 0)
                         for i, (a, n, _) in enumerate(entries))
        self.rt.vcpu.write_phys(prd, table)
        io = self.io
        io.outb(self.bm + M.BM_COMMAND, 0)
        io.outl(self.bm + M.BM_PRDT, prd)
        io.outb(self.bm + M.BM_STATUS, M.BM_STATUS_IRQ | M.BM_STATUS_ERROR)
        _command(io, 0, 0, M.ATA_READ_DMA, _lba_registers(lba, count), "READ DMA")
        io.outb(self.bm + M.BM_COMMAND, M.BM_START | M.BM_READ_TO_MEMORY)
        timeout = scaled(DMA_SECONDS)
        deadline = time.monotonic() + timeout
        while True:
            status = io.inb(self.bm + M.BM_STATUS)
            if status & M.BM_STATUS_IRQ and not io.inb(self.base + 7) & 0x80:
                break
            if time.monotonic() >= deadline:
                io.outb(self.bm + M.BM_COMMAND, 0)
                raise HarnessTooSlow(f"QEMU's IDE DMA of {count} sectors at {lba}", timeout)
            time.sleep(0)
        io.outb(self.bm + M.BM_COMMAND, 0)
        if status & M.BM_STATUS_ERROR or io.inb(self.base + 7) & STATUS_ERR:
            raise HiberfileError(f"READ DMA of {count} sectors at {lba} failed (bus master {status:#04x})")
        return self.rt.vcpu.read_phys(buffer, length)


def _lba_registers(lba: int, count: int) -> dict[int, int]:
    return {6: DEVICE_LBA | (lba >> 24 & 0x0F), 2: count & 0xFF, 3: lba & 0xFF, 4: lba >> 8 & 0xFF,
            5: lba >> 16 & 0xFF}


def _load_image(rt: GuestRuntime, functions: list[PciFunction]) -> tuple[list[tuple[int, bytes]], HiberHeader, _Ide, int]:
    """The resume loader: find, read and check the hiberfile; HiberfileError says why it cannot be used."""
    ide = _Ide(rt, functions, None)
    disk = ide.sectors()
    if not disk:
        raise HiberfileError("no emulated system disk answers ATA IDENTIFY")
    start, sectors = hiberfile_area(disk)
    ram_size = rt.config.guest.memory_mib << 20
    header = HiberHeader.unpack(ide.read_pio(start), ram_size, sectors * SECTOR)
    ide.scratch_gfn = header.scratch_gfn
    per_command = min(M.ATA_MAX_SECTORS, (header.scratch_pages - 1) * PAGE // SECTOR)
    wanted = -(-header.data_bytes // SECTOR)
    data = bytearray()
    lba = start + 1
    while len(data) < wanted * SECTOR:
        count = min(per_command, wanted - len(data) // SECTOR)
        data += ide.read_dma(lba, count)
        lba += count
    records = unpack_records(bytes(data), header)
    scratch = range(header.scratch_gfn * PAGE, (header.scratch_gfn + header.scratch_pages) * PAGE)
    if any(gpa < scratch.stop and gpa + len(page) > scratch.start for gpa, page in records):
        raise HiberfileError("a record overlaps the loader's scratch pages")
    return records, header, ide, start


def power_on(rt: GuestRuntime, context: MachineContext) -> str:
    """`lifecycle poweron`: see the module docstring; what the console prints."""
    relocate(rt.vcpu, context)
    rt.config.qtest_socket, rt.config.ram_path = context.qtest_socket, context.ram_path
    rt.config.hv_socket, rt.config.domid = context.hv_socket, context.domid
    functions = PciBus(rt.vcpu).assign_resources()  # the firmware step, as at every power-on
    try:
        records, header, ide, start = _load_image(rt, functions)
        fdo = rt.drivers.xenbus.active_fdo if rt.drivers is not None else None
        platform_bar = fdo.platform.hole if fdo is not None and fdo.platform is not None else None
        now = next((b.address >> 12 for f in functions if f.vendor_id == 0x5853 for b in f.bars if b.kind == "mem"),
                   None)
        if platform_bar != now:
            raise HiberfileError(f"the Xen platform device's BAR moved ({platform_bar} -> {now}): this is "
                                 "not the machine that hibernated")
    except HiberfileError as exc:
        return _fresh_boot(rt, str(exc))
    for gpa, page in records:
        rt.vcpu.write_phys(gpa, page)
    rt.vcpu.write_phys(header.scratch_gfn * PAGE, bytes(header.scratch_pages * PAGE))  # free, as they were
    ide.write_pio(start, bytes(SECTOR))  # the hiberfile is used: a second power-on boots afresh
    rt.kernel.log.print("HIBERNATE", f"winresume: {len(records)} records restored from the hiberfile; resuming")
    rt.vcpu.relocation.waiting = None
    with rt.kernel.cpu.lock:
        rt.kernel.power.set_system_state(S0)
    return f"resumed from hibernation: {len(records)} records restored, running in {_where(rt)}"


def _where(rt: GuestRuntime) -> str:
    return f"dom{rt.vcpu.hv.domid}" if rt.vcpu.hv is not None else "no domain"


def _fresh_boot(rt: GuestRuntime, why: str) -> str:
    """No usable hiberfile: Windows starts afresh (the hibernated kernel and drivers are gone)."""
    log.warning("no usable hibernation image: %s", why)
    if rt.drivers is not None:
        try:
            rt.drivers.close()  # the hibernated stack: its threads end, nothing of it talks to the new domain
        except Exception as exc:  # noqa: BLE001 - whatever it was doing is gone with the old machine
            log.info("discarding the hibernated driver stack: %r", exc)
        rt.drivers = None
    registry = Registry.load(rt.config.registry_path)
    rt.kernel = Kernel(registry=registry, seed=rt.config.guest.seed, scheduler=rt.scheduler).activate()
    rt.boots += 1
    rt.kernel.log.print("setup", f"boot {rt.boots}: winload: no usable hibernation image ({why}); "
                                 "starting Windows afresh")
    rt.vcpu.relocation.waiting = None
    rt._start_windows()
    return f"fresh boot (boot {rt.boots}): no usable hibernation image: {why}; running in {_where(rt)}"
