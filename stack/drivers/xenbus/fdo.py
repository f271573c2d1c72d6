"""The XENBUS FDO on a platform PCI device (XB src/xenbus/fdo.c; reference windows-pv-drivers.md 2-4, 7).

Every platform device (0001, 0002, C000) gets an FDO; `FdoSetActive` picks exactly one. Only the active
FDO does anything (`if (!Active) goto not_active`): at START it brings up the platform (BAR hole,
shared_info and grant frames, upcalls, the store ring), creates the interface contexts, goes D3 -> D0 and
reports one child PDO per class. Inactive FDOs pass everything down.

D0 (FdoD3ToD0, as fdo.c): the FDO acquires DEBUG, SUSPEND, RANGE_SET, EVTCHN, STORE and CONSOLE itself,
watches `device` (the scan) and `control/shutdown` (the suspend thread), writes control/feature-suspend=1
and registers a SUSPEND LATE callback that goes D0 -> D3 -> D0 on the watches and feature key (they are dead
in a new domain). D3 (FdoD0ToD3) undoes all of it after the suspend thread is idle.

The suspend thread (FdoSuspend) wakes on the control/shutdown watch; in D0, when the node reads "suspend",
it writes "" (the toolstack's acknowledgement) and calls SUSPEND.Trigger, which parks the vCPU in the
suspend hypercall until the domain resumes in place or its saved state runs in a new domain.

System power (FdoSetSystemPower): to S3/S4 the FDO goes D0 -> D3 (its children, which get the IRP first,
have released theirs), then on the way to S4 FdoS3ToS4 BUGs on any reference still held to SUSPEND,
SHARED_INFO, EVTCHN, STORE, CONSOLE, GNTTAB or BALLOON; back to S0 from S4, FdoS4ToS3 logs the resume and
unplugs the emulated devices again (a new domain's device model has them), then D3 -> D0. S5 passes down.
The D-IRPs the real FDO requests with PoRequestPowerIrp are its own D0/D3 steps here, done inline.

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
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_LATE
from xenpv.stack.drivers.xenfilt.emulated import GUID_XENFILT_EMULATED_INTERFACE, EmulatedStatus
from xenpv.stack.kernel import (IRP_MN_PNP, IRP_MN_POWER, POWER_STATE_TYPE, S0, S3, S4, S5, BusQueryIdType,
                          DeviceObject, DeviceRelationType, Irp, IoCompleteRequest, IoDeleteDevice,
                          IoDetachDevice, IoGetAttachedDevice, IoInvalidateDeviceRelations, IoSynchronousCallDriver,
                          QueryIdParameters, QueryInterfaceParameters, forward)
from xenpv.stack.kernel.bugcheck import BUG, BUG_ON, BugCheck
from xenpv.stack.kernel.debuglog import DbgLevel
from xenpv.stack.kernel.event import KEvent, KeWaitForSingleObject, wait_for_thread
from xenpv.stack.kernel.irql import assert_passive, current_processor
from xenpv.stack.kernel.power import D0, D3
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_CANCELLED, STATUS_SUCCESS,
                                       STATUS_UNSUCCESSFUL, status_name)
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.vcpu.relocation import parked_hypercall
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import xen as X

if TYPE_CHECKING:
    from xenpv.stack.vcpu.platform import XenPlatform

    from .driver import XenbusDriver

log = logging.getLogger("stack.drivers.xenbus.fdo")

XEN_PLATFORM_VENDOR_ID = 0x5853
PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters"

# Interface contexts in creation order (later ones take earlier ones as constructor arguments), with
# the module under stack/drivers/xenbus/ that provides each.
INTERFACE_MODULES = (("DEBUG", "debug"), ("SUSPEND", "suspend"), ("SHARED_INFO", "shared_info"),
                     ("EVTCHN", "evtchn"), ("STORE", "store"), ("RANGE_SET", "range_set"), ("CACHE", "cache"),
                     ("GNTTAB", "gnttab"), ("CONSOLE", "console"))
# FdoS3ToS4: these must be unreferenced when the domain is about to be rebuilt (a10d605, 28420a4).
S4_UNREFERENCED = ("SUSPEND", "SHARED_INFO", "EVTCHN", "STORE", "CONSOLE", "GNTTAB", "BALLOON")
# What FdoD3ToD0 acquires for the FDO itself, in order (CONSOLE may fail: ConsoleAcquired stays FALSE).
FDO_HELD_INTERFACES = ("DEBUG", "SUSPEND", "RANGE_SET", "EVTCHN", "STORE", "CONSOLE")
# How often the suspend thread looks at whether it was asked to stop, between watch events.
SUSPEND_THREAD_PERIOD = 0.25


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
    device_power: int = D3
    # The scan watch's event (ScanThread's) and the suspend thread's; FdoScan runs from poll().
    _scan_event: KEvent = field(default_factory=lambda: KEvent("XENBUS scan", synchronization=True))
    _suspend_event: KEvent = field(default_factory=lambda: KEvent("XENBUS suspend", synchronization=True))
    # Set by the suspend thread each time round (Fdo->SuspendEvent): FdoD0ToD3 waits for it.
    _suspend_idle: KEvent = field(default_factory=lambda: KEvent("XENBUS suspend idle"))
    _suspend_thread: threading.Thread | None = None
    _stopping: bool = False
    _scan_watch: Any = None
    _suspend_watch: Any = None
    _suspend_callback_late: Any = None
    _held: list[str] = field(default_factory=list)
    # Fault injection: the FDO leaves control/shutdown=suspend unanswered (a guest that never suspends).
    ignore_suspend: bool = False
    suspends: int = 0

    def FdoStop(self) -> None:
        """Go D3, stop the suspend thread, drop the platform (FDO removal, or the end of this boot)."""
        if self.platform is None:
            return
        try:
            try:
                with current_processor().lock:  # the agent's shutdown calls this outside any dispatch routine
                    if self.device_power == D0:
                        # After S5 (a restart) Windows sends the FDO no D-IRP: what it wrote to xenstore stays
                        # (control/feature-suspend, which the guest could not create again); the model
                        # still gives back what the boot holds.
                        self.FdoD0ToD3(keep_store_keys=self.system_power == S5)
                    self._stop_suspend_thread()
            except (BugCheck, HarnessTooSlow):
                # A stopped processor runs no more driver code: the interfaces stay as they are (the dump
                # shows them); the suspend thread sees the stop and ends.
                self._stop_suspend_thread()
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
            BUG_ON(not present, "!Present")  # fdo.c FdoSetActive: BUG_ON's text is its expression
        if status != EmulatedStatus.NEUTRAL:
            self.active = status == EmulatedStatus.FORCE_ACTIVATED
            if self.active:
                # (VOID) ConfigSetActive: a refusal (legacy device) leaves the FDO active anyway.
                config.ConfigSetActive(self.device_id, self.instance_id, self.location)
        elif (current := config.ConfigGetActive()) is not None:
            self.active = current.device_id.upper() == self.device_id.upper()
            if self.active:
                config.ConfigUpdateActive(self.device_id, self.instance_id, self.location)  # (VOID) too
        else:
            self.active = NT_SUCCESS(config.ConfigSetActive(self.device_id, self.instance_id, self.location))
        self._print(f"FdoSetActive: {self.device_id}\\{self.instance_id}: {'ACTIVE' if self.active else 'inactive'}"
                    + (f" ({status.name})" if status != EmulatedStatus.NEUTRAL else ""))

    # -- start and the interfaces --------------------------------------------------------------

    def FdoStart(self) -> int:
        try:
            self.platform = self.driver.platform_factory()
        except Exception as exc:  # noqa: BLE001 - a platform that cannot start fails START_DEVICE
            self._print(f"FdoStart: the platform did not start: {exc}", DbgLevel.ERROR)
            return STATUS_UNSUCCESSFUL
        self._create_interfaces()
        self._start_suspend_thread()
        status = self.FdoD3ToD0()
        if not NT_SUCCESS(status):
            return status
        self.FdoScan()
        return STATUS_SUCCESS

    def _suspend_domain(self) -> int:
        """xen.sys SchedShutdown(SHUTDOWN_suspend): the vCPU parks in the hypercall (stack.vcpu.relocation);
        1 means the suspend was cancelled (the domain resumed in place), as sched.c maps it."""
        assert self.platform is not None
        hc = self.platform.hypercalls
        hc.vcpu.write_phys(hc.scratch, bytes(X.SchedShutdown(reason=X.SHUTDOWN_suspend)))
        rc = parked_hypercall(hc.vcpu, X.HYPERCALL_NUMBERS["sched_op"], (X.SCHEDOP_shutdown, hc.scratch))
        if rc < 0:
            return STATUS_UNSUCCESSFUL
        return STATUS_CANCELLED if rc == 1 else STATUS_SUCCESS

    def _sync_capture(self) -> Any:
        """The model's SyncCapture: no other thread of the guest inside the xenstore ring meanwhile."""
        assert self.platform is not None
        return self.platform.store.held()

    def _create_interfaces(self) -> None:
        # What the contexts' constructors ask for by name, beside the interfaces made before them.
        pool: dict[str, Any] = {"platform": self.platform, "suspend_domain": self._suspend_domain,
                                "sync_capture": self._sync_capture,
                                "unplug_devices": self.driver.xen.unplug.UnplugDevices}
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

    def _classes_value(self, name: str) -> list[str]:
        """RegistryQuerySzValue on XENBUS\\Parameters (REG_SZ or REG_MULTI_SZ), as stored; [] if absent."""
        try:
            data = self.driver.xen.registry.query_value(PARAMETERS, name).data
        except RegistryError:
            return []
        return [data] if isinstance(data, str) else [str(d) for d in data] if isinstance(data, list) else []

    def FdoScan(self) -> bool:
        """Bring the child PDOs in line with `device/` + SyntheticClasses; True if anything changed.

        fdo.c FdoScan: the store's class names are upper-cased, SyntheticClasses are taken as stored; a
        class is kept when `strncmp(Class, Supported, strlen(Class)) == 0` for some SupportedClasses entry
        (so the entry must start with the class name, case-sensitively). No SupportedClasses value, no
        class is supported and no PDO is created; no SyntheticClasses value, no synthetic class."""
        assert self.platform is not None
        try:
            names = [n.upper() for n in self.platform.store.directory("device")]
        except XenstoreError as exc:
            if exc.errno != "ENOENT":
                raise
            names = []
        supported = self._classes_value("SupportedClasses")
        synthetic = self._classes_value("SyntheticClasses")
        wanted = [n for n in dict.fromkeys(names + synthetic) if n and any(s.startswith(n) for s in supported)]
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
        """Act on a `device` watch event (the FDO's scan thread, run from the agent's loop)."""
        if self.platform is None or self.device_power != D0:
            return
        self.platform.store.pump()
        fired = self._scan_event.read_state()
        self._scan_event.clear()
        if fired and self.FdoScan():
            IoInvalidateDeviceRelations(self.pdo)

    # -- D0 <-> D3 (fdo.c FdoD3ToD0 / FdoD0ToD3) ----------------------------------------------------

    def FdoD3ToD0(self) -> int:
        assert_passive("FdoD3ToD0")
        if self.active:
            # fdo.c takes and gives back the interfaces at DISPATCH_LEVEL; the model's interfaces start and
            # stop threads in their first Acquire and last Release (STORE's watch thread, EVTCHN's line),
            # which waits - legal only at PASSIVE - so the model stays there.
            for name in FDO_HELD_INTERFACES:
                context = self.interfaces.get(name)
                if context is None:
                    continue
                status = context.acquire()
                if not NT_SUCCESS(status):
                    if name == "CONSOLE":
                        continue  # Fdo->ConsoleAcquired stays FALSE
                    self._print(f"FdoD3ToD0: {name} Acquire: {status_name(status)}", DbgLevel.ERROR)
                    self._release_held()
                    return status
                self._held.append(name)
            self._d3_to_d0()
            suspend = self.interfaces["SUSPEND"]
            _, self._suspend_callback_late = suspend.SuspendRegister(SUSPEND_CALLBACK_LATE,
                                                                     self.FdoSuspendCallbackLate, None)
        self.device_power = D0
        self._print("FdoD3ToD0: D0")
        return STATUS_SUCCESS

    def FdoD0ToD3(self, keep_store_keys: bool = False) -> None:
        assert_passive("FdoD0ToD3")
        self.device_power = D3
        if self.active:
            # The suspend thread must not be in the middle of a suspend when the interfaces go.
            self._suspend_idle.clear()
            self._suspend_event.set()
            if self._suspend_thread is not None and self._suspend_thread.is_alive():
                KeWaitForSingleObject(self._suspend_idle, 30.0)
            # At PASSIVE_LEVEL in the model, as FdoD3ToD0 says.
            if self._suspend_callback_late is not None:
                self.interfaces["SUSPEND"].SuspendDeregister(self._suspend_callback_late)
                self._suspend_callback_late = None
            self._d0_to_d3(remove_feature=not keep_store_keys)
            self._release_held()
        self._print("FdoD0ToD3: D3")

    def _release_held(self) -> None:
        for name in reversed(self._held):
            self.interfaces[name].release()
        self._held.clear()

    def _d3_to_d0(self) -> None:
        """__FdoD3ToD0: the scan and suspend watches, control/feature-suspend."""
        store = self.interfaces["STORE"]
        status, self._scan_watch = store.StoreWatchAdd(None, "device", self._scan_event)
        if not NT_SUCCESS(status):
            self._print(f"device watch: {status_name(status)}", DbgLevel.WARNING)
        status, self._suspend_watch = store.StoreWatchAdd("control", "shutdown", self._suspend_event)
        if not NT_SUCCESS(status):
            self._print(f"control/shutdown watch: {status_name(status)}", DbgLevel.WARNING)
        status = store.StorePrintf(None, "control", "feature-suspend", "%u", 1)
        if not NT_SUCCESS(status):
            self._print(f"control/feature-suspend: {status_name(status)}", DbgLevel.WARNING)

    def _d0_to_d3(self, remove_feature: bool = True) -> None:
        """__FdoD0ToD3."""
        store = self.interfaces["STORE"]
        if remove_feature:
            store.StoreRemove(None, "control", "feature-suspend")
        for attribute in ("_suspend_watch", "_scan_watch"):
            watch = getattr(self, attribute)
            if watch is not None:
                store.StoreWatchRemove(watch)
                setattr(self, attribute, None)

    def FdoSuspendCallbackLate(self, _argument: Any) -> None:
        """In a new domain the watches are dead and the feature key is gone: D0 -> D3 -> D0 on them."""
        self._d0_to_d3()
        self._d3_to_d0()

    # -- the suspend thread (fdo.c FdoSuspend) -------------------------------------------------------

    def _start_suspend_thread(self) -> None:
        self._stopping = False
        self._suspend_thread = threading.Thread(target=self._run_suspend_thread, name="xenbus-suspend", daemon=True)
        self._suspend_thread.start()

    def _stop_suspend_thread(self) -> None:
        thread, self._suspend_thread = self._suspend_thread, None
        if thread is None:
            return
        self._stopping = True
        self._suspend_event.set()
        if thread is not threading.current_thread():
            wait_for_thread(thread, "XENBUS suspend thread")

    def _run_suspend_thread(self) -> None:
        cpu = current_processor()
        try:
            while not self._stopping:
                with cpu.lock:
                    if cpu.halted is not None:
                        return
                    # A synchronization event: a satisfied wait has reset it.
                    woken = KeWaitForSingleObject(self._suspend_event, SUSPEND_THREAD_PERIOD) == STATUS_SUCCESS
                    if self._stopping:
                        return
                    if woken:
                        self.FdoSuspend()
                    self._suspend_idle.set()
        except BugCheck as stop:
            # The guest stopped (in SUSPEND.Trigger's EARLY or LATE callbacks, say); whoever handed the
            # parked vCPU its new machine hears it instead of waiting for a resume that will not come.
            if self.platform is not None:
                self.platform.vcpu.relocation.report(f"the guest stopped: {stop.describe()}")
            return
        except HarnessTooSlow as late:
            cpu.give_up(late)
        except (OSError, ValueError, AttributeError) as exc:
            # The platform (and its xenstore connection) goes away when the agent shuts down.
            log.info("suspend thread ends: %r", exc)
        except Exception as exc:
            # A system thread's unhandled exception stops Windows: the model stops the guest the same way,
            # a STOP naming xenbus.sys, rather than a thread that silently stops answering suspends.
            log.exception("xenbus-suspend thread: unhandled exception")
            try:
                BUG(f"unhandled {type(exc).__name__} in the suspend thread: {exc}", module="xenbus.sys")
            except BugCheck:
                pass
        finally:
            self._suspend_idle.set()

    def FdoSuspend(self) -> None:
        """One round of FdoSuspend: in D0, a "suspend" request is acknowledged and SUSPEND.Trigger runs."""
        if self.device_power != D0 or not self.active:
            return  # it is not safe to use interfaces before this point
        store = self.interfaces["STORE"]
        status, buffer = store.StoreRead(None, "control", "shutdown")
        if not NT_SUCCESS(status):
            return
        request = buffer.Value.decode(errors="replace")
        store.StoreFree(buffer)
        if request != "suspend":
            return
        if self.ignore_suspend:
            self._print("FdoSuspend: control/shutdown=suspend ignored (fault injection)", DbgLevel.WARNING)
            return
        store.StorePrintf(None, "control", "shutdown", "")
        self._print("FdoSuspend: suspend requested")
        self.interfaces["SUSPEND"].SuspendTrigger()
        self.suspends += 1
        assert self.platform is not None
        # Whoever handed the parked vCPU a new machine hears that the guest runs there now.
        self.platform.vcpu.relocation.report(None)

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
        """FdoSetSystemPower: down to S3/S4 the FDO's D3 comes first, and FdoS3ToS4's check after it; up
        from S3/S4 the bus is back first, then FdoS4ToS3 and D0. S5 passes down (FdoSetSystemPowerDown)."""
        params = irp.parameters
        if not (self.platform is not None and irp.minor == IRP_MN_POWER.SET_POWER
                and params.type == POWER_STATE_TYPE.SystemPowerState):
            return forward(irp, self.lower)
        state = params.state
        if state in (S3, S4) and self.system_power == S0:
            if self.device_power == D0:
                self.FdoD0ToD3()
            if state == S4:
                self.system_power = S3
                self.FdoS3ToS4()
            self.system_power = state
            return forward(irp, self.lower)
        if state == S0 and self.system_power in (S3, S4):
            status = forward(irp, self.lower)
            if self.system_power == S4:
                self.FdoS4ToS3()
            self.system_power = S0
            if self.device_power != D0:
                self.FdoD3ToD0()
            return status
        self.system_power = state
        return forward(irp, self.lower)

    def FdoS3ToS4(self) -> None:
        if not self.active:
            return
        for name in S4_UNREFERENCED:
            context = self.interfaces.get(name)
            if context is not None and context.references != 0:
                # fdo.c: BUG_ON(SuspendGetReferences(Fdo->SuspendContext) != 0)...; the count is in the dump.
                prefix = context.prefix()
                BUG(f"{prefix}GetReferences(Fdo->{prefix}Context) != 0")

    def FdoS4ToS3(self) -> None:
        if not self.active:
            return
        # LogResume, then UnplugDevices: the domain was rebuilt and its emulated devices are back.
        self._print("FdoS4ToS3: resume from S4")
        self.driver.xen.unplug.UnplugDevices()
        # What SHARED_INFO's, GNTTAB's and STORE's Acquire set up in the real driver is the platform's
        # here (made once at start): shared_info and the grant frames are mapped in the new domain and the
        # store connection moves to its event channel before D3 -> D0 takes the interfaces again.
        assert self.platform is not None
        self.platform.map_shared_info()
        self.platform.map_grant_frames()
        port = self.platform.reconnect_store()
        self._print(f"FdoS4ToS3: platform mapped in the new domain, store port {port}")

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
    if not NT_SUCCESS(irp.io_status.status):
        return None
    return irp.parameters.interface


PlatformFactory = Callable[[], "XenPlatform"]
__all__ = ["XenbusFdo", "PlatformFactory", "query_bus_interface", "query_emulated", "query_id", "query_location"]
