"""The PnP manager: device nodes, driver matching and loading, start, enumeration and removal.

What is modelled, in Windows order:
- A root device node `HTREE\\ROOT\\0` whose PDO belongs to the PnP manager; devices registered with
  `add_root_device` are its bus relations (as root-enumerated devices are).
- For each new PDO: IRP_MN_QUERY_ID (DeviceID, InstanceID, HardwareIDs, CompatibleIDs) and
  IRP_MN_QUERY_CAPABILITIES, the `Enum\\<DeviceID>\\<InstanceID>` key, then a driver match: every hardware
  ID in order, then every compatible ID, against the `DriverCatalog`; the best rank wins (any hardware ID
  beats any compatible ID, an earlier ID beats a later one, then the catalog's own rank).
- Driver loading: DriverEntry once per driver per boot. A failing DriverEntry leaves the driver unloaded
  (the failure is remembered for the boot) and the device with CM_PROB_FAILED_DRIVER_ENTRY (37) and the
  status as its problem status. A driver with no catalog image is CM_PROB_DRIVER_FAILED_LOAD (39); no
  match at all is CM_PROB_FAILED_INSTALL (28).
- AddDevice in Windows order: device LowerFilters, class LowerFilters, the function driver, device
  UpperFilters, class UpperFilters (filters are REG_MULTI_SZ values of the Enum key and of
  `Control\\Class\\{ClassGUID}`). A filter whose DriverEntry left no AddDevice is skipped (XENFILT on a
  XenTouch mismatch). A failing AddDevice is CM_PROB_FAILED_ADD (31).
- IRP_MN_START_DEVICE to the top of the stack; each driver forwards and waits, so the PDO completes first.
  Failure is CM_PROB_FAILED_START (10), or CM_PROB_NEED_RESTART (14) for STATUS_PNP_REBOOT_REQUIRED, and
  the stack gets IRP_MN_REMOVE_DEVICE.
- A started device is asked for BusRelations; new PDOs are configured and started depth first. A PDO
  that is no longer reported gets IRP_MN_SURPRISE_REMOVAL (if started) and then IRP_MN_REMOVE_DEVICE,
  for its whole subtree, children before parents. A non-PDO in the relations, or two siblings with one
  instance path, stop the guest with PNP_DETECTED_FATAL_ERROR (0xCA, p1 = 2 / 1).
- IoInvalidateDeviceRelations queues a re-enumeration; it runs at once when called at PASSIVE_LEVEL
  outside other PnP work, else when that work finishes or at the next `process_pending()` (Windows runs
  it on a worker thread; the agent calls process_pending from its main loop).
- A driver whose last device is gone is unloaded (Unload is called) and loads again with DriverEntry
  when a device needs it.

Simplifications: no resource arbitration, no QUERY_REMOVE/CANCEL_REMOVE negotiation for user-initiated
removal, no UniqueID-based instance-ID prefixing (the bus driver's InstanceID is used as is), no
device interfaces, and `Enum` keys are written but not used to skip re-querying IDs.
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Any, Protocol

from .bugcheck import BugCheckCode, KeBugCheckEx
from .debuglog import DebugLog, DbgLevel
from .device import (DeviceKind, DeviceObject, DriverEntryRoutine, DriverObject, IoCreateDevice, IoDeleteDevice,
                     IoGetAttachedDevice, device_stack)
from .irp import (IRP_MJ, IRP_MN_PNP, BusQueryIdType, DeviceCapabilities, DeviceRelationType, Irp,
                  IoCompleteRequest, IoSynchronousCallDriver, QueryCapabilitiesParameters,
                  QueryDeviceRelationsParameters, QueryIdParameters)
from .irql import PASSIVE_LEVEL, current_processor
from .registry import Registry, RegistryError
from .status import (NT_SUCCESS, STATUS_NOT_SUPPORTED, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_PNP_REBOOT_REQUIRED,
                     STATUS_SUCCESS, status_name)

log = logging.getLogger("stack.kernel.pnp")

ENUM_KEY = r"HKLM\SYSTEM\CurrentControlSet\Enum"
CLASS_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\Class"
SYSTEM_CLASS_GUID = "{4d36e97d-e325-11ce-bfc1-08002be10318}"
HDC_CLASS_GUID = "{4d36e96a-e325-11ce-bfc1-08002be10318}"
ROOT_INSTANCE_PATH = r"HTREE\ROOT\0"

# Rank bands (lower is better): hardware IDs before compatible IDs, earlier IDs before later ones.
_HARDWARE_ID_RANK = 0x0000
_COMPATIBLE_ID_RANK = 0x2000


class CmProblem(IntEnum):
    NONE = 0
    FAILED_START = 10
    NEED_RESTART = 14
    DEVICE_NOT_THERE = 24
    FAILED_INSTALL = 28
    FAILED_ADD = 31
    FAILED_DRIVER_ENTRY = 37
    DRIVER_FAILED_LOAD = 39


class DeviceNodeState(Enum):
    INITIALIZED = "initialized"
    DRIVERS_ADDED = "drivers-added"
    STARTED = "started"
    SURPRISE_REMOVED = "surprise-removed"
    REMOVED = "removed"


@dataclass(frozen=True)
class DriverMatch:
    """One catalog entry binding an ID to a service. `rank` orders entries for the same ID (0 best)."""

    service: str
    rank: int = 0
    class_guid: str = SYSTEM_CLASS_GUID
    package: str = ""


class DriverCatalog(Protocol):
    """Installed driver packages as the PnP manager sees them (the installer implements this)."""

    def find(self, device_id: str) -> Sequence[DriverMatch]:
        """Entries binding `device_id` (hardware or compatible ID; compare case-insensitively)."""
        ...

    def entry_point(self, service: str) -> DriverEntryRoutine | None:
        """The DriverEntry of `service`'s image, or None if the image is missing."""
        ...


class InMemoryCatalog:
    """A `DriverCatalog` held in memory: bind IDs to services and services to DriverEntry routines."""

    def __init__(self) -> None:
        self._bindings: dict[str, list[DriverMatch]] = {}
        self._images: dict[str, DriverEntryRoutine] = {}

    def add_driver(self, service: str, entry: DriverEntryRoutine) -> None:
        self._images[service.upper()] = entry

    def bind(self, device_id: str, service: str, *, rank: int = 0, class_guid: str = SYSTEM_CLASS_GUID,
             package: str = "") -> None:
        self._bindings.setdefault(device_id.upper(), []).append(DriverMatch(service, rank, class_guid, package))

    def find(self, device_id: str) -> Sequence[DriverMatch]:
        return list(self._bindings.get(device_id.upper(), []))

    def entry_point(self, service: str) -> DriverEntryRoutine | None:
        return self._images.get(service.upper())


@dataclass(eq=False)
class DeviceNode:
    manager: PnpManager
    pdo: DeviceObject
    parent: DeviceNode | None
    device_id: str = ""
    instance_id: str = ""
    hardware_ids: list[str] = field(default_factory=list)
    compatible_ids: list[str] = field(default_factory=list)
    capabilities: DeviceCapabilities = field(default_factory=DeviceCapabilities)
    children: list[DeviceNode] = field(default_factory=list)
    service: str | None = None
    matching_id: str | None = None
    class_guid: str | None = None
    state: DeviceNodeState = DeviceNodeState.INITIALIZED
    problem: CmProblem = CmProblem.NONE
    problem_status: int = STATUS_SUCCESS
    # Device power state as last set by a completed D-IRP (power.py keeps it current).
    device_power: int = 1

    @property
    def instance_path(self) -> str:
        return f"{self.device_id}\\{self.instance_id}" if self.parent is not None else ROOT_INSTANCE_PATH

    @property
    def top(self) -> DeviceObject:
        return IoGetAttachedDevice(self.pdo)

    def stack(self) -> list[DeviceObject]:
        return device_stack(self.pdo)

    def walk(self) -> Iterator[DeviceNode]:
        """Pre-order: parents before children."""
        yield self
        for child in list(self.children):
            yield from child.walk()

    def walk_children_first(self) -> Iterator[DeviceNode]:
        for child in list(self.children):
            yield from child.walk_children_first()
        yield self

    def __repr__(self) -> str:
        return f"<DeviceNode {self.instance_path} {self.state.value}>"


@dataclass
class RootChild:
    """The PnP manager's extension for a root-enumerated PDO."""

    device_id: str
    instance_id: str
    hardware_ids: list[str]
    compatible_ids: list[str]


class PnpManager:
    def __init__(self, registry: Registry, catalog: DriverCatalog, debug_log: DebugLog) -> None:
        self.registry = registry
        self.catalog = catalog
        self.debug_log = debug_log
        self.drivers: dict[str, DriverObject] = {}
        self.failed_drivers: dict[str, int] = {}
        self.root_driver = DriverObject("PnpManager", module="ntoskrnl.exe")
        self.root_driver.major_function[IRP_MJ.PNP] = self._root_dispatch_pnp
        self.root_driver.major_function[IRP_MJ.POWER] = self._root_dispatch_power
        self.root_children: list[DeviceObject] = []
        root_pdo = IoCreateDevice(self.root_driver, DeviceKind.PDO, name="HTREE\\ROOT\\0")
        self.root = DeviceNode(self, root_pdo, None, device_id="HTREE\\ROOT", instance_id="0",
                               state=DeviceNodeState.STARTED)
        root_pdo.device_node = self.root
        self._pending: deque[DeviceNode] = deque()
        self._busy = False
        # Set by the PowerManager built on top of this manager (PoRequestPowerIrp finds it here).
        self.power: Any = None

    # -- the root enumerator ------------------------------------------------------------------------

    def add_root_device(self, device_id: str, hardware_ids: Sequence[str], compatible_ids: Sequence[str] = (),
                        instance_id: str = "0") -> DeviceObject:
        """Register a root-enumerated device; it appears at the next enumeration of the root."""
        pdo = IoCreateDevice(self.root_driver, DeviceKind.PDO,
                             RootChild(device_id, instance_id, list(hardware_ids), list(compatible_ids)),
                             name=f"{device_id}\\{instance_id}")
        self.root_children.append(pdo)
        return pdo

    def remove_root_device(self, pdo: DeviceObject) -> None:
        self.root_children.remove(pdo)

    def _root_dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        minor = irp.minor
        if device is self.root.pdo:
            if minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS and irp.parameters.type == DeviceRelationType.BusRelations:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, list(self.root_children)
        else:
            child: RootChild = device.extension
            if minor == IRP_MN_PNP.QUERY_ID:
                ids: dict[BusQueryIdType, Any] = {
                    BusQueryIdType.BusQueryDeviceID: child.device_id,
                    BusQueryIdType.BusQueryInstanceID: child.instance_id,
                    BusQueryIdType.BusQueryHardwareIDs: child.hardware_ids,
                    BusQueryIdType.BusQueryCompatibleIDs: child.compatible_ids,
                }
                if irp.parameters.id_type in ids:
                    irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, ids[irp.parameters.id_type]
            elif minor in (IRP_MN_PNP.START_DEVICE, IRP_MN_PNP.QUERY_CAPABILITIES, IRP_MN_PNP.SURPRISE_REMOVAL,
                           IRP_MN_PNP.STOP_DEVICE, IRP_MN_PNP.QUERY_REMOVE_DEVICE, IRP_MN_PNP.CANCEL_REMOVE_DEVICE):
                irp.io_status.status = STATUS_SUCCESS
            elif minor == IRP_MN_PNP.REMOVE_DEVICE:
                irp.io_status.status = STATUS_SUCCESS
                if device not in self.root_children:
                    IoDeleteDevice(device)
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status

    def _root_dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        # Root-enumerated PDOs have no hardware: every power request succeeds.
        irp.io_status.status = STATUS_SUCCESS
        IoCompleteRequest(irp)
        return STATUS_SUCCESS

    # -- entry points -------------------------------------------------------------------------------

    def start(self) -> None:
        """Boot: enumerate everything from the root."""
        self.invalidate(self.root)

    def invalidate(self, node: DeviceNode) -> None:
        """IoInvalidateDeviceRelations(node.pdo, BusRelations)."""
        if node not in self._pending:
            self._pending.append(node)
        if not self._busy and current_processor().irql == PASSIVE_LEVEL:
            self.process_pending()

    def process_pending(self) -> None:
        if self._busy:
            return
        self._busy = True
        try:
            while self._pending:
                node = self._pending.popleft()
                if node.state == DeviceNodeState.STARTED and self._attached(node):
                    self._enumerate(node)
        finally:
            self._busy = False

    def _attached(self, node: DeviceNode) -> bool:
        while node.parent is not None:
            if node not in node.parent.children:
                return False
            node = node.parent
        return node is self.root

    def find(self, instance_path: str) -> DeviceNode | None:
        for node in self.root.walk():
            if node.instance_path.upper() == instance_path.upper():
                return node
        return None

    def remove(self, node: DeviceNode) -> None:
        """Remove `node` and its subtree (REMOVE_DEVICE, children first) without surprise removal."""
        self._remove_subtree(node, surprise=False)

    # -- enumeration --------------------------------------------------------------------------------

    def _send(self, node: DeviceNode, minor: IRP_MN_PNP, parameters: Any = None, *,
              to: DeviceObject | None = None) -> Irp:
        irp = Irp.pnp(minor, parameters)
        IoSynchronousCallDriver(to or node.top, irp)
        return irp

    def _enumerate(self, node: DeviceNode) -> None:
        irp = self._send(node, IRP_MN_PNP.QUERY_DEVICE_RELATIONS,
                         QueryDeviceRelationsParameters(DeviceRelationType.BusRelations))
        if not NT_SUCCESS(irp.io_status.status):
            if irp.io_status.status != STATUS_NOT_SUPPORTED or node.children:
                log.info("%s: BusRelations failed with %s; children unchanged", node.instance_path,
                         status_name(irp.io_status.status))
            return
        reported: list[DeviceObject] = list(irp.io_status.information or [])
        for pdo in reported:
            if not isinstance(pdo, DeviceObject) or pdo.kind != DeviceKind.PDO or pdo.deleted:
                raise KeBugCheckEx(BugCheckCode.PNP_DETECTED_FATAL_ERROR, 2, pdo, 0, 0,
                                   module=node.top.driver.module,
                                   message=f"{node.instance_path} reported {pdo!r} as a child PDO")
        gone = [child for child in node.children if child.pdo not in reported]
        for child in gone:
            self._print(f"{child.instance_path}: no longer reported by {node.instance_path}")
            self._remove_subtree(child, surprise=True)
        known = {child.pdo for child in node.children}
        for pdo in reported:
            if pdo not in known:
                self._configure(node, pdo)

    def _configure(self, parent: DeviceNode, pdo: DeviceObject) -> None:
        node = DeviceNode(self, pdo, parent)
        pdo.device_node = node
        node.device_id = self._query_id(node, BusQueryIdType.BusQueryDeviceID) or ""
        node.instance_id = self._query_id(node, BusQueryIdType.BusQueryInstanceID) or "0"
        node.hardware_ids = list(self._query_id(node, BusQueryIdType.BusQueryHardwareIDs) or [])
        node.compatible_ids = list(self._query_id(node, BusQueryIdType.BusQueryCompatibleIDs) or [])
        if not node.device_id:
            raise KeBugCheckEx(BugCheckCode.PNP_DETECTED_FATAL_ERROR, 3, pdo, 0, 1, module=pdo.driver.module,
                               message=f"{pdo!r} has no device ID")
        for sibling in parent.children:
            if sibling.instance_path.upper() == node.instance_path.upper():
                raise KeBugCheckEx(BugCheckCode.PNP_DETECTED_FATAL_ERROR, 1, pdo, sibling.pdo, 0,
                                   module=pdo.driver.module,
                                   message=f"duplicate PDO {node.instance_path} under {parent.instance_path}")
        caps = DeviceCapabilities()
        self._send(node, IRP_MN_PNP.QUERY_CAPABILITIES, QueryCapabilitiesParameters(caps))
        node.capabilities = caps
        parent.children.append(node)
        self._write_enum_key(node)
        self._print(f"{node.instance_path}: new device")
        if self._load_stack(node):
            self._start(node)

    def _query_id(self, node: DeviceNode, id_type: BusQueryIdType) -> Any:
        irp = self._send(node, IRP_MN_PNP.QUERY_ID, QueryIdParameters(id_type))
        return irp.io_status.information if NT_SUCCESS(irp.io_status.status) else None

    def _enum_path(self, node: DeviceNode) -> str:
        return f"{ENUM_KEY}\\{node.instance_path}"

    def _write_enum_key(self, node: DeviceNode) -> None:
        path = self._enum_path(node)
        self.registry.create_key(path)
        if node.hardware_ids:
            self.registry.set_multi_sz(path, "HardwareID", node.hardware_ids)
        if node.compatible_ids:
            self.registry.set_multi_sz(path, "CompatibleIDs", node.compatible_ids)

    def _match(self, node: DeviceNode) -> tuple[DriverMatch, str] | None:
        best: tuple[tuple[int, int], DriverMatch, str] | None = None
        ranked = [(_HARDWARE_ID_RANK + i, hid) for i, hid in enumerate(node.hardware_ids)]
        ranked += [(_COMPATIBLE_ID_RANK + i, cid) for i, cid in enumerate(node.compatible_ids)]
        for id_rank, device_id in ranked:
            for match in self.catalog.find(device_id):
                key = (id_rank, match.rank)
                if best is None or key < best[0]:
                    best = (key, match, device_id)
        return None if best is None else (best[1], best[2])

    def _filters(self, node: DeviceNode, value: str) -> tuple[list[str], list[str]]:
        """(device filters, class filters) named `value` ("UpperFilters" or "LowerFilters")."""
        def read(path: str) -> list[str]:
            try:
                return self.registry.get_multi_sz(path, value)
            except RegistryError:
                return []

        class_filters = read(f"{CLASS_KEY}\\{node.class_guid}") if node.class_guid else []
        return read(self._enum_path(node)), class_filters

    def _load_stack(self, node: DeviceNode) -> bool:
        chosen = self._match(node)
        if chosen is None:
            return self._fail(node, CmProblem.FAILED_INSTALL, STATUS_OBJECT_NAME_NOT_FOUND,
                              "no driver package matches its hardware or compatible IDs")
        match, matched_id = chosen
        node.service, node.matching_id, node.class_guid = match.service, matched_id, match.class_guid
        path = self._enum_path(node)
        self.registry.set_sz(path, "Service", match.service)
        self.registry.set_sz(path, "ClassGUID", match.class_guid)
        self.registry.set_sz(path, "MatchingDeviceId", matched_id)
        device_lower, class_lower = self._filters(node, "LowerFilters")
        device_upper, class_upper = self._filters(node, "UpperFilters")
        order = ([(s, True) for s in device_lower + class_lower] + [(match.service, False)]
                 + [(s, True) for s in device_upper + class_upper])
        self._print(f"{node.instance_path}: {matched_id} -> {match.service}"
                    + (f" (filters {', '.join(s for s, f in order if f)})" if len(order) > 1 else ""))
        for service, is_filter in order:
            driver, status = self._load_driver(service)
            if driver is None:
                problem = CmProblem.DRIVER_FAILED_LOAD if status == STATUS_OBJECT_NAME_NOT_FOUND \
                    else CmProblem.FAILED_DRIVER_ENTRY
                return self._fail(node, problem, status, f"{service} did not load")
            if driver.add_device is None:
                if is_filter:
                    continue
                return self._fail(node, CmProblem.FAILED_ADD, STATUS_NOT_SUPPORTED, f"{service} has no AddDevice")
            with current_processor().running_as(driver.module):
                status = driver.add_device(driver, node.pdo)
            if not NT_SUCCESS(status):
                self._fail(node, CmProblem.FAILED_ADD, status, f"{service} AddDevice failed")
                self._send_remove(node)
                return False
        node.state = DeviceNodeState.DRIVERS_ADDED
        return True

    def _load_driver(self, service: str) -> tuple[DriverObject | None, int]:
        key = service.upper()
        if key in self.drivers:
            return self.drivers[key], STATUS_SUCCESS
        if key in self.failed_drivers:
            return None, self.failed_drivers[key]
        entry = self.catalog.entry_point(service)
        if entry is None:
            self.failed_drivers[key] = STATUS_OBJECT_NAME_NOT_FOUND
            return None, STATUS_OBJECT_NAME_NOT_FOUND
        driver = DriverObject(service)
        with current_processor().running_as(driver.module):
            status = entry(driver, driver.registry_path)
        if not NT_SUCCESS(status):
            self.failed_drivers[key] = status
            self._print(f"{service}: DriverEntry failed ({status_name(status)})", DbgLevel.ERROR)
            return None, status
        self.drivers[key] = driver
        self._print(f"{service}: loaded")
        return driver, STATUS_SUCCESS

    def _start(self, node: DeviceNode) -> None:
        irp = self._send(node, IRP_MN_PNP.START_DEVICE)
        if not NT_SUCCESS(irp.io_status.status):
            # A driver that can only start after a reboot says so: the device waits with "restart needed".
            problem = (CmProblem.NEED_RESTART if irp.io_status.status == STATUS_PNP_REBOOT_REQUIRED
                       else CmProblem.FAILED_START)
            self._fail(node, problem, irp.io_status.status, "START_DEVICE failed")
            self._send_remove(node)
            return
        node.state = DeviceNodeState.STARTED
        self._print(f"{node.instance_path}: started")
        self._enumerate(node)

    def _fail(self, node: DeviceNode, problem: CmProblem, status: int, why: str) -> bool:
        node.problem, node.problem_status = problem, status
        self._print(f"{node.instance_path}: problem {problem.value} (CM_PROB_{problem.name}), "
                    f"{status_name(status)}: {why}", DbgLevel.WARNING)
        return False

    # -- removal ------------------------------------------------------------------------------------

    def _remove_subtree(self, node: DeviceNode, *, surprise: bool) -> None:
        if surprise:
            for each in node.walk_children_first():
                if each.state == DeviceNodeState.STARTED:
                    self._send(each, IRP_MN_PNP.SURPRISE_REMOVAL)
                    each.state = DeviceNodeState.SURPRISE_REMOVED
        for each in node.walk_children_first():
            self._send_remove(each)
            each.state = DeviceNodeState.REMOVED
            if each.parent is not None and each in each.parent.children:
                each.parent.children.remove(each)
            self._print(f"{each.instance_path}: removed")

    def _send_remove(self, node: DeviceNode) -> None:
        drivers = {device.driver for device in node.stack()}
        self._send(node, IRP_MN_PNP.REMOVE_DEVICE)
        for driver in drivers:
            if driver is self.root_driver or driver.devices or self.drivers.get(driver.name.upper()) is not driver:
                continue
            if driver.unload is not None:
                with current_processor().running_as(driver.module):
                    driver.unload(driver)
            del self.drivers[driver.name.upper()]
            self._print(f"{driver.name}: unloaded")

    # -- display ------------------------------------------------------------------------------------

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.debug_log.print("PNP", text, level)

    def dump_tree(self) -> str:
        """The device tree: instance path, state, service, driver stack (bottom to top), problem."""
        lines: list[str] = []

        def visit(node: DeviceNode, depth: int) -> None:
            stack = ",".join(f"{d.driver.name}({d.kind.value})" for d in node.stack())
            line = f"{'  ' * depth}{node.instance_path} [{node.state.value}]"
            if node.service:
                line += f" service={node.service}"
            line += f" stack={stack}"
            if node.problem != CmProblem.NONE:
                line += f" problem={node.problem.value}:CM_PROB_{node.problem.name} ({status_name(node.problem_status)})"
            lines.append(line)
            for child in node.children:
                visit(child, depth + 1)

        visit(self.root, 0)
        return "\n".join(lines) + "\n"


def IoInvalidateDeviceRelations(pdo: DeviceObject, relation: DeviceRelationType = DeviceRelationType.BusRelations) -> None:
    """Ask the PnP manager to re-query `pdo`'s BusRelations. `pdo` must be a PDO the PnP manager knows
    (Windows stops with PNP_DETECTED_FATAL_ERROR, p1 = 2, "invalid PDO", when a driver passes its FDO)."""
    node = pdo.device_node
    if pdo.kind != DeviceKind.PDO or node is None:
        raise KeBugCheckEx(BugCheckCode.PNP_DETECTED_FATAL_ERROR, 2, pdo, 0, 0,
                           message=f"IoInvalidateDeviceRelations({pdo!r}): not a PDO in the device tree")
    if relation == DeviceRelationType.BusRelations:
        node.manager.invalidate(node)
