"""io/netif.h: the network device tx/rx rings, extra-info slots and their flags.

The layouts are identical on x86_32 and x86_64 (no 64-bit members), so netif has no per-ABI variants.
"""

from __future__ import annotations

import ctypes

from xenpv.xenabi.layout import XenStruct, XenUnion, struct_of
from xenpv.xenabi.ring import const_ring_size, ring_bytes

XEN_NETIF_NR_SLOTS_MIN = 18
XEN_NETIF_MAX_TX_SIZE = 0xFFFF

NETTXF_csum_blank = 1 << 0
NETTXF_data_validated = 1 << 1
NETTXF_more_data = 1 << 2
NETTXF_extra_info = 1 << 3

NETRXF_data_validated = 1 << 0
NETRXF_csum_blank = 1 << 1
NETRXF_more_data = 1 << 2
NETRXF_extra_info = 1 << 3
NETRXF_gso_prefix = 1 << 4

XEN_NETIF_EXTRA_TYPE_NONE = 0
XEN_NETIF_EXTRA_TYPE_GSO = 1
XEN_NETIF_EXTRA_TYPE_MCAST_ADD = 2
XEN_NETIF_EXTRA_TYPE_MCAST_DEL = 3
XEN_NETIF_EXTRA_TYPE_HASH = 4
XEN_NETIF_EXTRA_TYPE_MAX = 5

XEN_NETIF_EXTRA_FLAG_MORE = 1 << 0

XEN_NETIF_GSO_TYPE_NONE = 0
XEN_NETIF_GSO_TYPE_TCPV4 = 1
XEN_NETIF_GSO_TYPE_TCPV6 = 2

# Hash types and algorithms carried in the HASH extra (shared with the control ring).
XEN_NETIF_CTRL_HASH_TYPE_IPV4 = 1 << 0
XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP = 1 << 1
XEN_NETIF_CTRL_HASH_TYPE_IPV6 = 1 << 2
XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP = 1 << 3
XEN_NETIF_CTRL_HASH_ALGORITHM_NONE = 0
XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ = 1

NETIF_RSP_DROPPED = -2
NETIF_RSP_ERROR = -1
NETIF_RSP_OKAY = 0
# Status of a response slot that only carries an extra-info segment.
NETIF_RSP_NULL = 1


class NetifTxRequest(XenStruct):
    """``size`` is the whole packet's size in the first request of a packet, a fragment's size after that."""

    _xen_name_ = "struct netif_tx_request"
    _fields_ = [
        ("gref", ctypes.c_uint32),
        ("offset", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("id", ctypes.c_uint16),
        ("size", ctypes.c_uint16),
    ]


class NetifTxResponse(XenStruct):
    _xen_name_ = "struct netif_tx_response"
    _fields_ = [
        ("id", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class NetifRxRequest(XenStruct):
    _xen_name_ = "struct netif_rx_request"
    _fields_ = [
        ("id", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("gref", ctypes.c_uint32),
    ]


class NetifRxResponse(XenStruct):
    """``status`` < 0 is a NETIF_RSP_* error, otherwise the number of bytes written at ``offset``."""

    _xen_name_ = "struct netif_rx_response"
    _fields_ = [
        ("id", ctypes.c_uint16),
        ("offset", ctypes.c_uint16),
        ("flags", ctypes.c_uint16),
        ("status", ctypes.c_int16),
    ]


class NetifExtraInfoGso(XenStruct):
    _fields_ = [
        ("size", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("features", ctypes.c_uint16),
    ]


class NetifExtraInfoMcast(XenStruct):
    _fields_ = [("addr", ctypes.c_uint8 * 6)]


class NetifExtraInfoHash(XenStruct):
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("algorithm", ctypes.c_uint8),
        ("value", ctypes.c_uint8 * 4),
    ]


class NetifExtraInfoU(XenUnion):
    _fields_ = [
        ("gso", NetifExtraInfoGso),
        ("mcast", NetifExtraInfoMcast),
        ("hash", NetifExtraInfoHash),
        ("pad", ctypes.c_uint16 * 3),
    ]


class NetifExtraInfo(XenStruct):
    """Occupies a whole request (tx) or response (rx) slot after a NETTXF/NETRXF_extra_info entry."""

    _xen_name_ = "struct netif_extra_info"
    _fields_ = [
        ("type", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("u", NetifExtraInfoU),
    ]


NETIF_TX_REQUEST_STRUCT = struct_of(NetifTxRequest)
NETIF_TX_RESPONSE_STRUCT = struct_of(NetifTxResponse)
NETIF_RX_REQUEST_STRUCT = struct_of(NetifRxRequest)
NETIF_RX_RESPONSE_STRUCT = struct_of(NetifRxResponse)
NETIF_EXTRA_INFO_STRUCT = struct_of(NetifExtraInfo)


def tx_ring_size(order: int = 0) -> int:
    slot = max(ctypes.sizeof(NetifTxRequest), ctypes.sizeof(NetifTxResponse))
    return const_ring_size(slot, ring_bytes(order))


def rx_ring_size(order: int = 0) -> int:
    slot = max(ctypes.sizeof(NetifRxRequest), ctypes.sizeof(NetifRxResponse))
    return const_ring_size(slot, ring_bytes(order))


NET_TX_RING_SIZE = tx_ring_size()
NET_RX_RING_SIZE = rx_ring_size()
