"""XENVIF child PDOs: `XENVIF\\VEN_<PREFIX>&DEV_NET`, one per vif, for XENNET (XV src/xenvif/pdo.c;
reference windows-pv-drivers.md 2 and 3).

IDs (PdoQueryId): DeviceID `XENVIF\\VEN_<PREFIX>&DEV_NET`, InstanceID the vif's number, HardwareIDs =
CompatibleIDs = `XENVIF\\VEN_<VendorName>&DEV_NET&REV_%08X` for every XENVIF revision, newest first, then
`XENDEVICE`; ContainerID a name-based (SHA-1, version 5) GUID of the vif's permanent address
(__PdoSetContainerID), so every boot gives the same NIC the same container.

PdoQueryInterface: a status other than NOT_SUPPORTED is completed unchanged; BUS_INTERFACE_STANDARD v1 is
the PDO's own (bus.c: references counted here, config space through the FDO's parent); VIF is local (any
implemented version; an unknown one NOT_SUPPORTED, a short buffer BUFFER_OVERFLOW); CACHE, STORE and
SUSPEND are delegated to the parent stack (the XENBUS PDO below the XENVIF FDO) as XV does; anything
else is completed here with NOT_SUPPORTED.

PdoStartDevice: never in safe mode (STATUS_UNSUCCESSFUL); a NET PDO starts only in a boot that unplugged the emulated NICs (UNPLUG.IsRequested(NICS)):
otherwise the emulated NIC with the same permanent address is still live, so the PDO arms the unplug for
the next boot (UNPLUG.Request(NICS, TRUE)), asks xenbus_monitor for a reboot (UNPLUG.Reboot("XENVIF")) and
fails with STATUS_PNP_REBOOT_REQUIRED. Started, it brings the frontend to CONNECTED and arms the unplug
again (the counter is consumed every boot). Each NET PDO arms it once (PdoUnplugRequest remembers what it
asked for); STOP and REMOVE of a started PDO disarm it. REMOVE_DEVICE takes the frontend back to UNKNOWN
(closing the backend) and, for a vif that vanished, deletes the PDO.

Types its parent from fdo.py, which imports this module to create PDOs: the pair mirrors XV's fdo.c and
pdo.c (see driver.py; tests/unit/test_layering.py allows the circle).
"""
from __future__ import annotations

import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.pci import GUID_BUS_INTERFACE_STANDARD
from xenpv.stack.drivers.revision import XENVIF_REVISIONS, newest_first
from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.pdo import (REGSTR_VAL_MAX_HCID_LEN, PdoQueryBusInterface,
                                           multi_sz_bytes_before_final_terminator)
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SuspendInterface
from xenpv.stack.drivers.xenbus.unplug import XENBUS_UNPLUG_DEVICE_TYPE_NICS
from xenpv.stack.kernel import (IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DeviceRelationType, Irp,
                          IoCompleteRequest, IoCreateDevice, IoDeleteDevice, IoSynchronousCallDriver,
                          QueryInterfaceParameters)
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_NOT_SUPPORTED, STATUS_PNP_REBOOT_REQUIRED,
                                       STATUS_SUCCESS, STATUS_UNSUCCESSFUL)

from .frontend import Frontend, FrontendState
from .vif import GUID_XENVIF_VIF_INTERFACE

if TYPE_CHECKING:
    from .fdo import XenvifFdo

log = logging.getLogger("stack.drivers.xenvif.pdo")

DELEGATED_INTERFACES = (CacheInterface.GUID, StoreInterface.GUID, SuspendInterface.GUID)
XENDEVICE = "XENDEVICE"  # the last hardware/compatible ID of every NET PDO
# GUID_CONTAINER_ID_NAME_SPACE (pdo.c): the name space of the NET PDOs' name-based ContainerIDs.
GUID_CONTAINER_ID_NAME_SPACE = uuid.UUID("2A597D5E-8864-4428-A110-F568F316D4E4")
MODULE = "XENVIF"  # __MODULE__, the name UNPLUG.Reboot files the request under


def pdo_device_id(prefix: str) -> str:
    return f"XENVIF\\VEN_{prefix}&DEV_NET"


def pdo_hardware_ids(vendor: str) -> list[str]:
    ids = [f"XENVIF\\VEN_{vendor}&DEV_NET&REV_{revision:08X}" for revision in newest_first(XENVIF_REVISIONS)]
    ids.append(XENDEVICE)
    # XV pdo.c PdoQueryId: ASSERT3U((ULONG_PTR)Buffer - (ULONG_PTR)Id.Buffer, <, REGSTR_VAL_MAX_HCID_LEN), in bytes
    ASSERT(multi_sz_bytes_before_final_terminator(ids) < REGSTR_VAL_MAX_HCID_LEN,
           "(ULONG_PTR)Buffer - (ULONG_PTR)Id.Buffer < REGSTR_VAL_MAX_HCID_LEN")
    return ids


def pdo_container_id(permanent_address: bytes) -> str:
    """__PdoSetContainerID: RFC 4122 4.3 over the name space GUID (as it lies in memory) and the permanent
    address, SHA-1, version 5, variant 10; RtlStringFromGUID's braced upper-case form."""
    digest = hashlib.sha1(GUID_CONTAINER_ID_NAME_SPACE.bytes_le + permanent_address).digest()
    raw = uuid.UUID(bytes_le=digest[:16])
    fields = list(raw.fields)
    fields[2] = fields[2] & 0x0FFF | 5 << 12  # Data3: the version
    fields[3] = fields[3] & 0x3F | 0x80  # Data4[0]: the variant bits
    return "{" + str(uuid.UUID(fields=tuple(fields))).upper() + "}"


@dataclass
class XenvifPdo:
    fdo: XenvifFdo
    device: DeviceObject
    frontend: Frontend
    permanent_address: bytes = bytes(6)
    missing: str | None = None
    unplug_requested: bool = False  # Pdo->UnplugRequested: what this PDO last asked UNPLUG for
    started: bool = False  # D0: START succeeded and no STOP/REMOVE since

    @property
    def index(self) -> int:
        return self.frontend.index

    def PdoQueryId(self, id_type: int) -> Any:
        if id_type == BusQueryIdType.BusQueryDeviceID:
            return pdo_device_id(self.fdo.prefix)
        if id_type == BusQueryIdType.BusQueryInstanceID:
            return str(self.index)
        if id_type in (BusQueryIdType.BusQueryHardwareIDs, BusQueryIdType.BusQueryCompatibleIDs):
            return pdo_hardware_ids(self.fdo.vendor_name)
        if id_type == BusQueryIdType.BusQueryContainerID:
            return pdo_container_id(self.permanent_address)
        return None

    # -- the NIC unplug (pdo.c PdoUnplugRequest, PdoRequestReboot, PdoUnplugRequested) ----------------

    def PdoUnplugRequest(self, make: bool) -> None:
        # A restarted driver calls this again: the counter moves once per PDO, not once per call.
        if self.unplug_requested == make:
            return
        self.unplug_requested = make
        unplug = self.fdo.interfaces["UNPLUG"]
        if not NT_SUCCESS(unplug.UnplugAcquire()):
            return
        try:
            unplug.UnplugRequest(XENBUS_UNPLUG_DEVICE_TYPE_NICS, make)
        finally:
            unplug.UnplugRelease()

    def PdoRequestReboot(self) -> None:
        unplug = self.fdo.interfaces["UNPLUG"]
        if not NT_SUCCESS(unplug.UnplugAcquire()):
            return
        try:
            unplug.UnplugReboot(MODULE)
        finally:
            unplug.UnplugRelease()

    def PdoUnplugRequested(self) -> bool:
        unplug = self.fdo.interfaces["UNPLUG"]
        if not NT_SUCCESS(unplug.UnplugAcquire()):
            return False
        try:
            return bool(unplug.UnplugIsRequested(XENBUS_UNPLUG_DEVICE_TYPE_NICS))
        finally:
            unplug.UnplugRelease()

    def PdoStartDevice(self) -> int:
        if self.fdo.DriverSafeMode():
            log.warning("%s: safe mode: not started", self.frontend)
            return STATUS_UNSUCCESSFUL
        if not self.PdoUnplugRequested():
            # The emulated NIC of this boot is still there: the PV one may only start after the reboot
            # that unplugs it.
            self.PdoUnplugRequest(True)
            self.PdoRequestReboot()
            log.warning("%s: emulated NICs not unplugged this boot: %s", self.frontend,
                        STATUS_PNP_REBOOT_REQUIRED.name)
            return STATUS_PNP_REBOOT_REQUIRED
        status = self.frontend.FrontendSetState(FrontendState.FRONTEND_CONNECTED)
        if not NT_SUCCESS(status):
            return STATUS_UNSUCCESSFUL
        self.PdoUnplugRequest(True)
        self.started = True
        return STATUS_SUCCESS

    def PdoStopDevice(self) -> None:
        """STOP and REMOVE of a started (D0) PDO: the unplug it armed is withdrawn."""
        if self.started:
            self.PdoUnplugRequest(False)
            self.started = False

    def PdoDelegateIrp(self, irp: Irp) -> int:
        """A clone of the query to the parent stack (XENBUS's PDO under the XENVIF FDO), waited for."""
        params: QueryInterfaceParameters = irp.parameters
        clone = Irp.pnp(irp.minor, QueryInterfaceParameters(params.interface_type, params.size, params.version,
                                                            params.interface, params.interface_specific_data))
        status = IoSynchronousCallDriver(self.fdo.lower, clone)
        params.interface = clone.parameters.interface
        irp.io_status.information = clone.io_status.information
        return status

    def PdoQueryInterface(self, irp: Irp) -> int:
        params: QueryInterfaceParameters = irp.parameters
        if irp.io_status.status != STATUS_NOT_SUPPORTED:
            return irp.io_status.status
        if params.interface_type == GUID_BUS_INTERFACE_STANDARD:
            status = PdoQueryBusInterface(params, self.device, self.fdo.lower_bus)
            if NT_SUCCESS(status):
                irp.io_status.information = 0
            return status
        if params.interface_type == GUID_XENVIF_VIF_INTERFACE:
            status, found = self.frontend.vif.get_interface(params.version, params.size)
            if found is not None:
                params.interface = found
                irp.io_status.information = 0
            return status
        if params.interface_type in DELEGATED_INTERFACES:
            return self.PdoDelegateIrp(irp)
        return STATUS_NOT_SUPPORTED

    def PdoSetMissing(self, reason: str) -> None:
        self.missing = reason
        log.info("%s: missing: %s", self.frontend, reason)

    def dispatch_pnp(self, irp: Irp) -> int:
        minor = irp.minor
        if minor == IRP_MN_PNP.QUERY_ID:
            value = self.PdoQueryId(irp.parameters.id_type)
            if value is not None:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, value
        elif minor == IRP_MN_PNP.QUERY_INTERFACE:
            irp.io_status.status = self.PdoQueryInterface(irp)
        elif minor == IRP_MN_PNP.QUERY_CAPABILITIES:
            caps = irp.parameters.capabilities
            caps.unique_id = caps.silent_install = caps.surprise_removal_ok = True
            caps.removable = True
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS:
            if irp.parameters.type == DeviceRelationType.TargetDeviceRelation:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, [self.device]
        elif minor == IRP_MN_PNP.START_DEVICE:
            irp.io_status.status = self.PdoStartDevice()
        elif minor == IRP_MN_PNP.STOP_DEVICE:
            self.PdoStopDevice()
            irp.io_status.status = STATUS_SUCCESS
        elif minor in (IRP_MN_PNP.QUERY_REMOVE_DEVICE, IRP_MN_PNP.CANCEL_REMOVE_DEVICE,
                       IRP_MN_PNP.SURPRISE_REMOVAL):
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.REMOVE_DEVICE:
            self.PdoStopDevice()
            self.frontend.FrontendSetState(FrontendState.FRONTEND_UNKNOWN)
            irp.io_status.status = STATUS_SUCCESS
            if self.missing is not None:
                self.fdo.PdoDestroyed(self)
                IoDeleteDevice(self.device)
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status

    def dispatch_power(self, irp: Irp) -> int:
        irp.io_status.status = STATUS_SUCCESS
        IoCompleteRequest(irp)
        return STATUS_SUCCESS


def PdoCreate(fdo: XenvifFdo, frontend: Frontend, permanent_address: bytes = bytes(6)) -> DeviceObject:
    device = IoCreateDevice(fdo.device.driver, DeviceKind.PDO, name=f"{pdo_device_id(fdo.prefix)}\\{frontend.index}")
    device.extension = XenvifPdo(fdo, device, frontend, permanent_address)
    log.info("PdoCreate: vif %d (%s)", frontend.index, fdo.vendor_name)
    return device
