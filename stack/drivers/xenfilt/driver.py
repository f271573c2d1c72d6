"""xenfilt.sys: the UpperFilter on the PCI bus and the IDE channels (XB src/xenfilt/driver.c, fdo.c, pdo.c;
reference windows-pv-drivers.md 0, 2, 4, 6).

- AddDevice attaches only where `Services\\XENFILT\\Parameters` maps one of the device's hardware IDs to a
  type: `*PNP0A03` -> "PCI", `Internal_IDE_Channel` -> "IDE" (it is a class filter, so it is offered
  every System and HDC device).
- Each filter FDO puts a filter "PDO" on top of every child PDO the bus reports, before the PnP manager
  sees it, so XENFILT sits right above each emulated device: that is where it answers EMULATED queries
  (then always passes them down) and reports the stored ActiveInstanceID for the active device.
- Until unplug has been decided the FDOs report no children and ask to be enumerated again
  (ENABLED -> PENDING -> DISABLED, DriverSetFilterState): once every filter FDO has enumerated, unplug
  runs if the active platform device is present (not in safe mode), and only then are the real children
  exposed, so unplugged devices vanish before any driver binds to them.
- A XenTouch mismatch or a machine without Xen leaves DriverEntry successful but without AddDevice, so
  the PnP manager skips the filter (6816d05, 080720a).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

from xenpv.stack.drivers.pci import DEVICE_TEXT_LOCATION_INFORMATION
from xenpv.stack.drivers.xen import PACKAGE_VERSION, Xen
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DeviceRelationType,
                          DriverObject, Irp, IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice,
                          IoDeleteDevice, IoDetachDevice, IoGetAttachedDevice, IoInvalidateDeviceRelations,
                          IoSynchronousCallDriver, QueryIdParameters, forward)
from xenpv.stack.kernel.debuglog import DbgLevel
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_NOT_SUPPORTED, STATUS_SUCCESS

from .emulated import Emulated, EmulatedDevice, EmulatedDisk, EmulatedStatus

log = logging.getLogger("stack.drivers.xenfilt")

PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENFILT\Parameters"
PRECEDENCE = PARAMETERS + r"\Precedence"
CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"
DEFAULT_TYPES = {"*PNP0A03": "PCI", "Internal_IDE_Channel": "IDE"}


class FilterState(Enum):
    ENABLED = "enabled"
    PENDING = "pending"
    DISABLED = "disabled"


@dataclass
class FilterFdo:
    lower: DeviceObject
    pdo: DeviceObject
    type: str  # "PCI" or "IDE"
    enumerated: bool = False
    children: dict[DeviceObject, DeviceObject] = field(default_factory=dict)  # child PDO -> filter PDO


@dataclass
class FilterPdo:
    lower: DeviceObject
    fdo: DeviceObject
    device_id: str
    instance_id: str
    emulated: EmulatedDevice | EmulatedDisk | None


def _query_id(device: DeviceObject, id_type: BusQueryIdType) -> object:
    irp = Irp.pnp(IRP_MN_PNP.QUERY_ID, QueryIdParameters(id_type))
    status = IoSynchronousCallDriver(device, irp)
    return irp.io_status.information if NT_SUCCESS(status) else None


class XenfiltDriver:
    def __init__(self, xen: Xen, version: tuple[int, int, int, int] = PACKAGE_VERSION) -> None:
        self.xen = xen
        self.version = version
        self.state = FilterState.ENABLED
        self.fdos: list[DeviceObject] = []
        self.emulated = Emulated()
        self.unplugged_mask = 0

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.xen.debug_log.print("XENFILT", text, level)

    # -- DriverEntry / AddDevice ---------------------------------------------------------------

    def driver_entry(self, driver: DriverObject, registry_path: str) -> int:
        status = self.xen.XenTouch("XENFILT", *self.version)
        if not NT_SUCCESS(status):
            return STATUS_SUCCESS  # loaded but inert: no AddDevice, as xenfilt's DriverEntry "done" path
        if not self.xen.is_xen:
            self._print("DriverEntry: not running on Xen: no filtering")
            return STATUS_SUCCESS
        driver.major_function[IRP_MJ.PNP] = self.dispatch_pnp
        driver.major_function[IRP_MJ.POWER] = self.dispatch_power
        driver.add_device = self.add_device
        driver.extension = self
        return STATUS_SUCCESS

    def _type_of(self, hardware_ids: list[str]) -> str | None:
        types: dict[str, str] = {}
        try:
            for value in self.xen.registry.values(PARAMETERS):
                if isinstance(value.data, str):
                    types[value.name.upper()] = value.data.upper()
        except RegistryError:
            types = {k.upper(): v for k, v in DEFAULT_TYPES.items()}
        for hardware_id in hardware_ids:
            if hardware_id.upper() in types and types[hardware_id.upper()] in ("PCI", "IDE"):
                return types[hardware_id.upper()]
        return None

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        hardware_ids = _query_id(IoGetAttachedDevice(pdo), BusQueryIdType.BusQueryHardwareIDs) or []
        kind = self._type_of(list(hardware_ids))  # type: ignore[arg-type]
        if kind is None:
            return STATUS_SUCCESS
        fdo = IoCreateDevice(driver, DeviceKind.FILTER, name=f"XENFILT {kind}")
        fdo.extension = FilterFdo(IoAttachDeviceToDeviceStack(fdo, pdo), pdo, kind)
        self.fdos.append(fdo)
        self._print(f"FdoCreate: {kind} filter on {pdo!r}")
        return STATUS_SUCCESS

    # -- dispatch ------------------------------------------------------------------------------

    def dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        return forward(irp, device.extension.lower)

    def dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        if isinstance(device.extension, FilterPdo):
            return self._pdo_pnp(device, irp)
        ext: FilterFdo = device.extension
        if irp.minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS and irp.parameters.type == DeviceRelationType.BusRelations:
            return self.FdoQueryDeviceRelations(device, irp)
        if irp.minor == IRP_MN_PNP.REMOVE_DEVICE:
            status = forward(irp, ext.lower)
            IoDetachDevice(ext.lower)
            IoDeleteDevice(device)
            self.fdos.remove(device)
            return status
        return forward(irp, ext.lower)

    def FdoQueryDeviceRelations(self, fdo: DeviceObject, irp: Irp) -> int:
        ext: FilterFdo = fdo.extension
        status = IoSynchronousCallDriver(ext.lower, irp)
        if NT_SUCCESS(status):
            self.FdoEnumerate(fdo, list(irp.io_status.information or []))
            ext.enumerated = True
            self.DriverSetFilterState()
            if self.state != FilterState.DISABLED:
                irp.io_status.information = []
        IoCompleteRequest(irp)
        return status

    def FdoEnumerate(self, fdo: DeviceObject, relations: list[DeviceObject]) -> None:
        ext: FilterFdo = fdo.extension
        for child in list(ext.children):
            if child not in relations:
                self._pdo_gone(ext, child)
        for child in relations:
            if child in ext.children:
                continue
            device_id = str(_query_id(child, BusQueryIdType.BusQueryDeviceID) or "")
            instance_id = str(_query_id(child, BusQueryIdType.BusQueryInstanceID) or "")
            emulated: EmulatedDevice | EmulatedDisk | None = None
            if ext.type == "PCI":
                emulated = EmulatedDevice(device_id, instance_id)
                self.emulated.devices.append(emulated)
            else:
                parts = instance_id.split(".")
                if len(parts) == 3 and all(p.isdigit() for p in parts):
                    emulated = EmulatedDisk(*(int(p) for p in parts))
                    self.emulated.disks.append(emulated)
            filter_pdo = IoCreateDevice(fdo.driver, DeviceKind.FILTER,
                                        FilterPdo(child, fdo, device_id, instance_id, emulated),
                                        name=f"XENFILT {device_id}\\{instance_id}")
            IoAttachDeviceToDeviceStack(filter_pdo, child)
            ext.children[child] = filter_pdo
        if ext.type == "PCI":
            self._apply_precedence()

    def _pdo_gone(self, ext: FilterFdo, child: DeviceObject) -> None:
        filter_pdo = ext.children.pop(child)
        self._forget(filter_pdo.extension)
        if child.device_node is None:
            # The PnP manager never saw it (it vanished while gated): nobody will send it REMOVE_DEVICE.
            IoDetachDevice(child)
            IoDeleteDevice(filter_pdo)

    def _forget(self, pdo_ext: FilterPdo) -> None:
        if isinstance(pdo_ext.emulated, EmulatedDevice) and pdo_ext.emulated in self.emulated.devices:
            self.emulated.devices.remove(pdo_ext.emulated)
        elif isinstance(pdo_ext.emulated, EmulatedDisk) and pdo_ext.emulated in self.emulated.disks:
            self.emulated.disks.remove(pdo_ext.emulated)
        pdo_ext.emulated = None

    def _apply_precedence(self) -> None:
        try:
            values = {v.name.upper(): v.data for v in self.xen.registry.values(PRECEDENCE) if isinstance(v.data, int)}
        except RegistryError:
            values = {}
        devices = self.emulated.devices
        for device in devices:
            device.status = EmulatedStatus.NEUTRAL
        if not values:
            return
        ranked = [(max((p for prefix, p in values.items() if d.device_id.upper().startswith(prefix)), default=-1), d)
                  for d in devices]
        best = max(ranked, key=lambda rd: rd[0], default=None)
        if best is None or best[0] < 0:
            return
        for _, device in ranked:
            device.status = (EmulatedStatus.FORCE_ACTIVATED if device is best[1]
                             else EmulatedStatus.FORCE_DEACTIVATED)
        self._print(f"FdoEnumerate: {best[1].device_id} FORCE_ACTIVATED (precedence {best[0]:#x})")

    # -- the gate ------------------------------------------------------------------------------

    def _safe_mode(self) -> bool:
        try:
            return "SAFEBOOT" in self.xen.registry.get_sz(CONTROL_KEY, "SystemStartOptions").upper()
        except RegistryError:
            return False

    def DriverIsActivePresent(self) -> bool:
        present, _ = self.emulated.EmulatedIsDevicePresent(None, None)
        if present:
            return True
        active = self.xen.config.ConfigGetActive()
        return active is not None and self.emulated.EmulatedIsDevicePresent(active.device_id, None)[0]

    def DriverSetFilterState(self) -> None:
        if self.state != FilterState.ENABLED or not all(f.extension.enumerated for f in self.fdos):
            return
        self.state = FilterState.PENDING
        if self.DriverIsActivePresent() and not self._safe_mode():
            self.unplugged_mask = self.xen.unplug.UnplugDevices()
        else:
            self._print("DriverSetFilterState: no active device present: nothing unplugged")
        self.state = FilterState.DISABLED
        self._print("DriverSetFilterState: DISABLED: exposing emulated devices")
        for fdo in self.fdos:
            IoInvalidateDeviceRelations(fdo.extension.pdo)

    # -- the filter PDO ------------------------------------------------------------------------

    def _active_override(self, ext: FilterPdo) -> tuple[str | None, str | None]:
        active = self.xen.config.ConfigGetActive()
        if active is None or active.device_id.upper() != ext.device_id.upper():
            return None, None
        return active.instance_id, active.location_information

    def _pdo_pnp(self, device: DeviceObject, irp: Irp) -> int:
        ext: FilterPdo = device.extension
        minor = irp.minor
        if minor == IRP_MN_PNP.QUERY_INTERFACE and irp.parameters.interface_type == Emulated.GUID:
            if irp.io_status.status == STATUS_NOT_SUPPORTED:
                params = irp.parameters
                status, found = self.emulated.get_interface(params.version, params.size)
                irp.io_status.status = status
                if found is not None:
                    params.interface = found
            return forward(irp, ext.lower)  # always down to the PCI PDO (xenfilt pdo.c)
        if minor in (IRP_MN_PNP.QUERY_ID, IRP_MN_PNP.QUERY_DEVICE_TEXT):
            status = IoSynchronousCallDriver(ext.lower, irp)
            instance_id, location = self._active_override(ext)
            if (minor == IRP_MN_PNP.QUERY_ID and irp.parameters.id_type == BusQueryIdType.BusQueryInstanceID
                    and instance_id):
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, instance_id
            elif (minor == IRP_MN_PNP.QUERY_DEVICE_TEXT and location
                  and irp.parameters.text_type == DEVICE_TEXT_LOCATION_INFORMATION):
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, location
            status = irp.io_status.status
            IoCompleteRequest(irp)
            return status
        if minor == IRP_MN_PNP.REMOVE_DEVICE:
            status = forward(irp, ext.lower)
            self._forget(ext)
            fdo_ext: FilterFdo = ext.fdo.extension
            fdo_ext.children.pop(ext.lower, None)
            IoDetachDevice(ext.lower)
            IoDeleteDevice(device)
            return status
        return forward(irp, ext.lower)
