"""pci.sys over the real machine: the root bus (`*PNP0A03`) whose child PDOs are the PCI functions found
through 0xCF8/0xCFC on the vCPU, with Windows' PCI IDs, and the BUS_INTERFACE_STANDARD (config space)
their function drivers use.

Every BusRelations query re-reads configuration space, so a function QEMU has ejected (an unplugged NIC)
is simply no longer there. IDs follow Windows: DeviceID `PCI\\VEN_v&DEV_d&SUBSYS_ss&REV_r`, hardware IDs
from most to least specific, compatible IDs by class code; InstanceID `3&0&0&<devfn>` (Windows hashes
the parent's instance path into the middle fields; the model keeps them fixed).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.bus import BusDriver
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DriverObject, Irp,
                          IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice, IoDeleteDevice)
from xenpv.stack.kernel.status import STATUS_BUFFER_TOO_SMALL, STATUS_NOT_SUPPORTED, STATUS_SUCCESS
from xenpv.stack.vcpu.pci import PciBus, PciFunction

log = logging.getLogger("stack.drivers.pci")

GUID_BUS_INTERFACE_STANDARD = uuid.UUID("496B8280-6F25-11D0-BEAF-08002BE2092F")
BUS_INTERFACE_STANDARD_SIZE = 2 + 2 + 4 + 8 * 3 + 8 * 5  # header + 5 routines on x64
PNP0A03_IDS = [r"ACPI\PNP0A03", "*PNP0A03"]
DEVICE_TEXT_DESCRIPTION = 0
DEVICE_TEXT_LOCATION_INFORMATION = 1


@dataclass
class QueryDeviceTextParameters:
    """IRP_MN_QUERY_DEVICE_TEXT: DeviceTextDescription 0 / DeviceTextLocationInformation 1."""

    text_type: int
    locale: int = 0x409


@dataclass
class BusInterfaceStandard:
    """BUS_INTERFACE_STANDARD v1: what XENBUS reads its platform device's IDs through."""

    Size: int
    Version: int
    Context: Any
    bus: PciBus
    function: PciFunction
    references: int = 0

    def InterfaceReference(self) -> None:
        self.references += 1

    def InterfaceDereference(self) -> None:
        self.references -= 1

    def GetBusData(self, offset: int, length: int) -> bytes:
        f = self.function
        return bytes(self.bus.read(f.slot, f.function, offset + i, 1) for i in range(length))

    def SetBusData(self, offset: int, data: bytes) -> int:
        f = self.function
        for i, byte in enumerate(data):
            self.bus.write(f.slot, f.function, offset + i, byte, 1)
        return len(data)


def pci_ids(f: PciFunction) -> tuple[str, list[str], list[str]]:
    ven, dev = f"VEN_{f.vendor_id:04X}", f"DEV_{f.device_id:04X}"
    subsys = f"SUBSYS_{f.subsystem_id:04X}{f.subsystem_vendor_id:04X}"
    rev, cc = f"REV_{f.revision:02X}", f"CC_{f.class_code:06X}"
    base = f"PCI\\{ven}&{dev}"
    device_id = f"{base}&{subsys}&{rev}"
    hardware = [device_id, f"{base}&{subsys}", f"{base}&{cc}", f"{base}&{cc[:7]}"]
    compatible = [f"{base}&{rev}", base, f"PCI\\{ven}&{cc}", f"PCI\\{ven}&{cc[:7]}", f"PCI\\{ven}",
                  f"PCI\\{cc}", f"PCI\\{cc[:7]}"]
    return device_id, hardware, compatible


@dataclass
class PciPdo:
    function: PciFunction
    present: bool = True

    @property
    def devfn(self) -> int:
        return self.function.slot << 3 | self.function.function


@dataclass
class PciFdo:
    lower: DeviceObject
    bus: PciBus
    children: dict[tuple[int, int, int], DeviceObject] = field(default_factory=dict)


class PciDriver(BusDriver):
    """The PCI bus driver for one machine: `bus` is configuration space through the vCPU."""

    def __init__(self, bus: PciBus) -> None:
        self.bus = bus

    def driver_entry(self, driver: DriverObject, registry_path: str) -> int:
        driver.major_function[IRP_MJ.PNP] = self.dispatch_pnp
        driver.major_function[IRP_MJ.POWER] = self.dispatch_power
        driver.add_device = self.add_device
        return STATUS_SUCCESS

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        fdo = IoCreateDevice(driver, DeviceKind.FDO, name="PCI bus 0")
        fdo.extension = PciFdo(IoAttachDeviceToDeviceStack(fdo, pdo), self.bus)
        return STATUS_SUCCESS

    def _enumerate(self, fdo: DeviceObject) -> list[DeviceObject]:
        ext: PciFdo = fdo.extension
        # A rescan reads IDs; only a function not seen before is read whole (its BARs sized), as the PCI
        # driver does not size the BARs of devices it already has.
        present = ext.bus.present_functions()
        found = {(vendor, slot, fn) for slot, fn, vendor in present}
        for key in list(ext.children):
            if key not in found:
                gone = ext.children.pop(key)
                gone.extension.present = False
                log.info("PCI %s is gone", gone.extension.function)
        for slot, fn, vendor in present:
            if (vendor, slot, fn) not in ext.children:
                function = ext.bus.function(slot, fn)
                ext.children[vendor, slot, fn] = IoCreateDevice(fdo.driver, DeviceKind.PDO, PciPdo(function),
                                                                name=function.bdf)
        return list(ext.children.values())

    def _pdo_pnp(self, device: DeviceObject, irp: Irp) -> int:
        ext: PciPdo = device.extension
        f = ext.function
        minor = irp.minor
        if minor == IRP_MN_PNP.QUERY_ID:
            device_id, hardware, compatible = pci_ids(f)
            ids: dict[int, Any] = {BusQueryIdType.BusQueryDeviceID: device_id,
                                   BusQueryIdType.BusQueryInstanceID: f"3&0&0&{ext.devfn:02X}",
                                   BusQueryIdType.BusQueryHardwareIDs: hardware,
                                   BusQueryIdType.BusQueryCompatibleIDs: compatible}
            if irp.parameters.id_type in ids:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, ids[irp.parameters.id_type]
        elif minor == IRP_MN_PNP.QUERY_DEVICE_TEXT:
            if irp.parameters.text_type == DEVICE_TEXT_LOCATION_INFORMATION:
                irp.io_status.status = STATUS_SUCCESS
                irp.io_status.information = f"PCI bus {f.bus}, device {f.slot}, function {f.function}"
        elif minor == IRP_MN_PNP.QUERY_INTERFACE and irp.parameters.interface_type == GUID_BUS_INTERFACE_STANDARD:
            params = irp.parameters
            if params.version != 1:
                irp.io_status.status = STATUS_NOT_SUPPORTED
            elif params.size < BUS_INTERFACE_STANDARD_SIZE:
                irp.io_status.status = STATUS_BUFFER_TOO_SMALL
            else:
                params.interface = BusInterfaceStandard(BUS_INTERFACE_STANDARD_SIZE, 1, device, self.bus, f)
                params.interface.InterfaceReference()
                irp.io_status.status = STATUS_SUCCESS
        elif minor in (IRP_MN_PNP.START_DEVICE, IRP_MN_PNP.QUERY_CAPABILITIES, IRP_MN_PNP.SURPRISE_REMOVAL,
                       IRP_MN_PNP.STOP_DEVICE, IRP_MN_PNP.QUERY_REMOVE_DEVICE, IRP_MN_PNP.CANCEL_REMOVE_DEVICE):
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.REMOVE_DEVICE:
            irp.io_status.status = STATUS_SUCCESS
            if not ext.present:
                IoDeleteDevice(device)
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status
