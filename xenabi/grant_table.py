"""grant_table.h: v1 grant entries, their flags, and the GNTTABOP_* hypercall argument structures (x86_64).

``XEN_GUEST_HANDLE(T)`` is ``struct { T *p; }`` on x86_64, an 8-byte guest address; in the op structs below it
is a ``c_uint64`` named like the C member.  In this project the guest passes guest-physical addresses there.
"""

from __future__ import annotations

import ctypes

from xenpv.xenabi.layout import XenStruct, XenUnion
from xenpv.xenabi.ring import XEN_PAGE_SIZE

GNTTABOP_map_grant_ref = 0
GNTTABOP_unmap_grant_ref = 1
GNTTABOP_setup_table = 2
GNTTABOP_dump_table = 3
GNTTABOP_transfer = 4
GNTTABOP_copy = 5
GNTTABOP_query_size = 6
GNTTABOP_unmap_and_replace = 7
GNTTABOP_set_version = 8
GNTTABOP_get_status_frames = 9
GNTTABOP_get_version = 10
GNTTABOP_swap_grant_ref = 11
GNTTABOP_cache_flush = 12

GNTTAB_NR_RESERVED_ENTRIES = 8
GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1

# grant_entry_v1.flags: the type in bits 0-1 ...
GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
# ... and subflags above it.  GTF_reading/GTF_writing are set by the hypervisor while a mapping exists.
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_PWT = 1 << 5
GTF_PCD = 1 << 6
GTF_PAT = 1 << 7
GTF_sub_page = 1 << 8
GTF_transfer_committed = 1 << 2
GTF_transfer_completed = 1 << 3

GNTMAP_device_map = 1 << 0
GNTMAP_host_map = 1 << 1
GNTMAP_readonly = 1 << 2
GNTMAP_application_map = 1 << 3
GNTMAP_contains_pte = 1 << 4
GNTMAP_guest_avail_mask = 0xFFFF0000

GNTCOPY_source_gref = 1 << 0
GNTCOPY_dest_gref = 1 << 1

GNTTAB_CACHE_CLEAN = 1 << 0
GNTTAB_CACHE_INVAL = 1 << 1
GNTTAB_CACHE_SOURCE_GREF = 1 << 31

GNTST_okay = 0
GNTST_general_error = -1
GNTST_bad_domain = -2
GNTST_bad_gntref = -3
GNTST_bad_handle = -4
GNTST_bad_virt_addr = -5
GNTST_bad_dev_addr = -6
GNTST_no_device_space = -7
GNTST_permission_denied = -8
GNTST_bad_page = -9
GNTST_bad_copy_arg = -10
GNTST_address_too_big = -11
GNTST_eagain = -12
GNTST_no_space = -13

GNTST_NAMES: dict[int, str] = {
    value: name for name, value in globals().items() if name.startswith("GNTST_") and isinstance(value, int)
}


class GrantEntryV1(XenStruct):
    """One v1 entry.  The granting domain writes domid and frame, then (after a barrier) flags."""

    _xen_name_ = "struct grant_entry_v1"
    _fields_ = [
        ("flags", ctypes.c_uint16),
        ("domid", ctypes.c_uint16),
        ("frame", ctypes.c_uint32),
    ]


GRANT_ENTRIES_V1_PER_FRAME = XEN_PAGE_SIZE // ctypes.sizeof(GrantEntryV1)


class GnttabMapGrantRef(XenStruct):
    _xen_name_ = "struct gnttab_map_grant_ref"
    _fields_ = [
        ("host_addr", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("ref", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("status", ctypes.c_int16),
        ("handle", ctypes.c_uint32),
        ("dev_bus_addr", ctypes.c_uint64),
    ]


class GnttabUnmapGrantRef(XenStruct):
    _xen_name_ = "struct gnttab_unmap_grant_ref"
    _fields_ = [
        ("host_addr", ctypes.c_uint64),
        ("dev_bus_addr", ctypes.c_uint64),
        ("handle", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class GnttabSetupTable(XenStruct):
    _xen_name_ = "struct gnttab_setup_table"
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),
    ]


class GnttabDumpTable(XenStruct):
    _xen_name_ = "struct gnttab_dump_table"
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class GnttabTransfer(XenStruct):
    _xen_name_ = "struct gnttab_transfer"
    _fields_ = [
        ("mfn", ctypes.c_uint64),
        ("domid", ctypes.c_uint16),
        ("ref", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class GnttabCopyPtrU(XenUnion):
    _fields_ = [
        ("ref", ctypes.c_uint32),
        ("gmfn", ctypes.c_uint64),
    ]


class GnttabCopyPtr(XenStruct):
    """``u.ref`` if the matching GNTCOPY_*_gref flag is set, else ``u.gmfn`` of the caller's own memory."""

    _xen_name_ = "struct gnttab_copy_ptr"
    _fields_ = [
        ("u", GnttabCopyPtrU),
        ("domid", ctypes.c_uint16),
        ("offset", ctypes.c_uint16),
    ]


class GnttabCopy(XenStruct):
    _xen_name_ = "struct gnttab_copy"
    _fields_ = [
        ("source", GnttabCopyPtr),
        ("dest", GnttabCopyPtr),
        ("len", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class GnttabQuerySize(XenStruct):
    _xen_name_ = "struct gnttab_query_size"
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("nr_frames", ctypes.c_uint32),
        ("max_nr_frames", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class GnttabUnmapAndReplace(XenStruct):
    _xen_name_ = "struct gnttab_unmap_and_replace"
    _fields_ = [
        ("host_addr", ctypes.c_uint64),
        ("new_addr", ctypes.c_uint64),
        ("handle", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class GnttabSetVersion(XenStruct):
    _xen_name_ = "struct gnttab_set_version"
    _fields_ = [("version", ctypes.c_uint32)]


class GnttabGetStatusFrames(XenStruct):
    _xen_name_ = "struct gnttab_get_status_frames"
    _fields_ = [
        ("nr_frames", ctypes.c_uint32),
        ("dom", ctypes.c_uint16),
        ("status", ctypes.c_int16),
        ("frame_list", ctypes.c_uint64),
    ]


class GnttabGetVersion(XenStruct):
    _xen_name_ = "struct gnttab_get_version"
    _fields_ = [
        ("dom", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("version", ctypes.c_uint32),
    ]


class GnttabSwapGrantRef(XenStruct):
    _xen_name_ = "struct gnttab_swap_grant_ref"
    _fields_ = [
        ("ref_a", ctypes.c_uint32),
        ("ref_b", ctypes.c_uint32),
        ("status", ctypes.c_int16),
    ]


class GnttabCacheFlushA(XenUnion):
    _fields_ = [
        ("dev_bus_addr", ctypes.c_uint64),
        ("ref", ctypes.c_uint32),
    ]


class GnttabCacheFlush(XenStruct):
    _xen_name_ = "struct gnttab_cache_flush"
    _fields_ = [
        ("a", GnttabCacheFlushA),
        ("offset", ctypes.c_uint16),
        ("length", ctypes.c_uint16),
        ("op", ctypes.c_uint32),
    ]


# The argument structure each GNTTABOP_* takes (an array of ``count`` of them).
GNTTABOP_ARGUMENTS: dict[int, type[XenStruct]] = {
    GNTTABOP_map_grant_ref: GnttabMapGrantRef,
    GNTTABOP_unmap_grant_ref: GnttabUnmapGrantRef,
    GNTTABOP_setup_table: GnttabSetupTable,
    GNTTABOP_dump_table: GnttabDumpTable,
    GNTTABOP_transfer: GnttabTransfer,
    GNTTABOP_copy: GnttabCopy,
    GNTTABOP_query_size: GnttabQuerySize,
    GNTTABOP_unmap_and_replace: GnttabUnmapAndReplace,
    GNTTABOP_set_version: GnttabSetVersion,
    GNTTABOP_get_status_frames: GnttabGetStatusFrames,
    GNTTABOP_get_version: GnttabGetVersion,
    GNTTABOP_swap_grant_ref: GnttabSwapGrantRef,
    GNTTABOP_cache_flush: GnttabCacheFlush,
}
