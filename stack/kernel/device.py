"""Driver objects, device objects and device stacks.

A driver is a `DriverObject` filled in by its DriverEntry: `major_function[IRP_MJ_*]` dispatch routines,
`add_device` (called by the PnP manager for each device whose stack the driver joins) and `unload`.
Device objects are PDOs (created by a bus driver for a child), FDOs (the function driver's) and filter
DOs; `IoAttachDeviceToDeviceStack` puts a new device on top of a stack and returns the device it landed
on, which is where the driver sends IRPs down. `extension` is the device extension: any object the
driver wants (Windows gives a zeroed buffer of the requested size; Python drivers keep a dataclass).

Simplifications: no named device objects namespace, no DO_* flags beyond what the model checks, no
reference counting (IoDeleteDevice marks the object deleted; using it afterwards is a driver bug the
PnP manager reports).

Layering: this is the bottom of the I/O model. irp.py (IRPs, whose stack locations belong to device
objects) and pnp.py (device nodes, which hold device stacks) import this module, never the reverse, so
the two names from above them that appear here are typed loosely: a dispatch routine's IRP argument, and
the PDO's device node (for the I/O manager an opaque pointer, as DEVOBJ_EXTENSION.DeviceNode is).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from enum import Enum
from typing import Any

log = logging.getLogger("stack.kernel.device")

# DRIVER_DISPATCH: (DeviceObject, irp.Irp) -> NTSTATUS; IoCallDriver (irp.py) is the caller.
DispatchRoutine = Callable[["DeviceObject", Any], int]
AddDeviceRoutine = Callable[["DriverObject", "DeviceObject"], int]
UnloadRoutine = Callable[["DriverObject"], None]
DriverEntryRoutine = Callable[["DriverObject", str], int]

_addresses = itertools.count(0xFFFFC000_00100000, 0x1000)


class DeviceKind(Enum):
    PDO = "PDO"
    FDO = "FDO"
    FILTER = "FILTER"


class DriverObject:
    """DRIVER_OBJECT. `name` is the service name (`XENBUS`); `module` the image (`xenbus.sys`)."""

    def __init__(self, name: str, *, module: str | None = None) -> None:
        self.name = name
        self.module = module or f"{name.lower()}.sys"
        self.major_function: dict[int, DispatchRoutine] = {}
        self.add_device: AddDeviceRoutine | None = None
        self.unload: UnloadRoutine | None = None
        self.devices: list[DeviceObject] = []
        self.registry_path = f"\\Registry\\Machine\\SYSTEM\\CurrentControlSet\\Services\\{name}"
        # Driver-global state (what a C driver keeps in globals).
        self.extension: Any = None
        self.address = next(_addresses)

    def __repr__(self) -> str:
        return f"DriverObject({self.name})"

    def __str__(self) -> str:
        return f"\\Driver\\{self.name}"


class DeviceObject:
    def __init__(self, driver: DriverObject, kind: DeviceKind, extension: Any = None, name: str | None = None) -> None:
        self.driver = driver
        self.kind = kind
        self.extension = extension
        self.name = name
        self.address = next(_addresses)
        # AttachedDevice (the one above) and the device this one is attached to (the one below).
        self.upper: DeviceObject | None = None
        self.lower: DeviceObject | None = None
        self.deleted = False
        # pnp.DeviceNode, set by the PnP manager on PDOs it has seen in a bus relations list (None before).
        self.device_node: Any = None

    def __repr__(self) -> str:
        label = self.name or hex(self.address)
        return f"<{self.kind.value} {self.driver.name} {label}>"

    def __str__(self) -> str:
        return repr(self)

    @property
    def pdo(self) -> DeviceObject:
        """The bottom of this device's stack."""
        device = self
        while device.lower is not None:
            device = device.lower
        return device


def IoCreateDevice(driver: DriverObject, kind: DeviceKind, extension: Any = None,
                   name: str | None = None) -> DeviceObject:
    device = DeviceObject(driver, kind, extension, name)
    driver.devices.append(device)
    log.debug("IoCreateDevice %r", device)
    return device


def IoDeleteDevice(device: DeviceObject) -> None:
    if device.upper is not None:
        # Windows would leave a dangling AttachedDevice pointer; say which driver forgot to detach.
        log.warning("IoDeleteDevice(%r) while %r is still attached above it", device, device.upper)
    device.deleted = True
    if device in device.driver.devices:
        device.driver.devices.remove(device)


def IoGetAttachedDevice(device: DeviceObject) -> DeviceObject:
    """The top of the stack `device` belongs to."""
    while device.upper is not None:
        device = device.upper
    return device


def IoAttachDeviceToDeviceStack(source: DeviceObject, target: DeviceObject) -> DeviceObject:
    """Attach `source` on top of `target`'s stack; returns the device it now sits on."""
    top = IoGetAttachedDevice(target)
    if source.lower is not None or source.upper is not None:
        raise ValueError(f"{source!r} is already in a device stack")
    top.upper = source
    source.lower = top
    return top


def IoDetachDevice(lower: DeviceObject) -> None:
    """Detach whatever is attached directly above `lower` (IoDetachDevice takes the target device)."""
    upper = lower.upper
    if upper is None:
        return
    upper.lower = None
    lower.upper = None


def device_stack(device: DeviceObject) -> list[DeviceObject]:
    """Bottom (PDO) to top."""
    stack = [device.pdo]
    while stack[-1].upper is not None:
        stack.append(stack[-1].upper)  # type: ignore[arg-type]
    return stack
