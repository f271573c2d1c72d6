"""XENIFACE's user-mode IOCTL ABI (XI include/xeniface_ioctls.h at f12cbdb): the device interface GUID, the
IOCTL codes built as the header builds them, and the input/output structures as x64 layouts.

The layouts are ctypes structures with the header's member types (USHORT, ULONG, BOOLEAN, enums as 32-bit
ints, pointers and HANDLEs as 64-bit), so ctypes' native x86-64 alignment gives MSVC's x64 offsets; the
sizes the driver checks InLen/OutLen against are `sizeof` of these. ANYSIZE_ARRAY members are declared with
one element, as in C, and `FIELD_OFFSET(S, Member[n])` is `field_offset(S, "Member", n)`.
"""
from __future__ import annotations

import ctypes
import uuid

from xenpv.stack.kernel.io import (CTL_CODE, FILE_ANY_ACCESS, FILE_DEVICE_UNKNOWN, METHOD_BUFFERED, METHOD_NEITHER,
                                  STATUS_INVALID_HANDLE)

GUID_INTERFACE_XENIFACE = uuid.UUID("B2CFB085-AA5E-47E1-8BF7-9793F3154565")

# ntstatus.h values stack.kernel.status does not name, returned by ioctls.c and friends.
STATUS_INVALID_BUFFER_SIZE = 0xC0000206
STATUS_ACCESS_VIOLATION = 0xC0000005

USHORT = ctypes.c_uint16
ULONG = ctypes.c_uint32
BOOLEAN = ctypes.c_uint8
ENUM = ctypes.c_int32
PVOID = ctypes.c_uint64  # PCHAR, PVOID, HANDLE: 64-bit values in an x64 caller's buffer
HANDLE = ctypes.c_uint64


def _ioctl(function: int, method: int = METHOD_BUFFERED) -> int:
    return CTL_CODE(FILE_DEVICE_UNKNOWN, function, method, FILE_ANY_ACCESS)


IOCTL_XENIFACE_STORE_READ = _ioctl(0x800)
IOCTL_XENIFACE_STORE_WRITE = _ioctl(0x801)
IOCTL_XENIFACE_STORE_DIRECTORY = _ioctl(0x802)
IOCTL_XENIFACE_STORE_REMOVE = _ioctl(0x803)
IOCTL_XENIFACE_STORE_SET_PERMISSIONS = _ioctl(0x804)
IOCTL_XENIFACE_STORE_ADD_WATCH = _ioctl(0x805)
IOCTL_XENIFACE_STORE_REMOVE_WATCH = _ioctl(0x806)
IOCTL_XENIFACE_EVTCHN_BIND_INTERDOMAIN = _ioctl(0x810)
IOCTL_XENIFACE_EVTCHN_BIND_UNBOUND = _ioctl(0x811)
IOCTL_XENIFACE_EVTCHN_CLOSE = _ioctl(0x812)
IOCTL_XENIFACE_EVTCHN_NOTIFY = _ioctl(0x813)
IOCTL_XENIFACE_EVTCHN_UNMASK = _ioctl(0x814)
IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS = _ioctl(0x820, METHOD_NEITHER)
IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS = _ioctl(0x821)
IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES = _ioctl(0x822, METHOD_NEITHER)
IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES = _ioctl(0x823)
IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_V2 = _ioctl(0x824, METHOD_NEITHER)
IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_V2 = _ioctl(0x825)
IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_V2 = _ioctl(0x826, METHOD_NEITHER)
IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_V2 = _ioctl(0x827)
IOCTL_XENIFACE_SUSPEND_GET_COUNT = _ioctl(0x830)
IOCTL_XENIFACE_SUSPEND_REGISTER = _ioctl(0x831)
IOCTL_XENIFACE_SUSPEND_DEREGISTER = _ioctl(0x832)
IOCTL_XENIFACE_SHAREDINFO_GET_TIME = _ioctl(0x840)
IOCTL_XENIFACE_LOG = _ioctl(0x84F)

IOCTL_NAMES = {value: name for name, value in globals().items() if name.startswith("IOCTL_XENIFACE_")}

XENIFACE_LOG_MAX_LENGTH = 256

XENIFACE_STORE_PERM_NONE = 0
XENIFACE_STORE_PERM_READ = 1
XENIFACE_STORE_PERM_WRITE = 2
XENIFACE_STORE_ALLOWED_PERMISSIONS = XENIFACE_STORE_PERM_NONE | XENIFACE_STORE_PERM_READ | XENIFACE_STORE_PERM_WRITE

XENIFACE_GNTTAB_READONLY = 1 << 0
XENIFACE_GNTTAB_USE_NOTIFY_OFFSET = 1 << 1
XENIFACE_GNTTAB_USE_NOTIFY_PORT = 1 << 2


class Layout(ctypes.Structure):
    """A header structure: `pack()` its bytes, `unpack(buffer)` from the start of a buffer (the driver reads
    an input buffer that is at least this long; callers check lengths first, as the C code does)."""

    def pack(self) -> bytes:
        return bytes(self)

    @classmethod
    def unpack(cls, data: bytes):  # type: ignore[no-untyped-def]
        return cls.from_buffer_copy(data[:ctypes.sizeof(cls)].ljust(ctypes.sizeof(cls), b"\0"))

    @classmethod
    def size(cls) -> int:
        return ctypes.sizeof(cls)


def field_offset(layout: type[ctypes.Structure], member: str, index: int = 0) -> int:
    """FIELD_OFFSET(layout, member[index]) for an array member."""
    element = layout._element_types[member]  # type: ignore[attr-defined]
    return getattr(layout, member).offset + index * ctypes.sizeof(element)


class XENIFACE_STORE_PERMISSION(Layout):
    _fields_ = [("Domain", USHORT), ("Mask", ENUM)]


class XENIFACE_STORE_SET_PERMISSIONS_IN(Layout):
    _fields_ = [("Path", PVOID), ("PathLength", ULONG), ("NumberPermissions", ULONG),
                ("Permissions", XENIFACE_STORE_PERMISSION * 1)]
    _element_types = {"Permissions": XENIFACE_STORE_PERMISSION}


class XENIFACE_STORE_ADD_WATCH_IN(Layout):
    _fields_ = [("Path", PVOID), ("PathLength", ULONG), ("Event", HANDLE)]


class XENIFACE_STORE_ADD_WATCH_OUT(Layout):
    _fields_ = [("Context", PVOID)]


class XENIFACE_STORE_REMOVE_WATCH_IN(Layout):
    _fields_ = [("Context", PVOID)]


class XENIFACE_EVTCHN_BIND_INTERDOMAIN_IN(Layout):
    _fields_ = [("RemoteDomain", USHORT), ("RemotePort", ULONG), ("Mask", BOOLEAN), ("Event", HANDLE)]


class XENIFACE_EVTCHN_BIND_INTERDOMAIN_OUT(Layout):
    _fields_ = [("LocalPort", ULONG)]


class XENIFACE_EVTCHN_BIND_UNBOUND_IN(Layout):
    _fields_ = [("RemoteDomain", USHORT), ("Mask", BOOLEAN), ("Event", HANDLE)]


class XENIFACE_EVTCHN_BIND_UNBOUND_OUT(Layout):
    _fields_ = [("LocalPort", ULONG)]


class XENIFACE_EVTCHN_CLOSE_IN(Layout):
    _fields_ = [("LocalPort", ULONG)]


class XENIFACE_EVTCHN_NOTIFY_IN(Layout):
    _fields_ = [("LocalPort", ULONG)]


class XENIFACE_EVTCHN_UNMASK_IN(Layout):
    _fields_ = [("LocalPort", ULONG)]


class XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN(Layout):
    _fields_ = [("RequestId", ULONG), ("RemoteDomain", USHORT), ("NumberPages", ULONG), ("Flags", ENUM),
                ("NotifyOffset", ULONG), ("NotifyPort", ULONG)]


class XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN_V2(Layout):
    _fields_ = [("RemoteDomain", USHORT), ("Address", PVOID), ("NumberPages", ULONG), ("Flags", ENUM),
                ("NotifyOffset", ULONG), ("NotifyPort", ULONG)]


class XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT(Layout):
    """Also XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT_V2 (the header typedefs one to the other)."""
    _fields_ = [("Address", PVOID), ("References", ULONG * 1)]
    _element_types = {"References": ULONG}


class XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_IN(Layout):
    _fields_ = [("RequestId", ULONG)]


class XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_IN_V2(Layout):
    _fields_ = [("Address", PVOID)]


class XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN(Layout):
    _fields_ = [("RequestId", ULONG), ("RemoteDomain", USHORT), ("NumberPages", ULONG), ("Flags", ENUM),
                ("NotifyOffset", ULONG), ("NotifyPort", ULONG), ("References", ULONG * 1)]
    _element_types = {"References": ULONG}


class XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN_V2(Layout):
    _fields_ = [("RemoteDomain", USHORT), ("NumberPages", ULONG), ("Flags", ENUM), ("NotifyOffset", ULONG),
                ("NotifyPort", ULONG), ("References", ULONG * 1)]
    _element_types = {"References": ULONG}


class XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_OUT(Layout):
    """Also ..._OUT_V2."""
    _fields_ = [("Address", PVOID)]


class XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_IN(Layout):
    _fields_ = [("RequestId", ULONG)]


class XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_IN_V2(Layout):
    _fields_ = [("Address", PVOID)]


class XENIFACE_SUSPEND_REGISTER_IN(Layout):
    _fields_ = [("Event", HANDLE)]


class XENIFACE_SUSPEND_REGISTER_OUT(Layout):
    """Also the input of IOCTL_XENIFACE_SUSPEND_DEREGISTER."""
    _fields_ = [("Context", PVOID)]


class FILETIME(Layout):
    _fields_ = [("dwLowDateTime", ULONG), ("dwHighDateTime", ULONG)]


class XENIFACE_SHAREDINFO_GET_TIME_OUT(Layout):
    _fields_ = [("Time", FILETIME), ("Local", BOOLEAN)]


ULONG_SIZE = ctypes.sizeof(ULONG)
