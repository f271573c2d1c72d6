"""IRPs: major/minor codes, parameters, sending down a device stack and completion.

The model keeps the parts of the I/O manager the PV drivers depend on:
- `IoCallDriver(device, irp)` runs the device's driver dispatch routine for the IRP's major function; a
  driver without one gets STATUS_INVALID_DEVICE_REQUEST as from IopInvalidDeviceRequest.
- Each IoCallDriver pushes a stack location owned by the called device. `IoSetCompletionRoutine` sets a
  completion routine on the caller's own location (C drivers set it on the next location before calling
  down; the effect is the same: it runs when the lower driver completes the IRP). `IoCompleteRequest`
  runs completion routines from the bottom up; STATUS_MORE_PROCESSING_REQUIRED stops it and gives the IRP
  back to that driver, which completes it again later. Completing an IRP twice is
  MULTIPLE_IRP_COMPLETE_REQUESTS (0x44).
- Parameters are one object per IRP shared by all stack locations, i.e. every forward behaves like
  IoSkipCurrentIrpStackLocation/IoCopyCurrentIrpStackLocationToNext (the PV drivers never rewrite them).
- PnP IRPs are sent at PASSIVE_LEVEL and start with Status = STATUS_NOT_SUPPORTED (`Irp.pnp`), which a bus
  driver leaves in place for requests it does not handle. Sending one above PASSIVE stops the guest
  with DRIVER_IRQL_NOT_LESS_OR_EQUAL naming the sending driver. Power IRPs go up to DISPATCH_LEVEL.
- A dispatch routine returning STATUS_PENDING marks the IRP pending; whoever waits (IoSynchronousCallDriver)
  blocks on an event the completion sets, so an IRP completed later from a DPC or the interrupt thread
  works.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .bugcheck import BugCheckCode, KeBugCheckEx
from .device import DeviceObject
from .event import KEvent, KeWaitForSingleObject
from .irql import DISPATCH_LEVEL, assert_max_irql, assert_passive, current_processor
from .status import (STATUS_INVALID_DEVICE_REQUEST, STATUS_MORE_PROCESSING_REQUIRED, STATUS_NOT_SUPPORTED,
                     STATUS_PENDING, STATUS_SUCCESS, status_name)

log = logging.getLogger("stack.kernel.irp")


class IRP_MJ(IntEnum):
    CREATE = 0x00
    CLOSE = 0x02
    READ = 0x03
    WRITE = 0x04
    DEVICE_CONTROL = 0x0E
    INTERNAL_DEVICE_CONTROL = 0x0F
    SHUTDOWN = 0x10
    CLEANUP = 0x12
    POWER = 0x16
    SYSTEM_CONTROL = 0x17
    PNP = 0x1B


class IRP_MN_PNP(IntEnum):
    START_DEVICE = 0x00
    QUERY_REMOVE_DEVICE = 0x01
    REMOVE_DEVICE = 0x02
    CANCEL_REMOVE_DEVICE = 0x03
    STOP_DEVICE = 0x04
    QUERY_STOP_DEVICE = 0x05
    CANCEL_STOP_DEVICE = 0x06
    QUERY_DEVICE_RELATIONS = 0x07
    QUERY_INTERFACE = 0x08
    QUERY_CAPABILITIES = 0x09
    QUERY_RESOURCES = 0x0A
    QUERY_RESOURCE_REQUIREMENTS = 0x0B
    QUERY_DEVICE_TEXT = 0x0C
    FILTER_RESOURCE_REQUIREMENTS = 0x0D
    READ_CONFIG = 0x0F
    WRITE_CONFIG = 0x10
    EJECT = 0x11
    SET_LOCK = 0x12
    QUERY_ID = 0x13
    QUERY_PNP_DEVICE_STATE = 0x14
    QUERY_BUS_INFORMATION = 0x15
    DEVICE_USAGE_NOTIFICATION = 0x16
    SURPRISE_REMOVAL = 0x17
    DEVICE_ENUMERATED = 0x19


class IRP_MN_POWER(IntEnum):
    WAIT_WAKE = 0x00
    POWER_SEQUENCE = 0x01
    SET_POWER = 0x02
    QUERY_POWER = 0x03


class BusQueryIdType(IntEnum):
    BusQueryDeviceID = 0
    BusQueryHardwareIDs = 1
    BusQueryCompatibleIDs = 2
    BusQueryInstanceID = 3
    BusQueryDeviceSerialNumber = 4
    BusQueryContainerID = 5


class DeviceRelationType(IntEnum):
    BusRelations = 0
    EjectionRelations = 1
    PowerRelations = 2
    RemovalRelations = 3
    TargetDeviceRelation = 4
    SingleBusRelations = 5
    TransportRelations = 6


class POWER_STATE_TYPE(IntEnum):
    SystemPowerState = 0
    DevicePowerState = 1


class SYSTEM_POWER_STATE(IntEnum):
    PowerSystemUnspecified = 0
    PowerSystemWorking = 1  # S0
    PowerSystemSleeping1 = 2
    PowerSystemSleeping2 = 3
    PowerSystemSleeping3 = 4  # S3
    PowerSystemHibernate = 5  # S4
    PowerSystemShutdown = 6  # S5


class DEVICE_POWER_STATE(IntEnum):
    PowerDeviceUnspecified = 0
    PowerDeviceD0 = 1
    PowerDeviceD1 = 2
    PowerDeviceD2 = 3
    PowerDeviceD3 = 4


class POWER_ACTION(IntEnum):
    PowerActionNone = 0
    PowerActionSleep = 2
    PowerActionHibernate = 3
    PowerActionShutdown = 4
    PowerActionShutdownReset = 5
    PowerActionShutdownOff = 6


@dataclass
class QueryIdParameters:
    id_type: BusQueryIdType


@dataclass
class QueryDeviceRelationsParameters:
    type: DeviceRelationType


@dataclass
class QueryInterfaceParameters:
    """IRP_MN_QUERY_INTERFACE. `interface` is the caller's buffer: the provider fills it in place."""

    interface_type: uuid.UUID
    size: int
    version: int
    interface: Any
    interface_specific_data: Any = None


@dataclass
class DeviceCapabilities:
    """DEVICE_CAPABILITIES: the fields PnP and the PV drivers look at."""

    removable: bool = False
    unique_id: bool = False
    surprise_removal_ok: bool = False
    silent_install: bool = False
    raw_device_ok: bool = False
    eject_supported: bool = False
    address: int = 0xFFFFFFFF
    ui_number: int = 0xFFFFFFFF
    device_state: dict[SYSTEM_POWER_STATE, DEVICE_POWER_STATE] = field(default_factory=dict)


@dataclass
class QueryCapabilitiesParameters:
    capabilities: DeviceCapabilities


@dataclass
class PowerParameters:
    type: POWER_STATE_TYPE
    state: int
    action: POWER_ACTION = POWER_ACTION.PowerActionNone

    def describe(self) -> str:
        if self.type == POWER_STATE_TYPE.SystemPowerState:
            return SYSTEM_POWER_STATE(self.state).name
        return DEVICE_POWER_STATE(self.state).name


@dataclass
class DeviceControlParameters:
    io_control_code: int
    input: bytes = b""
    output_length: int = 0


@dataclass
class IoStatusBlock:
    status: int
    information: Any = None


CompletionRoutine = Callable[[DeviceObject, "Irp", Any], int]


@dataclass
class IoStackLocation:
    device: DeviceObject
    completion: CompletionRoutine | None = None
    context: Any = None


_addresses = itertools.count(0xFFFFD000_00100000, 0x100)


class Irp:
    def __init__(self, major: int, minor: int = 0, parameters: Any = None, *, status: int = STATUS_SUCCESS) -> None:
        self.major = major
        self.minor = minor
        self.parameters = parameters
        self.io_status = IoStatusBlock(status)
        self.stack: list[IoStackLocation] = []
        self.pending_returned = False
        self.completed = False
        # The originator's completion callbacks (UserEvent / PoRequestPowerIrp's CompletionFunction).
        self.on_complete: list[Callable[[Irp], None]] = []
        self.address = next(_addresses)

    @classmethod
    def pnp(cls, minor: int, parameters: Any = None) -> Irp:
        """A PnP IRP as the PnP manager and well-behaved drivers build it: Status = NOT_SUPPORTED."""
        return cls(IRP_MJ.PNP, minor, parameters, status=STATUS_NOT_SUPPORTED)

    @classmethod
    def power(cls, minor: int, parameters: PowerParameters | None = None) -> Irp:
        return cls(IRP_MJ.POWER, minor, parameters, status=STATUS_NOT_SUPPORTED)

    def name(self) -> str:
        if self.major == IRP_MJ.PNP:
            minor = _name(IRP_MN_PNP, self.minor)
        elif self.major == IRP_MJ.POWER:
            minor = _name(IRP_MN_POWER, self.minor)
        else:
            return f"IRP_MJ_{_name(IRP_MJ, self.major)}"
        return f"IRP_MN_{minor}"

    def __repr__(self) -> str:
        return f"<IRP {self.name()} {status_name(self.io_status.status)}>"

    def __str__(self) -> str:
        return repr(self)

    @property
    def current_device(self) -> DeviceObject | None:
        return self.stack[-1].device if self.stack else None


def _name(enum: type[IntEnum], value: int) -> str:
    try:
        return enum(value).name
    except ValueError:
        return f"0x{value:02X}"


def _invalid_device_request(device: DeviceObject, irp: Irp) -> int:
    irp.io_status.status = STATUS_INVALID_DEVICE_REQUEST
    IoCompleteRequest(irp)
    return STATUS_INVALID_DEVICE_REQUEST


def IoCallDriver(device: DeviceObject, irp: Irp) -> int:
    """Send `irp` to `device`'s driver; returns what its dispatch routine returns."""
    if irp.major == IRP_MJ.PNP:
        assert_passive(irp.name())
    else:
        assert_max_irql(DISPATCH_LEVEL, irp.name())
    if irp.completed:
        raise KeBugCheckEx(BugCheckCode.MULTIPLE_IRP_COMPLETE_REQUESTS, irp, 0, 0, 0,
                           message=f"{irp} sent to {device!r} after completion")
    irp.stack.append(IoStackLocation(device))
    dispatch = device.driver.major_function.get(irp.major, _invalid_device_request)
    with current_processor().running_as(device.driver.module):
        status = dispatch(device, irp)
    if status == STATUS_PENDING:
        irp.pending_returned = True
    return status


def IoSetCompletionRoutine(irp: Irp, routine: CompletionRoutine, context: Any = None) -> None:
    """Run `routine(device, irp, context)` when the drivers below complete `irp`."""
    location = irp.stack[-1]
    location.completion, location.context = routine, context


def IoSkipCurrentIrpStackLocation(irp: Irp) -> None:
    """Forward without a completion routine for this level."""
    location = irp.stack[-1]
    location.completion, location.context = None, None


def IoCopyCurrentIrpStackLocationToNext(irp: Irp) -> None:
    """Parameters are shared by all levels in the model, so there is nothing to copy."""


def IoMarkIrpPending(irp: Irp) -> None:
    irp.pending_returned = True


def IoCompleteRequest(irp: Irp) -> None:
    """Complete `irp`: run completion routines bottom-up, then the originator's callbacks."""
    assert_max_irql(DISPATCH_LEVEL, "IoCompleteRequest")
    if irp.completed:
        raise KeBugCheckEx(BugCheckCode.MULTIPLE_IRP_COMPLETE_REQUESTS, irp, 0, 0, 0,
                           message=f"{irp} completed twice")
    if irp.io_status.status == STATUS_PENDING:
        raise KeBugCheckEx(BugCheckCode.MULTIPLE_IRP_COMPLETE_REQUESTS, irp, STATUS_PENDING, 0, 0,
                           message=f"{irp} completed with STATUS_PENDING")
    cpu = current_processor()
    while irp.stack:
        location = irp.stack.pop()
        if location.completion is None:
            continue
        with cpu.running_as(location.device.driver.module):
            result = location.completion(location.device, irp, location.context)
        if result == STATUS_MORE_PROCESSING_REQUIRED:
            return
    irp.completed = True
    for callback in irp.on_complete:
        callback(irp)


def forward(irp: Irp, lower: DeviceObject) -> int:
    """Pass `irp` down unchanged and let the lower driver complete it (skip + IoCallDriver)."""
    IoSkipCurrentIrpStackLocation(irp)
    return IoCallDriver(lower, irp)


def IoSynchronousCallDriver(device: DeviceObject, irp: Irp, timeout: float | None = None) -> int:
    """Send `irp` and wait until it is complete (PASSIVE_LEVEL only); returns IoStatus.Status.

    From inside a dispatch routine (the IRP has a current stack location) this is forward-and-wait: the
    caller owns the IRP again afterwards and must IoCompleteRequest it. For an IRP the caller built
    itself, the IRP is finished when this returns.
    """
    assert_passive("IoSynchronousCallDriver")
    done = KEvent(f"sync {irp.name()}")
    if irp.stack:
        def _back_to_caller(_device: DeviceObject, _irp: Irp, _context: Any) -> int:
            done.set()
            return STATUS_MORE_PROCESSING_REQUIRED

        IoSetCompletionRoutine(irp, _back_to_caller)
    else:
        irp.on_complete.append(lambda _irp: done.set())
    IoCallDriver(device, irp)
    KeWaitForSingleObject(done, timeout)
    return irp.io_status.status
