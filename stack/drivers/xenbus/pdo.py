"""XENBUS child PDOs: IDs, capabilities and IRP_MN_QUERY_INTERFACE (XB src/xenbus/pdo.c; reference 2, 3).

IDs (PdoQueryId): DeviceID `XENBUS\\VEN_<PREFIX>&DEV_<CLASS>`, InstanceID "_", HardwareIDs = CompatibleIDs =
`XENBUS\\VEN_<VendorName>&DEV_<CLASS>&REV_%08X` for every revision newest first, then `XENCLASS`; the
MULTI_SZ's bytes (WCHARs, up to XENCLASS's terminator) must stay under REGSTR_VAL_MAX_HCID_LEN, which is an
ASSERT: a checked build stops there (at 13 revisions), a free build returns the whole list (its buffer
holds MAX_DEVICE_ID_LEN WCHARs per revision).

PdoQueryInterface: a status other than NOT_SUPPORTED is completed unchanged; BUS_INTERFACE_STANDARD v1 is
a proxy onto the platform device's config space; the XENBUS interfaces come from the FDO's contexts
(unknown version NOT_SUPPORTED, short buffer BUFFER_OVERFLOW); EMULATED is delegated down the FDO's own
stack to XENFILT; any other GUID is completed here with NOT_SUPPORTED and never forwarded.

Types its parent from fdo.py, which imports this module to create PDOs: the pair mirrors XB's fdo.c and
pdo.c (see driver.py; tests/unit/test_layering.py allows the circle).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.pci import BUS_INTERFACE_STANDARD_SIZE, GUID_BUS_INTERFACE_STANDARD, BusInterfaceStandard
from xenpv.stack.drivers.revision import XENBUS_REVISIONS, newest_first
from xenpv.stack.drivers.xenfilt.emulated import GUID_XENFILT_EMULATED_INTERFACE
from xenpv.stack.kernel import (IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DeviceRelationType, Irp,
                          IoCompleteRequest, IoCreateDevice, IoDeleteDevice)
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.debuglog import DbgLevel
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.kernel.status import (STATUS_BUFFER_TOO_SMALL, STATUS_NOT_SUPPORTED, STATUS_SUCCESS,
                                 status_name)

if TYPE_CHECKING:
    from .fdo import XenbusFdo

log = logging.getLogger("stack.drivers.xenbus.pdo")

XENCLASS = "XENCLASS"
PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters"
XENBUS_PDO_INTERFACES = ("DEBUG", "SUSPEND", "SHARED_INFO", "EVTCHN", "STORE", "RANGE_SET", "CACHE", "GNTTAB",
                         "UNPLUG", "CONSOLE")


REGSTR_VAL_MAX_HCID_LEN = 1024  # pdo.c #define, compared with a length in bytes


def multi_sz_bytes_before_final_terminator(strings: list[str]) -> int:
    """What PdoQueryId compares with REGSTR_VAL_MAX_HCID_LEN: `(ULONG_PTR)Buffer - (ULONG_PTR)Id.Buffer`
    once Buffer is past the last string's terminator, i.e. the WCHARs (2 bytes each) of every string and
    its terminator, without the MULTI_SZ's final one."""
    return 2 * sum(len(s) + 1 for s in strings)


def pdo_device_id(prefix: str, device_class: str) -> str:
    return f"XENBUS\\VEN_{prefix}&DEV_{device_class}"


def pdo_hardware_ids(vendor: str, device_class: str) -> list[str]:
    ids = [f"XENBUS\\VEN_{vendor}&DEV_{device_class}&REV_{revision:08X}"
           for revision in newest_first(XENBUS_REVISIONS)] + [XENCLASS]
    # pdo.c PdoQueryId: ASSERT3U((ULONG_PTR)Buffer - (ULONG_PTR)Id.Buffer, <, REGSTR_VAL_MAX_HCID_LEN)
    ASSERT(multi_sz_bytes_before_final_terminator(ids) < REGSTR_VAL_MAX_HCID_LEN,
           "(ULONG_PTR)Buffer - (ULONG_PTR)Id.Buffer < REGSTR_VAL_MAX_HCID_LEN")
    return ids


@dataclass
class BusProxy:
    """The per-PDO BUS_INTERFACE_STANDARD (bus.c): references count here, work goes to the FDO's."""

    Size: int
    Version: int
    Context: DeviceObject
    target: BusInterfaceStandard
    references: int = 0

    def InterfaceReference(self) -> None:
        self.references += 1

    def InterfaceDereference(self) -> None:
        self.references -= 1

    def GetBusData(self, offset: int, length: int) -> bytes:
        return self.target.GetBusData(offset, length)

    def SetBusData(self, offset: int, data: bytes) -> int:
        return self.target.SetBusData(offset, data)


def PdoQueryBusInterface(params: Any, device: DeviceObject, target: BusInterfaceStandard) -> int:
    """A child PDO's answer to BUS_INTERFACE_STANDARD (XB and XV pdo.c): v1 only, a buffer of at least
    sizeof (BUS_INTERFACE_STANDARD), a proxy referenced once for the caller."""
    if params.version != 1:
        return STATUS_NOT_SUPPORTED
    if params.size < BUS_INTERFACE_STANDARD_SIZE:
        return STATUS_BUFFER_TOO_SMALL
    proxy = BusProxy(BUS_INTERFACE_STANDARD_SIZE, 1, device, target)
    proxy.InterfaceReference()
    params.interface = proxy
    return STATUS_SUCCESS


@dataclass
class XenbusPdo:
    fdo: XenbusFdo
    device: DeviceObject
    device_class: str
    missing: str | None = None

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.fdo.driver.xen.debug_log.print("XENBUS", text, level)

    @property
    def device_id(self) -> str:
        return pdo_device_id(self.fdo.driver.prefix, self.device_class)

    def PdoSetMissing(self, reason: str) -> None:
        self.missing = reason
        self._print(f"PdoSetMissing: {self.device_class}: {reason}")

    def _removable(self) -> bool:
        try:
            return self.fdo.driver.xen.registry.get_dword(f"{PARAMETERS}\\{self.device_class}", "AllowPdoRemove") != 0
        except RegistryError:
            return True

    def PdoQueryId(self, id_type: int) -> Any:
        if id_type == BusQueryIdType.BusQueryDeviceID:
            return self.device_id
        if id_type == BusQueryIdType.BusQueryInstanceID:
            return "_"
        if id_type in (BusQueryIdType.BusQueryHardwareIDs, BusQueryIdType.BusQueryCompatibleIDs):
            return pdo_hardware_ids(self.fdo.vendor_name, self.device_class)
        return None

    def PdoQueryInterface(self, irp: Irp) -> int:
        params = irp.parameters
        if irp.io_status.status != STATUS_NOT_SUPPORTED:
            return irp.io_status.status
        guid = params.interface_type
        if guid == GUID_XENFILT_EMULATED_INTERFACE:
            return self.fdo.delegate(irp)
        if guid == GUID_BUS_INTERFACE_STANDARD:
            status = PdoQueryBusInterface(params, self.device, self.fdo.bus_interface)
            if status != STATUS_SUCCESS:
                return status
            irp.io_status.information = 0
            return STATUS_SUCCESS
        for name in XENBUS_PDO_INTERFACES:
            context: Interface | None = self.fdo.interfaces.get(name)
            if context is None or context.GUID != guid:
                continue
            status, found = context.get_interface(params.version, params.size)
            if found is not None:
                params.interface = found
                irp.io_status.information = 0
            return status
        known = {c.GUID: n for n, c in self.fdo.interfaces.items()}
        if guid not in known:
            self._print(f"PdoQueryInterface: {self.device_class}: {guid} not served "
                        f"(unknown GUID or provider absent)", DbgLevel.TRACE)
        return STATUS_NOT_SUPPORTED

    def dispatch_pnp(self, irp: Irp) -> int:
        minor = irp.minor
        if minor == IRP_MN_PNP.QUERY_ID:
            value = self.PdoQueryId(irp.parameters.id_type)
            if value is not None:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, value
        elif minor == IRP_MN_PNP.QUERY_INTERFACE:
            irp.io_status.status = self.PdoQueryInterface(irp)
            if irp.io_status.status not in (STATUS_SUCCESS, STATUS_NOT_SUPPORTED):
                self._print(f"PdoQueryInterface: {self.device_class}: {irp.parameters.interface_type} "
                            f"v{irp.parameters.version}: {status_name(irp.io_status.status)}", DbgLevel.TRACE)
        elif minor == IRP_MN_PNP.QUERY_CAPABILITIES:
            caps = irp.parameters.capabilities
            caps.removable = self._removable()
            caps.surprise_removal_ok = caps.removable  # pdo.c PdoQueryCapabilities
            caps.unique_id = caps.silent_install = True
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS:
            if irp.parameters.type == DeviceRelationType.TargetDeviceRelation:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, [self.device]
        elif minor in (IRP_MN_PNP.START_DEVICE, IRP_MN_PNP.SURPRISE_REMOVAL, IRP_MN_PNP.STOP_DEVICE,
                       IRP_MN_PNP.QUERY_REMOVE_DEVICE, IRP_MN_PNP.CANCEL_REMOVE_DEVICE):
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.REMOVE_DEVICE:
            irp.io_status.status = STATUS_SUCCESS
            if self.missing is not None:
                IoDeleteDevice(self.device)
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status

    def dispatch_power(self, irp: Irp) -> int:
        irp.io_status.status = STATUS_SUCCESS
        IoCompleteRequest(irp)
        return STATUS_SUCCESS


def PdoCreate(fdo: XenbusFdo, device_class: str) -> DeviceObject:
    device = IoCreateDevice(fdo.device.driver, DeviceKind.PDO, name=pdo_device_id(fdo.driver.prefix, device_class))
    device.extension = XenbusPdo(fdo, device, device_class)
    device.extension._print(f"PdoCreate: {device_class} ({fdo.vendor_name})")
    return device
