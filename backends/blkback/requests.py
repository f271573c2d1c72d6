"""Decoding and checking one blkif request copied off the ring.

Everything here works on a private copy of the slot (the ring's RING_COPY), so the frontend cannot change a
field between its check and its use.  A request that breaks a rule raises :class:`BadRequest`, which the
queue answers with BLKIF_RSP_ERROR (or the status it carries).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat
from operator import gt, itemgetter
from typing import NamedTuple

from xenpv.xenabi.blkif import (BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, BLKIF_OP_READ,
                          BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_SECTORS_PER_PAGE, BLKIF_SEGS_PER_INDIRECT_FRAME,
                          BlkifLayouts, BlkifRequestSegment)
from xenpv.xenabi.layout import struct_of

SEGMENT = struct_of(BlkifRequestSegment)


class BadRequest(Exception):
    """A request the back end refuses; ``status`` is the response status to send."""

    def __init__(self, reason: str, status: int = BLKIF_RSP_ERROR) -> None:
        super().__init__(reason)
        self.status = status


class Segment(NamedTuple):
    # A named tuple rather than a frozen dataclass: an indirect request makes up to hundreds of these,
    # and a tuple is made in a third of the time.
    gref: int
    first_sect: int
    last_sect: int

    @property
    def sectors(self) -> int:
        return self.last_sect - self.first_sect + 1

    def check(self, where: str) -> None:
        if self.first_sect > self.last_sect or self.last_sect >= BLKIF_SECTORS_PER_PAGE:
            raise BadRequest(f"{where}: sectors [{self.first_sect}, {self.last_sect}] of gref {self.gref} "
                             f"are not inside one page")


@dataclass(frozen=True)
class Codecs:
    """The struct codecs of one ABI for every request shape sharing the ring slot."""

    request: struct.Struct
    discard: struct.Struct
    indirect: struct.Struct
    id_offset: int

    @staticmethod
    @lru_cache(maxsize=None)
    def of(layouts: BlkifLayouts) -> "Codecs":
        return Codecs(layouts.request_struct, struct_of(layouts.request_discard),
                      struct_of(layouts.request_indirect), layouts.request.id.offset)

    def request_id(self, raw: bytes) -> int:
        return int.from_bytes(raw[self.id_offset:self.id_offset + 8], "little")


@dataclass(frozen=True)
class Request:
    """A decoded request: ``operation`` as on the ring, ``data_op`` READ/WRITE for the data of INDIRECT."""

    operation: int
    id: int
    sector: int
    segments: tuple[Segment, ...] = ()
    nr_sectors: int = 0  # DISCARD only
    flag: int = 0  # DISCARD only
    indirect_op: int | None = None
    indirect_grefs: tuple[int, ...] = ()
    nr_indirect_segments: int = 0


def decode(raw: bytes, codecs: Codecs, max_indirect_segments: int) -> Request:
    """The request in ``raw``; raises BadRequest for what no valid request contains.

    An INDIRECT request's segments live in granted pages; they are read (and checked) by the queue.
    """
    op = raw[0]
    if op == BLKIF_OP_DISCARD:
        _, flag, _, rid, sector, nr = codecs.discard.unpack_from(raw)
        return Request(op, rid, sector, nr_sectors=nr, flag=flag)
    if op == BLKIF_OP_INDIRECT:
        values = codecs.indirect.unpack_from(raw)
        _, indirect_op, nr_segments, rid, sector, _ = values[:6]
        request = Request(op, rid, sector, indirect_op=indirect_op, indirect_grefs=tuple(values[6:14]),
                          nr_indirect_segments=nr_segments)
        if indirect_op not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
            raise BadRequest(f"indirect request {rid:#x}: indirect operation {indirect_op} is not read or write")
        if not 0 < nr_segments <= max_indirect_segments:
            raise BadRequest(f"indirect request {rid:#x}: {nr_segments} segments "
                             f"(1..{max_indirect_segments} allowed)")
        return request
    values = codecs.request.unpack_from(raw)
    _, nr_segments, _, rid, sector = values[:5]
    if nr_segments > BLKIF_MAX_SEGMENTS_PER_REQUEST:
        raise BadRequest(f"request {rid:#x}: {nr_segments} segments (at most "
                         f"{BLKIF_MAX_SEGMENTS_PER_REQUEST} allowed)")
    segs = tuple(Segment(*values[5 + 3 * i:8 + 3 * i]) for i in range(nr_segments))
    for i, s in enumerate(segs):
        s.check(f"request {rid:#x} segment {i}")
    return Request(op, rid, sector, segs)


def indirect_pages(nr_segments: int) -> int:
    return -(-nr_segments // BLKIF_SEGS_PER_INDIRECT_FRAME)


def decode_indirect_segments(pages: list[bytes], nr_segments: int, rid: int) -> tuple[Segment, ...]:
    """The segments of an INDIRECT request from copies of its indirect pages."""
    # decode() refuses a count outside 1..max, but this decoder must not rely on it (an empty list has
    # no max() below).
    if nr_segments <= 0:
        raise BadRequest(f"indirect request {rid:#x}: {nr_segments} segments")
    # Built and checked with C-level iteration (map over the unpacked tuples): a Python loop per segment
    # was the largest cost of serving a 64 KiB request after the copy itself.
    segs: list[Segment] = []
    for page in pages:
        n = min(nr_segments - len(segs), BLKIF_SEGS_PER_INDIRECT_FRAME)
        segs += map(tuple.__new__, repeat(Segment), SEGMENT.iter_unpack(page[:n * SEGMENT.size]))
    if len(segs) != nr_segments:
        raise BadRequest(f"indirect request {rid:#x}: {len(pages)} indirect pages hold no {nr_segments} segments")
    if any(map(gt, map(_FIRST, segs), map(_LAST, segs))) or max(map(_LAST, segs)) >= BLKIF_SECTORS_PER_PAGE:
        for i, s in enumerate(segs):
            s.check(f"indirect request {rid:#x} segment {i}")
    return tuple(segs)


_FIRST, _LAST = itemgetter(1), itemgetter(2)


def total_sectors(segments: tuple[Segment, ...]) -> int:
    return sum(map(_LAST, segments)) - sum(map(_FIRST, segments)) + len(segments)
