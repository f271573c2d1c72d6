"""tx validation and offload mapping rules of netback's data path that a one-line change would break without
the older tests noticing (issue 18): the Ethernet header in the first slot (Linux netback's "Bad packet
size" rule: the first slot's own bytes, not the packet's total, must cover ETH_HLEN), every slot inside its
page at the exact boundary, and each GSO type and checksum flag mapped to its own virtio_net_hdr offload
with the checksum location of that frame's family. What the Linux kernel makes of these headers is checked
by tests/integration/test_netback_offloads.py."""
from __future__ import annotations

from dataclasses import dataclass

import dpkt
import pytest

from xenpv.backends.netback.datapath import ETH_HLEN, TxPath, VifStats
from xenpv.backends.netback.tap import (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
                                        VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VnetHdr)
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, BackRing, FrontRing

from .test_datapath import MAC_A, MAC_B, FakeGrants, Tx, _extra, _put, _req, tx  # noqa: F401  (tx is a fixture)

OK, ERR = N.NETIF_RSP_OKAY, N.NETIF_RSP_ERROR


def _tcp(family: int, payload: bytes = b"p" * 100, ip_options: bytes = b"") -> bytes:
    tcp = dpkt.tcp.TCP(sport=1000, dport=2000, seq=1, flags=dpkt.tcp.TH_ACK, data=payload)
    if family == 4:
        ip = dpkt.ip.IP(src=bytes([10, 0, 0, 2]), dst=bytes([10, 0, 0, 1]), p=dpkt.ip.IP_PROTO_TCP, data=tcp,
                        hl=5 + len(ip_options) // 4, opts=ip_options)
        return bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))
    ip6 = dpkt.ip6.IP6(src=bytes(15) + b"\2", dst=bytes(15) + b"\1", nxt=dpkt.ip.IP_PROTO_TCP, hlim=64, data=tcp,
                       plen=len(bytes(tcp)))
    return bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=dpkt.ethernet.ETH_TYPE_IP6, data=ip6))


def _udp6(payload: bytes = b"u" * 20) -> bytes:
    udp = dpkt.udp.UDP(sport=1000, dport=2000, ulen=8 + len(payload), data=payload)
    ip6 = dpkt.ip6.IP6(src=bytes(15) + b"\2", dst=bytes(15) + b"\1", nxt=dpkt.ip.IP_PROTO_UDP, hlim=64, data=udp,
                       plen=8 + len(payload))
    return bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=dpkt.ethernet.ETH_TYPE_IP6, data=ip6))


def _one(tx: Tx, *entries: bytes) -> tuple[list[tuple[VnetHdr, bytes]], list[int]]:
    frames = tx.send(*entries)
    return frames, [status for _, status in tx.responses()]


# ---- the Ethernet header is in the first slot -------------------------------------------------------

@pytest.mark.parametrize("size", [1, ETH_HLEN - 1])
def test_runt_frame_is_refused(tx: Tx, size: int) -> None:
    _put(tx.grants, 5, MAC_B + MAC_A + b"\x08\x06" + bytes(50))
    assert _one(tx, _req(5, 0, 0, 1, size)) == ([], [ERR])
    assert tx.stats.tx_errors == 1


def test_frame_of_just_an_ethernet_header_is_sent(tx: Tx) -> None:
    header = MAC_B + MAC_A + b"\x88\xb5"  # local experimental ethertype, no payload
    _put(tx.grants, 5, header)
    assert _one(tx, _req(5, 0, 0, 1, ETH_HLEN)) == ([(VnetHdr(), header)], [OK])


def test_first_slot_shorter_than_an_ethernet_header_is_refused_whatever_the_total(tx: Tx) -> None:
    frame = MAC_B + MAC_A + b"\x08\x06" + bytes(86)  # 100 bytes
    _put(tx.grants, 5, frame[:10])
    _put(tx.grants, 6, frame[10:])
    assert _one(tx, _req(5, 0, N.NETTXF_more_data, 1, 100), _req(6, 0, 0, 2, 90)) == ([], [ERR, ERR])
    # The first slot holds nothing at all: its size is exactly the fragments'.
    assert _one(tx, _req(5, 0, N.NETTXF_more_data, 3, 90), _req(6, 0, 0, 4, 90)) == ([], [ERR, ERR])
    # With the header in the first slot the same total goes through.
    _put(tx.grants, 5, frame[:ETH_HLEN])
    _put(tx.grants, 6, frame[ETH_HLEN:])
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_more_data, 5, 100), _req(6, 0, 0, 6, 100 - ETH_HLEN))
    assert [f for _, f in frames] == [frame] and statuses == [OK, OK]


# ---- every slot inside its page ---------------------------------------------------------------------

@dataclass
class ContiguousGrants(FakeGrants):
    """Granted pages that happen to be followed by more guest memory: reading past a page's end succeeds,
    so only netback's own bound refuses a slot that crosses its page."""

    def _page(self, ref: int, offset: int, size: int) -> bytearray:
        page = self.pages.setdefault(ref, bytearray(XEN_PAGE_SIZE))
        if len(page) < 2 * XEN_PAGE_SIZE:
            page.extend(bytes(2 * XEN_PAGE_SIZE - len(page)))
        return page


@pytest.fixture
def loose() -> Tx:
    shared = bytearray(XEN_PAGE_SIZE)
    front = FrontRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT, init=True)
    back = BackRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT)
    grants, stats = ContiguousGrants(), VifStats()
    return Tx(grants, front, TxPath(back, grants, stats, "test-tx"), stats)


def test_single_slot_may_end_exactly_at_the_page_end(loose: Tx) -> None:
    tx = loose
    frame = MAC_B + MAC_A + b"\x08\x06" + bytes(82)  # 96 bytes
    _put(tx.grants, 5, frame, offset=XEN_PAGE_SIZE - 96)
    assert _one(tx, _req(5, XEN_PAGE_SIZE - 96, 0, 1, 96)) == ([(VnetHdr(), frame)], [OK])
    assert _one(tx, _req(5, XEN_PAGE_SIZE - 95, 0, 2, 96)) == ([], [ERR])
    assert _one(tx, _req(5, XEN_PAGE_SIZE - 96, 0, 3, 97)) == ([], [ERR])


def test_first_slot_is_bounded_by_its_own_bytes_not_the_total(loose: Tx) -> None:
    tx = loose
    frame = MAC_B + MAC_A + b"\x08\x06" + bytes(286)  # 300 bytes: 96 at the end of one page, 204 in another
    _put(tx.grants, 5, frame[:96], offset=XEN_PAGE_SIZE - 96)
    _put(tx.grants, 6, frame[96:])
    frames, statuses = _one(tx, _req(5, XEN_PAGE_SIZE - 96, N.NETTXF_more_data, 1, 300), _req(6, 0, 0, 2, 204))
    assert [f for _, f in frames] == [frame] and statuses == [OK, OK]
    # One more byte in the first slot crosses its page.
    frames, statuses = _one(tx, _req(5, XEN_PAGE_SIZE - 96, N.NETTXF_more_data, 3, 301), _req(6, 0, 0, 4, 204))
    assert (frames, statuses) == ([], [ERR, ERR])


def test_fragment_may_end_exactly_at_the_page_end(loose: Tx) -> None:
    tx = loose
    frame = MAC_B + MAC_A + b"\x08\x06" + bytes(186)  # 200 bytes
    _put(tx.grants, 5, frame[:100])
    _put(tx.grants, 6, frame[100:], offset=XEN_PAGE_SIZE - 100)
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_more_data, 1, 200), _req(6, XEN_PAGE_SIZE - 100, 0, 2, 100))
    assert [f for _, f in frames] == [frame] and statuses == [OK, OK]
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_more_data, 3, 201), _req(6, XEN_PAGE_SIZE - 100, 0, 4, 101))
    assert (frames, statuses) == ([], [ERR, ERR])


# ---- offloads: each flag to its own virtio_net_hdr type --------------------------------------------

@pytest.mark.parametrize("xen_type, family, virtio_type, csum_start", [
    (N.XEN_NETIF_GSO_TYPE_TCPV4, 4, VIRTIO_NET_HDR_GSO_TCPV4, ETH_HLEN + 20),
    (N.XEN_NETIF_GSO_TYPE_TCPV6, 6, VIRTIO_NET_HDR_GSO_TCPV6, ETH_HLEN + 40),
], ids=["tcpv4", "tcpv6"])
def test_gso_type_maps_to_its_own_virtio_type(tx: Tx, xen_type: int, family: int, virtio_type: int,
                                              csum_start: int) -> None:
    frame = _tcp(family, b"g" * 3000)
    _put(tx.grants, 5, frame)
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_extra_info | N.NETTXF_csum_blank, 1, len(frame)),
                            _extra(N.XEN_NETIF_EXTRA_TYPE_GSO, gso_size=1400, gso_type=xen_type))
    assert statuses == [OK, N.NETIF_RSP_NULL]
    (hdr, got), = frames
    assert got == frame
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, virtio_type, csum_start, 1400, csum_start, 16)


@pytest.mark.parametrize("gso_type", [0, 3, 0xFF])  # NONE and types netif.h does not define
def test_gso_extra_of_no_known_type_is_refused(tx: Tx, gso_type: int) -> None:
    frame = _tcp(4)
    _put(tx.grants, 5, frame)
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_extra_info | N.NETTXF_csum_blank, 1, len(frame)),
                            _extra(N.XEN_NETIF_EXTRA_TYPE_GSO, gso_size=1400, gso_type=gso_type))
    assert (frames, statuses) == ([], [ERR, N.NETIF_RSP_NULL])


@pytest.mark.parametrize("frame, csum_start, csum_offset", [
    (_tcp(4), ETH_HLEN + 20, 16),
    (_tcp(4, ip_options=b"\x01\x01\x01\x00"), ETH_HLEN + 24, 16),  # IHL 6: the L4 header starts later
    (_tcp(6), ETH_HLEN + 40, 16),
    (_udp6(), ETH_HLEN + 40, 6),
], ids=["tcp4", "tcp4-ihl6", "tcp6", "udp6"])
def test_csum_blank_gives_the_l4_checksum_of_the_frame(tx: Tx, frame: bytes, csum_start: int,
                                                       csum_offset: int) -> None:
    _put(tx.grants, 5, frame)
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_csum_blank, 1, len(frame)))
    assert statuses == [OK]
    (hdr, got), = frames
    assert got == frame
    assert hdr == VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, csum_start, 0, csum_start,
                          csum_offset)


@pytest.mark.parametrize("flags", [0, N.NETTXF_data_validated])
def test_without_csum_blank_no_offload_is_asked(tx: Tx, flags: int) -> None:
    frame = _tcp(6)
    _put(tx.grants, 5, frame)
    assert _one(tx, _req(5, 0, flags, 1, len(frame))) == ([(VnetHdr(), frame)], [OK])


def test_csum_blank_on_a_truncated_l4_header_is_refused(tx: Tx) -> None:
    frame = _tcp(4)[:ETH_HLEN + 20 + 17]  # the TCP checksum field (offset 16, 2 bytes) is cut
    _put(tx.grants, 5, frame)
    assert _one(tx, _req(5, 0, N.NETTXF_csum_blank, 1, len(frame))) == ([], [ERR])
    whole = _tcp(4)[:ETH_HLEN + 20 + 18]
    _put(tx.grants, 5, whole)
    frames, statuses = _one(tx, _req(5, 0, N.NETTXF_csum_blank, 2, len(whole)))
    assert statuses == [OK] and frames[0][0].csum_offset == 16
