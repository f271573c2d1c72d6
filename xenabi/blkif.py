"""io/blkif.h: the block device ring protocol (requests, responses, discard, indirect) and its constants.

Two ABIs exist on x86: the native x86_64 one and "x86_32-abi", where uint64_t is only 4-byte aligned, so
``id`` and ``sector_number`` move down and the structures shrink.  A back end picks the layout from the
front end's ``protocol`` key (absent => native) with :func:`layouts_for_protocol`.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import cached_property

from xenpv.xenabi.layout import XenStruct, struct_of
from xenpv.xenabi.ring import XEN_PAGE_SIZE, const_ring_size, ring_bytes

BLKIF_OP_READ = 0
BLKIF_OP_WRITE = 1
BLKIF_OP_WRITE_BARRIER = 2
BLKIF_OP_FLUSH_DISKCACHE = 3
BLKIF_OP_RESERVED_1 = 4
BLKIF_OP_DISCARD = 5
BLKIF_OP_INDIRECT = 6

BLKIF_MAX_SEGMENTS_PER_REQUEST = 11
BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8
BLKIF_DISCARD_SECURE = 1

BLKIF_RSP_EOPNOTSUPP = -2
BLKIF_RSP_ERROR = -1
BLKIF_RSP_OKAY = 0

VDISK_CDROM = 0x1
VDISK_REMOVABLE = 0x2
VDISK_READONLY = 0x4

XEN_IO_PROTO_ABI_X86_32 = "x86_32-abi"
XEN_IO_PROTO_ABI_X86_64 = "x86_64-abi"
XEN_IO_PROTO_ABI_ARM = "arm-abi"

# sector_number, first_sect and last_sect count 512-byte units whatever the disk's sector-size.
BLKIF_SECTOR_SIZE = 512
BLKIF_SECTORS_PER_PAGE = XEN_PAGE_SIZE // BLKIF_SECTOR_SIZE


class BlkifRequestSegment(XenStruct):
    """One granted page and the inclusive 512-byte sector range [first_sect, last_sect] within it."""

    _xen_name_ = "struct blkif_request_segment"
    _fields_ = [
        ("gref", ctypes.c_uint32),
        ("first_sect", ctypes.c_uint8),
        ("last_sect", ctypes.c_uint8),
    ]


# An indirect page is an array of segments filling one page.
BLKIF_SEGS_PER_INDIRECT_FRAME = XEN_PAGE_SIZE // ctypes.sizeof(BlkifRequestSegment)
BLKIF_MAX_INDIRECT_SEGMENTS = BLKIF_SEGS_PER_INDIRECT_FRAME * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST


class BlkifRequest(XenStruct):
    _xen_name_ = "struct blkif_request"
    _fields_ = [
        ("operation", ctypes.c_uint8),
        ("nr_segments", ctypes.c_uint8),
        ("handle", ctypes.c_uint16),
        ("id", ctypes.c_uint64),
        ("sector_number", ctypes.c_uint64),
        ("seg", BlkifRequestSegment * BLKIF_MAX_SEGMENTS_PER_REQUEST),
    ]


class BlkifRequestDiscard(XenStruct):
    _xen_name_ = "struct blkif_request_discard"
    _fields_ = [
        ("operation", ctypes.c_uint8),
        ("flag", ctypes.c_uint8),
        ("handle", ctypes.c_uint16),
        ("id", ctypes.c_uint64),
        ("sector_number", ctypes.c_uint64),
        ("nr_sectors", ctypes.c_uint64),
    ]


class BlkifRequestIndirect(XenStruct):
    _xen_name_ = "struct blkif_request_indirect"
    _fields_ = [
        ("operation", ctypes.c_uint8),
        ("indirect_op", ctypes.c_uint8),
        ("nr_segments", ctypes.c_uint16),
        ("id", ctypes.c_uint64),
        ("sector_number", ctypes.c_uint64),
        ("handle", ctypes.c_uint16),
        ("indirect_grefs", ctypes.c_uint32 * BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST),
    ]


class BlkifResponse(XenStruct):
    _xen_name_ = "struct blkif_response"
    _fields_ = [
        ("id", ctypes.c_uint64),
        ("operation", ctypes.c_uint8),
        ("status", ctypes.c_int16),
    ]


# x86_32-abi: the same C declarations compiled for i386, where the ABI aligns uint64_t to 4 bytes.  The
# conformance test compiles the header with gcc -m32 to check these.
class BlkifX86_32Request(XenStruct):
    _pack_ = 4
    _xen_name_ = "struct blkif_request"
    _xen_abi_ = "x86_32"
    _fields_ = BlkifRequest._fields_


class BlkifX86_32RequestDiscard(XenStruct):
    _pack_ = 4
    _xen_name_ = "struct blkif_request_discard"
    _xen_abi_ = "x86_32"
    _fields_ = BlkifRequestDiscard._fields_


class BlkifX86_32RequestIndirect(XenStruct):
    _pack_ = 4
    _xen_name_ = "struct blkif_request_indirect"
    _xen_abi_ = "x86_32"
    # i386 adds an explicit pad so the request stays 64 bytes like on x86_64.
    _fields_ = BlkifRequestIndirect._fields_ + [("pad", ctypes.c_uint64)]


class BlkifX86_32Response(XenStruct):
    _pack_ = 4
    _xen_name_ = "struct blkif_response"
    _xen_abi_ = "x86_32"
    _fields_ = BlkifResponse._fields_


_UNSIGNED_CODES = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_uint64: "Q"}


def fields_struct(layout: type[XenStruct], *names: str) -> struct.Struct:
    """A struct that unpacks only the unsigned scalar fields `names` (in offset order) of `layout`, with pad
    bytes for everything in between; its size stays ``sizeof(layout)`` so it reads a whole entry.  For
    unpacking only: packing it would write zeros over every other field."""
    types = {f[0]: f[1] for f in layout._fields_}
    fmt, cursor = "<", 0
    for name in names:
        offset = getattr(layout, name).offset
        if offset < cursor:
            raise ValueError(f"{layout.__name__}.{name} is not after the fields before it")
        fmt += f"{offset - cursor}x{_UNSIGNED_CODES[types[name]]}"
        cursor = offset + ctypes.sizeof(types[name])
    return struct.Struct(f"{fmt}{ctypes.sizeof(layout) - cursor}x")


@dataclass(frozen=True)
class BlkifLayouts:
    """The layouts of one blkif ABI, and the ring entry codecs derived from them."""

    request: type[XenStruct]
    request_discard: type[XenStruct]
    request_indirect: type[XenStruct]
    response: type[XenStruct]

    @cached_property
    def request_struct(self) -> struct.Struct:
        return struct_of(self.request)

    @cached_property
    def response_struct(self) -> struct.Struct:
        return struct_of(self.response)

    @cached_property
    def request_id_sector(self) -> struct.Struct:
        """(id, sector_number) of a READ or WRITE request, skipping every other byte: a back-end serving a
        request shape it has already checked needs only these two, not the 38 fields of the whole request."""
        return fields_struct(self.request, "id", "sector_number")

    def ring_size(self, order: int = 0) -> int:
        """Slots in a ring of ``1 << order`` pages (32 per page for both x86 ABIs)."""
        slot = max(ctypes.sizeof(self.request), ctypes.sizeof(self.response))
        return const_ring_size(slot, ring_bytes(order))


BLKIF_NATIVE = BlkifLayouts(BlkifRequest, BlkifRequestDiscard, BlkifRequestIndirect, BlkifResponse)
BLKIF_X86_32 = BlkifLayouts(BlkifX86_32Request, BlkifX86_32RequestDiscard, BlkifX86_32RequestIndirect,
                            BlkifX86_32Response)

BLKIF_RING_SIZE = BLKIF_NATIVE.ring_size()


def layouts_for_protocol(protocol: str | None) -> BlkifLayouts:
    """The layouts for a front end's ``protocol`` key; None or empty means the back end's native ABI."""
    if protocol in (None, "", XEN_IO_PROTO_ABI_X86_64):
        return BLKIF_NATIVE
    if protocol == XEN_IO_PROTO_ABI_X86_32:
        return BLKIF_X86_32
    raise ValueError(f"unsupported blkif protocol {protocol!r}")
