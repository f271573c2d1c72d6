"""Decoding and checking of blkif requests (backends/blkback/requests.py) without any process."""
from __future__ import annotations

import pytest
from pathlib import Path

from xenpv.backends.blkback.image import ImageError, RawImage, parse_params
from xenpv.backends.blkback.requests import BadRequest, Codecs, decode, decode_indirect_segments, indirect_pages
from xenpv.harness.frontends.blkfront import pack_discard, pack_indirect, pack_request
from xenpv.xenabi.blkif import (BLKIF_NATIVE, BLKIF_OP_DISCARD, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
                          BLKIF_RSP_ERROR, BLKIF_X86_32)

NATIVE = Codecs.of(BLKIF_NATIVE)


def test_read_request_decodes_segments() -> None:
    r = decode(pack_request(BLKIF_OP_READ, 0xABCDEF, 1 << 40, [(9, 0, 7), (10, 2, 3)]), NATIVE, 256)
    assert (r.operation, r.id, r.sector) == (BLKIF_OP_READ, 0xABCDEF, 1 << 40)
    assert [(s.gref, s.first_sect, s.last_sect, s.sectors) for s in r.segments] == [(9, 0, 7, 8), (10, 2, 3, 2)]


@pytest.mark.parametrize("raw, why", [
    (pack_request(BLKIF_OP_WRITE, 1, 0, [(1, 0, 7)], nr_segments=12), "segments"),
    (pack_request(BLKIF_OP_WRITE, 1, 0, [(1, 4, 3)]), "not inside one page"),
    (pack_request(BLKIF_OP_READ, 1, 0, [(1, 0, 8)]), "not inside one page"),
    (pack_indirect(BLKIF_OP_DISCARD, 1, 0, 1, [5]), "not read or write"),
    (pack_indirect(BLKIF_OP_READ, 1, 0, 0, [5]), "segments"),
    (pack_indirect(BLKIF_OP_READ, 1, 0, 257, [5]), "segments"),
])
def test_bad_requests_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why) as ei:
        decode(raw, NATIVE, 256)
    assert ei.value.status == BLKIF_RSP_ERROR


def test_discard_and_indirect() -> None:
    d = decode(pack_discard(7, 100, 5000, flag=1), NATIVE, 256)
    assert (d.operation, d.id, d.sector, d.nr_sectors, d.flag) == (BLKIF_OP_DISCARD, 7, 100, 5000, 1)
    i = decode(pack_indirect(BLKIF_OP_WRITE, 8, 16, 600, [3, 4]), NATIVE, 1024)
    assert (i.operation, i.indirect_op, i.nr_indirect_segments, i.indirect_grefs[:2]) == (BLKIF_OP_INDIRECT,
                                                                                          BLKIF_OP_WRITE, 600, (3, 4))
    assert indirect_pages(600) == 2 and indirect_pages(512) == 1


def test_indirect_segment_pages() -> None:
    page = bytearray(4096)
    page[0:8] = (77).to_bytes(4, "little") + bytes([1, 6, 0, 0])
    page[8:16] = (78).to_bytes(4, "little") + bytes([0, 9, 0, 0])
    (s,) = decode_indirect_segments([bytes(page)], 1, 1)
    assert (s.gref, s.first_sect, s.last_sect) == (77, 1, 6)
    with pytest.raises(BadRequest):
        decode_indirect_segments([bytes(page)], 2, 1)


def test_x86_32_ids_sit_lower() -> None:
    codecs = Codecs.of(BLKIF_X86_32)
    raw = codecs.request.pack(BLKIF_OP_READ, 1, 0, 0x1122, 5, *([1, 0, 7] + [0, 0, 0] * 10))
    assert codecs.request_id(raw + bytes(4)) == 0x1122
    assert decode(raw, codecs, 256).sector == 5


def test_params_and_raw_image(tmp_path) -> None:
    assert parse_params("raw:/x/y.img") == ("raw", Path("/x/y.img"))
    assert parse_params("/a.img")[0] == "raw"
    with pytest.raises(ImageError):
        parse_params("qcow2:")
    img = tmp_path / "r.img"
    img.write_bytes(bytes(3 * 4096))
    r = RawImage(img)
    try:
        r.write(4096, [memoryview(b"a" * 512), memoryview(b"b" * 512)])
        out = [memoryview(bytearray(512)), memoryview(bytearray(512))]
        r.read_into(4096, out)
        assert bytes(out[0]) == b"a" * 512 and bytes(out[1]) == b"b" * 512
        r.discard(4096, 4096)
        r.flush()
        assert img.read_bytes()[4096:8192] == bytes(4096) and r.size == 3 * 4096
        with pytest.raises(OSError):
            r.read_into(3 * 4096 - 512, [memoryview(bytearray(1024))])
    finally:
        r.close()
    with pytest.raises(ImageError):
        RawImage(tmp_path / "missing.img")


def test_a_request_may_carry_exactly_the_maximum_of_segments() -> None:
    """xen/include/public/io/blkif.h BLKIF_MAX_SEGMENTS_PER_REQUEST (11) is a maximum, not a bound below it:
    Linux xen-blkback dispatch_rw_block_io refuses nseg > BLKIF_MAX_SEGMENTS_PER_REQUEST only. Eleven segments
    decode, twelve are refused."""
    segments = [(20 + i, 0, 7) for i in range(11)]
    r = decode(pack_request(BLKIF_OP_WRITE, 5, 0, segments), NATIVE, 256)
    assert [s.gref for s in r.segments] == [20 + i for i in range(11)]
    with pytest.raises(BadRequest, match="segments"):
        decode(pack_request(BLKIF_OP_WRITE, 5, 0, segments, nr_segments=12), NATIVE, 256)


def test_indirect_segments_fill_whole_pages_then_part_of_the_last() -> None:
    """blkif.h BLKIF_OP_INDIRECT: each indirect page holds BLKIF_SEGS_PER_INDIRECT_FRAME (512) segments, in
    order; 600 segments are one full page and 88 from the next, whatever else the last page holds."""
    pages = []
    for p in range(2):
        page = bytearray(4096)
        for i in range(512):
            page[8 * i:8 * i + 8] = (1000 * p + i).to_bytes(4, "little") + bytes([0, 7, 0, 0])
        pages.append(bytes(page))
    segs = decode_indirect_segments(pages, 600, 1)
    assert [s.gref for s in segs] == list(range(512)) + list(range(1000, 1088))
