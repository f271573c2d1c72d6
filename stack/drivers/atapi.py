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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from xenpv.stack.drivers.bus import BusDriver
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DriverObject, Irp,
                          IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice, IoDeleteDevice)
from xenpv.stack.kernel.status import STATUS_SUCCESS

log = logging.getLogger("stack.drivers.atapi")

IDE_CHANNEL_ID = "Internal_IDE_Channel"
CHANNEL_PORTS = ((0x1F0, 0x3F6), (0x170, 0x376))
ATA_IDENTIFY_DEVICE = 0xEC
ATA_READ_SECTORS = 0x20
DEVICE_LBA = 0x40
STATUS_ERR, STATUS_DRQ, STATUS_BSY = 0x01, 0x08, 0x80
_POLLS = 100


class PortIO(Protocol):
    def inb(self, port: int) -> int: ...
    def inw(self, port: int) -> int: ...
    def outb(self, port: int, value: int) -> None: ...


def ata_identify(io: PortIO, channel: int, target: int) -> str | None:
    """The model string of the ATA disk at (channel, target), or None if there is none."""
    base, _ = CHANNEL_PORTS[channel]
    io.outb(base + 6, 0xA0 | target << 4)
    if io.inb(base + 7) in (0x00, 0xFF):
        return None
    io.outb(base + 7, ATA_IDENTIFY_DEVICE)
    for _ in range(_POLLS):
        status = io.inb(base + 7)
        if status & STATUS_BSY:
            continue
        if status & STATUS_ERR or not status & STATUS_DRQ:
            return None
        words = [io.inw(base) for _ in range(256)]
        raw = b"".join(w.to_bytes(2, "big") for w in words[27:47])
        return raw.decode("ascii", "replace").strip() or "UNKNOWN"
    return None


def ata_has_medium(io: PortIO, channel: int, target: int) -> bool:
    """True if a PIO READ SECTORS of LBA 0 at (channel, target) transfers data.

    The drive's IDENTIFY data outlives its medium (see the module docstring), so only a read tells a
    detached drive from a disk.
    """
    base, _ = CHANNEL_PORTS[channel]
    io.outb(base + 6, 0xA0 | DEVICE_LBA | target << 4)
    io.outb(base + 2, 1)  # sector count
    for port in (base + 3, base + 4, base + 5):  # LBA 0
        io.outb(port, 0)
    io.outb(base + 7, ATA_READ_SECTORS)
    for _ in range(_POLLS):
        status = io.inb(base + 7)
        if status & STATUS_BSY:
            continue
        if status & STATUS_ERR or not status & STATUS_DRQ:
            log.info("IDE %d.%d: IDENTIFY answers but READ SECTORS fails (status %#04x, error %#04x): "
                     "no medium", channel, target, status, io.inb(base + 1))
            return False
        for _ in range(256):  # drain the sector so the drive leaves DRQ
            io.inw(base)
        return True
    return False


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
