"""The netif data path (backends/netback/datapath.py) over plain buffers: a front ring and a back ring
sharing one bytearray per ring, and a fake grant layer of page-sized bytearrays by ref."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

import dpkt
import pytest

from xenpv.backends.netback.datapath import (MAX_TX_SLOTS, GrantFault, RxPath, TxPath, VifStats, flow_queue,
                                       l4_checksum_location)
from xenpv.backends.netback.tap import (VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                  VIRTIO_NET_HDR_GSO_TCPV4, VnetHdr)
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, BackRing, FrontRing, RingOverflowError

MAC_A, MAC_B = bytes.fromhex("00163e000001"), bytes.fromhex("00163e000002")


@dataclass
class FakeGrants:
    """Grant refs the frontend owns, each one page; any other ref is a fault, as xenhv would answer."""
    pages: dict[int, bytearray] = field(default_factory=dict)

    def page(self, ref: int) -> bytearray:
        return self.pages.setdefault(ref, bytearray(XEN_PAGE_SIZE))

    def _page(self, ref: int, offset: int, size: int) -> bytearray:
        if ref not in self.pages:
            raise GrantFault(f"ref {ref} is not granted")
        if offset + size > XEN_PAGE_SIZE:
            raise GrantFault(f"offset {offset} + {size} beyond the page")
        return self.pages[ref]

    def read(self, ref: int, offset: int, size: int) -> bytes:
        return bytes(self._page(ref, offset, size)[offset:offset + size])

    def write(self, ref: int, offset: int, data: bytes | memoryview) -> None:
        self._page(ref, offset, len(data))[offset:offset + len(data)] = data


@dataclass
class Tx:
    grants: FakeGrants
    front: FrontRing
    path: TxPath
    stats: VifStats

    def send(self, *entries: bytes) -> list[tuple[VnetHdr, bytes]]:
        for e in entries:
            self.front.put_request_bytes(e)
        self.front.push_requests()
        frames, _ = self.path.poll()
        return frames

    def responses(self) -> list[tuple[int, int]]:
        out = []
        while self.front.unconsumed_responses():
            out.append(self.front.get_response())
        return out


@pytest.fixture
def tx() -> Tx:
    shared = bytearray(XEN_PAGE_SIZE)
    front = FrontRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT, init=True)
    back = BackRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT)
    grants, stats = FakeGrants(), VifStats()
    return Tx(grants, front, TxPath(back, grants, stats, "test-tx"), stats)


def _req(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return N.NETIF_TX_REQUEST_STRUCT.pack(gref, offset, flags, rid, size)


def _extra(etype: int, more: bool = False, gso_size: int = 0, gso_type: int = 0) -> bytes:
    raw = struct.pack("<BBHBBH", etype, N.XEN_NETIF_EXTRA_FLAG_MORE if more else 0, gso_size, gso_type, 0, 0)
    return raw.ljust(N.NETIF_TX_REQUEST_STRUCT.size, b"\0")


def _udp_frame(payload: bytes = b"hello", csum: bool = True) -> bytes:
    udp = dpkt.udp.UDP(sport=1000, dport=2000, ulen=8 + len(payload), data=payload)
    ip = dpkt.ip.IP(src=bytes([10, 0, 0, 2]), dst=bytes([10, 0, 0, 1]), p=dpkt.ip.IP_PROTO_UDP, data=udp)
    raw = bytes(dpkt.ethernet.Ethernet(dst=MAC_B, src=MAC_A, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))
    if not csum:  # a csum_blank frame carries only the pseudo-header sum; zero is as good for the test
        raw = raw[:40] + b"\0\0" + raw[42:]
    return raw


def _put(grants: FakeGrants, ref: int, data: bytes, offset: int = 0) -> int:
    grants.page(ref)[offset:offset + len(data)] = data
    return ref


# ---- tx: hostile entries --------------------------------------------------------------------------

def test_size_zero_is_refused(tx: Tx) -> None:
    _put(tx.grants, 5, _udp_frame())
    assert tx.send(_req(5, 0, 0, 3, 0)) == []
    assert tx.responses() == [(3, N.NETIF_RSP_ERROR)]
    assert tx.stats.tx_errors == 1 and tx.stats.tx_frames == 0


def test_fragments_beyond_65535_bytes_are_refused(tx: Tx) -> None:
    # The first slot's size is the whole packet (at most 65535 in its 16 bits); fragments adding up to
    # more than that leave nothing for the first slot: the packet cannot be honest.
    _put(tx.grants, 5, bytes(XEN_PAGE_SIZE))
    chain = [_req(5, 0, N.NETTXF_more_data, 0, 0xFFFF)]
    chain += [_req(5, 0, N.NETTXF_more_data if i < 16 else 0, i, 4096) for i in range(1, 17)]
    assert tx.send(*chain) == []
    assert tx.responses() == [(i, N.NETIF_RSP_ERROR) for i in range(17)]


def test_offset_plus_size_beyond_the_page_is_refused(tx: Tx) -> None:
    _put(tx.grants, 5, bytes(XEN_PAGE_SIZE))
    assert tx.send(_req(5, 4000, 0, 1, 200)) == []
    assert tx.responses() == [(1, N.NETIF_RSP_ERROR)]
    # Also on a fragment: the first slot is fine, the second crosses its page.
    assert tx.send(_req(5, 0, N.NETTXF_more_data, 2, 300), _req(5, 4090, 0, 3, 100)) == []
    assert tx.responses() == [(2, N.NETIF_RSP_ERROR), (3, N.NETIF_RSP_ERROR)]


def test_chain_over_the_slot_limit_is_refused_and_the_ring_recovers(tx: Tx) -> None:
    _put(tx.grants, 5, _udp_frame())
    n = MAX_TX_SLOTS + 3
    chain = [_req(5, 0, N.NETTXF_more_data, i, 600 if i == 0 else 1) for i in range(n - 1)]
    chain.append(_req(5, 0, 0, n - 1, 1))
    assert tx.send(*chain) == []
    assert tx.responses() == [(i, N.NETIF_RSP_ERROR) for i in range(n)]
    assert tx.stats.tx_errors == 1
    frame = _udp_frame()
    assert [f for _, f in tx.send(_req(5, 0, 0, 9, len(frame)))] == [frame]
    assert tx.responses() == [(9, N.NETIF_RSP_OKAY)]


def test_chain_that_never_ends_gets_an_error_per_slot(tx: Tx) -> None:
    # more_data on every slot the frontend ever writes: once past the limit, each further slot is
    # answered at once (the frontend gets its slots back), and nothing reaches the wire.
    _put(tx.grants, 5, bytes(100))
    for batch in range(4):
        ids = range(batch * 10, batch * 10 + 10)
        assert tx.send(*[_req(5, 0, N.NETTXF_more_data, i, 100) for i in ids]) == []
    got = tx.responses()
    assert all(status == N.NETIF_RSP_ERROR for _, status in got)
    assert [rid for rid, _ in got] == list(range(40))
    assert tx.stats.tx_frames == 0


def test_unknown_extra_type_is_refused(tx: Tx) -> None:
    _put(tx.grants, 5, _udp_frame())
    assert tx.send(_req(5, 0, N.NETTXF_extra_info, 4, 60), _extra(0x77)) == []
    assert tx.responses() == [(4, N.NETIF_RSP_ERROR), (0, N.NETIF_RSP_NULL)]


def test_extra_info_on_a_fragment_is_refused(tx: Tx) -> None:
    _put(tx.grants, 5, _udp_frame())
    assert tx.send(_req(5, 0, N.NETTXF_more_data, 1, 100), _req(5, 0, N.NETTXF_extra_info, 2, 40)) == []
    assert {s for _, s in tx.responses()} == {N.NETIF_RSP_ERROR}


def test_bad_grant_ref_is_refused(tx: Tx) -> None:
    assert tx.send(_req(9999, 0, 0, 6, 60)) == []
    assert tx.responses() == [(6, N.NETIF_RSP_ERROR)]
    assert tx.stats.tx_errors == 1


def test_bad_gso_extra_is_refused(tx: Tx) -> None:
    _put(tx.grants, 5, _udp_frame())
    assert tx.send(_req(5, 0, N.NETTXF_extra_info, 1, 60), _extra(N.XEN_NETIF_EXTRA_TYPE_GSO, gso_size=0,
                                                                 gso_type=N.XEN_NETIF_GSO_TYPE_TCPV4)) == []
    assert tx.responses()[0] == (1, N.NETIF_RSP_ERROR)


# ---- tx: good packets ------------------------------------------------------------------------------

def test_chain_is_reassembled_in_order(tx: Tx) -> None:
    frame = _udp_frame(bytes(range(256)) * 30)        # 7,722 bytes over three slots in three pages
    parts = [frame[:3000], frame[3000:7000], frame[7000:]]
    refs = [_put(tx.grants, 10 + i, p, offset=100 if i == 2 else 0) for i, p in enumerate(parts)]
    chain = [_req(refs[0], 0, N.NETTXF_more_data, 0, len(frame)),
             _req(refs[1], 0, N.NETTXF_more_data, 1, len(parts[1])),
             _req(refs[2], 100, 0, 2, len(parts[2]))]
    (hdr, got), = tx.send(*chain)
    assert got == frame and hdr == VnetHdr()
    assert tx.responses() == [(0, N.NETIF_RSP_OKAY), (1, N.NETIF_RSP_OKAY), (2, N.NETIF_RSP_OKAY)]
    assert (tx.stats.tx_frames, tx.stats.tx_bytes) == (1, len(frame))


def test_chain_split_across_polls(tx: Tx) -> None:
    frame = _udp_frame(b"x" * 5000)
    _put(tx.grants, 1, frame[:4096])
    _put(tx.grants, 2, frame[4096:])
    assert tx.send(_req(1, 0, N.NETTXF_more_data, 0, len(frame))) == []
    assert tx.responses() == []                                       # nothing answered mid-packet
    assert [f for _, f in tx.send(_req(2, 0, 0, 1, len(frame) - 4096))] == [frame]
    assert tx.responses() == [(0, N.NETIF_RSP_OKAY), (1, N.NETIF_RSP_OKAY)]


def test_csum_blank_becomes_needs_csum_with_the_l4_location(tx: Tx) -> None:
    frame = _udp_frame(csum=False)
    _put(tx.grants, 5, frame)
    (hdr, got), = tx.send(_req(5, 0, N.NETTXF_csum_blank | N.NETTXF_data_validated, 0, len(frame)))
    assert got == frame
    assert hdr.flags == VIRTIO_NET_HDR_F_NEEDS_CSUM
    assert (hdr.csum_start, hdr.csum_offset) == (14 + 20, 6) == l4_checksum_location(frame)[:2]


def test_csum_blank_on_a_non_ip_frame_is_refused(tx: Tx) -> None:
    arp = MAC_B + MAC_A + b"\x08\x06" + bytes(46)
    _put(tx.grants, 5, arp)
    assert tx.send(_req(5, 0, N.NETTXF_csum_blank, 0, len(arp))) == []
    assert tx.responses() == [(0, N.NETIF_RSP_ERROR)]


def test_gso_extra_sets_the_gso_header(tx: Tx) -> None:
    frame = _udp_frame()
    _put(tx.grants, 5, frame)
    (hdr, _), = tx.send(_req(5, 0, N.NETTXF_extra_info | N.NETTXF_csum_blank, 0, len(frame)),
                        _extra(N.XEN_NETIF_EXTRA_TYPE_GSO, gso_size=1448, gso_type=N.XEN_NETIF_GSO_TYPE_TCPV4))
    assert (hdr.flags, hdr.gso_type, hdr.gso_size) == (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448)
    assert tx.responses() == [(0, N.NETIF_RSP_OKAY), (0, N.NETIF_RSP_NULL)]


# ---- rx ----------------------------------------------------------------------------------------------

@dataclass
class Rx:
    grants: FakeGrants
    front: FrontRing
    path: RxPath
    stats: VifStats

    def post(self, ids: range) -> None:
        for i in ids:
            self.front.put_request(i, 0, 100 + i)
            self.grants.page(100 + i)
        self.front.push_requests()

    def responses(self) -> list[tuple[int, int, int, int]]:
        out = []
        while self.front.unconsumed_responses():
            out.append(self.front.get_response())
        return out


@pytest.fixture
def rx() -> Rx:
    shared = bytearray(XEN_PAGE_SIZE)
    front = FrontRing(shared, N.NETIF_RX_REQUEST_STRUCT, N.NETIF_RX_RESPONSE_STRUCT, init=True)
    back = BackRing(shared, N.NETIF_RX_REQUEST_STRUCT, N.NETIF_RX_RESPONSE_STRUCT)
    grants, stats = FakeGrants(), VifStats()
    return Rx(grants, front, RxPath(back, grants, stats, "test-rx", sg=True), stats)


def test_rx_copies_a_frame_over_several_buffers(rx: Rx) -> None:
    frame = bytes(i & 0xFF for i in range(9000))
    rx.post(range(4))
    assert rx.path.ready(frame)
    rx.path.deliver(VnetHdr(), frame)
    got = rx.responses()
    assert [(rid, flags, status) for rid, _, flags, status in got] == [
        (0, N.NETRXF_more_data, 4096), (1, N.NETRXF_more_data, 4096), (2, 0, 9000 - 8192)]
    assert b"".join(bytes(rx.grants.page(100 + rid)[:status]) for rid, _, _, status in got) == frame
    assert (rx.stats.rx_frames, rx.stats.rx_bytes) == (1, 9000)
    assert rx.path.ready(b"x" * 60) and not rx.path.ready(b"x" * 5000)   # one buffer left


@pytest.mark.parametrize("vflags, want", [
    (VIRTIO_NET_HDR_F_NEEDS_CSUM, N.NETRXF_csum_blank | N.NETRXF_data_validated),
    (VIRTIO_NET_HDR_F_DATA_VALID, N.NETRXF_data_validated),
    (0, 0),
])
def test_rx_checksum_flags(rx: Rx, vflags: int, want: int) -> None:
    rx.post(range(1))
    rx.path.deliver(VnetHdr(vflags), _udp_frame())
    (_, _, flags, status), = rx.responses()
    assert (flags, status) == (want, len(_udp_frame()))


def test_rx_bad_buffer_grant_is_an_error_response(rx: Rx) -> None:
    rx.front.put_request(0, 0, 4242)                                   # never granted
    rx.front.push_requests()
    rx.path.deliver(VnetHdr(), b"y" * 100)
    assert rx.responses() == [(0, 0, 0, N.NETIF_RSP_ERROR)]
    assert rx.stats.rx_errors == 1 and rx.stats.rx_frames == 0


def test_rx_requests_beyond_the_ring_are_fatal(rx: Rx) -> None:
    rx.post(range(2))
    # A req_prod no honest frontend can publish: the caller (Vif) disconnects on RingOverflowError.
    rx.front.req_prod_pvt = (rx.front.req_prod_pvt + 1000) & 0xFFFFFFFF
    rx.front.push_requests()
    with pytest.raises(RingOverflowError):
        rx.path.ready(b"z" * 60)


def test_tx_requests_beyond_the_ring_are_fatal(tx: Tx) -> None:
    tx.front.req_prod_pvt = N.NET_TX_RING_SIZE + 5
    tx.front.push_requests()
    with pytest.raises(RingOverflowError):
        tx.path.poll()


def test_rx_fits_without_sg_only_one_buffer(rx: Rx) -> None:
    rx.path.sg = False
    assert rx.path.fits(b"a" * 4096) and not rx.path.fits(b"a" * 4097)
    rx.path.sg = True
    assert rx.path.fits(b"a" * 65536)


def test_a_vifs_counters_start_at_zero() -> None:
    """netback's statistics (the daemon writes VifStats.as_dict() per vif to its stats file, which the
    tests read): every counter of a new vif is 0, including the drops only vif.py counts (`+= 1` on them)."""
    names = ["tx_frames", "tx_bytes", "tx_errors", "tx_drops", "rx_frames", "rx_bytes", "rx_errors", "rx_drops"]
    assert VifStats().as_dict() == dict.fromkeys(names, 0)


def test_l4_checksum_location_needs_a_whole_ip_header_and_reads_nothing_past_the_frame() -> None:
    """Linux skb_checksum_setup_ipv4/_ipv6 (net/core/skbuff.c), what netback's csum_blank packets go through:
    the frame must hold 20 bytes of IPv4 header (ihl * 4 is then taken as it is) or the 40-byte IPv6 header,
    and the checksum field inside the frame; a shorter frame, or one of another ethertype whatever its
    length, has no location (and is never read past its end)."""
    def frame(ethertype: int, body: bytes) -> bytes:
        return MAC_A + MAC_B + struct.pack("!H", ethertype) + body

    ipv4_no_options = bytes([0x40, 0, 0, 0, 0, 0, 0, 0, 64, 6]) + bytes(10)    # IHL 0: nothing but the 20 bytes
    assert l4_checksum_location(frame(0x0800, ipv4_no_options)) == (14, 16, 6)
    assert l4_checksum_location(frame(0x0800, ipv4_no_options[:19])) is None
    for ethertype in (0x0800, 0x86DD):
        for length in range(0, 7):                                             # frames of 14..20 bytes
            assert l4_checksum_location(frame(ethertype, bytes([0x45] + [6] * 10)[:length])) is None
    ipv6_tcp = bytes([0x60, 0, 0, 0, 0, 20, 6, 64]) + bytes(32) + bytes(20)
    assert l4_checksum_location(frame(0x86DD, ipv6_tcp)) == (54, 16, 6)
    assert l4_checksum_location(frame(0x0806, ipv6_tcp)) is None                # ARP, however long
    assert l4_checksum_location(frame(0x0806, bytes([0x45] + [6] * 99))) is None


def _ipv4(src: int, frag: int, proto: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                         src.to_bytes(4, "big"), bytes([10, 0, 0, 1]))
    return MAC_A + MAC_B + struct.pack("!H", 0x0800) + header + payload


def test_every_fragment_of_a_datagram_goes_to_the_rx_queue_of_its_flow() -> None:
    """flow_queue spreads IPv4 frames over the rx queues by a hash of addresses and protocol (and ports when
    the datagram is not fragmented): every fragment of one datagram reaches the same queue, down to one
    that is nothing but its 20-byte IP header; a frame too short for an IPv4 header goes to queue 0."""
    src = next(s for s in range(0x0A000002, 0x0A000100)
               if flow_queue(_ipv4(s, 0x2000, 17, b"\x12\x34\x56\x78" + bytes(12)), 4) != 0)
    first = _ipv4(src, 0x2000, 17, b"\x12\x34\x56\x78" + bytes(12))   # MF, offset 0: has the UDP ports
    middle = _ipv4(src, 0x2000 | 2, 17, bytes(16))                  # MF, offset 16 bytes
    last_empty = _ipv4(src, 4, 17, b"")                              # offset 32 bytes, no payload: 34 bytes
    assert len(last_empty) == 34
    assert flow_queue(first, 4) == flow_queue(middle, 4) == flow_queue(last_empty, 4) != 0
    assert flow_queue(first, 1) == 0
    # Two queues are two: flows land on both.
    assert {flow_queue(_ipv4(s, 0, 6, bytes(20)), 2) for s in range(0x0A000002, 0x0A000012)} == {0, 1}
    for length in range(14, 34):
        assert flow_queue(first[:length], 4) == 0, length


def _flow_packet(src: bytes, proto: int, sport: int, payload: bytes, ident: int) -> bytes:
    """An unfragmented IPv4 TCP or UDP packet from `src` to 10.0.0.1 (port 80), with its header checksum."""
    l4 = struct.pack("!HH", sport, 80) + (struct.pack("!IIBBHHH", ident * 0x01010101 & 0xFFFFFFFF, 0, 0x50, 0x10,
                                                       1024, 0, 0)
                                           if proto == 6 else struct.pack("!HH", 8 + len(payload), 0))
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4) + len(payload), ident, 0x4000, 64,
                                   proto, 0, src, bytes([10, 0, 0, 1])))
    words = sum(struct.unpack("!10H", header))
    while words >> 16:
        words = (words & 0xFFFF) + (words >> 16)
    header[10:12] = struct.pack("!H", ~words & 0xFFFF)
    return MAC_A + MAC_B + struct.pack("!H", 0x0800) + bytes(header) + l4 + payload


def test_every_packet_of_a_flow_goes_to_one_rx_queue_and_addresses_protocol_and_ports_spread_flows() -> None:
    """flow_queue's key is the IPv4 addresses, the protocol and (unfragmented TCP/UDP) the ports, found after
    the IP header by its IHL: packets of one flow differing in anything else (length, payload, IP id, and so
    the header checksum) reach the same queue, while flows differing only in their protocol, their ports or
    one byte of an address are spread over the queues."""
    for proto in (6, 17):
        queues = {flow_queue(_flow_packet(bytes([10, 1, 2, 3]), proto, 4321, bytes([n]) * (n * 97), ident), 8)
                  for n in range(12) for ident in (1, 0x1234, 0xBEEF)}
        assert len(queues) == 1, (proto, queues)
    sources = [bytes([a, 1, 2, 3]) for a in range(1, 40)]
    assert any(flow_queue(_flow_packet(s, 6, 4321, b"", 1), 8) != flow_queue(_flow_packet(s, 17, 4321, b"", 1), 8)
               for s in sources), "the protocol is not part of the key"
    assert len({flow_queue(_flow_packet(s, 17, 4321, b"", 1), 8) for s in sources}) > 1, "the address's first byte"
    assert len({flow_queue(_flow_packet(sources[0], 17, port, b"", 1), 8) for port in range(1000, 1040)}) > 1


def test_a_chain_of_exactly_the_slot_limit_is_sent() -> None:
    """netif.h XEN_NETIF_NR_SLOTS_MIN (18): a frontend may use that many request slots for one packet, and
    netback sends such a packet; one slot more is refused (test_chain_over_the_slot_limit_is_refused...)."""
    shared = bytearray(XEN_PAGE_SIZE)
    front = FrontRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT, init=True)
    grants, stats = FakeGrants(), VifStats()
    tx = Tx(grants, front, TxPath(BackRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT),
                                  grants, stats, "test-tx"), stats)
    frame = _udp_frame(bytes(range(40)))
    pieces = [frame[:len(frame) - MAX_TX_SLOTS + 1]] + [frame[i:i + 1] for i in range(len(frame) - MAX_TX_SLOTS + 1,
                                                                                        len(frame))]
    assert len(pieces) == MAX_TX_SLOTS
    for ref, piece in enumerate(pieces, 5):
        _put(grants, ref, piece)
    chain = [_req(5 + i, 0, N.NETTXF_more_data if i + 1 < MAX_TX_SLOTS else 0, i,
                  len(frame) if i == 0 else len(pieces[i])) for i in range(MAX_TX_SLOTS)]
    assert [f for _, f in tx.send(*chain)] == [frame]
    assert tx.responses() == [(i, N.NETIF_RSP_OKAY) for i in range(MAX_TX_SLOTS)]


def test_a_bad_packet_is_refused_whole_once_its_last_slot_is_in(tx: Tx) -> None:
    """Linux netback (xenvif_tx_err): a packet found bad on an early slot is still consumed up to its last
    slot, and every slot of it is answered: NETIF_RSP_ERROR for its requests (NULL for extras), one tx error;
    the fragment after the bad slot is not taken for a packet of its own. Each refused packet counts."""
    frame = _udp_frame()
    _put(tx.grants, 5, frame)
    _put(tx.grants, 6, frame)
    assert tx.send(_req(5, 0, N.NETTXF_extra_info | N.NETTXF_more_data, 1, len(frame) + 20), _extra(0x77),
                   _req(6, 0, 0, 2, 20)) == []
    assert tx.responses() == [(1, N.NETIF_RSP_ERROR), (0, N.NETIF_RSP_NULL), (2, N.NETIF_RSP_ERROR)]
    assert tx.stats.tx_errors == 1
    assert tx.send(_req(9999, 0, 0, 3, 60)) == []
    assert tx.stats.tx_errors == 2


def test_extras_chained_with_the_more_flag_are_all_taken_before_the_data(tx: Tx) -> None:
    """netif.h: XEN_NETIF_EXTRA_FLAG_MORE on an extra-info slot says another extra follows; the packet's
    data requests come only after the last one (here a multicast extra, then the GSO one)."""
    frame = _udp_frame()
    _put(tx.grants, 5, frame)
    mcast = _extra(N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, more=True)
    gso = _extra(N.XEN_NETIF_EXTRA_TYPE_GSO, gso_size=1448, gso_type=N.XEN_NETIF_GSO_TYPE_TCPV4)
    (hdr, got), = tx.send(_req(5, 0, N.NETTXF_extra_info | N.NETTXF_csum_blank, 7, len(frame)), mcast, gso)
    assert got == frame and (hdr.gso_type, hdr.gso_size) == (VIRTIO_NET_HDR_GSO_TCPV4, 1448)
    assert tx.responses() == [(7, N.NETIF_RSP_OKAY), (0, N.NETIF_RSP_NULL), (0, N.NETIF_RSP_NULL)]


def test_the_counters_add_up_over_several_packets_and_rx_writes_at_offset_0(tx: Tx, rx: Rx) -> None:
    """Each packet and byte counts (tx_frames/tx_bytes, rx_frames/rx_bytes, rx_errors), not only the last;
    rx-copy writes each buffer from its start, so every response's offset is 0 (netif.h netif_rx_response);
    a vif made with feature-sg takes a frame over several buffers."""
    first, second = _udp_frame(b"a" * 10), _udp_frame(b"b" * 300)
    _put(tx.grants, 5, first)
    _put(tx.grants, 6, second)
    assert len(tx.send(_req(5, 0, 0, 1, len(first)), _req(6, 0, 0, 2, len(second)))) == 2
    assert (tx.stats.tx_frames, tx.stats.tx_bytes) == (2, len(first) + len(second))
    assert rx.path.fits(b"a" * (XEN_PAGE_SIZE + 1))
    rx.post(range(3))
    rx.path.deliver(VnetHdr(), first)
    rx.path.deliver(VnetHdr(), b"c" * (XEN_PAGE_SIZE + 10))
    assert [offset for _, offset, _, _ in rx.responses()] == [0, 0, 0]
    assert (rx.stats.rx_frames, rx.stats.rx_bytes) == (2, len(first) + XEN_PAGE_SIZE + 10)
    for rid in (10, 11):
        rx.front.put_request(rid, 0, 4242 + rid)                       # never granted
    rx.front.push_requests()
    rx.path.deliver(VnetHdr(), b"y" * 100)
    rx.path.deliver(VnetHdr(), b"z" * 100)
    assert rx.stats.rx_errors == 2
