"""io/ring.h: the shared request/response ring of Xen split drivers.

A shared ring is a 64-byte header (:class:`SringHeader`) followed by a power-of-two number of slots, each the
size of ``union { request; response; }``.  It may span ``1 << order`` contiguous pages (blkif
``ring-page-order``); both classes take one writable buffer covering all of them.

:class:`FrontRing` and :class:`BackRing` keep the private indexes of ``struct X_front_ring`` /
``struct X_back_ring`` and implement the ring.h macros on top of the shared header.  All index arithmetic is
modulo 2**32, exactly like ``RING_IDX`` in C.

Memory ordering
---------------
Both ends of a ring in this project are Python processes on x86 sharing an mmap.  x86 is TSO: stores become
visible in program order, loads are not reordered with other loads, and a store is never reordered before
an earlier load.  That already gives ``xen_wmb()`` (entry bytes before the producer index) and ``xen_rmb()``
(producer index before entry bytes); the only thing a compiler could still reorder is moot because every
shared-memory access here is a separate opaque C call made by the interpreter.  What TSO does *not* give is
store->load ordering: a store can sit in the store buffer while a later load of another location completes.
ring.h needs exactly that ordering (``xen_mb()``) in PUSH_*_AND_CHECK_NOTIFY (publish prod, then read event)
and FINAL_CHECK_FOR_* (publish event, then re-read prod); without it both ends can miss each other and the
ring stalls without a notification.  Those publishing stores are therefore done with a locked ``xchg``
through the ``atomics`` package, which is a full barrier on x86.  Every shared index load and store is a
single aligned 32-bit access, so the peer never sees a torn index.
"""

from __future__ import annotations

import contextlib
import ctypes
import struct
import weakref
from types import TracebackType
from typing import Any, Callable, Self

import atomics

from xenpv.xenabi.layout import XenStruct, XenUnion

try:
    from atomics._impl.enums import MemoryOrder, OpType
except ImportError:  # another atomics release: _exchanger falls back to the public method
    MemoryOrder = OpType = None  # type: ignore[assignment,misc]

XEN_PAGE_SIZE = 4096
RING_IDX_MODULUS = 1 << 32
_IDX_MASK = RING_IDX_MODULUS - 1


class SringNetifPvt(XenStruct):
    _fields_ = [("smartpoll_active", ctypes.c_uint8)]


class SringTapifUserPvt(XenStruct):
    _fields_ = [("msg", ctypes.c_uint8)]


class SringPvt(XenUnion):
    _fields_ = [
        ("netif", SringNetifPvt),
        ("tapif_user", SringTapifUserPvt),
        ("pvt_pad", ctypes.c_uint8 * 4),
    ]


class SringHeader(XenStruct):
    """The header every ``struct X_sring`` starts with; slots begin at ``sizeof(SringHeader)``."""

    # Any DEFINE_RING_TYPES instance has this header; blkif's is the one the conformance test compiles.
    _xen_name_ = "struct blkif_sring"
    _fields_ = [
        ("req_prod", ctypes.c_uint32),
        ("req_event", ctypes.c_uint32),
        ("rsp_prod", ctypes.c_uint32),
        ("rsp_event", ctypes.c_uint32),
        ("pvt", SringPvt),
        ("__pad", ctypes.c_uint8 * 44),
    ]


SRING_RING_OFFSET = ctypes.sizeof(SringHeader)
# The header's indexes as 32-bit word numbers, for plain loads.
_REQ_PROD, _REQ_EVENT, _RSP_PROD, _RSP_EVENT = (getattr(SringHeader, f).offset // 4
                                                for f in ("req_prod", "req_event", "rsp_prod", "rsp_event"))


class RingError(Exception):
    """A ring operation that the ring's state does not allow."""


class RingFullError(RingError):
    """No free slot to produce into."""


class RingEmptyError(RingError):
    """Nothing unconsumed to read."""


class RingOverflowError(RingError):
    """The peer published a producer index that cannot be valid: it is misbehaving or hostile."""


def round_down_pow2(value: int) -> int:
    """``__RD32``: the largest power of two <= value (0 for 0)."""
    if value < 0 or value >= RING_IDX_MODULUS:
        raise ValueError(f"{value} is not a 32-bit ring quantity")
    return 1 << (value.bit_length() - 1) if value else 0


def ring_bytes(order: int = 0) -> int:
    """Bytes of a ring of ``1 << order`` pages (blkif ``ring-page-order``)."""
    return XEN_PAGE_SIZE << order


def const_ring_size(entry_size: int, size_bytes: int = XEN_PAGE_SIZE) -> int:
    """``__CONST_RING_SIZE``: number of slots of ``entry_size`` bytes that fit in ``size_bytes``."""
    if entry_size <= 0:
        raise ValueError("entry size must be positive")
    return round_down_pow2(max(size_bytes - SRING_RING_OFFSET, 0) // entry_size)


def slot_size(request: struct.Struct, response: struct.Struct) -> int:
    """Size of ``union X_sring_entry``: each slot holds a request or, later, its response.

    A C union can be larger than its largest member when a smaller member is more aligned; no Xen ring
    pairs such structures, and the conformance test checks the resulting ring sizes against the headers.
    """
    return max(request.size, response.size)


def shared_ring_init(buffer: Any) -> None:
    """``SHARED_RING_INIT``: done by the front end before it grants the ring to the back end."""
    with memoryview(buffer) as raw, raw.cast("B") as view:
        view[:SRING_RING_OFFSET] = bytes(SRING_RING_OFFSET)
        for name in ("req_event", "rsp_event"):
            struct.pack_into("<I", view, getattr(SringHeader, name).offset, 1)


def _exchanger(index: Any) -> Callable[[int], None]:
    """``index.exchange`` (a locked xchg on the shared word) without the atomics package's per-call Python
    (buffer exports and checks: ~7.5 us a call, against ~0.5 us for its C function called directly).  Rings
    publish an index with it at every push and final check.  The raw call is only valid while ``index`` is
    open, so a ring swaps these back to the checked method when it is closed."""
    try:
        fn = index._core.get_op_func(OpType.EXCHANGE)
        address = index._core.address
        order = MemoryOrder.SEQ_CST.value
    except AttributeError:
        fn = None
    if fn is None or index.width != 4:
        return index.exchange
    desired, result = ctypes.c_uint32(), ctypes.c_uint32()
    desired_at, result_at = ctypes.addressof(desired), ctypes.addressof(result)

    def exchange(value: int) -> None:
        desired.value = value
        fn(address, desired_at, order, result_at)

    return exchange


def _sub(a: int, b: int) -> int:
    return (a - b) & _IDX_MASK


def _release(stack: contextlib.ExitStack, view: memoryview) -> None:
    stack.close()
    view.release()


class _SharedRing:
    """The shared header and slots of one ring, plus the work both ends share."""

    def __init__(self, buffer: Any, request: struct.Struct, response: struct.Struct) -> None:
        self._view = memoryview(buffer).cast("B")
        if self._view.readonly:
            raise ValueError("a shared ring needs a writable buffer")
        self.request = request
        self.response = response
        self.slot_size = slot_size(request, response)
        self.nr_ents = const_ring_size(self.slot_size, len(self._view))
        if self.nr_ents == 0:
            raise ValueError(f"{len(self._view)} bytes hold no {self.slot_size}-byte slot")
        self._stack = contextlib.ExitStack()
        self._req_prod = self._index("req_prod")
        self._req_event = self._index("req_event")
        self._rsp_prod = self._index("rsp_prod")
        self._rsp_event = self._index("rsp_event")
        self._publish = {w: _exchanger(v) for w, v in ((_REQ_PROD, self._req_prod), (_REQ_EVENT, self._req_event),
                                                        (_RSP_PROD, self._rsp_prod), (_RSP_EVENT, self._rsp_event))}
        # Loads of the indexes are plain aligned 32-bit reads: atomic on x86 and, under TSO, ordered
        # before later loads of the slots, so they need no barrier; an `atomics` load costs ~4.5 us,
        # the largest single cost per request in a back-end. Stores stay xchg (see the module docstring).
        words = self._view[:SRING_RING_OFFSET].cast("I")
        self._stack.callback(words.release)
        self._words = words
        # A ring dropped without close() must still let go of the buffer, or its mmap can never be closed.
        self._finalizer = weakref.finalize(self, _release, self._stack, self._view)

    def _index(self, name: str) -> Any:
        offset = getattr(SringHeader, name).offset
        window = self._view[offset:offset + 4]
        return self._stack.enter_context(atomics.atomicview(buffer=window, atype=atomics.UINT))

    def close(self) -> None:
        """Release the buffer so the caller can close its mmap."""
        # The raw exchangers would write through a stale address; the checked methods raise instead.
        self._publish = {_REQ_PROD: self._req_prod.exchange, _REQ_EVENT: self._req_event.exchange,
                         _RSP_PROD: self._rsp_prod.exchange, _RSP_EVENT: self._rsp_event.exchange}
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _slot_offset(self, idx: int) -> int:
        return SRING_RING_OFFSET + (idx & (self.nr_ents - 1)) * self.slot_size

    def _copy_slot(self, idx: int, size: int) -> bytes:
        # RING_COPY_*: one copy out of shared memory; callers parse and validate only the copy, so the
        # peer cannot change a field between the check and the use.
        offset = self._slot_offset(idx)
        return bytes(self._view[offset:offset + size])

    def _write_slot(self, idx: int, data: bytes | bytearray | memoryview, size: int) -> None:
        if len(data) != size:
            raise ValueError(f"entry must be {size} bytes, got {len(data)}")
        offset = self._slot_offset(idx)
        self._view[offset:offset + size] = data

    @property
    def sring_req_prod(self) -> int:
        return self._words[_REQ_PROD]

    @property
    def sring_req_event(self) -> int:
        return self._words[_REQ_EVENT]

    @property
    def sring_rsp_prod(self) -> int:
        return self._words[_RSP_PROD]

    @property
    def sring_rsp_event(self) -> int:
        return self._words[_RSP_EVENT]

    def _push_and_check_notify(self, prod_word: int, event_word: int, new: int) -> bool:
        # This end is the only writer of its producer index, so a plain load reads back its own last store.
        old = self._words[prod_word]
        # xchg publishes the index after the entries (TSO keeps store order) and is the xen_mb() that
        # orders this store before the load of the peer's event index.
        self._publish[prod_word](new)
        return _sub(new, self._words[event_word]) < _sub(new, old)


class FrontRing(_SharedRing):
    """The front end (guest driver) side: produces requests, consumes responses.

    ``init=True`` runs SHARED_RING_INIT first (FRONT_RING_INIT); otherwise the ring is attached at ``start``
    (FRONT_RING_ATTACH), e.g. after resume.
    """

    def __init__(self, buffer: Any, request: struct.Struct, response: struct.Struct, *,
                 init: bool = False, start: int = 0) -> None:
        if init:
            shared_ring_init(buffer)
        super().__init__(buffer, request, response)
        self.req_prod_pvt = start & _IDX_MASK
        self.rsp_cons = start & _IDX_MASK

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.nr_ents - _sub(self.req_prod_pvt, self.rsp_cons)

    def full(self) -> bool:
        """RING_FULL."""
        return self.free_requests() == 0

    def put_request_bytes(self, data: bytes | bytearray | memoryview) -> int:
        """Write a request into the next private slot; returns its ring index.  Visible after a push."""
        if self.full():
            raise RingFullError(f"all {self.nr_ents} slots are in flight")
        idx = self.req_prod_pvt
        self._write_slot(idx, data, self.request.size)
        self.req_prod_pvt = (idx + 1) & _IDX_MASK
        return idx

    def put_request(self, *values: Any) -> int:
        return self.put_request_bytes(self.request.pack(*values))

    def push_requests(self) -> None:
        """RING_PUSH_REQUESTS (for callers that notify unconditionally)."""
        self._req_prod.store(self.req_prod_pvt)

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: True if the back end asked to be notified."""
        return self._push_and_check_notify(_REQ_PROD, _REQ_EVENT, self.req_prod_pvt)

    def unconsumed_responses(self) -> int:
        """XEN_RING_NR_UNCONSUMED_RESPONSES, refusing a producer index no honest back end can publish."""
        prod = self.sring_rsp_prod
        if self.response_prod_overflow(prod):
            raise RingOverflowError(f"rsp_prod {prod} is more than {self.nr_ents} past rsp_cons {self.rsp_cons}")
        return _sub(prod, self.rsp_cons)

    def response_prod_overflow(self, prod: int) -> bool:
        """RING_RESPONSE_PROD_OVERFLOW."""
        return _sub(prod, self.rsp_cons) > self.nr_ents

    def get_response_bytes(self) -> bytes:
        """Copy out the next response and consume it."""
        if self.unconsumed_responses() == 0:
            raise RingEmptyError("no unconsumed response")
        data = self._copy_slot(self.rsp_cons, self.response.size)
        self.rsp_cons = (self.rsp_cons + 1) & _IDX_MASK
        return data

    def get_response(self) -> tuple[Any, ...]:
        return self.response.unpack(self.get_response_bytes())

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: re-arm rsp_event, then look again so no response is missed."""
        if self.unconsumed_responses():
            return True
        self._publish[_RSP_EVENT]((self.rsp_cons + 1) & _IDX_MASK)
        return self.unconsumed_responses() > 0


class BackRing(_SharedRing):
    """The back end (dom0 driver) side: consumes requests, produces responses.

    Every index the front end publishes is untrusted: a producer index that would put more than ``nr_ents``
    requests in flight raises :class:`RingOverflowError`, which back ends treat as a fatal protocol error for
    that device.
    """

    def __init__(self, buffer: Any, request: struct.Struct, response: struct.Struct, *, start: int = 0) -> None:
        super().__init__(buffer, request, response)
        self.rsp_prod_pvt = start & _IDX_MASK
        self.req_cons = start & _IDX_MASK

    def request_cons_overflow(self, cons: int) -> bool:
        """RING_REQUEST_CONS_OVERFLOW: consuming at ``cons`` would overwrite an unpushed response slot."""
        return _sub(cons, self.rsp_prod_pvt) >= self.nr_ents

    def request_prod_overflow(self, prod: int) -> bool:
        """RING_REQUEST_PROD_OVERFLOW: ill-behaved front end."""
        return _sub(prod, self.rsp_prod_pvt) > self.nr_ents

    def unconsumed_requests(self) -> int:
        """XEN_RING_NR_UNCONSUMED_REQUESTS, bounded by the slots whose responses have been produced."""
        prod = self.sring_req_prod
        if self.request_prod_overflow(prod):
            raise RingOverflowError(
                f"req_prod {prod} is more than {self.nr_ents} past rsp_prod_pvt {self.rsp_prod_pvt}")
        return min(_sub(prod, self.req_cons), self.nr_ents - _sub(self.req_cons, self.rsp_prod_pvt))

    def get_request_bytes(self) -> bytes:
        """Copy out the next request (once) and consume it; validate the returned copy, not the slot."""
        if self.unconsumed_requests() == 0:
            raise RingEmptyError("no unconsumed request")
        data = self._copy_slot(self.req_cons, self.request.size)
        self.req_cons = (self.req_cons + 1) & _IDX_MASK
        return data

    def get_request(self) -> tuple[Any, ...]:
        return self.request.unpack(self.get_request_bytes())

    def get_requests_bytes(self, count: int) -> list[bytes]:
        """Copy out and consume up to ``count`` requests at once (one index check for the batch)."""
        count = min(count, self.unconsumed_requests())
        view, mask, size, cons = self._view, self.nr_ents - 1, self.slot_size, self.req_cons
        length = self.request.size
        out = []
        for i in range(cons, cons + count):
            offset = SRING_RING_OFFSET + (i & mask) * size
            out.append(bytes(view[offset:offset + length]))
        self.req_cons = (cons + count) & _IDX_MASK
        return out

    def put_response_bytes(self, data: bytes | bytearray | memoryview) -> int:
        """Write a response into the next private slot; returns its ring index.  Visible after a push."""
        if self.rsp_prod_pvt == self.req_cons:
            # Responses overlay request slots: one response per consumed request, never more.
            raise RingFullError("no consumed request is waiting for a response")
        idx = self.rsp_prod_pvt
        self._write_slot(idx, data, self.response.size)
        self.rsp_prod_pvt = (idx + 1) & _IDX_MASK
        return idx

    def put_response(self, *values: Any) -> int:
        return self.put_response_bytes(self.response.pack(*values))

    def put_responses(self, responses: list[tuple[Any, ...]]) -> None:
        """Write one response per consumed request, in order; visible after a push."""
        if len(responses) > _sub(self.req_cons, self.rsp_prod_pvt):
            raise RingFullError(f"{len(responses)} responses for {_sub(self.req_cons, self.rsp_prod_pvt)} "
                                "consumed requests")
        view, mask, size, prod = self._view, self.nr_ents - 1, self.slot_size, self.rsp_prod_pvt
        pack_into = self.response.pack_into
        for values in responses:
            pack_into(view, SRING_RING_OFFSET + (prod & mask) * size, *values)
            prod += 1
        self.rsp_prod_pvt = prod & _IDX_MASK

    def push_responses(self) -> None:
        """RING_PUSH_RESPONSES."""
        self._rsp_prod.store(self.rsp_prod_pvt)

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: True if the front end asked to be notified."""
        return self._push_and_check_notify(_RSP_PROD, _RSP_EVENT, self.rsp_prod_pvt)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look again so no request is missed."""
        if self.unconsumed_requests():
            return True
        self._publish[_REQ_EVENT]((self.req_cons + 1) & _IDX_MASK)
        return self.unconsumed_requests() > 0
