"""A ring's hold on its shared buffer: nothing it hands to C outlives what it points at, the mapping cannot
be unmapped under a ring, close() waits for a user in progress, and any use after close() is refused with
RingClosedError instead of touching memory that may be gone."""

from __future__ import annotations

import ctypes
import mmap
import struct
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

from xenpv.xenabi.ring import BackRing, FrontRing, RingClosedError, RingError, SringHeader, ring_bytes

if TYPE_CHECKING:  # fixtures of conftest.py
    from conftest import Gate, ReleaseCheck

ENTRY = struct.Struct("<Q")


def test_publishing_writes_nothing_but_the_ring() -> None:
    """Every address a ring hands to C must be kept alive by the ring: a publish (xchg) must not write
    into freed heap blocks that other objects now occupy."""
    block = sys.getsizeof(ctypes.c_uint32())  # the pymalloc class of a ctypes scratch word
    for _ in range(8):
        buf = mmap.mmap(-1, ring_bytes(0))
        ring = FrontRing(memoryview(buf), ENTRY, ENTRY, init=True)
        victims = [b"A" * (block - sys.getsizeof(b"")) for _ in range(4096)]  # fill freed blocks
        struct.pack_into("<I", buf, SringHeader.rsp_event.offset, 0x5A5A5A5A)
        ring.final_check_for_responses()  # xchg(rsp_event): the old value goes to the exchange's result word
        assert all(v == b"A" * len(v) for v in victims), "a ring publish wrote into a freed heap block"
        assert struct.unpack_from("<I", buf, SringHeader.rsp_event.offset)[0] == 1
        ring.close()
        buf.close()


@pytest.mark.parametrize("side", [FrontRing, BackRing])
def test_a_ring_pins_its_mapping_until_closed(side: type[FrontRing] | type[BackRing]) -> None:
    buf = mmap.mmap(-1, ring_bytes(0))
    ring = side(buf, ENTRY, ENTRY)
    with pytest.raises(BufferError):
        buf.close()
    ring.close()
    ring.close()  # idempotent
    buf.close()


class _GatedField:
    """A response field whose packing passes through the gate: holds a thread inside BackRing.put_responses."""

    def __init__(self, value: int, gate: Gate) -> None:
        self.value, self.gate = value, gate

    def __index__(self) -> int:
        self.gate.enter()
        return self.value


def test_close_waits_for_a_user_in_progress(gate: Gate, release_waits_for_user: ReleaseCheck) -> None:
    buf = mmap.mmap(-1, ring_bytes(0))
    front = FrontRing(buf, ENTRY, ENTRY, init=True)
    back = BackRing(buf, ENTRY, ENTRY)
    front.put_request(1)
    front.push_requests()
    assert back.get_requests_bytes(1) == [ENTRY.pack(1)]
    release_waits_for_user(lambda: back.put_responses([(_GatedField(7, gate),)]), back.close, "BackRing.close()")
    front.close()
    buf.close()  # both rings gave the buffer back
    with pytest.raises(RingClosedError):
        back.push_responses()


def _front_uses() -> dict[str, Callable[[FrontRing], Any]]:
    return {
        "put_request": lambda r: r.put_request(1),
        "push_requests": lambda r: r.push_requests(),
        "push_requests_and_check_notify": lambda r: r.push_requests_and_check_notify(),
        "unconsumed_responses": lambda r: r.unconsumed_responses(),
        "get_response": lambda r: r.get_response(),
        "final_check_for_responses": lambda r: r.final_check_for_responses(),
        "sring_rsp_prod": lambda r: r.sring_rsp_prod,
        "sring_req_event": lambda r: r.sring_req_event,
    }


def _back_uses() -> dict[str, Callable[[BackRing], Any]]:
    return {
        "unconsumed_requests": lambda r: r.unconsumed_requests(),
        "get_request": lambda r: r.get_request(),
        "get_requests_bytes": lambda r: r.get_requests_bytes(4),
        "put_response": lambda r: r.put_response(1),
        "put_responses": lambda r: r.put_responses([(1,)]),
        "push_responses": lambda r: r.push_responses(),
        "push_responses_and_check_notify": lambda r: r.push_responses_and_check_notify(),
        "final_check_for_requests": lambda r: r.final_check_for_requests(),
        "sring_req_prod": lambda r: r.sring_req_prod,
        "sring_rsp_event": lambda r: r.sring_rsp_event,
    }


@pytest.fixture
def closed_pair() -> Iterator[tuple[FrontRing, BackRing]]:
    """A front and back end whose rings hold one request and one response each way, then closed and
    their mapping unmapped: any access through them would touch unmapped memory."""
    buf = mmap.mmap(-1, ring_bytes(0))
    front = FrontRing(buf, ENTRY, ENTRY, init=True)
    back = BackRing(buf, ENTRY, ENTRY)
    front.put_request(1)
    front.push_requests()
    back.get_request()
    front.close()
    back.close()
    buf.close()
    yield front, back


@pytest.mark.parametrize("use", sorted(_front_uses()))
def test_every_front_use_after_close_is_refused(closed_pair: tuple[FrontRing, BackRing], use: str) -> None:
    with pytest.raises(RingClosedError, match="after close"):
        _front_uses()[use](closed_pair[0])


@pytest.mark.parametrize("use", sorted(_back_uses()))
def test_every_back_use_after_close_is_refused(closed_pair: tuple[FrontRing, BackRing], use: str) -> None:
    with pytest.raises(RingClosedError, match="after close"):
        _back_uses()[use](closed_pair[1])


def test_ring_closed_is_a_ring_error() -> None:
    # Back ends stop a device on RingError; a ring closed under a data path thread must end it the same way.
    assert issubclass(RingClosedError, RingError)
