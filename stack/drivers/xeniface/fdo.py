"""The XENIFACE FDO on XENBUS's synthetic IFACE PDO (XI src/xeniface/fdo.c at f12cbdb).

FdoCreate (AddDevice) queries, at PASSIVE_LEVEL, the XENBUS interfaces XENIFACE uses - STORE, EVTCHN,
GNTTAB, SUSPEND, SHARED_INFO - at the versions of the XENBUS revision its INF bound (the REV_ of the
hardware ID the PnP manager matched), and registers the device interface GUID_INTERFACE_XENIFACE on the
PDO (IoRegisterDeviceInterface). START_DEVICE: FdoD3ToD0, then the interface is enabled
(IoSetDeviceInterfaceState TRUE) so user mode (xenagent, xencontrol) can open it.

FdoD3ToD0 acquires STORE, EVTCHN, GNTTAB, SUSPEND, SHARED_INFO in that order (InterfacesAcquired: IOCTLs
answer STATUS_DEVICE_NOT_READY before), writes its `drivers/<n>` distribution entry ("Xen_Project
XENIFACE 9.1.0.10 ", FdoSetDistribution: the first free index 0..255), registers a SUSPEND LATE callback
and creates its grant cache "xeniface-gnttab". FdoD0ToD3 undoes it in reverse, first dropping every
handle's watches, event channels and suspend events (XenIfaceCleanup(Fdo, NULL)). The LATE callback
(FdoSuspendCallbackLate) rewrites the distribution entry in the new domain and sets every registered
suspend event (SuspendEventFire).

Power: a system power IRP below S0 takes the FDO to D3 before the bus sees it (XENBUS's reference check
on S4 entry needs every interface released), S0 brings it back to D0 after. REMOVE_DEVICE disables the
device interface and goes to D3.

Modelled rather than real: no WMI provider (wmi.c), so no WMI suspend or session events.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.interface import InterfaceTable
from xenpv.stack.drivers.revision import CHILD_BINDS_XENBUS_REVISION, XENBUS_REVISIONS
from xenpv.stack.drivers.xenbus.evtchn import EvtchnInterface
from xenpv.stack.drivers.xenbus.gnttab import GnttabInterface
from xenpv.stack.drivers.xenbus.shared_info import SharedInfoInterface
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_LATE, SuspendInterface
from xenpv.stack.kernel import (IRP_MN_PNP, IRP_MN_POWER, POWER_STATE_TYPE, S0, DeviceObject, Irp, IoCompleteRequest,
                                IoDeleteDevice, IoDetachDevice, IoSynchronousCallDriver, QueryInterfaceParameters,
                                forward)
from xenpv.stack.kernel.debuglog import current_log
from xenpv.stack.kernel.io import IoRegisterDeviceInterface, IoSetDeviceInterfaceState
from xenpv.stack.kernel.irql import assert_passive
from xenpv.stack.kernel.registry import KeyNotFound, ValueNotFound
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, status_name

from .abi import GUID_INTERFACE_XENIFACE
from .ioctls import XenIfaceState

log = logging.getLogger("stack.drivers.xeniface.fdo")

# FdoD3ToD0's acquisition order; released in reverse.
FDO_INTERFACES = {"STORE": StoreInterface, "EVTCHN": EvtchnInterface, "GNTTAB": GnttabInterface,
                  "SUSPEND": SuspendInterface, "SHARED_INFO": SharedInfoInterface}
VENDOR_NAME = "Xen Project"  # build.ps1's default VENDOR_NAME
PRODUCT = "XENIFACE"
MAXIMUM_INDEX = 255  # FdoSetDistribution
QUERY_SIZE = 4096
# Where the installer records each image's build (stack.install.installer IMAGES_KEY): the version the
# distribution entry names, as MAJOR_VERSION.MINOR_VERSION.MICRO_VERSION.BUILD_NUMBER are compiled in.
IMAGE_KEY = r"HKLM\SYSTEM\DriverDatabase\Images\xeniface.sys"
DEFAULT_VERSION = "9.1.0.10"
_REVISION = re.compile(r"&REV_([0-9A-Fa-f]{8})$")


class XenifaceFdoError(Exception):
    pass


def bound_revision(pdo: DeviceObject) -> int:
    """The XENBUS revision the INF bound: the REV_ of the ID the PnP manager matched (the current INF's
    exact binding, stack.drivers.revision)."""
    node = pdo.device_node
    matched = node.matching_id if node is not None else None
    m = _REVISION.search(matched or "")
    return int(m.group(1), 16) if m else CHILD_BINDS_XENBUS_REVISION


def query_interface(lower: DeviceObject, name: str, version: int) -> InterfaceTable:
    """FdoQueryInterface: a synchronous IRP_MN_QUERY_INTERFACE to the PDO."""
    assert_passive("FdoQueryInterface")
    guid = FDO_INTERFACES[name].GUID
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(guid, QUERY_SIZE, version, None))
    status = IoSynchronousCallDriver(lower, irp)
    if not NT_SUCCESS(status) or irp.parameters.interface is None:
        raise XenifaceFdoError(f"{name} v{version} ({guid}): {status_name(status)}")
    return irp.parameters.interface


def distribution_vendor() -> str:
    """FdoSetDistribution's vendor: VENDOR_NAME_STR with every non-alphanumeric character as '_'."""
    return "".join(c if c.isalnum() else "_" for c in VENDOR_NAME)


@dataclass
class XenifaceFdo:
    device: DeviceObject
    lower: DeviceObject
    pdo: DeviceObject
    interfaces: dict[str, InterfaceTable]
    interface_name: str
    revision: int
    state: XenIfaceState = field(init=False)
    started: bool = False
    powered: bool = False  # D0: the interfaces are held (InterfacesAcquired)
    distribution: str | None = None  # the drivers/<n> index this FDO wrote
    gnttab_cache: Any = None
    _suspend_callback_late: Any = None
    # MAJOR_VERSION.MINOR_VERSION.MICRO_VERSION.BUILD_NUMBER, compiled into the image: the model reads the
    # installed image's build once, at AddDevice (PASSIVE_LEVEL). FdoSetDistribution also runs in the
    # SUSPEND LATE callback, at DISPATCH_LEVEL, where reading the registry is a 0xD1 XI never has.
    version: str = DEFAULT_VERSION

    def __post_init__(self) -> None:
        self.state = XenIfaceState(self)

    @classmethod
    def create(cls, device: DeviceObject, lower: DeviceObject, pdo: DeviceObject) -> XenifaceFdo:
        revision = bound_revision(pdo)
        versions = XENBUS_REVISIONS.get(revision)
        if versions is None:
            raise XenifaceFdoError(f"XENBUS revision {revision:#010x} is not one this XENIFACE knows")
        interfaces = {name: query_interface(lower, name, versions[name]) for name in FDO_INTERFACES}
        status, link = IoRegisterDeviceInterface(pdo, GUID_INTERFACE_XENIFACE)
        if not NT_SUCCESS(status):
            raise XenifaceFdoError(f"IoRegisterDeviceInterface: {status_name(status)}")
        fdo = cls(device, lower, pdo, interfaces, link, revision)
        fdo.version = fdo._image_version()
        return fdo

    # -- the interfaces ----------------------------------------------------------------------------

    @property
    def InterfacesAcquired(self) -> bool:
        return self.powered

    @property
    def store(self) -> InterfaceTable:
        return self.interfaces["STORE"]

    def _acquire(self, name: str) -> int:
        return getattr(self.interfaces[name], f"{FDO_INTERFACES[name].prefix()}Acquire")()

    def _release(self, name: str) -> None:
        getattr(self.interfaces[name], f"{FDO_INTERFACES[name].prefix()}Release")()

    def FdoD3ToD0(self) -> int:
        assert_passive("FdoD3ToD0")
        acquired: list[str] = []
        for name in FDO_INTERFACES:
            status = self._acquire(name)
            if not NT_SUCCESS(status):
                log.error("FdoD3ToD0: %s Acquire: %s", name, status_name(status))
                for held in reversed(acquired):
                    self._release(held)
                return status
            acquired.append(name)
        self.powered = True
        self.FdoSetDistribution()
        suspend = self.interfaces["SUSPEND"]
        status, self._suspend_callback_late = suspend.SuspendRegister(SUSPEND_CALLBACK_LATE,
                                                                      self.FdoSuspendCallbackLate, None)
        if NT_SUCCESS(status):
            status, self.gnttab_cache = self._create_gnttab_cache()
            if not NT_SUCCESS(status):
                suspend.SuspendDeregister(self._suspend_callback_late)
                self._suspend_callback_late = None
        if not NT_SUCCESS(status):
            log.error("FdoD3ToD0: %s", status_name(status))
            self.FdoClearDistribution()
            self.powered = False
            for held in reversed(acquired):
                self._release(held)
            return status
        return STATUS_SUCCESS

    def _create_gnttab_cache(self) -> tuple[int, Any]:
        """"xeniface-gnttab", no reservation, no cap. Every Get and Put XENIFACE makes passes Locked=FALSE,
        so the cache takes its own lock; GnttabAcquireLock/ReleaseLock (Fdo->GnttabCacheLock) are no-ops here."""
        gnttab = self.interfaces["GNTTAB"]
        no_lock = lambda _argument: None  # noqa: E731
        if "GnttabCreateCache" in gnttab.methods:
            return gnttab.GnttabCreateCache("xeniface-gnttab", 0, 0, no_lock, no_lock, None)
        return gnttab.GnttabCreateCacheVersion1("xeniface-gnttab", 0, no_lock, no_lock, None)

    def FdoD0ToD3(self) -> None:
        assert_passive("FdoD0ToD3")
        if not self.powered:
            return
        self.state.XenIfaceCleanup(None)
        self.powered = False
        if self.gnttab_cache is not None:
            self.interfaces["GNTTAB"].GnttabDestroyCache(self.gnttab_cache)
            self.gnttab_cache = None
        if self._suspend_callback_late is not None:
            self.interfaces["SUSPEND"].SuspendDeregister(self._suspend_callback_late)
            self._suspend_callback_late = None
        self.FdoClearDistribution()
        for name in reversed(list(FDO_INTERFACES)):
            self._release(name)

    def FdoSuspendCallbackLate(self, _argument: Any) -> None:
        """In the new domain: the distribution entry again, then every registered suspend event."""
        self.FdoClearDistribution()
        self.FdoSetDistribution()
        self.state.SuspendEventFire()

    # -- drivers/<n> (FdoSetDistribution, FdoClearDistribution) -------------------------------------------

    def _image_version(self) -> str:
        node = self.pdo.device_node
        if node is None:
            return DEFAULT_VERSION
        try:
            return node.manager.registry.get_sz(IMAGE_KEY, "Version")
        except (KeyNotFound, ValueNotFound):
            return DEFAULT_VERSION

    def FdoSetDistribution(self) -> int:
        store = self.store
        for index in range(MAXIMUM_INDEX + 1):
            status, buffer = store.StoreRead(None, "drivers", str(index))
            if not NT_SUCCESS(status):
                if status != STATUS_OBJECT_NAME_NOT_FOUND:
                    log.error("FdoSetDistribution: drivers/%d: %s", index, status_name(status))
                    return status
                text = f"{distribution_vendor()} {PRODUCT} {self.version} "  # ATTRIBUTES: "" in a free build
                store.StorePrintf(None, "drivers", str(index), "%s", text)
                self.distribution = str(index)
                current_log().print("XENIFACE", f"drivers/{index} = {text!r}")
                return STATUS_SUCCESS
            store.StoreFree(buffer)
        return STATUS_OBJECT_NAME_NOT_FOUND

    def FdoClearDistribution(self) -> None:
        """Every drivers/<n> that names this vendor's XENIFACE goes (__FdoMatchDistribution)."""
        store = self.store
        status, buffer = store.StoreDirectory(None, None, "drivers")
        if not NT_SUCCESS(status):
            return
        names = [n for n in buffer.Value.decode(errors="replace").split("\0") if n]
        store.StoreFree(buffer)
        for name in names:
            status, buffer = store.StoreRead(None, "drivers", name)
            if not NT_SUCCESS(status):
                continue
            words = buffer.Value.decode(errors="replace").split(" ")
            store.StoreFree(buffer)
            if len(words) >= 2 and words[0] == distribution_vendor() and words[1].upper() == PRODUCT:
                store.StoreRemove(None, "drivers", name)
        self.distribution = None

    # -- IRPs -----------------------------------------------------------------------------------------

    def dispatch_pnp(self, irp: Irp) -> int:
        minor = irp.minor
        if minor == IRP_MN_PNP.START_DEVICE:
            return self.FdoStartDevice(irp)
        if minor == IRP_MN_PNP.SURPRISE_REMOVAL:
            IoSetDeviceInterfaceState(self.pdo, self.interface_name, False)
            return forward(irp, self.lower)
        if minor == IRP_MN_PNP.REMOVE_DEVICE:
            return self.FdoRemoveDevice(irp)
        return forward(irp, self.lower)

    def FdoStartDevice(self, irp: Irp) -> int:
        status = IoSynchronousCallDriver(self.lower, irp)
        if NT_SUCCESS(status):
            status = self.FdoD3ToD0()
            if NT_SUCCESS(status):
                IoSetDeviceInterfaceState(self.pdo, self.interface_name, True)
                self.started = True
            irp.io_status.status = status
        IoCompleteRequest(irp)
        return status

    def FdoRemoveDevice(self, irp: Irp) -> int:
        if self.started:
            self.FdoD0ToD3()
            IoSetDeviceInterfaceState(self.pdo, self.interface_name, False)
            self.started = False
        status = forward(irp, self.lower)
        IoDetachDevice(self.lower)
        IoDeleteDevice(self.device)
        return status

    def dispatch_power(self, irp: Irp) -> int:
        params = irp.parameters
        system = (self.started and irp.minor == IRP_MN_POWER.SET_POWER and params is not None
                  and params.type == POWER_STATE_TYPE.SystemPowerState)
        if system and params.state != S0 and self.powered:
            self.FdoD0ToD3()
        status = forward(irp, self.lower)
        if system and params.state == S0 and not self.powered:
            self.FdoD3ToD0()
        return status

    def dispatch_device_control(self, irp: Irp) -> int:
        return self.state.XenIfaceIoctl(irp)

    def dispatch_cleanup(self, irp: Irp) -> int:
        """FdoDispatchCleanup: the handle's watches, event channels and suspend events go."""
        assert_passive("FdoDispatchCleanup")
        self.state.XenIfaceCleanup(irp.parameters.file_object)
        return self.dispatch_complete(irp)

    @staticmethod
    def dispatch_complete(irp: Irp) -> int:
        """FdoDispatchComplete: CREATE and CLOSE succeed with nothing to do."""
        irp.io_status.information = None
        irp.io_status.status = STATUS_SUCCESS
        IoCompleteRequest(irp)
        return STATUS_SUCCESS

