"""The xenstore wire ABI (xen/include/public/io/xs_wire.h): message header, types, errors, ring page.

This module is the only place the layout of xenstore messages and of the xenstore ring page is written
down; the daemon, its clients and the guest model all import it.
"""
from __future__ import annotations

import ctypes
import struct
from enum import IntEnum


class XsdSockmsgType(IntEnum):
    CONTROL = 0
    DEBUG = 0  # historical alias of CONTROL
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    # 20 was XS_RESTRICT; it was removed and is invalid.
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    TYPE_COUNT = 27
    INVALID = 0xFFFF


# struct xsd_sockmsg { uint32_t type, req_id, tx_id, len; } followed by `len` payload bytes.
XSD_SOCKMSG = struct.Struct("<IIII")
XENSTORE_PAYLOAD_MAX = 4096

# xsd_errors[] in its order; an errno not in this table travels as "EINVAL".
XSD_ERRORS: tuple[str, ...] = (
    "EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
    "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM",
)


class XsWatchType(IntEnum):
    """Field order of a WATCH_EVENT payload."""
    PATH = 0
    TOKEN = 1


XS_WATCH_PATH = XsWatchType.PATH
XS_WATCH_TOKEN = XsWatchType.TOKEN

XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

# Ring page.
XENSTORE_RING_SIZE = 1024
XENSTORE_RING_IDX = ctypes.c_uint32


def MASK_XENSTORE_IDX(idx: int) -> int:
    return idx & (XENSTORE_RING_SIZE - 1)


class XenstoreDomainInterface(ctypes.LittleEndianStructure):
    """struct xenstore_domain_interface: the shared page between a guest and xenstored."""

    _fields_ = [
        ("req", ctypes.c_char * XENSTORE_RING_SIZE),  # requests, guest -> xenstored
        ("rsp", ctypes.c_char * XENSTORE_RING_SIZE),  # replies and watch events, xenstored -> guest
        ("req_cons", XENSTORE_RING_IDX),
        ("req_prod", XENSTORE_RING_IDX),
        ("rsp_cons", XENSTORE_RING_IDX),
        ("rsp_prod", XENSTORE_RING_IDX),
        ("server_features", ctypes.c_uint32),
        ("connection", ctypes.c_uint32),
        ("error", ctypes.c_uint32),
        ("evtchn_port", ctypes.c_uint32),
    ]


# server_features bits
XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_SERVER_FEATURE_WATCHDEPTH = 4
XENSTORE_SERVER_FEATURE_DOMID_ANY = 8

# connection values
XENSTORE_CONNECTED = 0
XENSTORE_RECONNECT = 1

# error values
XENSTORE_ERROR_NONE = 0
XENSTORE_ERROR_COMM = 1
XENSTORE_ERROR_RINGIDX = 2
XENSTORE_ERROR_PROTO = 3

# Domain ids with a meaning of their own (xen/include/public/xen.h).
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_ANY = 0x7FF5  # in a xenstore permission entry: matches every domain
DOMID_IDLE = 0x7FFF

# Grant reference the toolstack reserves for the xenstore page (grant_table.h).
GNTTAB_RESERVED_XENSTORE = 1
