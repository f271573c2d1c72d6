"""The XENBUS FDO on a platform PCI device (XB src/xenbus/fdo.c; reference windows-pv-drivers.md 2-4, 7).

Every platform device (0001, 0002, C000) gets an FDO; `FdoSetActive` picks exactly one. Only the active
FDO does anything (`if (!Active) goto not_active`): at START it brings up the platform (BAR hole,
shared_info and grant frames, upcalls, the store ring), creates the interface contexts, watches `device`
in xenstore and reports one child PDO per class. Inactive FDOs pass everything down.

Imports driver.py (its parent, for types) and pdo.py (PdoCreate), which import it back: the three mirror
XB's driver.c, fdo.c and pdo.c and their headers (see driver.py; tests/unit/test_layering.py allows it).
"""
from __future__ import annotations

import ctypes
import importlib
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.interface import Interface, InterfaceTable
from xenpv.stack.drivers.pci import (BUS_INTERFACE_STANDARD_SIZE, DEVICE_TEXT_LOCATION_INFORMATION,
                               GUID_BUS_INTERFACE_STANDARD, BusInterfaceStandard, QueryDeviceTextParameters)
from xenpv.stack.drivers.revision import vendor_name
from xenpv.stack.drivers.xenfilt.emulated import GUID_XENFILT_EMULATED_INTERFACE, EmulatedStatus
from xenpv.stack.kernel import (IRP_MN_PNP, IRP_MN_POWER, POWER_STATE_TYPE, S0, S4, BusQueryIdType,
                          DeviceObject, DeviceRelationType, Irp, IoCompleteRequest, IoDeleteDevice,
                          IoDetachDevice, IoGetAttachedDevice, IoInvalidateDeviceRelations, IoSynchronousCallDriver,
                          QueryIdParameters, QueryInterfaceParameters, forward)
from xenpv.stack.kernel.bugcheck import BUG, BUG_ON
from xenpv.stack.kernel.debuglog import DbgLevel
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_NOT_SUPPORTED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import xen as X

if TYPE_CHECKING:
    from xenpv.stack.vcpu.platform import XenPlatform

    from .driver import XenbusDriver

log = logging.getLogger("stack.drivers.xenbus.fdo")

XEN_PLATFORM_VENDOR_ID = 0x5853
ENUM_PCI = r"HKLM\SYSTEM\CurrentControlSet\Enum\PCI"
PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters"
DEFAULT_SUPPORTED_CLASSES = ["VIF", "VBD", "VKBD", "IFACE", "CONS"]
DEFAULT_SYNTHETIC_CLASSES = ["IFACE", "CONS"]

# Interface contexts in creation order (later ones take earlier ones as constructor arguments), with
# the module under stack/drivers/xenbus/ that provides each.
INTERFACE_MODULES = (("DEBUG", "debug"), ("SUSPEND", "suspend"), ("SHARED_INFO", "shared_info"),
                     ("EVTCHN", "evtchn"), ("STORE", "store"), ("RANGE_SET", "range_set"), ("CACHE", "cache"),
                     ("GNTTAB", "gnttab"), ("CONSOLE", "console"))
# FdoS3ToS4: these must be unreferenced when the domain is about to be rebuilt (a10d605, 28420a4).
S4_UNREFERENCED = ("SUSPEND", "SHARED_INFO", "EVTCHN", "STORE", "CONSOLE", "GNTTAB", "BALLOON")


@dataclass
class XenbusFdo:
    driver: XenbusDriver
    device: DeviceObject
    lower: DeviceObject
    pdo: DeviceObject
    device_id: str
    instance_id: str
    location: str
    pci_device_id: int
    bus_interface: BusInterfaceStandard
    emulated: InterfaceTable | None
    active: bool = False
    platform: XenPlatform | None = None
    interfaces: dict[str, Interface] = field(default_factory=dict)
    children: dict[str, DeviceObject] = field(default_factory=dict)
    system_power: int = S0
    # Set by the `device` watch (on whichever thread reads the store ring); FdoScan runs from poll().
    _device_changed: threading.Event = field(default_factory=threading.Event)

    @property
    def watch_token(self) -> str:
        # Unique per FDO, as XENBUS's tokens are watch addresses: a reboot reuses the store connection.
        return f"xenbus-fdo-{self.device.address:x}"

    def FdoStop(self) -> None:
        """Drop the watch and the platform (FDO removal, or the end of this boot)."""
        if self.platform is None:
            return
        try:
            self.platform.store.unwatch("device", self.watch_token)
        finally:
            self.platform.close()
            self.platform = None

    @property
    def vendor_name(self) -> str:
        return vendor_name(self.pci_device_id, self.driver.prefix)

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.driver.xen.debug_log.print("XENBUS", text, level)

    # -- creation ------------------------------------------------------------------------------

    def FdoSetActive(self) -> None:
        config = self.driver.xen.config
        status = EmulatedStatus.NEUTRAL
        if self.emulated is not None:
            answer = self.emulated.EmulatedIsDevicePresent(self.device_id, None)
            present, status = answer if self.emulated.Version >= 3 else (answer, EmulatedStatus.NEUTRAL)
            BUG_ON(not present, f"{self.device_id} IS NOT PRESENT")
        if status != EmulatedStatus.NEUTRAL:
            self.active = status == EmulatedStatus.FORCE_ACTIVATED
            if self.active:
                config.ConfigSetActive(self.device_id, self.instance_id, self.location)
        elif (current := config.ConfigGetActive()) is not None:
            self.active = current.device_id.upper() == self.device_id.upper()
            if self.active:
                config.ConfigUpdateActive(self.device_id, self.instance_id, self.location)
        else:
            self.active = self._set_active()
        self._print(f"FdoSetActive: {self.device_id}\\{self.instance_id}: {'ACTIVE' if self.active else 'inactive'}"
                    + (f" ({status.name})" if status != EmulatedStatus.NEUTRAL else ""))

    def _set_active(self) -> bool:
        vdid = self.driver.vendor_device_id
        if self.pci_device_id != vdid:
            vendor_key = (f"{ENUM_PCI}\\VEN_{XEN_PLATFORM_VENDOR_ID:04X}&DEV_{vdid:04X}"
                          f"&SUBSYS_{vdid:04X}{XEN_PLATFORM_VENDOR_ID:04X}&REV_01")
            if self.driver.xen.registry.key_exists(vendor_key):
                self._print(f"FdoSetActive: {self.device_id} is a legacy device and the vendor device "
                            f"DEV_{vdid:04X} exists: not activating", DbgLevel.WARNING)
                return False
        self.driver.xen.config.ConfigSetActive(self.device_id, self.instance_id, self.location)
        return True

    # -- start and the interfaces --------------------------------------------------------------

    def FdoStart(self) -> int:
        try:
            self.platform = self.driver.platform_factory()
        except Exception as exc:  # noqa: BLE001 - a platform that cannot start fails START_DEVICE
            self._print(f"FdoStart: the platform did not start: {exc}", DbgLevel.ERROR)
            return STATUS_UNSUCCESSFUL
        self._create_interfaces()
        self.platform.store.watch("device", self.watch_token, lambda path, token: self._device_changed.set())
        self.FdoScan()
        return STATUS_SUCCESS

    def _suspend_domain(self) -> int:
        assert self.platform is not None
        rc, _ = self.platform.hypercalls.op(X.HYPERCALL_NUMBERS["sched_op"], X.SCHEDOP_shutdown,
                                            ctypes.c_uint32(X.SHUTDOWN_suspend))
        return STATUS_SUCCESS if rc >= 0 else STATUS_UNSUCCESSFUL

    def _create_interfaces(self) -> None:
        pool: dict[str, Any] = {"platform": self.platform, "kernel": self.driver.kernel, "fdo": self,
                                "xen": self.driver.xen, "vcpu": self.driver.xen.vcpu,
                                "registry": self.driver.xen.registry, "debug_log": self.driver.xen.debug_log,
                                "suspend_domain": self._suspend_domain}
        for name, module_name in INTERFACE_MODULES:
            context = self._create_interface(name, module_name, pool)
            if context is not None:
                self.interfaces[name] = context
                pool[module_name] = context
        from .unplug import UnplugInterface
        self.interfaces["UNPLUG"] = UnplugInterface(self.driver.xen)
        self._print(f"FdoCreateInterfaces: {', '.join(self.interfaces)}")

    def _create_interface(self, name: str, module_name: str, pool: dict[str, Any]) -> Interface | None:
        qualified = f"{__package__}.{module_name}"
        try:
            module = importlib.import_module(qualified)
        except ModuleNotFoundError as exc:
            if exc.name != qualified:
                raise
            self._print(f"FdoCreateInterfaces: {name}: no provider module ({qualified}): absent", DbgLevel.WARNING)
            return None
        classes = [c for c in vars(module).values()
                   if inspect.isclass(c) and issubclass(c, Interface) and getattr(c, "NAME", None) == name]
        if not classes:
            self._print(f"FdoCreateInterfaces: {name}: {qualified} has no Interface with NAME {name}: absent",
                        DbgLevel.WARNING)
            return None
        cls = classes[0]
        kwargs: dict[str, Any] = {}
        for parameter in list(inspect.signature(cls).parameters.values()):
            if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            if parameter.name in pool:
                kwargs[parameter.name] = pool[parameter.name]
            elif parameter.default is parameter.empty:
                self._print(f"FdoCreateInterfaces: {name}: {cls.__name__} needs '{parameter.name}', which the FDO "
                            f"does not have (yet): absent", DbgLevel.WARNING)
                return None
        return cls(**kwargs)

    # -- children ------------------------------------------------------------------------------

    def _multi_sz(self, name: str, default: list[str]) -> list[str]:
        try:
            return [s.upper() for s in self.driver.xen.registry.get_multi_sz(PARAMETERS, name)]
        except RegistryError:
            return list(default)

    def FdoScan(self) -> bool:
        """Bring the child PDOs in line with `device/` + SyntheticClasses; True if anything changed."""
        assert self.platform is not None
        try:
            names = [n.upper() for n in self.platform.store.directory("device")]
        except XenstoreError as exc:
            if exc.errno != "ENOENT":
                raise
            names = []
        supported = self._multi_sz("SupportedClasses", DEFAULT_SUPPORTED_CLASSES)
        synthetic = self._multi_sz("SyntheticClasses", DEFAULT_SYNTHETIC_CLASSES)
        wanted = [n for n in dict.fromkeys(names + synthetic) if any(n.startswith(s) for s in supported)]
        changed = False
        for name in list(self.children):
            if name not in wanted:
                self.children.pop(name).extension.PdoSetMissing("device vanished")
                changed = True
        for name in wanted:
            if name not in self.children:
                from .pdo import PdoCreate
                self.children[name] = PdoCreate(self, name)
                changed = True
        return changed

    def poll(self) -> None:
        """Act on queued `device` watch events (the FDO's watch thread, run from the agent's loop)."""
        if self.platform is None:
            return
        self.platform.store.pump()
        fired = self._device_changed.is_set()
        self._device_changed.clear()
        if fired and self.FdoScan():
            IoInvalidateDeviceRelations(self.pdo)

    # -- IRPs ----------------------------------------------------------------------------------

    def dispatch_pnp(self, irp: Irp) -> int:
        minor = irp.minor
        if minor == IRP_MN_PNP.START_DEVICE:
            status = IoSynchronousCallDriver(self.lower, irp)
            if NT_SUCCESS(status) and self.active:
                status = self.FdoStart()
                irp.io_status.status = status
            IoCompleteRequest(irp)
            return status
        if (minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS and self.active
                and irp.parameters.type == DeviceRelationType.BusRelations):
            irp.io_status.status = STATUS_SUCCESS
            irp.io_status.information = list(self.children.values())
            return forward(irp, self.lower)
        if minor == IRP_MN_PNP.REMOVE_DEVICE:
            return self.FdoRemove(irp)
        return forward(irp, self.lower)

    def FdoRemove(self, irp: Irp) -> int:
        if self.active:
            self.driver.xen.config.ConfigClearActive()
        self.FdoStop()
        status = forward(irp, self.lower)
        IoDetachDevice(self.lower)
        IoDeleteDevice(self.device)
        self.driver.FdoDestroyed(self)
        return status

    def dispatch_power(self, irp: Irp) -> int:
        params = irp.parameters
        if (self.active and irp.minor == IRP_MN_POWER.SET_POWER
                and params.type == POWER_STATE_TYPE.SystemPowerState):
            if params.state == S4:
                self.FdoS3ToS4()
            elif params.state == S0 and self.system_power == S4:
                self.FdoS4ToS3()
            self.system_power = params.state
        return forward(irp, self.lower)

    def FdoS3ToS4(self) -> None:
        for name in S4_UNREFERENCED:
            context = self.interfaces.get(name)
            if context is not None and context.references != 0:
                BUG(f"{name} INTERFACE HAS {context.references} OUTSTANDING REFERENCE(S) ON ENTRY TO S4")

    def FdoS4ToS3(self) -> None:
        # The domain was rebuilt: its emulated devices are back until unplugged again.
        self._print("FdoS4ToS3: resume from S4")
        self.driver.xen.unplug.UnplugDevices()

    def delegate(self, irp: Irp) -> int:
        """FdoDelegateIrp: a clone of `irp` to the top of this FDO's own stack, waited for."""
        params: QueryInterfaceParameters = irp.parameters
        clone = Irp.pnp(irp.minor, QueryInterfaceParameters(params.interface_type, params.size, params.version,
                                                            params.interface, params.interface_specific_data))
        clone.io_status.status = irp.io_status.status
        status = IoSynchronousCallDriver(IoGetAttachedDevice(self.device), clone)
        params.interface = clone.parameters.interface
        irp.io_status.status, irp.io_status.information = status, clone.io_status.information
        return status


def query_lower(lower: DeviceObject, minor: IRP_MN_PNP, parameters: Any) -> Irp:
    irp = Irp.pnp(minor, parameters)
    IoSynchronousCallDriver(lower, irp)
    return irp


def query_id(lower: DeviceObject, id_type: BusQueryIdType) -> str:
    irp = query_lower(lower, IRP_MN_PNP.QUERY_ID, QueryIdParameters(id_type))
    return str(irp.io_status.information) if NT_SUCCESS(irp.io_status.status) else ""


def query_location(lower: DeviceObject) -> str:
    irp = query_lower(lower, IRP_MN_PNP.QUERY_DEVICE_TEXT, QueryDeviceTextParameters(DEVICE_TEXT_LOCATION_INFORMATION))
    return str(irp.io_status.information) if NT_SUCCESS(irp.io_status.status) else ""


def query_bus_interface(lower: DeviceObject) -> BusInterfaceStandard | None:
    irp = query_lower(lower, IRP_MN_PNP.QUERY_INTERFACE,
                      QueryInterfaceParameters(GUID_BUS_INTERFACE_STANDARD, BUS_INTERFACE_STANDARD_SIZE, 1, None))
    return irp.parameters.interface if NT_SUCCESS(irp.io_status.status) else None


def query_emulated(lower: DeviceObject, version: int) -> InterfaceTable | None:
    """Optional: a stack without XENFILT answers NOT_SUPPORTED, which is accepted."""
    irp = query_lower(lower, IRP_MN_PNP.QUERY_INTERFACE,
                      QueryInterfaceParameters(GUID_XENFILT_EMULATED_INTERFACE, 4096, version, None))
    if irp.io_status.status == STATUS_NOT_SUPPORTED or not NT_SUCCESS(irp.io_status.status):
        return None
    return irp.parameters.interface


PlatformFactory = Callable[[], "XenPlatform"]
__all__ = ["XenbusFdo", "PlatformFactory", "query_bus_interface", "query_emulated", "query_id", "query_location"]
