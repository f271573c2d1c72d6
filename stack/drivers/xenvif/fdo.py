"""The XENVIF FDO on XENBUS's VIF PDO (XV src/xenvif/fdo.c).

AddDevice queries, at PASSIVE_LEVEL, the XENBUS interfaces the frontends need at the versions of the
XENBUS revision the XENVIF INF binds (CACHE, STORE, SUSPEND, EVTCHN, GNTTAB, UNPLUG) and its parent's
BUS_INTERFACE_STANDARD, held for the FDO's life (__FdoAcquireLowerBusInterface: the NET PDOs' own bus
interface reads config space through it), and reads the platform's PCI DeviceID through it (for the
children's VendorName). START_DEVICE acquires them and creates one frontend and NET PDO per
`device/vif/N` with the vif's `mac` as its permanent address; REMOVE_DEVICE releases everything. The
NIC unplug is armed and disarmed by each NET PDO (pdo.py), not here. A `FrontendMaxQueues` DWORD in XENVIF\\Parameters, read at START_DEVICE, sets every
frontend's queue maximum (the INF's FrontendMaxQueues).

Imports driver.py (its parent, for types) and pdo.py (PdoCreate), which import it back: the three mirror
XV's driver.c, fdo.c and pdo.c and their headers (see driver.py; tests/unit/test_layering.py allows it).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.interface import InterfaceTable
from xenpv.stack.drivers.pci import BUS_INTERFACE_STANDARD_SIZE, GUID_BUS_INTERFACE_STANDARD
from xenpv.stack.drivers.revision import CHILD_BINDS_XENBUS_REVISION, VENDOR_PREFIX, XENBUS_REVISIONS, vendor_name
from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.evtchn import EvtchnInterface
from xenpv.stack.drivers.xenbus.gnttab import GnttabInterface
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SuspendInterface
from xenpv.stack.drivers.xenbus.unplug import UnplugInterface
from xenpv.stack.kernel import (IRP_MN_PNP, IRP_MN_POWER, POWER_STATE_TYPE, S0, DeviceObject, DeviceRelationType, Irp, IoCompleteRequest, IoDeleteDevice,
                          IoDetachDevice, IoSynchronousCallDriver, QueryInterfaceParameters, forward)
from xenpv.stack.kernel.irql import assert_passive
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_SUCCESS, status_name

from .frontend import Frontend, FrontendInterfaces, FrontendState, parse_mac

if TYPE_CHECKING:
    from .driver import XenvifDriver

log = logging.getLogger("stack.drivers.xenvif.fdo")

# The interfaces XENVIF takes from XENBUS, with their provider classes (for the GUIDs).
FDO_INTERFACES = {"CACHE": CacheInterface, "STORE": StoreInterface, "SUSPEND": SuspendInterface,
                  "EVTCHN": EvtchnInterface, "GNTTAB": GnttabInterface, "UNPLUG": UnplugInterface}
# Acquired for the life of the started FDO (UNPLUG only around each Request).
HELD_INTERFACES = ("CACHE", "STORE", "SUSPEND", "EVTCHN", "GNTTAB")
PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENVIF\Parameters"
CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"


class XenvifFdoError(Exception):
    pass


def query_interface(lower: DeviceObject, name: str, version: int) -> InterfaceTable:
    assert_passive("FdoQueryInterface")
    guid = FDO_INTERFACES[name].GUID
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(guid, 4096, version, None))
    status = IoSynchronousCallDriver(lower, irp)
    if not NT_SUCCESS(status) or irp.parameters.interface is None:
        raise XenvifFdoError(f"{name} v{version} ({guid}): {status_name(status)}")
    return irp.parameters.interface


def acquire_lower_bus_interface(lower: DeviceObject) -> Any:
    """__FdoAcquireLowerBusInterface: the parent's BUS_INTERFACE_STANDARD v1, referenced until FdoRemove."""
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(GUID_BUS_INTERFACE_STANDARD,
                                                                       BUS_INTERFACE_STANDARD_SIZE, 1, None))
    if not NT_SUCCESS(IoSynchronousCallDriver(lower, irp)) or irp.parameters.interface is None:
        raise XenvifFdoError("BUS_INTERFACE_STANDARD: not served by the parent")
    return irp.parameters.interface


@dataclass
class XenvifFdo:
    driver: XenvifDriver
    device: DeviceObject
    lower: DeviceObject
    pdo: DeviceObject
    interfaces: dict[str, InterfaceTable]
    lower_bus: Any  # the parent's BUS_INTERFACE_STANDARD (LowerBusInterface)
    pci_device_id: int
    prefix: str = VENDOR_PREFIX
    children: dict[int, DeviceObject] = field(default_factory=dict)
    started: bool = False
    powered: bool = True  # D0: the interfaces are held
    _resume_states: dict[int, FrontendState] = field(default_factory=dict)

    @property
    def vendor_name(self) -> str:
        return vendor_name(self.pci_device_id, self.prefix)

    @classmethod
    def create(cls, driver: XenvifDriver, device: DeviceObject, lower: DeviceObject, pdo: DeviceObject) -> XenvifFdo:
        versions = XENBUS_REVISIONS[CHILD_BINDS_XENBUS_REVISION]
        interfaces = {name: query_interface(lower, name, versions[name]) for name in FDO_INTERFACES}
        bus = acquire_lower_bus_interface(lower)
        return cls(driver, device, lower, pdo, interfaces, bus, int.from_bytes(bus.GetBusData(2, 2), "little"))

    def FdoReadPermanentAddress(self, index: int) -> bytes:
        """`device/vif/<N>/mac` (FdoEnumerate reads it for PdoCreate); zeroes when absent or malformed: the
        frontend refuses such a vif when it connects, with the reason."""
        store = self.interfaces["STORE"]
        status, buffer = store.StoreRead(None, f"device/vif/{index}", "mac")
        if not NT_SUCCESS(status):
            return bytes(6)
        try:
            return parse_mac(buffer.Value.decode(errors="replace"))
        except ValueError:
            return bytes(6)
        finally:
            store.StoreFree(buffer)

    def FdoStart(self) -> int:
        acquired: list[str] = []
        for name in HELD_INTERFACES:
            table = self.interfaces[name]
            status = getattr(table, f"{name.title()}Acquire")()
            if not NT_SUCCESS(status):
                log.error("FdoStart: %s Acquire: %s", name, status_name(status))
                self._release(acquired)
                return status
            acquired.append(name)
        self.started = True
        store = self.interfaces["STORE"]
        status, buffer = store.StoreDirectory(None, None, "device/vif")
        indices: list[int] = []
        if NT_SUCCESS(status):
            indices = sorted(int(n) for n in buffer.Value.decode().split("\0") if n.isdigit())
            store.StoreFree(buffer)
        xi = FrontendInterfaces(store, self.interfaces["EVTCHN"], self.interfaces["GNTTAB"],
                                self.interfaces["SUSPEND"])
        from .pdo import PdoCreate
        max_queues = self.parameter("FrontendMaxQueues")
        for index in indices:
            self.children[index] = PdoCreate(self, Frontend(index, xi, max_queues=max_queues or None),
                                             self.FdoReadPermanentAddress(index))
        log.info("FdoStart: vifs %s", indices or "none")
        return STATUS_SUCCESS

    def parameter(self, name: str) -> int | None:
        node = self.pdo.device_node
        if node is None:
            return None
        try:
            return node.manager.registry.get_dword(PARAMETERS, name)
        except RegistryError:
            return None

    def DriverSafeMode(self) -> bool:
        """driver.c DriverSafeMode (*InitSafeBootMode > 0): the model's Windows is in safe mode when its
        SystemStartOptions name SAFEBOOT, as XENFILT reads it."""
        node = self.pdo.device_node
        if node is None:
            return False
        try:
            return "SAFEBOOT" in node.manager.registry.get_sz(CONTROL_KEY, "SystemStartOptions").upper()
        except RegistryError:
            return False

    def _release(self, names: list[str]) -> None:
        for name in reversed(names):
            getattr(self.interfaces[name], f"{name.title()}Release")()

    def PdoDestroyed(self, pdo: object) -> None:
        for index, device in list(self.children.items()):
            if device.extension is pdo:
                del self.children[index]

    def dispatch_pnp(self, irp: Irp) -> int:
        minor = irp.minor
        if minor == IRP_MN_PNP.START_DEVICE:
            status = IoSynchronousCallDriver(self.lower, irp)
            if NT_SUCCESS(status):
                status = irp.io_status.status = self.FdoStart()
            IoCompleteRequest(irp)
            return status
        if minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS and irp.parameters.type == DeviceRelationType.BusRelations:
            irp.io_status.status = STATUS_SUCCESS
            irp.io_status.information = [d for d in self.children.values() if d.extension.missing is None]
            return forward(irp, self.lower)
        if minor == IRP_MN_PNP.REMOVE_DEVICE:
            return self.FdoRemove(irp)
        return forward(irp, self.lower)

    def FdoRemove(self, irp: Irp) -> int:
        for index, device in list(self.children.items()):
            # The PnP manager removed the children first; what is left never got a REMOVE of its own.
            device.extension.frontend.FrontendSetState(0)
            IoDeleteDevice(device)
        self.children.clear()
        if self.started:
            self._release(list(HELD_INTERFACES))
            self.started = False
        # Before the parent PDO goes (fdo.c: "We must release our reference before the PDO is destroyed").
        self.lower_bus.InterfaceDereference()
        status = forward(irp, self.lower)
        IoDetachDevice(self.lower)
        IoDeleteDevice(self.device)
        return status

    def dispatch_power(self, irp: Irp) -> int:
        """System power: below S0 the frontends close and every XENBUS interface is released before the
        bus sees the IRP (XENBUS bugchecks on S4 entry if a reference is outstanding); at S0 they are
        taken again after the bus is back, and each frontend returns to the state it had."""
        params = irp.parameters
        system = (self.started and irp.minor == IRP_MN_POWER.SET_POWER and params is not None
                  and params.type == POWER_STATE_TYPE.SystemPowerState)
        if system and params.state != S0 and self.powered:
            self.FdoD0ToD3()
        status = forward(irp, self.lower)
        if system and params.state == S0 and not self.powered:
            self.FdoD3ToD0()
        return status

    def FdoD0ToD3(self) -> None:
        # PdoSuspend -> FrontendSuspend: each frontend goes all the way down to UNKNOWN, so that coming
        # back it reads its backend's path again (after S4 the domain, and so that path, is a new one).
        for device in self.children.values():
            frontend = device.extension.frontend
            self._resume_states[frontend.index] = frontend.state
            frontend.FrontendSetState(FrontendState.FRONTEND_UNKNOWN)
        self._release(list(HELD_INTERFACES))
        self.powered = False

    def FdoD3ToD0(self) -> None:
        for name in HELD_INTERFACES:
            status = getattr(self.interfaces[name], f"{name.title()}Acquire")()
            if not NT_SUCCESS(status):
                log.error("FdoD3ToD0: %s Acquire: %s", name, status_name(status))
        self.powered = True
        for device in self.children.values():
            frontend = device.extension.frontend
            frontend.FrontendSetState(self._resume_states.pop(frontend.index, FrontendState.FRONTEND_CLOSED))



