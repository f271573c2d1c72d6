"""Hypothesis fuzz of blkback's request validation (backends/blkback/requests.py) with hostile ring entries.

Every ring slot a frontend writes, for both ABIs (native and x86_32), must either be refused with
BadRequest (a clear reason and a BLKIF_RSP_* status) or decode into a Request that keeps every rule the
queue relies on: the id is the slot's id, a read/write has at most BLKIF_MAX_SEGMENTS_PER_REQUEST segments
each inside one page (first_sect <= last_sect < 8) and exactly the ones the slot holds, an indirect request
has a read or write operation and 1..max segments, a discard carries its fields. Indirect segment pages
decode the same way. No other exception may leave the decoders.
"""
from __future__ import annotations

import struct

from hypothesis import given, settings, strategies as st

from xenpv.backends.blkback.requests import (BadRequest, Codecs, decode, decode_indirect_segments, indirect_pages,
                                             total_sectors)
from xenpv.xenabi.blkif import (BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_NATIVE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT,
                                BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR,
                                BLKIF_SECTORS_PER_PAGE, BLKIF_SEGS_PER_INDIRECT_FRAME, BLKIF_X86_32)

ABIS = {"native": Codecs.of(BLKIF_NATIVE), "x86_32": Codecs.of(BLKIF_X86_32)}
MAX_INDIRECT = 256
OPS = st.one_of(st.sampled_from([BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_INDIRECT, BLKIF_OP_DISCARD, 2, 3, 4]),
                st.integers(0, 255))
U8 = st.one_of(st.integers(0, 12), st.sampled_from([0x7F, 0xFF]), st.integers(0, 255))
SECT = st.one_of(st.integers(0, 9), st.integers(0, 255))
U64 = st.one_of(st.integers(0, 1 << 20), st.sampled_from([(1 << 64) - 1, 1 << 63, (1 << 41) - 1]),
                st.integers(0, (1 << 64) - 1))
GREF = st.one_of(st.integers(0, 16), st.integers(0, 0xFFFFFFFF))
SEGMENT = st.tuples(GREF, SECT, SECT)


@st.composite
def slots(draw: st.DrawFn, codecs: Codecs) -> bytes:
    """A ring slot: one of the three request shapes with hostile fields, or any bytes at all."""
    op = draw(OPS)
    rid = draw(U64)
    sector = draw(U64)
    kind = draw(st.sampled_from(["request", "indirect", "discard", "raw"]))
    size = codecs.request.size
    if kind == "raw":
        return draw(st.binary(min_size=size, max_size=size))
    if kind == "discard":
        fields = codecs.discard.unpack(bytes(codecs.discard.size))
        raw = codecs.discard.pack(op, draw(U8), *fields[2:3], rid, sector, draw(U64))
    elif kind == "indirect":
        fields = codecs.indirect.unpack(bytes(codecs.indirect.size))
        grefs = draw(st.lists(GREF, min_size=8, max_size=8))
        nr = draw(st.one_of(st.integers(0, MAX_INDIRECT + 2), st.integers(0, 0xFFFF)))
        raw = codecs.indirect.pack(op, draw(OPS), nr, rid, sector, *fields[5:6], *grefs, *fields[14:])
    else:
        segs = draw(st.lists(SEGMENT, min_size=BLKIF_MAX_SEGMENTS_PER_REQUEST,
                             max_size=BLKIF_MAX_SEGMENTS_PER_REQUEST))
        fields = codecs.request.unpack(bytes(size))
        nr = draw(U8)
        raw = codecs.request.pack(op, nr, *fields[2:3], rid, sector, *[v for s in segs for v in s],
                                  *fields[5 + 3 * BLKIF_MAX_SEGMENTS_PER_REQUEST:])
    return raw.ljust(size, b"\0")


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.data(), abi=st.sampled_from(sorted(ABIS)))
def test_any_ring_slot_is_refused_or_decodes_to_a_valid_request(data: st.DataObject, abi: str) -> None:
    codecs = ABIS[abi]
    raw = data.draw(slots(codecs), label="slot")
    try:
        r = decode(raw, codecs, MAX_INDIRECT)
    except BadRequest as exc:
        assert str(exc) and exc.status in (BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
        return
    assert r.id == codecs.request_id(raw) and r.operation == raw[0]
    if r.operation == BLKIF_OP_DISCARD:
        _, flag, _, rid, sector, nr = codecs.discard.unpack_from(raw)
        assert (r.flag, r.sector, r.nr_sectors, r.segments) == (flag, sector, nr, ())
    elif r.operation == BLKIF_OP_INDIRECT:
        assert r.indirect_op in (BLKIF_OP_READ, BLKIF_OP_WRITE)
        assert 1 <= r.nr_indirect_segments <= MAX_INDIRECT and r.segments == ()
        assert indirect_pages(r.nr_indirect_segments) <= len(r.indirect_grefs)
    else:
        values = codecs.request.unpack_from(raw)
        assert len(r.segments) == values[1] <= BLKIF_MAX_SEGMENTS_PER_REQUEST
        for i, s in enumerate(r.segments):
            assert (s.gref, s.first_sect, s.last_sect) == tuple(values[5 + 3 * i:8 + 3 * i])
            assert 0 <= s.first_sect <= s.last_sect < BLKIF_SECTORS_PER_PAGE
        assert total_sectors(r.segments) == sum(s.sectors for s in r.segments) <= 8 * len(r.segments)


SEGMENT_STRUCT = struct.Struct("<IBBxx")


@settings(max_examples=100, deadline=None, derandomize=True)
@given(nr=st.one_of(st.integers(-2, 3 * BLKIF_SEGS_PER_INDIRECT_FRAME), st.integers(0, 0xFFFF)),
       pages=st.integers(0, 3), segs=st.lists(SEGMENT, max_size=40), fill=st.sampled_from([0, 1, 8, 0xFF]))
def test_indirect_segment_pages_are_refused_or_all_valid(nr: int, pages: int, segs: list[tuple[int, int, int]],
                                                         fill: int) -> None:
    """Segment pages as the frontend filled them (a pattern of hostile segments, the rest `fill` bytes)."""
    page = b"".join(SEGMENT_STRUCT.pack(*s) for s in segs).ljust(4096, bytes([fill]))[:4096]
    try:
        got = decode_indirect_segments([page] * pages, nr, rid=5)
    except BadRequest as exc:
        assert "indirect request 0x5" in str(exc)
        return
    assert len(got) == nr > 0
    assert all(0 <= s.first_sect <= s.last_sect < BLKIF_SECTORS_PER_PAGE for s in got)
    assert indirect_pages(nr) <= pages
