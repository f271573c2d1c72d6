"""The I/O manager's user-mode side: device interfaces, file objects, handles and DeviceIoControl.

What XENIFACE and its user-mode clients (xenagent, xencontrol) depend on:
- `IoRegisterDeviceInterface(pdo, guid)` gives a symbolic link `\\??\\<instance path, '\\' as '#'>#{guid}`
  and records it under `Control\\DeviceClasses\\{guid}` in the registry, as Windows does;
  `IoSetDeviceInterfaceState(link, enable)` makes it visible to `SetupDiGetClassDevs` (user mode's
  DIGCF_PRESENT | DIGCF_DEVICEINTERFACE enumeration) and tells whoever registered for arrivals and
  removals of that interface class (RegisterDeviceNotification / IoRegisterPlugPlayNotification).
- `CreateFile(link)` builds a FILE_OBJECT on the top of the device's stack and sends IRP_MJ_CREATE;
  `DeviceIoControl(file, code, input, output_length)` sends IRP_MJ_DEVICE_CONTROL with the file object in
  its parameters (a driver keys per-handle state on it); `CloseHandle(file)` sends IRP_MJ_CLEANUP then
  IRP_MJ_CLOSE. A request the driver leaves pending (STATUS_PENDING, METHOD_NEITHER requests that hold a
  resource until revoked) stays with the `UserProcess` that issued it; the process's end cancels it
  (IoCancelIrp runs the routine the driver set with IoSetCancelRoutine), as a thread's termination does.

Modelled rather than real: there is no object manager namespace; a user buffer is bytes in, bytes out (a
METHOD_NEITHER output is handed back like a buffered one); what a request points at lives in the process's
`memory` (UserProcess.buffer), which is not guest RAM; there is no security check
beyond what a driver does itself, and one processor: user-mode code calls in holding the kernel lock.
"""
from __future__ import annotations

import itertools
import logging
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .device import DeviceObject, IoGetAttachedDevice
from .irp import IRP_MJ, Irp, IoCallDriver, IoCompleteRequest
from .irql import assert_passive
from .registry import Registry
from .event import KEvent
from .status import (STATUS_ACCESS_DENIED, STATUS_CANCELLED, STATUS_OBJECT_TYPE_MISMATCH, STATUS_PENDING,
                     STATUS_SUCCESS, NTSTATUS)

STATUS_INVALID_HANDLE = 0xC0000008

log = logging.getLogger("stack.kernel.io")

DEVICE_CLASSES_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\DeviceClasses"

# winioctl.h
FILE_DEVICE_UNKNOWN = 0x22
METHOD_BUFFERED = 0
METHOD_IN_DIRECT = 1
METHOD_OUT_DIRECT = 2
METHOD_NEITHER = 3
FILE_ANY_ACCESS = 0
FILE_READ_ACCESS = 1
FILE_WRITE_ACCESS = 2
# CreateFile's dwDesiredAccess and what the I/O manager grants the handle (winnt.h)
GENERIC_READ = 0x8000_0000
GENERIC_WRITE = 0x4000_0000
FILE_READ_DATA = 0x0001
FILE_WRITE_DATA = 0x0002


def CTL_CODE(device_type: int, function: int, method: int, access: int) -> int:
    """winioctl.h's CTL_CODE: ((DeviceType) << 16) | ((Access) << 14) | ((Function) << 2) | (Method)."""
    return (device_type << 16) | (access << 14) | (function << 2) | method


def METHOD_FROM_CTL_CODE(code: int) -> int:
    return code & 3


class IoError(Exception):
    """A user-mode I/O call that Windows would fail before any driver sees it (no such interface, a
    closed handle): the Win32 error it would be."""


_file_addresses = itertools.count(0xFFFFB000_00100000, 0x100)


@dataclass(eq=False)
class FileObject:
    """FILE_OBJECT: one per CreateFile; `device` is the top of the stack the handle was opened on."""

    device: DeviceObject
    link: str
    process: UserProcess
    granted: int = FILE_READ_DATA | FILE_WRITE_DATA  # the handle's access (CreateFile's GENERIC_READ/WRITE)
    address: int = field(default_factory=lambda: next(_file_addresses))
    closed: bool = False

    def __repr__(self) -> str:
        return f"FileObject({self.address:#x} on {self.link})"


@dataclass
class FileIrpParameters:
    """IRP_MJ_CREATE / CLEANUP / CLOSE: IoStackLocation->FileObject."""

    file_object: FileObject


@dataclass
class DeviceIoControlParameters:
    """IRP_MJ_DEVICE_CONTROL: the stack location's DeviceIoControl parameters and FileObject. `input` is the
    captured input buffer (SystemBuffer for METHOD_BUFFERED, Type3InputBuffer for METHOD_NEITHER); the
    driver completes with IoStatus.Information = the output bytes."""

    file_object: FileObject
    io_control_code: int
    input: bytes
    output_length: int

    @property
    def method(self) -> int:
        return METHOD_FROM_CTL_CODE(self.io_control_code)


@dataclass
class IoctlResult:
    """`output`: the bytes the driver returned; `information`: IoStatus.Information (their length, or what
    a driver that returned no data put there, such as the length a STATUS_BUFFER_OVERFLOW asks for)."""
    status: NTSTATUS
    output: bytes
    information: int
    irp: Irp


@dataclass
class _Interface:
    guid: uuid.UUID
    pdo: DeviceObject
    instance_path: str
    enabled: bool = False


@dataclass
class _InterfaceTable:
    links: dict[str, _Interface] = field(default_factory=dict)
    # RegisterDeviceNotification(DBT_DEVTYP_DEVICEINTERFACE): (guid, callback(link, arrived))
    watchers: list[tuple[uuid.UUID, Callable[[str, bool], None]]] = field(default_factory=list)


# Per PnP manager (one per booted kernel): the live interfaces. Weak, so a kernel that went keeps nothing.
_tables: weakref.WeakKeyDictionary[Any, _InterfaceTable] = weakref.WeakKeyDictionary()
_cancel_routines: weakref.WeakKeyDictionary[Irp, Callable[[Irp], None]] = weakref.WeakKeyDictionary()


def _table(pnp: Any) -> _InterfaceTable:
    table = _tables.get(pnp)
    if table is None:
        table = _tables[pnp] = _InterfaceTable()
    return table


def _guid_text(guid: uuid.UUID) -> str:
    return "{" + str(guid).lower() + "}"


def IoRegisterDeviceInterface(pdo: DeviceObject, guid: uuid.UUID) -> tuple[NTSTATUS, str]:
    """The symbolic link name of `guid` on `pdo` (registered, not yet enabled)."""
    assert_passive("IoRegisterDeviceInterface")
    node = pdo.device_node
    if node is None:
        raise IoError(f"IoRegisterDeviceInterface: {pdo!r} is not a PDO the PnP manager reported")
    instance = node.instance_path
    link = "\\??\\" + instance.replace("\\", "#") + "#" + _guid_text(guid)
    _table(node.manager).links[link] = _Interface(guid, pdo, instance)
    registry: Registry = node.manager.registry
    key = rf"{DEVICE_CLASSES_KEY}\{_guid_text(guid)}\##?#{instance.replace(chr(92), '#')}#{_guid_text(guid)}"
    registry.set_sz(key, "DeviceInstance", instance)
    return STATUS_SUCCESS, link


def IoSetDeviceInterfaceState(pdo: DeviceObject, link: str, enable: bool) -> NTSTATUS:
    node = pdo.device_node
    if node is None:
        raise IoError(f"IoSetDeviceInterfaceState: {pdo!r} has no device node")
    table = _table(node.manager)
    interface = table.links.get(link)
    if interface is None:
        raise IoError(f"IoSetDeviceInterfaceState: {link} was never registered")
    if interface.enabled == enable:
        return STATUS_SUCCESS
    interface.enabled = enable
    log.info("device interface %s %s", link, "enabled" if enable else "disabled")
    for guid, callback in list(table.watchers):
        if guid == interface.guid:
            callback(link, enable)
    return STATUS_SUCCESS


def SetupDiGetClassDevs(pnp: Any, guid: uuid.UUID) -> list[str]:
    """The enabled interfaces of class `guid` (DIGCF_PRESENT | DIGCF_DEVICEINTERFACE), oldest first."""
    return [link for link, i in _table(pnp).links.items() if i.guid == guid and i.enabled]


def RegisterDeviceNotification(pnp: Any, guid: uuid.UUID, callback: Callable[[str, bool], None]) -> Callable[[], None]:
    """`callback(link, arrived)` on every arrival and removal of a `guid` interface; returns the
    UnregisterDeviceNotification."""
    table = _table(pnp)
    entry = (guid, callback)
    table.watchers.append(entry)

    def unregister() -> None:
        if entry in table.watchers:
            table.watchers.remove(entry)
    return unregister


def IoSetCancelRoutine(irp: Irp, routine: Callable[[Irp], None] | None) -> None:
    if routine is None:
        _cancel_routines.pop(irp, None)
    else:
        _cancel_routines[irp] = routine


def IoCancelIrp(irp: Irp) -> bool:
    """Run the IRP's cancel routine (which completes it with STATUS_CANCELLED); False if it has none."""
    routine = _cancel_routines.pop(irp, None)
    if routine is None or irp.completed:
        return False
    routine(irp)
    return True


class UserProcess:
    """A user-mode process: its handles and the requests it has pending in drivers. `exit()` is the end of
    its threads: pending requests are cancelled, then every handle is closed (cleanup, close)."""

    _ids = itertools.count(0x1000, 4)

    def __init__(self, pnp: Any, name: str) -> None:
        self.pnp = pnp
        self.name = name
        self.pid = next(self._ids)
        self.handles: list[FileObject] = []
        self.pending: list[Irp] = []
        # The process's handle table for objects other than files (events): handle -> object.
        self.objects: dict[int, Any] = {}
        self._next_handle = itertools.count(0x104, 4)
        # User memory a request points at (PCHAR Path...): base address -> bytes. It is not guest RAM.
        self.memory: dict[int, bytes] = {}
        self._next_address = itertools.count(0x0000_0200_0000_0000, 0x1_0000)

    def __repr__(self) -> str:
        return f"UserProcess({self.name}, pid {self.pid:#x})"

    def CreateEvent(self, name: str = "", event: KEvent | None = None) -> tuple[int, KEvent]:
        """A manual-reset event (CreateEvent(NULL, TRUE, FALSE, NULL)): its handle and the object (`event`:
        the object to use, for a caller that waits on several at once)."""
        event = event if event is not None else KEvent(f"{self.name}:{name or 'event'}")
        handle = next(self._next_handle)
        self.objects[handle] = event
        return handle, event

    def ObReferenceObjectByHandle(self, handle: int, object_type: type) -> tuple[NTSTATUS, Any]:
        """What a driver's ObReferenceObjectByHandle(Handle, ..., UserMode) finds in this process's table:
        STATUS_INVALID_HANDLE for no such handle, STATUS_OBJECT_TYPE_MISMATCH for another kind of object."""
        obj = self.objects.get(handle)
        if obj is None:
            return STATUS_INVALID_HANDLE, None
        if not isinstance(obj, object_type):
            return STATUS_OBJECT_TYPE_MISMATCH, None
        return STATUS_SUCCESS, obj

    def buffer(self, data: bytes) -> int:
        """Put `data` in this process's memory (a string a request points at); its user address."""
        address = next(self._next_address)
        self.memory[address] = bytes(data)
        return address

    def read_memory(self, address: int, length: int) -> bytes | None:
        """What ProbeForRead + RtlCopyMemory of a user pointer find: None where nothing is mapped."""
        for base, data in self.memory.items():
            if base <= address and address + length <= base + len(data):
                return data[address - base:address - base + length]
        return None

    def CreateFile(self, link: str, access: int = GENERIC_READ | GENERIC_WRITE) -> FileObject:
        interface = _table(self.pnp).links.get(link)
        if interface is None or not interface.enabled:
            raise IoError(f"CreateFile({link}): ERROR_FILE_NOT_FOUND (no such enabled device interface)")
        top = IoGetAttachedDevice(interface.pdo)
        granted = (FILE_READ_DATA if access & GENERIC_READ else 0) | (FILE_WRITE_DATA if access & GENERIC_WRITE else 0)
        file = FileObject(top, link, self, granted)
        status = self._send(file, Irp(IRP_MJ.CREATE, parameters=FileIrpParameters(file)))
        if status != STATUS_SUCCESS:
            raise IoError(f"CreateFile({link}): IRP_MJ_CREATE failed with {status:#010x}")
        self.handles.append(file)
        return file

    def DeviceIoControl(self, file: FileObject, code: int, input: bytes = b"", output_length: int = 0) -> IoctlResult:
        if file.closed or file not in self.handles:
            raise IoError(f"DeviceIoControl on {file!r}: ERROR_INVALID_HANDLE")
        irp = Irp(IRP_MJ.DEVICE_CONTROL, parameters=DeviceIoControlParameters(file, code, bytes(input), output_length))
        status = self._send(file, irp)
        info = irp.io_status.information
        output = bytes(info) if isinstance(info, (bytes, bytearray)) else b""
        information = len(output) if output else (info if isinstance(info, int) else 0)
        if status == STATUS_PENDING and not irp.completed:
            self.pending.append(irp)
            irp.on_complete.append(self._forget)
        return IoctlResult(status, output[:output_length], information, irp)

    def _forget(self, irp: Irp) -> None:
        if irp in self.pending:
            self.pending.remove(irp)

    def CloseHandle(self, file: FileObject) -> None:
        if file.closed:
            raise IoError(f"CloseHandle({file!r}): ERROR_INVALID_HANDLE")
        file.closed = True
        self.handles.remove(file)
        if file.device.deleted:  # the device went (surprise removal): nothing is left to tell
            return
        for major in (IRP_MJ.CLEANUP, IRP_MJ.CLOSE):
            self._send(file, Irp(major, parameters=FileIrpParameters(file)))

    def exit(self) -> None:
        """The process ends: its pending requests are cancelled, then its handles closed."""
        for irp in list(self.pending):
            if not IoCancelIrp(irp):
                log.warning("%r: %s pending at exit has no cancel routine", self, irp)
        self.pending.clear()
        for file in list(self.handles):
            self.CloseHandle(file)

    @staticmethod
    def _send(file: FileObject, irp: Irp) -> NTSTATUS:
        assert_passive(irp.name())
        status = IoCallDriver(file.device, irp)
        if status == STATUS_PENDING:
            return status
        return irp.io_status.status


def WdmlibIoValidateDeviceIoControlAccess(params: DeviceIoControlParameters, required: int) -> NTSTATUS:
    """wdmsec's check for a FILE_ANY_ACCESS IOCTL that still wants a handle opened for `required`
    (FILE_READ_ACCESS, FILE_WRITE_ACCESS): STATUS_ACCESS_DENIED when the user's handle lacks it."""
    granted = params.file_object.granted
    if (required & FILE_READ_ACCESS and not granted & FILE_READ_DATA) or \
            (required & FILE_WRITE_ACCESS and not granted & FILE_WRITE_DATA):
        return STATUS_ACCESS_DENIED
    return STATUS_SUCCESS


def IoCompleteCancelled(irp: Irp) -> None:
    """What a cancel routine ends with: STATUS_CANCELLED, no information."""
    irp.io_status.status = STATUS_CANCELLED
    irp.io_status.information = None
    IoCompleteRequest(irp)
