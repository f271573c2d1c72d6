"""XENVIF child PDOs: `XENVIF\\VEN_<PREFIX>&DEV_NET`, one per vif, for XENNET (XV src/xenvif/pdo.c;
reference windows-pv-drivers.md 2 and 3).

IDs: DeviceID `XENVIF\\VEN_<PREFIX>&DEV_NET`, InstanceID the vif's number, HardwareIDs = CompatibleIDs =
`XENVIF\\VEN_<VendorName>&DEV_NET&REV_%08X` for every XENVIF revision, newest first.

PdoQueryInterface: a status other than NOT_SUPPORTED is completed unchanged; VIF is local (any
implemented version; an unknown one NOT_SUPPORTED, a short buffer BUFFER_OVERFLOW); CACHE, STORE and
SUSPEND are delegated to the parent stack (the XENBUS PDO below the XENVIF FDO) as XV does; anything
else is completed here with NOT_SUPPORTED. BUS_INTERFACE_STANDARD is not served (nothing in the model
asks a NET PDO for config space).

START_DEVICE brings the frontend to CONNECTED; REMOVE_DEVICE takes it back to UNKNOWN (closing the
backend) and, for a vif that vanished, deletes the PDO.

Types its parent from fdo.py, which imports this module to create PDOs: the pair mirrors XV's fdo.c and
pdo.c (see driver.py; tests/unit/test_layering.py allows the circle).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.revision import MAX_HARDWARE_IDS_CHARS, XENVIF_REVISIONS, newest_first
from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.pdo import multi_sz_chars
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SuspendInterface
from xenpv.stack.kernel import (IRP_MN_PNP, BusQueryIdType, DeviceKind, DeviceObject, DeviceRelationType, Irp,
                          IoCompleteRequest, IoCreateDevice, IoDeleteDevice, IoSynchronousCallDriver,
                          QueryInterfaceParameters)
from xenpv.stack.kernel.bugcheck import BUG_ON
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_NOT_SUPPORTED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL

from .frontend import Frontend, FrontendState
from .vif import GUID_XENVIF_VIF_INTERFACE

if TYPE_CHECKING:
    from .fdo import XenvifFdo

log = logging.getLogger("stack.drivers.xenvif.pdo")

DELEGATED_INTERFACES = (CacheInterface.GUID, StoreInterface.GUID, SuspendInterface.GUID)


def pdo_device_id(prefix: str) -> str:
    return f"XENVIF\\VEN_{prefix}&DEV_NET"


def pdo_hardware_ids(vendor: str) -> list[str]:
    ids = [f"XENVIF\\VEN_{vendor}&DEV_NET&REV_{revision:08X}" for revision in newest_first(XENVIF_REVISIONS)]
    BUG_ON(multi_sz_chars(ids) >= MAX_HARDWARE_IDS_CHARS, "XENVIF HARDWARE IDS EXCEED REGSTR_VAL_MAX_HCID_LEN")
    return ids


@dataclass
class XenvifPdo:
    fdo: XenvifFdo
    device: DeviceObject
    frontend: Frontend
    missing: str | None = None

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
        return None

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
            status = self.frontend.FrontendSetState(FrontendState.FRONTEND_CONNECTED)
            irp.io_status.status = status if NT_SUCCESS(status) else STATUS_UNSUCCESSFUL
        elif minor in (IRP_MN_PNP.STOP_DEVICE, IRP_MN_PNP.QUERY_REMOVE_DEVICE, IRP_MN_PNP.CANCEL_REMOVE_DEVICE,
                       IRP_MN_PNP.SURPRISE_REMOVAL):
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.REMOVE_DEVICE:
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


def PdoCreate(fdo: XenvifFdo, frontend: Frontend) -> DeviceObject:
    device = IoCreateDevice(fdo.device.driver, DeviceKind.PDO, name=f"{pdo_device_id(fdo.prefix)}\\{frontend.index}")
    device.extension = XenvifPdo(fdo, device, frontend)
    log.info("PdoCreate: vif %d (%s)", frontend.index, fdo.vendor_name)
    return device
