"""xenpv.xenabi.ring's batch calls (BackRing.get_requests_bytes / put_responses, FrontRing.put_requests_bytes /
get_responses) and the xchg it publishes indexes with, on one process's shared buffer; and blkif's struct
of a request's id and sector alone, which serves a batch."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

import pytest

from xenpv.xenabi.blkif import BLKIF_NATIVE, BLKIF_X86_32, BlkifLayouts
from xenpv.xenabi.ring import BackRing, FrontRing, RingClosedError, RingFullError, RingOverflowError, ring_bytes

REQUEST = struct.Struct("<QQ")
RESPONSE = struct.Struct("<Qq")


@pytest.fixture
def rings() -> Iterator[tuple[FrontRing, BackRing]]:
    buffer = mmap.mmap(-1, ring_bytes(0))
    front = FrontRing(buffer, REQUEST, RESPONSE, init=True, start=0xFFFFFFFE)  # batches cross the wrap
    back = BackRing(buffer, REQUEST, RESPONSE, start=0xFFFFFFFE)
    # Bring the shared indexes and events to the start, as a ring in use would have them.
    front.push_requests()
    back.push_responses()
    assert not back.final_check_for_requests() and not front.final_check_for_responses()
    yield front, back
    front.close()
    back.close()
    buffer.close()


def test_batch_takes_in_order_and_answers_each(rings: tuple[FrontRing, BackRing]) -> None:
    front, back = rings
    for i in range(5):
        front.put_request(i, 100 + i)
    assert front.push_requests_and_check_notify()  # the back end armed req_event
    batch = back.get_requests_bytes(3)
    assert [REQUEST.unpack(b) for b in batch] == [(0, 100), (1, 101), (2, 102)]
    assert back.unconsumed_requests() == 2
    back.put_responses([(i, -i) for i in range(3)])
    with pytest.raises(RingFullError):
        back.put_responses([(9, 9)])  # no consumed request is waiting for it
    back.push_responses()
    assert [front.get_response() for _ in range(front.unconsumed_responses())] == [(0, 0), (1, -1), (2, -2)]
    assert len(back.get_requests_bytes(10)) == 2  # never more than are there
    assert back.get_requests_bytes(1) == []


def test_published_indexes_and_notification(rings: tuple[FrontRing, BackRing]) -> None:
    front, back = rings
    assert not back.final_check_for_requests()  # re-arms req_event through the direct xchg
    assert back.sring_req_event == (back.req_cons + 1) & 0xFFFFFFFF
    front.put_request(1, 1)
    assert front.push_requests_and_check_notify()
    assert back.sring_req_prod == front.req_prod_pvt
    front.put_request(2, 2)
    assert not front.push_requests_and_check_notify()  # the back end has not re-armed since


def test_a_closed_ring_refuses_to_publish() -> None:
    buffer = mmap.mmap(-1, ring_bytes(0))
    front = FrontRing(buffer, REQUEST, RESPONSE, init=True)
    front.put_request(1, 1)
    front.close()
    with pytest.raises(RingClosedError):
        front.push_requests_and_check_notify()
    buffer.close()


def test_front_batch_puts_in_order_and_takes_every_response(rings: tuple[FrontRing, BackRing]) -> None:
    front, back = rings
    front.put_requests_bytes([REQUEST.pack(i, 100 + i) for i in range(3)])
    assert front.push_requests_and_check_notify()
    assert [REQUEST.unpack(b) for b in back.get_requests_bytes(5)] == [(0, 100), (1, 101), (2, 102)]
    assert front.get_responses() == []
    back.put_responses([(i, -i) for i in range(3)])
    back.push_responses()
    assert front.get_responses() == [(0, 0), (1, -1), (2, -2)]
    assert front.get_responses() == []  # consumed


def test_front_batch_writes_nothing_unless_all_fit(rings: tuple[FrontRing, BackRing]) -> None:
    front, _ = rings
    with pytest.raises(RingFullError):
        front.put_requests_bytes([REQUEST.pack(i, i) for i in range(front.nr_ents + 1)])
    with pytest.raises(ValueError):
        front.put_requests_bytes([REQUEST.pack(1, 1), b"short"])
    assert front.free_requests() == front.nr_ents
    front.put_requests_bytes([REQUEST.pack(i, i) for i in range(front.nr_ents)])
    assert front.full()


def test_front_batch_refuses_an_overflowing_rsp_prod(rings: tuple[FrontRing, BackRing]) -> None:
    front, back = rings
    back._index[2].exchange((front.rsp_cons + front.nr_ents + 1) & 0xFFFFFFFF)  # a hostile back end
    with pytest.raises(RingOverflowError):
        front.get_responses()


def test_front_batch_after_close(rings: tuple[FrontRing, BackRing]) -> None:
    front, _ = rings
    front.close()
    with pytest.raises(RingClosedError):
        front.put_requests_bytes([])
    with pytest.raises(RingClosedError):
        front.get_responses()


@pytest.mark.parametrize("layouts", [BLKIF_NATIVE, BLKIF_X86_32], ids=["native", "x86_32"])
def test_blkif_id_sector_struct_reads_the_full_layouts_fields(layouts: BlkifLayouts) -> None:
    raw = bytes(range(256))[:layouts.request_struct.size]
    full = layouts.request_struct.unpack(raw)
    assert layouts.request_id_sector.unpack(raw) == full[3:5]  # operation, nr_segments, handle, id, sector
