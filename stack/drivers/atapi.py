"""The emulated IDE path Windows boots from: the PCI IDE controller (pciide) with its two channels, and
each channel's disks (atapi), found by ATA IDENTIFY DEVICE through the vCPU's port I/O on the real QEMU.

This is what XENFILT filters on the IDE side and what unplug must make vanish. QEMU's own Xen unplug
unparents the ide-hd device, so a real guest finds no disk there; the harness's unplug (xenhv over QMP)
can only `drive_del` the drive, and QEMU 7.2's ide-hd then still answers IDENTIFY DEVICE from the data it
built at realize (status 0x50, DRQ, the same model string) while every read fails for want of a medium
(READ SECTORS: status 0x41 DRDY|ERR, error 0x04 ABRT, from -ENOMEDIUM under rerror=report). A disk is
therefore reported only if IDENTIFY answers and sector 0 can be read, which is what the guest sees after
QEMU's own unplug: no disk at that position. Channel PDOs carry the hardware ID
`Internal_IDE_Channel`; disk PDOs are `IDE\\Disk<model>` with InstanceID "C.T.0" (channel, target, lun),
the form XENFILT's IsDiskPresent parses. Only ATA disks are reported: ATAPI devices (the CD-ROM) abort
IDENTIFY DEVICE and are not disks.

Timing, as atapi's WaitOnBusy: after a command the status register is polled, with short sleeps, until BSY
clears, for up to BUSY_WAIT_SECONDS (scaled, stack.timescale). QEMU's READ SECTORS is asynchronous and
stays BSY while its host I/O runs, which on a loaded host takes longer than any fixed number of reads; a
drive still BSY at the deadline means the harness fell behind (HarnessTooSlow), never "no disk", which
would end the boot in INACCESSIBLE_BOOT_DEVICE. Before each command the channel must be neither BSY nor
DRQ, because QEMU ignores a command (and a device select) written while it is.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from xenpv.stack.drivers.bus import BusDriver
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DriverObject, Irp,
                          IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice, IoDeleteDevice)
from xenpv.stack.kernel.status import STATUS_SUCCESS
from xenpv.stack.timescale import HarnessTooSlow, scaled

log = logging.getLogger("stack.drivers.atapi")

IDE_CHANNEL_ID = "Internal_IDE_Channel"
CHANNEL_PORTS = ((0x1F0, 0x3F6), (0x170, 0x376))
ATA_IDENTIFY_DEVICE = 0xEC
ATA_READ_SECTORS = 0x20
DEVICE_LBA = 0x40
STATUS_ERR, STATUS_DRQ, STATUS_BSY = 0x01, 0x08, 0x80
SECTOR_WORDS = 256
FLOATING_BUS = 0xFF
# atapi's WaitOnBusy: 20000 polls 150 us apart.
BUSY_WAIT_SECONDS = 3.0
BUSY_POLL_SECONDS = 0.001


class PortIO(Protocol):
    def inb(self, port: int) -> int: ...
    def inw(self, port: int) -> int: ...
    def outb(self, port: int, value: int) -> None: ...


def _wait_not_busy(io: PortIO, channel: int, target: int, during: str, idle: bool = False) -> int:
    """Poll the status register until BSY is clear (with `idle`, DRQ too: a transfer an earlier command
    left is drained); returns the status. HarnessTooSlow when BSY outlasts BUSY_WAIT_SECONDS (scaled)."""
    base, _ = CHANNEL_PORTS[channel]
    timeout = scaled(BUSY_WAIT_SECONDS)
    deadline = time.monotonic() + timeout
    while True:
        status = io.inb(base + 7)
        if status == FLOATING_BUS:
            return status  # no controller answers there: nothing to wait for
        busy = status & STATUS_BSY
        if not busy and not (idle and status & STATUS_DRQ):
            return status
        if not busy:
            log.warning("IDE %d: a transfer nobody read (status %#04x) %s: drained", channel, status, during)
            _drain(io, base)
        if time.monotonic() >= deadline:
            raise HarnessTooSlow(f"IDE {channel}.{target} still busy (status {status:#04x}) {during}", timeout)
        if busy:
            time.sleep(BUSY_POLL_SECONDS)


def _drain(io: PortIO, base: int) -> None:
    for _ in range(SECTOR_WORDS):
        io.inw(base)


def _command(io: PortIO, channel: int, target: int, command: int, registers: dict[int, int], what: str) -> int:
    """Select `target`, load the task file `registers` {offset: value}, write `command` and wait until the
    drive has taken it (BSY clear); returns the status."""
    base, _ = CHANNEL_PORTS[channel]
    _wait_not_busy(io, channel, target, f"before {what}", idle=True)
    io.outb(base + 6, 0xA0 | registers.get(6, 0) | target << 4)
    for offset, value in registers.items():
        if offset != 6:
            io.outb(base + offset, value)
    io.outb(base + 7, command)
    return _wait_not_busy(io, channel, target, f"after {what}")


def ata_identify(io: PortIO, channel: int, target: int) -> str | None:
    """The model string of the ATA disk at (channel, target), or None if there is none."""
    base, _ = CHANNEL_PORTS[channel]
    _wait_not_busy(io, channel, target, "before selecting a drive", idle=True)
    io.outb(base + 6, 0xA0 | target << 4)
    if io.inb(base + 7) in (0x00, FLOATING_BUS):
        return None
    status = _command(io, channel, target, ATA_IDENTIFY_DEVICE, {}, "IDENTIFY DEVICE")
    if status & STATUS_ERR or not status & STATUS_DRQ:
        return None
    words = [io.inw(base) for _ in range(SECTOR_WORDS)]
    raw = b"".join(w.to_bytes(2, "big") for w in words[27:47])
    return raw.decode("ascii", "replace").strip() or "UNKNOWN"


def ata_has_medium(io: PortIO, channel: int, target: int) -> bool:
    """True if a PIO READ SECTORS of LBA 0 at (channel, target) transfers data.

    The drive's IDENTIFY data outlives its medium (see the module docstring), so only a read tells a
    detached drive from a disk.
    """
    base, _ = CHANNEL_PORTS[channel]
    # Sector count 1, LBA 0.
    status = _command(io, channel, target, ATA_READ_SECTORS, {6: DEVICE_LBA, 2: 1, 3: 0, 4: 0, 5: 0},
                      "READ SECTORS")
    if status & STATUS_ERR or not status & STATUS_DRQ:
        log.info("IDE %d.%d: IDENTIFY answers but READ SECTORS fails (status %#04x, error %#04x): "
                 "no medium", channel, target, status, io.inb(base + 1))
        return False
    _drain(io, base)  # so the drive leaves DRQ
    return True


@dataclass
class ChildPdo:
    device_id: str
    channel: int | None
    instance_id: str
    hardware_ids: list[str]
    compatible_ids: list[str]
    present: bool = True


@dataclass
class BusFdo:
    lower: DeviceObject
    channel: int | None = None  # None: the controller
    children: dict[str, DeviceObject] = field(default_factory=dict)


class AtapiDriver(BusDriver):
    """Services PCIIDE (controller -> channels) and ATAPI (channel -> disks), one image."""

    def __init__(self, io: PortIO) -> None:
        self.io = io

    def pciide_entry(self, driver: DriverObject, registry_path: str) -> int:
        self._entry(driver)
        driver.add_device = lambda drv, pdo: self._add(drv, pdo, None)
        return STATUS_SUCCESS

    def atapi_entry(self, driver: DriverObject, registry_path: str) -> int:
        self._entry(driver)
        driver.add_device = lambda drv, pdo: self._add(drv, pdo, pdo.extension.channel)
        return STATUS_SUCCESS

    def _entry(self, driver: DriverObject) -> None:
        driver.major_function[IRP_MJ.PNP] = self.dispatch_pnp
        driver.major_function[IRP_MJ.POWER] = self.dispatch_power

    def _add(self, driver: DriverObject, pdo: DeviceObject, channel: int | None) -> int:
        fdo = IoCreateDevice(driver, DeviceKind.FDO, name=driver.name)
        fdo.extension = BusFdo(IoAttachDeviceToDeviceStack(fdo, pdo), channel)
        return STATUS_SUCCESS

    def _enumerate(self, fdo: DeviceObject) -> list[DeviceObject]:
        ext: BusFdo = fdo.extension
        wanted: dict[str, ChildPdo] = {}
        if ext.channel is None:
            for channel in (0, 1):
                wanted[str(channel)] = ChildPdo(r"PCIIDE\IDEChannel", channel, str(channel), [IDE_CHANNEL_ID],
                                                ["*PNP0600"])
        else:
            for target in (0, 1):
                model = ata_identify(self.io, ext.channel, target)
                if model is not None and ata_has_medium(self.io, ext.channel, target):
                    name = "Disk" + model.replace(" ", "_")
                    instance = f"{ext.channel}.{target}.0"
                    wanted[instance] = ChildPdo(f"IDE\\{name}", ext.channel, instance, [f"IDE\\{name}", name, "GenDisk"],
                                                ["GenDisk"])
        for key in list(ext.children):
            if key not in wanted:
                ext.children.pop(key).extension.present = False
        for key, spec in wanted.items():
            if key not in ext.children:
                pdo = IoCreateDevice(fdo.driver, DeviceKind.PDO, spec, name=f"{spec.device_id}\\{key}")
                ext.children[key] = pdo
        return list(ext.children.values())

    def _pdo_pnp(self, device: DeviceObject, irp: Irp) -> int:
        ext: ChildPdo = device.extension
        minor = irp.minor
        if minor == IRP_MN_PNP.QUERY_ID:
            ids: dict[int, Any] = {BusQueryIdType.BusQueryDeviceID: ext.device_id,
                                   BusQueryIdType.BusQueryInstanceID: ext.instance_id,
                                   BusQueryIdType.BusQueryHardwareIDs: ext.hardware_ids,
                                   BusQueryIdType.BusQueryCompatibleIDs: ext.compatible_ids}
            if irp.parameters.id_type in ids:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, ids[irp.parameters.id_type]
        elif minor in (IRP_MN_PNP.START_DEVICE, IRP_MN_PNP.QUERY_CAPABILITIES, IRP_MN_PNP.SURPRISE_REMOVAL):
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.REMOVE_DEVICE:
            irp.io_status.status = STATUS_SUCCESS
            if not ext.present:
                IoDeleteDevice(device)
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status
