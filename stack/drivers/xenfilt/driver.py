"""xenfilt.sys: the UpperFilter on the PCI bus and the IDE channels (XB src/xenfilt/driver.c, fdo.c, pdo.c;
reference windows-pv-drivers.md 0, 2, 4, 6).

- AddDevice (DriverAddDevice) attaches only where `Services\\XENFILT\\Parameters` maps one of the
  device's hardware IDs, or failing that one of its compatible IDs, to a type (DriverGetEmulatedType:
  `_strnicmp(Data, "PCI"|"IDE", strlen(Data))`, first ID with a type wins). Without the Parameters key
  nothing attaches (fail1: UNKNOWN). It is a class filter, so it is offered every System and HDC device.
- Each filter FDO puts a filter "PDO" on top of every new child PDO the bus reports (PdoCreate), before
  the PnP manager sees it, so XENFILT sits right above each emulated device: that is where it answers
  EMULATED queries (then always passes them down) and reports the stored ActiveInstanceID for the
  active device. PdoSetDeviceInformation decides at creation: a FORCE_(DE)ACTIVATED PDO keeps the real
  InstanceID and location; a NEUTRAL one whose DeviceID is ActiveDeviceID (stricmp) takes
  ActiveInstanceID - and if that value is missing PdoCreate fails (fail2), so the device is not
  reported at all until a later pass creates it; so does a child whose bus answers no DeviceID (fail1).
- Precedence (FdoEnumerate, DriverGetPrecedence): for each PDO new in this pass, the DWORD under
  `Parameters\\Precedence` named by the first of its CompatibleIDs that has one (an exact value name);
  the highest (first on a tie) is FORCE_ACTIVATED and every other new PDO FORCE_DEACTIVATED. PDOs of
  earlier passes keep their status. No value above 0: all NEUTRAL.
- The gate (FdoQueryDeviceRelations, DriverSetFilterState): a pass whose lower BusRelations are empty
  does not enumerate, so that FDO never counts as enumerated; when every filter FDO has enumerated the
  state goes ENABLED -> PENDING (unplug, if the active platform device is present and this is not safe
  mode); the next enumeration of any FDO moves it PENDING -> DISABLED. Until DISABLED every FDO reports
  no children and asks to be enumerated again, so unplugged devices vanish before any driver binds.
- A XenTouch mismatch or a machine without Xen leaves DriverEntry successful but without AddDevice, so
  the PnP manager skips the filter (6816d05, 080720a).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

from xenpv.stack.drivers.pci import DEVICE_TEXT_LOCATION_INFORMATION, QueryDeviceTextParameters
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
    """What PdoSetDeviceInformation fixed at creation: the IDs and location this filter PDO reports."""

    lower: DeviceObject
    fdo: DeviceObject
    device_id: str
    instance_id: str | None
    location: str | None
    active: bool
    force_activate: EmulatedStatus
    emulated: EmulatedDevice | EmulatedDisk | None


def _strnicmp_equal(a: str, b: str, n: int) -> bool:
    """`_strnicmp(a, b, n) == 0`: at most n characters, the end of either string (its NUL) included."""
    for i in range(n):
        ca = a[i].upper() if i < len(a) else "\0"
        cb = b[i].upper() if i < len(b) else "\0"
        if ca != cb:
            return False
        if ca == "\0":
            return True
    return True


def _query_id(device: DeviceObject, id_type: BusQueryIdType) -> object:
    irp = Irp.pnp(IRP_MN_PNP.QUERY_ID, QueryIdParameters(id_type))
    status = IoSynchronousCallDriver(device, irp)
    return irp.io_status.information if NT_SUCCESS(status) else None


def _device_text(device: DeviceObject) -> str | None:
    """DriverQueryDeviceText(DeviceTextLocationInformation); None if the bus does not answer."""
    irp = Irp.pnp(IRP_MN_PNP.QUERY_DEVICE_TEXT, QueryDeviceTextParameters(DEVICE_TEXT_LOCATION_INFORMATION))
    status = IoSynchronousCallDriver(device, irp)
    return str(irp.io_status.information) if NT_SUCCESS(status) and irp.io_status.information else None


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

    def _parameters(self) -> dict[str, object] | None:
        try:
            return {v.name.upper(): v.data for v in self.xen.registry.values(PARAMETERS)}
        except RegistryError:
            return None

    def DriverGetEmulatedType(self, ids: list[str]) -> str | None:
        """The type of the first ID whose Parameters value says PCI or IDE (XB xenfilt driver.c)."""
        parameters = self._parameters()
        if parameters is None:
            self._print("DriverGetEmulatedType: no Parameters key: fail1", DbgLevel.ERROR)
            return None
        for device_id in ids:
            data = parameters.get(device_id.upper())
            if not isinstance(data, str):
                continue
            for kind in ("PCI", "IDE"):
                if _strnicmp_equal(data, kind, len(data)):
                    return kind
        return None

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        """DriverAddDevice: hardware IDs first, then compatible IDs."""
        top = IoGetAttachedDevice(pdo)
        kind = self.DriverGetEmulatedType(list(_query_id(top, BusQueryIdType.BusQueryHardwareIDs) or []))  # type: ignore[call-overload]
        if kind is None:
            kind = self.DriverGetEmulatedType(list(_query_id(top, BusQueryIdType.BusQueryCompatibleIDs) or []))  # type: ignore[call-overload]
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
            relations = list(irp.io_status.information or [])
            if relations:
                # `if (Relations->Count != 0) FdoEnumerate(...)`: an empty bus never counts as enumerated.
                self.FdoEnumerate(fdo, relations)
            if self.state == FilterState.DISABLED:
                irp.io_status.information = list(ext.children)
            else:
                irp.io_status.information = []
                # FILTERED: the real FDO asks to be enumerated again every time. The model asks only while
                # PENDING, whose next pass opens the gate; an ENABLED gate waits on an FDO that has not
                # enumerated, and re-querying this one would change nothing (the real one spins).
                if self.state == FilterState.PENDING:
                    IoInvalidateDeviceRelations(ext.pdo)
        IoCompleteRequest(irp)
        return status

    def FdoEnumerate(self, fdo: DeviceObject, relations: list[DeviceObject]) -> None:
        ext: FilterFdo = fdo.extension
        for child in list(ext.children):
            if child not in relations:
                self._pdo_gone(ext, child)
        new = [child for child in relations if child not in ext.children]
        # Precedence among the PDOs new in this pass only: the highest wins, the first on a tie.
        active_index, precedence = 0, 0
        for index, child in enumerate(new):
            this = self.DriverGetPrecedence(child)
            if this > precedence:
                active_index, precedence = index, this
        for index, child in enumerate(new):
            if precedence > 0:
                force = (EmulatedStatus.FORCE_ACTIVATED if index == active_index
                         else EmulatedStatus.FORCE_DEACTIVATED)
            else:
                force = EmulatedStatus.NEUTRAL
            self.PdoCreate(fdo, child, force)
        ext.enumerated = True  # __FdoSetEnumerated
        self.DriverSetFilterState()

    def DriverGetPrecedence(self, child: DeviceObject) -> int:
        """The Precedence DWORD named by the first of the PDO's CompatibleIDs that has one (0 if none)."""
        try:
            values = {v.name.upper(): v.data for v in self.xen.registry.values(PRECEDENCE)}
        except RegistryError:
            return 0
        for compatible_id in list(_query_id(child, BusQueryIdType.BusQueryCompatibleIDs) or []):  # type: ignore[call-overload]
            data = values.get(str(compatible_id).upper())
            if isinstance(data, int):
                if data:
                    self._print(f"DriverGetPrecedence: {compatible_id} found precedence {data:X}")
                return data
        return 0

    def PdoCreate(self, fdo: DeviceObject, child: DeviceObject, force: EmulatedStatus) -> DeviceObject | None:
        ext: FilterFdo = fdo.extension
        info = self.PdoSetDeviceInformation(child, force)
        if info is None:
            return None
        device_id, instance_id, location, active = info
        compatible_ids = [str(i) for i in _query_id(child, BusQueryIdType.BusQueryCompatibleIDs) or []]  # type: ignore[union-attr]
        emulated = self.emulated.EmulatedAddObject(ext.type, device_id, instance_id or "", compatible_ids, force)
        filter_pdo = IoCreateDevice(fdo.driver, DeviceKind.FILTER,
                                    FilterPdo(child, fdo, device_id, instance_id, location, active, force, emulated),
                                    name=f"XENFILT {device_id}\\{instance_id}")
        IoAttachDeviceToDeviceStack(filter_pdo, child)
        ext.children[child] = filter_pdo
        self._print(f"PdoCreate: {device_id}\\{instance_id}{' [ACTIVE]' if active else ''}"
                    + (f" ({force.name})" if force != EmulatedStatus.NEUTRAL else ""))
        return filter_pdo

    def PdoSetDeviceInformation(self, child: DeviceObject,
                                force: EmulatedStatus) -> tuple[str, str | None, str | None, bool] | None:
        """(DeviceID, InstanceID, LocationInformation, Active), or None where pdo.c fails (fail1: the bus
        answers no DeviceID; fail2: the PDO is the active device but ActiveInstanceID is missing)."""
        answered = _query_id(child, BusQueryIdType.BusQueryDeviceID)
        if answered is None:
            # pdo.c PdoSetDeviceInformation: DriverQueryId(BusQueryDeviceID) failed -> fail1, no PDO.
            self._print("PdoCreate: the bus answers no DeviceID: fail1", DbgLevel.ERROR)
            return None
        device_id = str(answered)
        config = self.xen.config
        if force != EmulatedStatus.NEUTRAL:
            active = force == EmulatedStatus.FORCE_ACTIVATED
        else:
            stored = config.ConfigGetActive()
            active = stored is not None and stored.device_id.upper() == device_id.upper()
        if active and force == EmulatedStatus.NEUTRAL:
            stored = config.ConfigGetActive()
            assert stored is not None
            if stored.instance_id is None:
                self._print(f"PdoCreate: {device_id} is the active device but ActiveInstanceID is missing: "
                            "fail2", DbgLevel.ERROR)
                return None
            location = stored.location_information or _device_text(child)
            return device_id, stored.instance_id, location, True
        instance = _query_id(child, BusQueryIdType.BusQueryInstanceID)
        return device_id, (str(instance) if instance is not None else None), _device_text(child), active

    def _pdo_gone(self, ext: FilterFdo, child: DeviceObject) -> None:
        filter_pdo = ext.children.pop(child)
        self._forget(filter_pdo.extension)
        if child.device_node is None:
            # The PnP manager never saw it (it vanished while gated): nobody will send it REMOVE_DEVICE.
            IoDetachDevice(child)
            IoDeleteDevice(filter_pdo)

    def _forget(self, pdo_ext: FilterPdo) -> None:
        if pdo_ext.emulated is not None:
            self.emulated.EmulatedRemoveObject(pdo_ext.emulated)
        pdo_ext.emulated = None

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
        if self.state == FilterState.ENABLED:
            if not all(f.extension.enumerated for f in self.fdos):
                return
            self.state = FilterState.PENDING
            if self.DriverIsActivePresent() and not self._safe_mode():
                self.unplugged_mask = self.xen.unplug.UnplugDevices()
            else:
                self._print("DriverSetFilterState: no active device present: nothing unplugged")
            self._print("DriverSetFilterState: PENDING")
        elif self.state == FilterState.PENDING:
            self.state = FilterState.DISABLED
            self._print("DriverSetFilterState: DISABLED: exposing emulated devices")
            # The other FDOs were filtered and are asking to be enumerated again (see
            # FdoQueryDeviceRelations); this is that request.
            for fdo in self.fdos:
                IoInvalidateDeviceRelations(fdo.extension.pdo)

    # -- the filter PDO ------------------------------------------------------------------------

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
            # pdo.c PdoQueryId / PdoQueryDeviceText: the values fixed at PdoCreate, not re-read.
            if NT_SUCCESS(status) and minor == IRP_MN_PNP.QUERY_ID and ext.instance_id is not None and \
                    irp.parameters.id_type == BusQueryIdType.BusQueryInstanceID:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, ext.instance_id
            elif (minor == IRP_MN_PNP.QUERY_DEVICE_TEXT and ext.location
                  and irp.parameters.text_type == DEVICE_TEXT_LOCATION_INFORMATION):
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, ext.location
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
