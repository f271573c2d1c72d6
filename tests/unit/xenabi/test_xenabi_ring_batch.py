"""xenpv.xenabi.ring's batch calls (BackRing.get_requests_bytes / put_responses) and the xchg it publishes
indexes with, on one process's shared buffer."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator

import pytest

from xenpv.xenabi.ring import BackRing, FrontRing, RingClosedError, RingFullError, ring_bytes

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
