"""XENIFACE's store IOCTLs, 0x800-0x806 (XI src/xeniface/ioctl_store.c at f12cbdb).

READ and DIRECTORY called with no output buffer answer STATUS_BUFFER_OVERFLOW with the length needed in
Information (the caller's first call, as xenagent's StoreRead does); an output buffer shorter than that is
STATUS_INVALID_PARAMETER. WRITE's input is the path, its NUL, the value, its NUL (and xenagent's final NUL).
A path or value that holds a non-printable byte, or whose NUL is missing from the buffer, is
STATUS_INVALID_PARAMETER (__IsValidStr). ADD_WATCH's and SET_PERMISSIONS' path lengths are bounded by
XENSTORE_ABS_PATH_MAX (3072); SET_PERMISSIONS' InLen must be exactly FIELD_OFFSET(Permissions[N]) and N at
most 255, each mask within READ|WRITE.

The path a caller passes by pointer (ADD_WATCH, SET_PERMISSIONS: PCHAR Path) is captured from its process's
memory (__CaptureUserBuffer); a pointer to nothing mapped is the probe's STATUS_ACCESS_VIOLATION. Modelled
rather than real: the per-watch thread (StoreWatch), which only turns XENBUS's event into the user's, is
the forwarding `_WatchEvent`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.xenbus.store import StorePermission
from xenpv.stack.kernel.debuglog import current_log
from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.io import FileObject
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_BUFFER_OVERFLOW, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND,
                                       STATUS_SUCCESS, NTSTATUS)

from . import abi
from .request import Request, context_address

log = logging.getLogger("stack.drivers.xeniface.store")

XENSTORE_ABS_PATH_MAX = 3072
MAX_PERMISSIONS = 255  # __ConvertPermissions


def is_valid_str(data: bytes) -> bool:
    """ioctl_store.c __IsValidStr: printable bytes up to a NUL that lies within the buffer."""
    for byte in data:
        if byte == 0:
            return True
        if not 0x20 <= byte < 0x7F:
            return False
    return False


def _cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("ascii")


def capture_user_buffer(request: Request, address: int, length: int) -> tuple[NTSTATUS, bytes]:
    """__CaptureUserBuffer: the caller's bytes at `address`, or the access violation of probing nothing."""
    data = request.file_object.process.read_memory(address, length)
    if data is None:
        return abi.STATUS_ACCESS_VIOLATION, b""
    return STATUS_SUCCESS, data


def IoctlStoreRead(request: Request) -> NTSTATUS:
    if request.in_len == 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    if not is_valid_str(request.input):
        return STATUS_INVALID_PARAMETER
    store = request.fdo.store
    status, buffer = store.StoreRead(None, None, _cstr(request.input))
    if not NT_SUCCESS(status):
        return status
    value = buffer.Value.split(b"\0", 1)[0] + b"\0"
    store.StoreFree(buffer)
    if request.out_len == 0:
        return _overflow(request, len(value))
    if request.out_len < len(value):
        return STATUS_INVALID_PARAMETER
    request.complete_with(value)
    return STATUS_SUCCESS


def _overflow(request: Request, needed: int) -> NTSTATUS:
    """STATUS_BUFFER_OVERFLOW with Information = the length needed and no data."""
    request.irp.io_status.information = needed
    return STATUS_BUFFER_OVERFLOW


def IoctlStoreWrite(request: Request) -> NTSTATUS:
    if request.in_len == 0 or request.out_len != 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    if not is_valid_str(request.input):
        return STATUS_INVALID_PARAMETER
    path = _cstr(request.input)
    rest = request.input[len(path) + 1:]
    if not is_valid_str(rest):
        return STATUS_INVALID_PARAMETER
    value = _cstr(rest)
    return request.fdo.store.StorePrintf(None, None, path, "%s", value)


def IoctlStoreDirectory(request: Request) -> NTSTATUS:
    if request.in_len == 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    if not is_valid_str(request.input):
        return STATUS_INVALID_PARAMETER
    store = request.fdo.store
    status, buffer = store.StoreDirectory(None, None, _cstr(request.input))
    if not NT_SUCCESS(status):
        return status
    names = [n for n in buffer.Value.split(b"\0") if n]
    store.StoreFree(buffer)
    # __MultiSzLen + 1: each name and its NUL, the list's NUL, and one more.
    value = b"".join(n + b"\0" for n in names) + b"\0"
    length = len(value) + 1
    if request.out_len == 0:
        return _overflow(request, length)
    if request.out_len < length:
        return STATUS_INVALID_PARAMETER
    request.complete_with(value + b"\0")
    return STATUS_SUCCESS


def IoctlStoreRemove(request: Request) -> NTSTATUS:
    if request.in_len == 0 or request.out_len != 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    if not is_valid_str(request.input):
        return STATUS_INVALID_PARAMETER
    return request.fdo.store.StoreRemove(None, None, _cstr(request.input))


def IoctlStoreSetPermissions(request: Request) -> NTSTATUS:
    layout = abi.XENIFACE_STORE_SET_PERMISSIONS_IN
    if request.in_len < layout.size() or request.out_len != 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    header = layout.unpack(request.input)
    count = header.NumberPermissions
    if request.in_len != abi.field_offset(layout, "Permissions", count):
        return abi.STATUS_INVALID_BUFFER_SIZE
    if header.PathLength == 0 or header.PathLength > XENSTORE_ABS_PATH_MAX:
        return STATUS_INVALID_PARAMETER
    if count > MAX_PERMISSIONS:
        return STATUS_INVALID_PARAMETER
    permissions = []
    entry = abi.XENIFACE_STORE_PERMISSION
    for index in range(count):
        at = abi.field_offset(layout, "Permissions", index)
        p = entry.unpack(request.input[at:at + entry.size()])
        if p.Mask & ~abi.XENIFACE_STORE_ALLOWED_PERMISSIONS:
            return STATUS_INVALID_PARAMETER
        permissions.append(StorePermission(p.Domain, p.Mask & abi.XENIFACE_STORE_ALLOWED_PERMISSIONS))
    status, path = capture_user_buffer(request, header.Path, header.PathLength)
    if not NT_SUCCESS(status):
        return status
    path = path[:-1] + b"\0"  # Path[PathLength - 1] = 0
    return request.fdo.store.StorePermissionsSet(None, None, _cstr(path), permissions, count)


class _WatchEvent(KEvent):
    """The event XENBUS sets when the watch fires; setting it sets the user's (StoreWatch's loop)."""

    def __init__(self, context: StoreContext) -> None:
        super().__init__(f"xeniface watch {context.path}")
        self.context = context

    def set(self) -> bool:
        previous = super().set()
        log.info("watch %s fired", self.context.path)
        self.context.event.set()
        return previous


@dataclass(eq=False)
class StoreContext:
    """XENIFACE_STORE_CONTEXT."""

    path: str
    event: KEvent
    file_object: FileObject
    watch: Any = None
    address: int = field(default_factory=context_address)


def IoctlStoreAddWatch(request: Request) -> NTSTATUS:
    if request.in_len != abi.XENIFACE_STORE_ADD_WATCH_IN.size() or \
            request.out_len != abi.XENIFACE_STORE_ADD_WATCH_OUT.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    header = abi.XENIFACE_STORE_ADD_WATCH_IN.unpack(request.input)
    if header.PathLength == 0 or header.PathLength > XENSTORE_ABS_PATH_MAX:
        return STATUS_INVALID_PARAMETER
    status, raw = capture_user_buffer(request, header.Path, header.PathLength)
    if not NT_SUCCESS(status):
        return status
    status, event = request.file_object.process.ObReferenceObjectByHandle(header.Event, KEvent)
    if not NT_SUCCESS(status):
        return status
    context = StoreContext(_cstr(raw[:-1] + b"\0"), event, request.file_object)
    status, context.watch = request.fdo.store.StoreWatchAdd(None, context.path, _WatchEvent(context))
    if not NT_SUCCESS(status):
        return status
    request.state.store_watches.append(context)
    request.complete_with(abi.XENIFACE_STORE_ADD_WATCH_OUT(Context=context.address).pack())
    return STATUS_SUCCESS


def StoreFreeWatch(state: Any, context: StoreContext) -> None:
    status = state.fdo.store.StoreWatchRemove(context.watch)
    if not NT_SUCCESS(status):
        # ASSERT(NT_SUCCESS(status)) in a checked build: "fatal since we'd leave an active watch"
        current_log().print("XENIFACE", f"StoreFreeWatch: {context.path}: watch removal failed ({status:#x})")
    context.watch = None


def IoctlStoreRemoveWatch(request: Request) -> NTSTATUS:
    if request.in_len != abi.XENIFACE_STORE_REMOVE_WATCH_IN.size() or request.out_len != 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    wanted = abi.XENIFACE_STORE_REMOVE_WATCH_IN.unpack(request.input).Context
    for context in request.state.store_watches:
        if context.address == wanted and context.file_object is request.file_object:
            request.state.store_watches.remove(context)
            StoreFreeWatch(request.state, context)
            return STATUS_SUCCESS
    return STATUS_NOT_FOUND
