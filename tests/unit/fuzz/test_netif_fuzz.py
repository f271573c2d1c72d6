"""Hypothesis fuzz of netback's tx path (backends/netback/datapath.py) with hostile request chains.

A frontend writes any sequence of tx slots (requests with any gref, offset, flags, id and size, extra-info
slots of any type and flags) into a real shared ring; netback consumes them. What must hold:
- `poll()` raises nothing (the ring's producer index is honest here);
- every slot consumed gets exactly one response, in ring order: a request slot its id with OKAY or ERROR,
  an extra-info slot NULL; every slot of one packet gets the same status;
- every frame put on the wire is exactly the bytes its slots granted, at least an Ethernet header, and
  is counted; every refused packet is counted as an error;
- once the chain is over, a valid packet still goes through: a hostile chain does not wedge the queue.
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field

from hypothesis import given, settings, strategies as st

from xenpv.backends.netback.datapath import ETH_HLEN, GrantFault, TxPath, VifStats
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, BackRing, FrontRing

GRANTED = {1, 2, 3}  # refs the frontend granted, each one page of a known pattern


@dataclass
class Grants:
    pages: dict[int, bytes] = field(default_factory=lambda: {r: bytes((r * 31 + i) & 0xFF for i in range(XEN_PAGE_SIZE))
                                                             for r in GRANTED})

    def read(self, ref: int, offset: int, size: int) -> bytes:
        if ref not in self.pages:
            raise GrantFault(f"ref {ref} is not granted")
        if offset + size > XEN_PAGE_SIZE:
            raise GrantFault(f"offset {offset} + {size} beyond the page")
        return self.pages[ref][offset:offset + size]

    def write(self, ref: int, offset: int, data: bytes | memoryview) -> None:
        raise AssertionError("the tx path never writes")


@dataclass(frozen=True)
class Req:
    gref: int
    offset: int
    flags: int
    id: int
    size: int

    def pack(self) -> bytes:
        return N.NETIF_TX_REQUEST_STRUCT.pack(self.gref, self.offset, self.flags, self.id, self.size)


@dataclass(frozen=True)
class Extra:
    type: int
    flags: int
    gso_size: int
    gso_type: int

    def pack(self) -> bytes:
        raw = struct.pack("<BBHBBH", self.type, self.flags, self.gso_size, self.gso_type, 0, 0)
        return raw.ljust(N.NETIF_TX_REQUEST_STRUCT.size, b"\0")


def hostile(rng: random.Random, menu: list[int], bits: int) -> int:
    return rng.choice(menu) if rng.random() < 0.85 else rng.getrandbits(bits)


def packet(rng: random.Random) -> list[Req | Extra]:
    """One packet as a frontend would build it, with some of its fields made hostile."""
    nfrags = rng.choice([1, 1, 1, 2, 3, 17, 18, 19, 25])
    sizes = [hostile(rng, [0, 1, 13, 14, 60, 1514, 4000, 4096, 4097], 16) for _ in range(nfrags)]
    sizes[0] = hostile(rng, [sum(sizes), sum(sizes[1:]) + 14, sum(sizes[1:]) + 1, sum(sizes[1:]), 13, 0xFFFF], 16)
    extras = rng.choice([0, 0, 0, 1, 2])
    slots: list[Req | Extra] = []
    for i, size in enumerate(sizes):
        flags = N.NETTXF_more_data if i + 1 < nfrags else 0
        if i == 0 and extras:
            flags |= N.NETTXF_extra_info
        if rng.random() < 0.2:
            flags |= rng.choice([N.NETTXF_csum_blank, N.NETTXF_data_validated, N.NETTXF_extra_info,
                                 N.NETTXF_more_data, rng.getrandbits(16)])
        if rng.random() < 0.05:
            flags &= ~N.NETTXF_more_data  # the chain ends early
        slots.append(Req(hostile(rng, sorted(GRANTED) + [0, 99], 32), hostile(rng, [0, 0, 2, 100, 4000, 4095], 16),
                         flags & 0xFFFF, rng.getrandbits(16), size & 0xFFFF))
        if i == 0:
            for e in range(extras):
                more = N.XEN_NETIF_EXTRA_FLAG_MORE if e + 1 < extras else 0
                slots.append(Extra(hostile(rng, [N.XEN_NETIF_EXTRA_TYPE_GSO, N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD,
                                                 N.XEN_NETIF_EXTRA_TYPE_HASH, 0, 5], 8),
                                   more if rng.random() < 0.9 else more ^ N.XEN_NETIF_EXTRA_FLAG_MORE,
                                   hostile(rng, [1448, 0, 9000], 16),
                                   hostile(rng, [N.XEN_NETIF_GSO_TYPE_TCPV4, N.XEN_NETIF_GSO_TYPE_TCPV6, 0, 9], 8)))
    return slots


def chain_of(seed: int) -> list[Req | Extra]:
    rng = random.Random(seed)
    chain: list[Req | Extra] = []
    while len(chain) < 60 and rng.random() < 0.85:
        chain += packet(rng)
    return chain[:120]


# Hypothesis draws the seeds (derandomized: the same cases in every CI run); each seed builds a chain of
# frontend-shaped packets with hostile fields. Hypothesis's own draw of each field reached an accepted
# frame too rarely within the budget.
@settings(max_examples=250, deadline=None, derandomize=True)
@given(seed=st.integers(0, (1 << 64) - 1), batch=st.integers(1, 8))
def test_any_tx_chain_gets_one_response_per_slot_and_honest_frames(seed: int, batch: int) -> None:
    chain = chain_of(seed)
    shared = bytearray(XEN_PAGE_SIZE)
    front = FrontRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT, init=True)
    stats, grants = VifStats(), Grants()
    path = TxPath(BackRing(shared, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT), grants, stats, "fuzz")
    frames: list[bytes] = []
    responses: list[tuple[int, int]] = []
    for i in range(0, len(chain), batch):  # the frontend pushes in batches; netback polls after each
        for slot in chain[i:i + batch]:
            front.put_request_bytes(slot.pack())
        front.push_requests()
        got, _ = path.poll()
        frames += [f for _, f in got]
        while front.unconsumed_responses():
            rid, status = front.get_response()[:2]
            responses.append((rid, status))

    # Every slot consumed has its response, in ring order; the open packet's slots have none yet.
    assert len(responses) + len(path._pending.slots) == len(chain)
    ok_packets = 0
    for slot, (rid, status) in zip(chain, responses):
        as_request = N.NetifTxRequest.from_buffer_copy(slot.pack())  # what netback read, if not an extra
        if status == N.NETIF_RSP_NULL:
            assert rid == 0, "an extra-info slot's response"
            continue
        assert status in (N.NETIF_RSP_OKAY, N.NETIF_RSP_ERROR), (slot, status)
        assert rid == as_request.id, "a request slot's response carries its id"
        if status == N.NETIF_RSP_OKAY and not as_request.flags & N.NETTXF_more_data:
            ok_packets += 1  # each accepted packet has one request slot without more_data

    # Frames: each one accepted packet, at least a header and at most a packet's size, counted.
    assert ok_packets == len(frames)
    assert stats.tx_frames == len(frames) and stats.tx_bytes == sum(map(len, frames))
    assert all(ETH_HLEN <= len(f) <= 0xFFFF for f in frames)

    # The queue is not wedged: close any open packet (an extra without MORE, then a last request),
    # then a valid packet goes through.
    if path._pending.more_extras:
        front.put_request_bytes(Extra(N.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, 0, 0, 0).pack())
    if path._pending.slots or path._pending.more_extras or path._skipping:
        front.put_request_bytes(Req(1, 0, 0, 0xFFF0, 60).pack())
    front.put_request_bytes(Req(2, 0, 0, 0xFFF1, 60).pack())
    front.push_requests()
    got, _ = path.poll()
    assert got and got[-1][1] == grants.pages[2][:60]
    last = None
    while front.unconsumed_responses():
        last = front.get_response()[:2]
    assert last == (0xFFF1, N.NETIF_RSP_OKAY)
