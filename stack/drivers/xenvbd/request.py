"""Block requests: splitting an I/O into blkif requests and encoding them for the ring (VBD src/xenvbd/ring.c
PrepareReadWrite / PrepareBlkifReadWrite / PrepareBlkifIndirect; reference xen-abi.md 4).

Pure functions: what a request carries (operation, sectors, which pages of the I/O's buffer as which
segments) is decided here; granting and the ring are ring.py's. Every I/O buffer is page aligned, so each
segment is a whole page except the last one of an I/O, and sector_number/first_sect/last_sect are in
512-byte units whatever the disk's sector size. A request carries up to BLKIF_MAX_SEGMENTS_PER_REQUEST
segments directly; beyond that it needs BLKIF_OP_INDIRECT, which only a backend with
feature-max-indirect-segments accepts (one indirect page holds BLKIF_SEGS_PER_INDIRECT_FRAME segments).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from xenpv.xenabi.blkif import (BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_NATIVE,
                          BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ,
                          BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_SECTORS_PER_PAGE,
                          BLKIF_SEGS_PER_INDIRECT_FRAME, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST,
                          BlkifRequestSegment)
from xenpv.xenabi.layout import struct_of

REQUEST = BLKIF_NATIVE.request_struct
RESPONSE = BLKIF_NATIVE.response_struct
_DISCARD = struct_of(BLKIF_NATIVE.request_discard)
_INDIRECT = struct_of(BLKIF_NATIVE.request_indirect)
SEGMENT = struct_of(BlkifRequestSegment)

OPERATION_NAMES = {BLKIF_OP_READ: "READ", BLKIF_OP_WRITE: "WRITE", BLKIF_OP_WRITE_BARRIER: "WRITE_BARRIER",
                   BLKIF_OP_FLUSH_DISKCACHE: "FLUSH_DISKCACHE", BLKIF_OP_DISCARD: "DISCARD",
                   BLKIF_OP_INDIRECT: "INDIRECT"}


class RequestError(ValueError):
    """An I/O that cannot be expressed as blkif requests (bad range, unsupported operation)."""


@dataclass(frozen=True)
class Segment:
    """Page `page` of the I/O buffer, 512-byte sectors [first_sect, last_sect] of it."""

    page: int
    first_sect: int
    last_sect: int

    @property
    def sectors(self) -> int:
        return self.last_sect - self.first_sect + 1


@dataclass
class BlkRequest:
    """One ring entry's worth of an I/O: a read/write over some of its pages, a flush or a discard."""

    operation: int
    sector: int = 0
    segments: list[Segment] = field(default_factory=list)
    nr_sectors: int = 0  # DISCARD only

    @property
    def indirect(self) -> bool:
        return len(self.segments) > BLKIF_MAX_SEGMENTS_PER_REQUEST

    @property
    def indirect_pages(self) -> int:
        return -(-len(self.segments) // BLKIF_SEGS_PER_INDIRECT_FRAME) if self.indirect else 0

    @property
    def pages(self) -> list[int]:
        return [s.page for s in self.segments]


def max_segments(backend_indirect: int, frontend_indirect: int) -> int:
    """Segments per request: the direct 11, or what both ends allow for INDIRECT (bounded by the ABI)."""
    indirect = min(backend_indirect, frontend_indirect, BLKIF_MAX_INDIRECT_SEGMENTS)
    return max(BLKIF_MAX_SEGMENTS_PER_REQUEST, indirect)


def PrepareReadWrite(operation: int, sector: int, nr_sectors: int, segments_per_request: int) -> list[BlkRequest]:
    """Split a read or write of `nr_sectors` 512-byte sectors at `sector` (buffer page 0 = first sector)
    into requests of at most `segments_per_request` pages each."""
    if operation not in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        raise RequestError(f"operation {operation} is not a read or a write")
    if nr_sectors <= 0 or sector < 0:
        raise RequestError(f"sectors {sector}+{nr_sectors}: empty or negative range")
    if segments_per_request < 1:
        raise RequestError("a request needs room for at least one segment")
    pages = -(-nr_sectors // BLKIF_SECTORS_PER_PAGE)
    requests: list[BlkRequest] = []
    for first in range(0, pages, segments_per_request):
        segments = []
        for page in range(first, min(first + segments_per_request, pages)):
            count = min(BLKIF_SECTORS_PER_PAGE, nr_sectors - page * BLKIF_SECTORS_PER_PAGE)
            segments.append(Segment(page, 0, count - 1))
        requests.append(BlkRequest(operation, sector + first * BLKIF_SECTORS_PER_PAGE, segments))
    return requests


def PrepareFlush(flush_cache: bool, barrier: bool) -> list[BlkRequest]:
    """SYNCHRONIZE_CACHE: FLUSH_DISKCACHE, else WRITE_BARRIER, else nothing to send (a write-through disk)."""
    if flush_cache:
        return [BlkRequest(BLKIF_OP_FLUSH_DISKCACHE)]
    if barrier:
        return [BlkRequest(BLKIF_OP_WRITE_BARRIER)]
    return []


def PrepareDiscard(sector: int, nr_sectors: int) -> list[BlkRequest]:
    if nr_sectors <= 0 or sector < 0:
        raise RequestError(f"discard {sector}+{nr_sectors}: empty or negative range")
    return [BlkRequest(BLKIF_OP_DISCARD, sector, nr_sectors=nr_sectors)]


def encode(request: BlkRequest, request_id: int, grefs: list[int], indirect_grefs: list[int] = (),
           handle: int = 0) -> tuple[bytes, bytes]:
    """(ring entry, indirect page contents) of `request`; `grefs[i]` grants segment i's page."""
    if len(grefs) != len(request.segments):
        raise RequestError(f"{len(grefs)} grants for {len(request.segments)} segments")
    if request.operation == BLKIF_OP_DISCARD:
        raw = _DISCARD.pack(BLKIF_OP_DISCARD, 0, handle, request_id, request.sector, request.nr_sectors)
        return raw + bytes(REQUEST.size - len(raw)), b""
    triples = [(g, s.first_sect, s.last_sect) for g, s in zip(grefs, request.segments)]
    if not request.indirect:
        padded = triples + [(0, 0, 0)] * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(triples))
        flat = [value for triple in padded for value in triple]
        return REQUEST.pack(request.operation, len(triples), handle, request_id, request.sector, *flat), b""
    if len(indirect_grefs) != request.indirect_pages or request.indirect_pages > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST:
        raise RequestError(f"{len(triples)} segments need {request.indirect_pages} indirect pages, "
                           f"{len(indirect_grefs)} given")
    table = b"".join(SEGMENT.pack(*t) for t in triples)
    refs = list(indirect_grefs) + [0] * (BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST - len(indirect_grefs))
    raw = _INDIRECT.pack(BLKIF_OP_INDIRECT, request.operation, len(triples), request_id, request.sector, handle,
                         *refs)
    return raw + bytes(REQUEST.size - len(raw)), table


def decode_response(raw: bytes) -> tuple[int, int, int]:
    """(id, operation, status) of a blkif_response."""
    request_id, operation, status = RESPONSE.unpack(raw)
    return request_id, operation, status

