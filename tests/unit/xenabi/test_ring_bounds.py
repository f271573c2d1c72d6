"""xenabi.ring's sizes and bounds (ring.h's __CONST_RING_SIZE and RING_FINAL_CHECK_FOR_*), and a batch of
requests against a ring that already holds some."""
from __future__ import annotations

import mmap
import struct

import pytest

from xenpv.xenabi import ring
from xenpv.xenabi.ring import SRING_RING_OFFSET, FrontRing, RingFullError, const_ring_size, ring_bytes

REQUEST = struct.Struct("<QQ")
RESPONSE = struct.Struct("<Qq")


def test_a_ring_is_one_page_unless_an_order_says_more() -> None:
    assert ring_bytes() == 4096 and ring_bytes(2) == 4 * 4096


def test_const_ring_size_takes_any_positive_entry_size_and_nothing_fits_in_the_header() -> None:
    with pytest.raises(ValueError):
        const_ring_size(0)
    assert const_ring_size(1) == 2048  # (4096 - 64) // 1 rounded down to a power of two
    assert const_ring_size(1, SRING_RING_OFFSET - 8) == 0  # a buffer smaller than the header holds no slot
    assert const_ring_size(1, SRING_RING_OFFSET) == 0


def test_a_batch_counts_the_requests_already_in_the_ring() -> None:
    buffer = mmap.mmap(-1, ring_bytes())
    front = FrontRing(buffer, REQUEST, RESPONSE, init=True)
    try:
        front.put_request(1, 1)
        with pytest.raises(RingFullError):
            front.put_requests_bytes([REQUEST.pack(i, i) for i in range(front.nr_ents)])
        front.put_requests_bytes([REQUEST.pack(i, i) for i in range(front.nr_ents - 1)])
        assert front.free_requests() == 0
    finally:
        front.close()
        buffer.close()


def test_a_final_check_that_finds_exactly_one_new_entry_reports_it() -> None:
    """RING_FINAL_CHECK_FOR_*: one entry that arrives between the first look and the re-armed event is work."""
    buffer = mmap.mmap(-1, ring_bytes())
    front = FrontRing(buffer, REQUEST, RESPONSE, init=True)
    try:
        looks = iter((0, 1))
        with front._lock:
            assert front._final_check(lambda: next(looks), ring._RSP_EVENT, 1)
    finally:
        front.close()
        buffer.close()
