"""The netif data path of one queue, independent of sockets and threads so it can be unit-tested over
plain buffers: tx requests -> validated frames (with their virtio_net_hdr for the TAP), frames ->
rx-copy into the frontend's posted buffers.

Every request is hostile until validated: each request slot consumed gets exactly one response, a bad
packet gets NETIF_RSP_ERROR on all of its slots, and only a ring whose producer index cannot be honest
(RingOverflowError) is fatal for the vif (the caller disconnects it)."""
from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import asdict, dataclass, field
from typing import Protocol

from xenpv.backends.netback.tap import (VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                  VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VnetHdr)
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, BackRing, RingEmptyError

log = logging.getLogger("netback.datapath")

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_TCP = 6
IPPROTO_UDP = 17
# Offsets of the checksum field inside the L4 header, for the kernel to fill a csum_blank frame.
_CSUM_OFFSET = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}
# The most request slots one tx packet may use (netif.h's XEN_NETIF_NR_SLOTS_MIN, what every
# frontend honours); a longer chain is refused.
MAX_TX_SLOTS = N.XEN_NETIF_NR_SLOTS_MIN
KNOWN_EXTRAS = {N.XEN_NETIF_EXTRA_TYPE_GSO, N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, N.XEN_NETIF_EXTRA_TYPE_MCAST_DEL,
                N.XEN_NETIF_EXTRA_TYPE_HASH}


class GrantFault(Exception):
    """A grant ref the frontend gave cannot be mapped or the range is outside the page."""


class GrantAccess(Protocol):
    def read(self, ref: int, offset: int, size: int) -> bytes: ...

    def write(self, ref: int, offset: int, data: bytes | memoryview) -> None: ...


@dataclass
class VifStats:
    tx_frames: int = 0   # guest -> wire
    tx_bytes: int = 0
    tx_errors: int = 0   # packets refused with NETIF_RSP_ERROR
    tx_drops: int = 0    # valid packets the TAP refused
    rx_frames: int = 0   # wire -> guest
    rx_bytes: int = 0
    rx_errors: int = 0   # frames whose rx buffers were bad
    rx_drops: int = 0    # frames with no room in the rx ring (or too big without SG)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TxPacketError(Exception):
    pass


@dataclass
class TxPacket:
    """A packet being gathered from consecutive request slots; `slots` holds (kind, id) per slot in ring
    order so each gets its response: kind 'req' or 'extra'."""
    slots: list[tuple[str, int]] = field(default_factory=list)
    requests: list[N.NetifTxRequest] = field(default_factory=list)
    extras: list[N.NetifExtraInfo] = field(default_factory=list)
    more_extras: bool = False
    more_data: bool = False
    error: str | None = None

    @property
    def complete(self) -> bool:
        return bool(self.requests) and not self.more_extras and not self.more_data


def l4_checksum_location(frame: bytes | bytearray) -> tuple[int, int, int] | None:
    """(csum_start, csum_offset, l4 protocol) of a TCP/UDP frame over IPv4 or IPv6 (no extension
    headers), or None when the frame is not one the kernel can checksum for us."""
    if len(frame) < ETH_HLEN:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_P_IP and len(frame) >= ETH_HLEN + 20:
        ihl = (frame[ETH_HLEN] & 0x0F) * 4
        proto, start = frame[ETH_HLEN + 9], ETH_HLEN + ihl
    elif ethertype == ETH_P_IPV6 and len(frame) >= ETH_HLEN + 40:
        proto, start = frame[ETH_HLEN + 6], ETH_HLEN + 40
    else:
        return None
    if proto not in _CSUM_OFFSET or start + _CSUM_OFFSET[proto] + 2 > len(frame):
        return None
    return start, _CSUM_OFFSET[proto], proto


def flow_queue(frame: bytes | bytearray, queues: int) -> int:
    """The rx queue of a frame: a hash of its IPv4 addresses, protocol and ports; anything else (ARP,
    IPv6) goes to queue 0. Tests use it to aim traffic at a queue."""
    if queues <= 1 or len(frame) < ETH_HLEN + 20 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return 0
    ihl = (frame[ETH_HLEN] & 0x0F) * 4
    key = bytes(frame[ETH_HLEN + 12:ETH_HLEN + 20]) + bytes([frame[ETH_HLEN + 9]])
    frag = struct.unpack_from("!H", frame, ETH_HLEN + 6)[0]
    # Ports only in unfragmented datagrams: every fragment of one datagram must reach the same queue.
    if frag & 0x3FFF == 0 and frame[ETH_HLEN + 9] in _CSUM_OFFSET:
        key += bytes(frame[ETH_HLEN + ihl:ETH_HLEN + ihl + 4])
    return zlib.crc32(key) % queues


class TxPath:
    """Consumes a queue's tx ring. `poll()` returns the frames to put on the wire and pushes responses."""

    def __init__(self, ring: BackRing, grants: GrantAccess, stats: VifStats, name: str) -> None:
        self.ring = ring
        self.grants = grants
        self.stats = stats
        self.name = name
        self._pending = TxPacket()
        # After a chain longer than MAX_TX_SLOTS, the rest of that chain is refused slot by slot.
        self._skipping = False

    def poll(self) -> tuple[list[tuple[VnetHdr, bytes]], bool]:
        """Consume every available request; returns (frames, notify). Raises RingOverflowError."""
        frames: list[tuple[VnetHdr, bytes]] = []
        # Responses in slot order, written in one batch before the push (a ring call per slot was a
        # large part of a small frame's time).
        responses: list[tuple[int, int]] = []
        while raws := self.ring.get_requests_bytes(self.ring.nr_ents):
            self._take_all(raws, frames, responses)
        self.ring.put_responses(responses)
        notify = self.ring.push_responses_and_check_notify()
        return frames, notify

    def _take_all(self, raws: list[bytes], frames: list[tuple[VnetHdr, bytes]],
                  responses: list[tuple[int, int]]) -> None:
        """Take request copies in ring order: complete packets go to `frames`, and every slot of a finished
        packet gets its response in `responses`."""
        for raw in raws:
            if self._skipping:
                req = N.NetifTxRequest.from_buffer_copy(raw)
                responses.append((req.id, N.NETIF_RSP_ERROR))
                self._skipping = bool(req.flags & N.NETTXF_more_data)
                continue
            self._take(raw)
            pkt = self._pending
            if pkt.error is None and len(pkt.slots) > MAX_TX_SLOTS:
                pkt.error = f"fragment chain longer than {MAX_TX_SLOTS} slots"
                self._skipping = pkt.more_data
                pkt.more_data = pkt.more_extras = False
            if pkt.error is not None and (pkt.more_data or pkt.more_extras):
                continue  # refuse it whole once its last slot is in
            if pkt.error is None and not pkt.complete:
                continue
            self._pending = TxPacket()
            frame = None if pkt.error else self._gather(pkt)
            status = N.NETIF_RSP_OKAY if frame is not None else N.NETIF_RSP_ERROR
            if frame is None:
                self.stats.tx_errors += 1
                log.warning("%s: tx packet refused: %s", self.name, pkt.error)
            else:
                frames.append(frame)
            responses.extend((rid, status if kind == "req" else N.NETIF_RSP_NULL) for kind, rid in pkt.slots)

    def _take(self, raw: bytes) -> None:
        pkt = self._pending
        if pkt.more_extras:
            extra = N.NetifExtraInfo.from_buffer_copy(raw[:8])
            pkt.slots.append(("extra", 0))
            pkt.extras.append(extra)
            pkt.more_extras = bool(extra.flags & N.XEN_NETIF_EXTRA_FLAG_MORE)
            if extra.type not in KNOWN_EXTRAS and pkt.error is None:
                pkt.error = f"unknown extra-info type {extra.type}"
            return
        req = N.NetifTxRequest.from_buffer_copy(raw)
        pkt.slots.append(("req", req.id))
        pkt.requests.append(req)
        pkt.more_data = bool(req.flags & N.NETTXF_more_data)
        if len(pkt.requests) == 1 and req.flags & N.NETTXF_extra_info:
            pkt.more_extras = True
        elif req.flags & N.NETTXF_extra_info and pkt.error is None:
            pkt.error = "extra_info flag on a fragment (only the first request may carry extras)"

    def _gather(self, pkt: TxPacket) -> tuple[VnetHdr, bytes] | None:
        first, rest = pkt.requests[0], pkt.requests[1:]
        total = first.size
        first_len = total - sum(r.size for r in rest)
        if first_len < 0:
            pkt.error = f"tx size {total} is smaller than its fragments ({total - first_len} bytes)"
        elif first_len < ETH_HLEN:
            # Linux netback (xenvif_tx_build_gops) drops a packet whose first slot holds less than an
            # Ethernet header, whatever its total; xen-netfront bounces such a packet to avoid that.
            pkt.error = f"tx first slot holds {first_len} of {total} bytes, less than an Ethernet header"
        else:
            for r, n in [(first, first_len)] + [(r, r.size) for r in rest]:
                if r.offset + n > XEN_PAGE_SIZE:
                    pkt.error = f"tx slot id {r.id}: offset {r.offset} + size {n} crosses the page"
                    break
        if pkt.error:
            return None
        hdr = self._vnet_hdr(pkt, first.flags)
        if hdr is None:
            return None
        data = bytearray()
        try:
            for r, n in [(first, first_len)] + [(r, r.size) for r in rest]:
                if n:
                    data += self.grants.read(r.gref, r.offset, n)
        except GrantFault as exc:
            pkt.error = f"tx grant: {exc}"
            return None
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            loc = l4_checksum_location(data)
            if loc is None:
                pkt.error = "csum_blank on a frame that is not TCP/UDP over IP"
                return None
            hdr = VnetHdr(hdr.flags, hdr.gso_type, hdr.hdr_len or loc[0], hdr.gso_size, loc[0], loc[1])
        self.stats.tx_frames += 1
        self.stats.tx_bytes += len(data)
        return hdr, bytes(data)

    def _vnet_hdr(self, pkt: TxPacket, flags: int) -> VnetHdr | None:
        csum = VIRTIO_NET_HDR_F_NEEDS_CSUM if flags & N.NETTXF_csum_blank else 0
        for extra in pkt.extras:
            if extra.type != N.XEN_NETIF_EXTRA_TYPE_GSO:
                continue  # multicast and hash extras carry nothing the wire needs
            gso = extra.u.gso
            gso_type = {N.XEN_NETIF_GSO_TYPE_TCPV4: VIRTIO_NET_HDR_GSO_TCPV4,
                        N.XEN_NETIF_GSO_TYPE_TCPV6: VIRTIO_NET_HDR_GSO_TCPV6}.get(gso.type)
            if gso_type is None or gso.size == 0:
                pkt.error = f"GSO extra with type {gso.type} size {gso.size}"
                return None
            # A GSO packet is always partially checksummed: the kernel fills each segment's checksum.
            return VnetHdr(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, 0, gso.size)
        return VnetHdr(csum)


class RxFrameDropped(Exception):
    pass


class RxPath:
    """Copies frames into the buffers the frontend posted on a queue's rx ring (rx-copy)."""

    def __init__(self, ring: BackRing, grants: GrantAccess, stats: VifStats, name: str, sg: bool) -> None:
        self.ring = ring
        self.grants = grants
        self.stats = stats
        self.name = name
        self.sg = sg

    def slots_needed(self, frame: bytes) -> int:
        return max(1, -(-len(frame) // XEN_PAGE_SIZE))

    def fits(self, frame: bytes) -> bool:
        """Whether the frontend could ever take the frame (without SG only one buffer per frame)."""
        n = self.slots_needed(frame)
        return n <= (MAX_TX_SLOTS if self.sg else 1)

    def ready(self, frame: bytes) -> bool:
        """Raises RingOverflowError when the frontend's rx req_prod is beyond the ring."""
        return self.ring.unconsumed_requests() >= self.slots_needed(frame)

    def deliver(self, hdr: VnetHdr, frame: bytes) -> bool:
        """Copy one frame into posted buffers (the caller checked `ready`); returns whether to notify."""
        n = self.slots_needed(frame)
        raws = self.ring.get_requests_bytes(n)
        if len(raws) < n:  # the caller did not check `ready`
            raise RingEmptyError(f"{len(raws)} of the {n} rx buffers a {len(frame)}-byte frame needs are posted")
        reqs = [N.NetifRxRequest.from_buffer_copy(raw) for raw in raws]
        flags = 0
        if hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            flags = N.NETRXF_csum_blank | N.NETRXF_data_validated
        elif hdr.flags & VIRTIO_NET_HDR_F_DATA_VALID:
            flags = N.NETRXF_data_validated
        chunks = [frame[i * XEN_PAGE_SIZE:(i + 1) * XEN_PAGE_SIZE] for i in range(n)]
        error = None
        for req, chunk in zip(reqs, chunks):
            try:
                self.grants.write(req.gref, 0, chunk)
            except GrantFault as exc:
                error = f"rx buffer id {req.id} gref {req.gref}: {exc}"
        if error:
            self.stats.rx_errors += 1
            log.warning("%s: rx frame of %d bytes lost: %s", self.name, len(frame), error)
            self.ring.put_responses([(req.id, 0, 0, N.NETIF_RSP_ERROR) for req in reqs])
        else:
            more = [N.NETRXF_more_data] * (n - 1) + [0]
            self.ring.put_responses([(req.id, 0, (flags if i == 0 else 0) | more[i], len(chunk))
                                     for i, (req, chunk) in enumerate(zip(reqs, chunks))])
            self.stats.rx_frames += 1
            self.stats.rx_bytes += len(frame)
        return self.ring.push_responses_and_check_notify()
