"""XENVBD without a machine: target ids from vdev numbers, splitting I/O into blkif requests, their wire
encoding, and the ring arithmetic the frontend relies on (xenabi's FrontRing against a BackRing)."""
from __future__ import annotations

import pytest

from xenpv.backends.toolstack.layout import vdev_name
from xenpv.stack.agent.cmd_vbd import sector_pattern
from xenpv.stack.drivers.xenvbd.adapter import ParseVbd
from xenpv.stack.drivers.xenvbd.request import (REQUEST, RESPONSE, SEGMENT, PrepareDiscard, PrepareFlush,
                                          PrepareReadWrite, RequestError, decode_response, encode, max_segments)
from xenpv.xenabi.blkif import (BLKIF_MAX_INDIRECT_SEGMENTS, BLKIF_NATIVE, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
                          BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER)
from xenpv.xenabi.ring import BackRing, FrontRing


@pytest.mark.parametrize("vdev,name,target", [
    ((202 << 8) | (0 << 4), "xvda", 0),
    ((202 << 8) | (1 << 4), "xvdb", 1),
    ((202 << 8) | (15 << 4) | 3, "xvdp3", 15),
    ((8 << 8) | (2 << 4), "sdc", 2),
    ((3 << 8) | (0 << 6), "hda", 0),
    ((3 << 8) | (1 << 6) | 2, "hdb2", 1),
    ((22 << 8) | (0 << 6), "hdc", 2),
    ((22 << 8) | (1 << 6), "hdd", 3),
    ((1 << 28) | (16 << 8), "xvdq", 16),
    ((1 << 28) | (254 << 8) | 1, "xvdiu1", 254),
])
def test_parse_vbd_target_ids(vdev: int, name: str, target: int) -> None:
    assert vdev_name(vdev) == name  # the toolstack's encoding of the same disk
    assert ParseVbd(vdev) == target


# 255 too: VBD target.c TargetCreate refuses `TargetId >= XENVBD_MAX_TARGETS` (255).
@pytest.mark.parametrize("vdev", [(1 << 28) | (255 << 8), (1 << 28) | (256 << 8), (7 << 8), 1 << 29, -1])
def test_parse_vbd_refuses_what_names_no_target(vdev: int) -> None:
    assert ParseVbd(vdev) is None


def test_read_write_split_into_page_segments() -> None:
    requests = PrepareReadWrite(BLKIF_OP_WRITE, 100, 8 * 11 + 3, 11)
    assert [(r.sector, len(r.segments)) for r in requests] == [(100, 11), (100 + 88, 1)]
    assert all((s.first_sect, s.last_sect) == (0, 7) for s in requests[0].segments)
    assert (requests[1].segments[0].page, requests[1].segments[0].last_sect) == (11, 2)
    assert not any(r.indirect for r in requests)
    (one,) = PrepareReadWrite(BLKIF_OP_READ, 0, 1, 11)
    assert one.segments[0].sectors == 1


def test_indirect_only_beyond_eleven_segments_and_within_both_limits() -> None:
    assert max_segments(0, 256) == 11
    assert max_segments(256, 256) == 256
    assert max_segments(4096, 100_000) == BLKIF_MAX_INDIRECT_SEGMENTS
    (big,) = PrepareReadWrite(BLKIF_OP_READ, 0, 8 * 600, 600)
    assert big.indirect and big.indirect_pages == 2
    entry, table = encode(big, 7, list(range(1000, 1600)), [50, 51])
    assert len(entry) == REQUEST.size and len(table) == 600 * SEGMENT.size
    assert entry[0] == BLKIF_OP_INDIRECT and entry[1] == BLKIF_OP_READ
    assert int.from_bytes(entry[2:4], "little") == 600
    assert SEGMENT.unpack(table[599 * SEGMENT.size:])[:3] == (1599, 0, 7)
    with pytest.raises(RequestError):
        encode(big, 7, list(range(600)), [50])


def test_direct_request_encoding_and_response_decoding() -> None:
    (req,) = PrepareReadWrite(BLKIF_OP_WRITE, 2048, 12, 11)
    entry, table = encode(req, 0x1122334455, [40, 41])
    fields = BLKIF_NATIVE.request_struct.unpack(entry)
    assert fields[:5] == (BLKIF_OP_WRITE, 2, 0, 0x1122334455, 2048) and table == b""
    assert fields[5:11] == (40, 0, 7, 41, 0, 3)
    assert decode_response(RESPONSE.pack(9, BLKIF_OP_WRITE, -1)) == (9, BLKIF_OP_WRITE, -1)


def test_flush_discard_and_bad_ranges() -> None:
    assert [r.operation for r in PrepareFlush(True, True)] == [BLKIF_OP_FLUSH_DISKCACHE]
    assert [r.operation for r in PrepareFlush(False, True)] == [BLKIF_OP_WRITE_BARRIER]
    assert PrepareFlush(False, False) == []
    (discard,) = PrepareDiscard(8, 1 << 40)
    entry, _ = encode(discard, 3, [])
    assert entry[0] == BLKIF_OP_DISCARD and int.from_bytes(entry[24:32], "little") == 1 << 40
    for bad in ((BLKIF_OP_READ, 0, 0, 11), (BLKIF_OP_READ, -1, 8, 11), (BLKIF_OP_DISCARD, 0, 8, 11)):
        with pytest.raises(RequestError):
            PrepareReadWrite(*bad)


@pytest.mark.parametrize("order,slots", [(0, 32), (1, 64), (2, 128), (4, 512)])
def test_ring_sizes_and_index_wrap(order: int, slots: int) -> None:
    assert BLKIF_NATIVE.ring_size(order) == slots
    shared = bytearray(4096 << order)
    start = (1 << 32) - 3  # indexes wrap modulo 2**32 on both ends
    front = FrontRing(shared, REQUEST, RESPONSE, init=True, start=start)
    back = BackRing(shared, REQUEST, RESPONSE, start=start)
    for round_ in range(3):
        for i in range(slots):
            (req,) = PrepareReadWrite(BLKIF_OP_READ, i, 8, 11)
            front.put_request_bytes(encode(req, round_ * slots + i, [i])[0])
        assert front.full()
        front.push_requests()
        for _ in range(slots):
            request_id = BLKIF_NATIVE.request_struct.unpack(back.get_request_bytes())[3]
            back.put_response(request_id, BLKIF_OP_READ, 0)
        back.push_responses()
        ids = [decode_response(front.get_response_bytes())[0] for _ in range(slots)]
        assert ids == list(range(round_ * slots, (round_ + 1) * slots))
        assert front.free_requests() == slots


def test_console_patterns() -> None:
    assert sector_pattern("a55a", 0, 1, 512) == b"\xa5\x5a" * 256
    seq = sector_pattern("seq", 10, 2, 512)
    assert seq[:8] == (10).to_bytes(8, "little") and seq[512:520] == (11).to_bytes(8, "little")
