"""Toy drivers written against stack.kernel the way the PV drivers are: a bus driver that creates child
PDOs from a layout, a function driver, and filters. Every IRP they see is appended to `trace`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.pci import DEVICE_TEXT_LOCATION_INFORMATION
from xenpv.stack.kernel import (D0, D3, IRP_MJ, IRP_MN_PNP, IRP_MN_POWER, POWER_STATE_TYPE, S0, BusQueryIdType,
                          DeviceKind, DeviceObject, DeviceRelationType, DriverObject, Irp,
                          IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice, IoDeleteDevice,
                          IoDetachDevice, IoSynchronousCallDriver, PoRequestPowerIrp, forward)
from xenpv.stack.kernel.status import STATUS_NOT_SUPPORTED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL

Trace = list[tuple[str, str, str]]


def irp_label(irp: Irp) -> str:
    if irp.major == IRP_MJ.POWER:
        return f"{irp.name()}:{irp.parameters.describe()}"
    return irp.name()


@dataclass
class ChildSpec:
    device_id: str
    hardware_ids: list[str]
    compatible_ids: list[str] = field(default_factory=list)
    instance_id: str = "_"
    # (status, Information) the bus answers IRP_MN_QUERY_DEVICE_TEXT(DeviceTextLocationInformation) with;
    # None: the query keeps STATUS_NOT_SUPPORTED. A failure may come with Information left set (a careless bus).
    location: tuple[int, Any] | None = None
    unanswered: set[int] = field(default_factory=set)  # BusQueryIdTypes the bus leaves STATUS_NOT_SUPPORTED


@dataclass
class PdoExt:
    spec: ChildSpec
    present: bool = True


@dataclass
class FdoExt:
    lower: DeviceObject
    label: str
    children: dict[str, DeviceObject] = field(default_factory=dict)


@dataclass
class World:
    """Shared state of the toy drivers: which children each bus has, and the trace."""

    layout: dict[str, list[ChildSpec]] = field(default_factory=dict)
    trace: Trace = field(default_factory=list)
    veto_query_power: set[str] = field(default_factory=set)
    fail_start: set[str] = field(default_factory=set)
    start_status: dict[str, int] = field(default_factory=dict)  # a START status other than UNSUCCESSFUL
    hold_set_power: set[str] = field(default_factory=set)

    def record(self, who: str, device: DeviceObject, irp_or_event: Irp | str) -> None:
        label = irp_or_event if isinstance(irp_or_event, str) else irp_label(irp_or_event)
        self.trace.append((who, _device_label(device), label))

    # -- the bus driver: FDO on a bus device, PDOs for its children ------------------------------

    def bus_entry(self, driver: DriverObject, registry_path: str) -> int:
        driver.major_function[IRP_MJ.PNP] = self._bus_pnp
        driver.major_function[IRP_MJ.POWER] = self._bus_power
        driver.add_device = self._function_add_device
        return STATUS_SUCCESS

    def _bus_pnp(self, device: DeviceObject, irp: Irp) -> int:
        if device.kind == DeviceKind.PDO:
            return self._pdo_pnp(device, irp)
        return self._fdo_pnp(device, irp)

    def _bus_power(self, device: DeviceObject, irp: Irp) -> int:
        if device.kind == DeviceKind.PDO:
            self.record("pdo", device, irp)
            irp.io_status.status = STATUS_SUCCESS
            if irp.minor == IRP_MN_POWER.SET_POWER and _device_label(device) in self.hold_set_power:
                return 0x103  # STATUS_PENDING, and nobody will ever complete it
            IoCompleteRequest(irp)
            return STATUS_SUCCESS
        return self._fdo_power(device, irp)

    def _pdo_pnp(self, device: DeviceObject, irp: Irp) -> int:
        ext: PdoExt = device.extension
        self.record("pdo", device, irp)
        minor = irp.minor
        if minor == IRP_MN_PNP.QUERY_ID:
            ids: dict[int, Any] = {BusQueryIdType.BusQueryDeviceID: ext.spec.device_id,
                                   BusQueryIdType.BusQueryInstanceID: ext.spec.instance_id,
                                   BusQueryIdType.BusQueryHardwareIDs: ext.spec.hardware_ids,
                                   BusQueryIdType.BusQueryCompatibleIDs: ext.spec.compatible_ids}
            if irp.parameters.id_type in ids and irp.parameters.id_type not in ext.spec.unanswered:
                irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, ids[irp.parameters.id_type]
        elif (minor == IRP_MN_PNP.QUERY_DEVICE_TEXT and ext.spec.location is not None
              and irp.parameters.text_type == DEVICE_TEXT_LOCATION_INFORMATION):
            irp.io_status.status, irp.io_status.information = ext.spec.location
        elif minor == IRP_MN_PNP.START_DEVICE:
            irp.io_status.status = self.start_status.get(
                ext.spec.device_id, STATUS_UNSUCCESSFUL if ext.spec.device_id in self.fail_start else STATUS_SUCCESS)
        elif minor in (IRP_MN_PNP.QUERY_CAPABILITIES, IRP_MN_PNP.SURPRISE_REMOVAL):
            irp.io_status.status = STATUS_SUCCESS
        elif minor == IRP_MN_PNP.REMOVE_DEVICE:
            irp.io_status.status = STATUS_SUCCESS
            if not ext.present:
                IoDeleteDevice(device)
        # Anything else keeps the status it came with (STATUS_NOT_SUPPORTED), as a bus driver must.
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status

    # -- the function driver (also the bus FDO) ----------------------------------------------------

    def function_entry(self, driver: DriverObject, registry_path: str) -> int:
        driver.major_function[IRP_MJ.PNP] = self._fdo_pnp
        driver.major_function[IRP_MJ.POWER] = self._fdo_power
        driver.add_device = self._function_add_device
        return STATUS_SUCCESS

    def _function_add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        fdo = IoCreateDevice(driver, DeviceKind.FDO)
        fdo.extension = FdoExt(IoAttachDeviceToDeviceStack(fdo, pdo), _device_label(pdo))
        self.record("add", fdo, f"AddDevice {driver.name}")
        return STATUS_SUCCESS

    def _fdo_pnp(self, device: DeviceObject, irp: Irp) -> int:
        ext: FdoExt = device.extension
        self.record("fdo", device, irp)
        if irp.minor == IRP_MN_PNP.START_DEVICE:
            status = IoSynchronousCallDriver(ext.lower, irp)  # forward and wait: the PDO starts first
            self.record("fdo", device, "started" if status == STATUS_SUCCESS else "start failed")
            IoCompleteRequest(irp)
            return status
        if (irp.minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS
                and irp.parameters.type == DeviceRelationType.BusRelations):
            self._report_children(device, irp)
        if irp.minor == IRP_MN_PNP.REMOVE_DEVICE:
            status = forward(irp, ext.lower)
            IoDetachDevice(ext.lower)
            IoDeleteDevice(device)
            return status
        return forward(irp, ext.lower)

    def _report_children(self, fdo: DeviceObject, irp: Irp) -> None:
        ext: FdoExt = fdo.extension
        wanted = {spec.device_id: spec for spec in self.layout.get(_device_id(ext.lower.pdo), [])}
        for device_id in list(ext.children):
            if device_id not in wanted:
                ext.children.pop(device_id).extension.present = False
        for device_id, spec in wanted.items():
            if device_id not in ext.children:
                ext.children[device_id] = IoCreateDevice(fdo.driver, DeviceKind.PDO, PdoExt(spec), name=device_id)
        irp.io_status.status, irp.io_status.information = STATUS_SUCCESS, list(ext.children.values())

    def _fdo_power(self, device: DeviceObject, irp: Irp) -> int:
        ext: FdoExt = device.extension
        self.record("fdo", device, irp)
        params = irp.parameters
        if params.type == POWER_STATE_TYPE.SystemPowerState:
            if irp.minor == IRP_MN_POWER.QUERY_POWER and ext.label in self.veto_query_power:
                irp.io_status.status = STATUS_UNSUCCESSFUL
                IoCompleteRequest(irp)
                return STATUS_UNSUCCESSFUL
            if irp.minor == IRP_MN_POWER.SET_POWER:
                # The power policy owner turns the S-IRP into a D-IRP for its own stack.
                PoRequestPowerIrp(ext.lower.pdo, IRP_MN_POWER.SET_POWER, D0 if params.state == S0 else D3)
        return forward(irp, ext.lower)

    # -- a filter driver -------------------------------------------------------------------------

    def filter_entry(self, name: str) -> Any:
        def entry(driver: DriverObject, registry_path: str) -> int:
            def add_device(drv: DriverObject, pdo: DeviceObject) -> int:
                filter_do = IoCreateDevice(drv, DeviceKind.FILTER)
                filter_do.extension = FdoExt(IoAttachDeviceToDeviceStack(filter_do, pdo), _device_label(pdo))
                self.record("add", filter_do, f"AddDevice {drv.name}")
                return STATUS_SUCCESS

            def dispatch(device: DeviceObject, irp: Irp) -> int:
                ext: FdoExt = device.extension
                self.record(name, device, irp)
                if irp.major == IRP_MJ.PNP and irp.minor == IRP_MN_PNP.REMOVE_DEVICE:
                    status = forward(irp, ext.lower)
                    IoDetachDevice(ext.lower)
                    IoDeleteDevice(device)
                    return status
                return forward(irp, ext.lower)

            driver.major_function[IRP_MJ.PNP] = dispatch
            driver.major_function[IRP_MJ.POWER] = dispatch
            driver.add_device = add_device
            return STATUS_SUCCESS

        return entry


def _device_id(pdo: DeviceObject) -> str:
    node = pdo.device_node
    return node.device_id if node is not None else ""


def _device_label(device: DeviceObject) -> str:
    return _device_id(device.pdo) or (device.name or "?")


__all__ = ["ChildSpec", "World", "STATUS_NOT_SUPPORTED"]
