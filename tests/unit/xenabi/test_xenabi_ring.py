"""io/ring.h algorithms of xenabi.ring: sizing, notification decisions, final checks, index wrap-around,
overflow detection and copy-once reads, on one process's shared buffer."""

from __future__ import annotations

import ctypes
import mmap
import struct
from collections.abc import Callable, Iterator

import pytest

from xenpv.xenabi import blkif, netif
from xenpv.xenabi.ring import (SRING_RING_OFFSET, BackRing, FrontRing, RingEmptyError, RingFullError, RingOverflowError,
                         SringHeader, const_ring_size, ring_bytes, round_down_pow2, shared_ring_init)

REQUEST = struct.Struct("<QQ")
RESPONSE = struct.Struct("<Qq")
SLOT = 16
PAGE_SLOTS = 128  # (4096 - 64) // 16 = 252 -> 128


@pytest.fixture
def page() -> Iterator[mmap.mmap]:
    buffer = mmap.mmap(-1, ring_bytes(0))
    yield buffer
    buffer.close()


MakeRings = Callable[..., tuple[FrontRing, BackRing]]


@pytest.fixture
def rings(page: mmap.mmap) -> Iterator[MakeRings]:
    """Makes a front/back pair on ``page``; closes them before the page is unmapped, even on failure."""
    made: list[FrontRing | BackRing] = []

    def make(start: int = 0) -> tuple[FrontRing, BackRing]:
        pair = _pair(page, start)
        made.extend(pair)
        return pair

    yield make
    for ring in made:
        ring.close()


def _set_index(buffer: mmap.mmap, name: str, value: int) -> None:
    """Play a peer writing a shared index (possibly a hostile one)."""
    struct.pack_into("<I", buffer, getattr(SringHeader, name).offset, value & 0xFFFFFFFF)


def _pair(buffer: mmap.mmap, start: int = 0) -> tuple[FrontRing, BackRing]:
    shared_ring_init(buffer)
    if start:
        for name in ("req_prod", "rsp_prod"):
            _set_index(buffer, name, start)
        for name in ("req_event", "rsp_event"):
            _set_index(buffer, name, start + 1)
    return FrontRing(buffer, REQUEST, RESPONSE, start=start), BackRing(buffer, REQUEST, RESPONSE, start=start)


def test_round_down_pow2() -> None:
    assert [round_down_pow2(n) for n in (0, 1, 2, 3, 252, 256, 0xFFFFFFFF)] == [0, 1, 2, 2, 128, 256, 1 << 31]
    with pytest.raises(ValueError):
        round_down_pow2(1 << 32)


@pytest.mark.parametrize("order, expected", [(0, 32), (1, 64), (2, 128), (3, 256), (4, 512)])
def test_blkif_ring_sizes(order: int, expected: int) -> None:
    assert blkif.BLKIF_NATIVE.ring_size(order) == expected
    assert blkif.BLKIF_X86_32.ring_size(order) == expected
    assert const_ring_size(112, ring_bytes(order)) == expected


def test_netif_ring_sizes() -> None:
    assert netif.NET_TX_RING_SIZE == netif.NET_RX_RING_SIZE == 256
    assert netif.tx_ring_size(1) == 512


def test_shared_ring_init(page: mmap.mmap) -> None:
    page[:SRING_RING_OFFSET] = b"\xff" * SRING_RING_OFFSET
    shared_ring_init(page)
    header = SringHeader.from_buffer_copy(page[:SRING_RING_OFFSET])
    assert (header.req_prod, header.req_event, header.rsp_prod, header.rsp_event) == (0, 1, 0, 1)
    assert bytes(header.pvt.pvt_pad) == bytes(4) and bytes(getattr(header, "__pad")) == bytes(44)


def test_request_notify_decisions(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings()
    assert front.nr_ents == PAGE_SLOTS and front.free_requests() == PAGE_SLOTS
    for n in range(3):
        front.put_request(n, n)
    assert back.unconsumed_requests() == 0, "unpushed requests must be invisible"
    assert front.push_requests_and_check_notify() is True  # req_event starts at 1
    assert front.push_requests_and_check_notify() is False  # nothing new
    assert [back.get_request()[0] for _ in range(3)] == [0, 1, 2]
    # The back end did not re-arm req_event, so it is still polling: no notification needed.
    front.put_request(3, 3)
    assert front.push_requests_and_check_notify() is False
    assert back.final_check_for_requests() is True
    back.get_request()
    assert back.final_check_for_requests() is False
    assert back.sring_req_event == back.req_cons + 1
    front.put_request(4, 4)
    assert front.push_requests_and_check_notify() is True


def test_response_notify_decisions(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings()
    for n in range(2):
        front.put_request(n, 0)
    front.push_requests()
    back.get_request()
    back.get_request()
    back.put_response(0, 0)
    assert back.push_responses_and_check_notify() is True
    assert front.final_check_for_responses() is True
    assert front.get_response() == (0, 0)
    assert front.final_check_for_responses() is False  # re-armed rsp_event = rsp_cons + 1
    back.put_response(1, -1)
    assert back.push_responses_and_check_notify() is True
    assert front.get_response() == (1, -1)


def test_full_and_empty(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings()
    with pytest.raises(RingEmptyError):
        back.get_request_bytes()
    with pytest.raises(RingFullError):
        back.put_response(0, 0)
    for n in range(PAGE_SLOTS):
        front.put_request(n, 0)
    assert front.full() and front.free_requests() == 0
    with pytest.raises(RingFullError):
        front.put_request(99, 0)
    front.push_requests()
    back.get_request()
    back.put_response(0, 0)
    back.push_responses()
    # A slot is free again only once its response is consumed.
    assert front.free_requests() == 0
    front.get_response()
    assert front.free_requests() == 1
    with pytest.raises(RingEmptyError):
        front.get_response_bytes()


@pytest.mark.parametrize("start", [0xFFFFFFFF - 40, 0xFFFFFFFF, 0x80000000 - 3])
def test_indexes_wrap_modulo_2_32(page: mmap.mmap, rings: MakeRings, start: int) -> None:
    front, back = rings(start)
    sent = 0
    received = []
    for burst in range(10):
        for _ in range(17):
            front.put_request(sent, burst)
            sent += 1
        front.push_requests_and_check_notify()
        while back.unconsumed_requests():
            request_id, _ = back.get_request()
            back.put_response(request_id, request_id * 2)
        back.push_responses_and_check_notify()
        while front.unconsumed_responses():
            received.append(front.get_response())
        assert front.free_requests() == PAGE_SLOTS
    assert received == [(n, 2 * n) for n in range(sent)]
    assert front.req_prod_pvt == (start + sent) & 0xFFFFFFFF == back.sring_req_prod


def test_notify_decision_across_wrap(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings(0xFFFFFFFE)
    assert back.final_check_for_requests() is False  # req_event = 0xFFFFFFFF
    front.put_request(1, 1)
    front.put_request(2, 2)
    front.put_request(3, 3)  # req_prod goes 0xFFFFFFFE -> 1
    assert front.push_requests_and_check_notify() is True


@pytest.mark.parametrize("start", [0, 0xFFFFFFF0])
def test_request_overflow_is_detected(page: mmap.mmap, rings: MakeRings, start: int) -> None:
    front, back = rings(start)
    _set_index(page, "req_prod", start + PAGE_SLOTS)  # a full ring: legal
    assert back.unconsumed_requests() == PAGE_SLOTS
    assert back.request_cons_overflow((start + PAGE_SLOTS) & 0xFFFFFFFF)
    assert not back.request_cons_overflow((start + PAGE_SLOTS - 1) & 0xFFFFFFFF)
    for hostile in (start + PAGE_SLOTS + 1, start - 1, start + 0x80000000):
        _set_index(page, "req_prod", hostile)
        assert back.request_prod_overflow(hostile & 0xFFFFFFFF)
        with pytest.raises(RingOverflowError):
            back.unconsumed_requests()
        with pytest.raises(RingOverflowError):
            back.get_request_bytes()


def test_consumer_cannot_outrun_its_responses(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings()
    for n in range(PAGE_SLOTS):
        front.put_request(n, 0)
    front.push_requests()
    for _ in range(PAGE_SLOTS):
        back.get_request()
    # The front end cannot legally have produced more, and the back end must not read past its responses.
    assert back.unconsumed_requests() == 0


def test_response_overflow_is_detected(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings()
    _set_index(page, "rsp_prod", PAGE_SLOTS + 1)
    assert front.response_prod_overflow(PAGE_SLOTS + 1)
    with pytest.raises(RingOverflowError):
        front.get_response_bytes()


def test_requests_are_copied_once(page: mmap.mmap, rings: MakeRings) -> None:
    front, back = rings()
    front.put_request(7, 8)
    front.push_requests()
    data = back.get_request_bytes()
    # The front end rewrites the slot after the back end took its copy: the copy must not change.
    page[SRING_RING_OFFSET:SRING_RING_OFFSET + REQUEST.size] = REQUEST.pack(666, 666)
    assert REQUEST.unpack(data) == (7, 8)


def test_multi_page_blkif_ring() -> None:
    order = 2
    layouts = blkif.BLKIF_NATIVE
    with mmap.mmap(-1, ring_bytes(order)) as buffer, \
            FrontRing(buffer, layouts.request_struct, layouts.response_struct, init=True) as front, \
            BackRing(buffer, layouts.request_struct, layouts.response_struct) as back:
        assert front.nr_ents == 128
        for n in range(front.nr_ents):
            request = blkif.BlkifRequest(operation=blkif.BLKIF_OP_READ, nr_segments=1, handle=0x300, id=n,
                                         sector_number=8 * n)
            request.seg[0].gref = 1000 + n
            request.seg[0].last_sect = 7
            front.put_request_bytes(bytes(request))
        # The last slot lives in the ring's last page.
        assert SRING_RING_OFFSET + (front.nr_ents - 1) * 112 > 3 * 4096
        assert front.push_requests_and_check_notify()
        seen = []
        while back.unconsumed_requests():
            request = blkif.BlkifRequest.from_buffer_copy(back.get_request_bytes())
            seen.append((request.id, request.sector_number, request.seg[0].gref))
            back.put_response(request.id, request.operation, blkif.BLKIF_RSP_OKAY)
        assert seen == [(n, 8 * n, 1000 + n) for n in range(128)]
        assert back.push_responses_and_check_notify()
        statuses = [blkif.BlkifResponse.from_buffer_copy(front.get_response_bytes()).status for _ in range(128)]
        assert statuses == [blkif.BLKIF_RSP_OKAY] * 128


def test_ring_rejects_bad_buffers() -> None:
    with pytest.raises(ValueError):
        FrontRing(bytes(4096), REQUEST, RESPONSE)
    with pytest.raises(ValueError):
        FrontRing(bytearray(SRING_RING_OFFSET + SLOT - 1), REQUEST, RESPONSE)
    assert ctypes.sizeof(SringHeader) == SRING_RING_OFFSET == 64
