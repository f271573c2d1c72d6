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
ring stalls without a notification.  Every store of a shared index is therefore a locked ``xchg``
(:class:`~xenpv.xenabi.atomic.AtomicU32`), which is a full barrier on x86.  Every shared index load and
store is a single aligned 32-bit access, so the peer never sees a torn index.

Lifetime
--------
A ring holds exports of the caller's buffer (its byte view and the ctypes words of the four indexes), so
the mapping under it cannot be closed while the ring can touch it.  Every method that touches the buffer
holds the ring's lock; :meth:`_SharedRing.close` takes the same lock, so it waits for a user in progress,
then gives the exports back.  Any use after that raises :class:`RingClosedError`.
"""

from __future__ import annotations

import ctypes
import gc
import struct
import threading
from types import TracebackType
from typing import Any, Callable, Self

from xenpv.xenabi.atomic import AtomicU32
from xenpv.xenabi.layout import XenStruct, XenUnion

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
# The header's indexes as 32-bit word numbers (0..3): positions in a ring's list of index words.
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


class RingClosedError(RingError):
    """The ring was closed: it no longer holds its buffer, which may already be unmapped."""


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


def _sub(a: int, b: int) -> int:
    return (a - b) & _IDX_MASK


class _SharedRing:
    """The shared header and slots of one ring, plus the work both ends share."""

    def __init__(self, buffer: Any, request: struct.Struct, response: struct.Struct) -> None:
        view = memoryview(buffer).cast("B")
        if view.readonly:
            view.release()
            raise ValueError("a shared ring needs a writable buffer")
        self.request = request
        self.response = response
        self.slot_size = slot_size(request, response)
        self.nr_ents = const_ring_size(self.slot_size, len(view))
        if self.nr_ents == 0:
            view.release()
            raise ValueError(f"{len(view)} bytes hold no {self.slot_size}-byte slot")
        # Not re-entrant: public methods take it once and work through the _locked helpers.
        self._lock = threading.Lock()
        self._closed = False
        self._view = view
        # req_prod, req_event, rsp_prod, rsp_event in word order.  Loads of them are plain aligned 32-bit
        # reads: atomic on x86 and, under TSO, ordered before later loads of the slots, so they need no
        # barrier.  Stores are xchg (see the module docstring).
        self._index = [AtomicU32(view, n * 4) for n in range(4)]

    def _check_open(self) -> None:
        # Under _lock, first thing.  Names the ring so a use after close is easy to trace to its owner.
        if self._closed:
            raise RingClosedError(f"{type(self).__name__} of {self.nr_ents} slots used after close()")

    def close(self) -> None:
        """Give the buffer back so the caller can close its mapping; waits for a user in progress."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index = []  # each word holds an export of the view: they go first
            try:
                self._view.release()
            except BufferError:
                # Only a reference cycle (a traceback holding a word, say) can still hold one; anything
                # else is a bug that would leave the mapping pinned.
                gc.collect()
                try:
                    self._view.release()
                except BufferError as exc:
                    raise RingError(f"closing a {self.nr_ents}-slot ring: its buffer is still exported: "
                                    f"{exc}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _slot_offset(self, idx: int) -> int:
        return SRING_RING_OFFSET + (idx & (self.nr_ents - 1)) * self.slot_size

    def _copy_slot(self, idx: int, size: int) -> bytes:
        # Under _lock, after _check_open.  RING_COPY_*: one copy out of shared memory; callers parse and
        # validate only the copy, so the peer cannot change a field between the check and the use.
        offset = self._slot_offset(idx)
        return bytes(self._view[offset:offset + size])

    def _write_slot(self, idx: int, data: bytes | bytearray | memoryview, size: int) -> None:
        # Under _lock, after _check_open.
        if len(data) != size:
            raise ValueError(f"entry must be {size} bytes, got {len(data)}")
        offset = self._slot_offset(idx)
        self._view[offset:offset + size] = data

    def _load(self, word: int) -> int:
        with self._lock:
            self._check_open()
            return self._index[word].load()

    def _publish(self, word: int, value: int) -> None:
        with self._lock:
            self._check_open()
            self._index[word].exchange(value)

    def _final_check(self, unconsumed: Callable[[], int], event_word: int, event: int) -> bool:
        # RING_FINAL_CHECK_FOR_*, under _lock: re-arm the event index (xchg: the xen_mb() between this
        # store and the load of the producer index), then look again so nothing is missed.
        if unconsumed():
            return True
        self._index[event_word].exchange(event)
        return unconsumed() > 0

    @property
    def sring_req_prod(self) -> int:
        return self._load(_REQ_PROD)

    @property
    def sring_req_event(self) -> int:
        return self._load(_REQ_EVENT)

    @property
    def sring_rsp_prod(self) -> int:
        return self._load(_RSP_PROD)

    @property
    def sring_rsp_event(self) -> int:
        return self._load(_RSP_EVENT)

    def _push_and_check_notify(self, prod_word: int, event_word: int, new: int) -> bool:
        with self._lock:
            self._check_open()
            prod, event = self._index[prod_word], self._index[event_word]
            # This end is the only writer of its producer index, so a plain load reads back its own last store.
            old = prod.load()
            # xchg publishes the index after the entries (TSO keeps store order) and is the xen_mb() that
            # orders this store before the load of the peer's event index.
            prod.exchange(new)
            return _sub(new, event.load()) < _sub(new, old)


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
        with self._lock:
            self._check_open()
            if self.full():
                raise RingFullError(f"all {self.nr_ents} slots are in flight")
            idx = self.req_prod_pvt
            self._write_slot(idx, data, self.request.size)
            self.req_prod_pvt = (idx + 1) & _IDX_MASK
            return idx

    def put_request(self, *values: Any) -> int:
        return self.put_request_bytes(self.request.pack(*values))

    def put_requests_bytes(self, items: list[bytes | bytearray | memoryview]) -> None:
        """Write requests into the next private slots, in order (one lock and one free-slot check for the
        batch); visible after a push.  Nothing is written unless all of them fit."""
        with self._lock:
            self._check_open()
            free = self.nr_ents - _sub(self.req_prod_pvt, self.rsp_cons)
            if len(items) > free:
                raise RingFullError(f"{len(items)} requests for {free} free slots")
            view, mask, size, prod = self._view, self.nr_ents - 1, self.slot_size, self.req_prod_pvt
            length = self.request.size
            if any(len(data) != length for data in items):
                raise ValueError(f"every entry must be {length} bytes")
            for data in items:
                offset = SRING_RING_OFFSET + (prod & mask) * size
                view[offset:offset + length] = data
                prod += 1
            self.req_prod_pvt = prod & _IDX_MASK

    def push_requests(self) -> None:
        """RING_PUSH_REQUESTS (for callers that notify unconditionally)."""
        self._publish(_REQ_PROD, self.req_prod_pvt)

    def push_requests_and_check_notify(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: True if the back end asked to be notified."""
        return self._push_and_check_notify(_REQ_PROD, _REQ_EVENT, self.req_prod_pvt)

    def unconsumed_responses(self) -> int:
        """XEN_RING_NR_UNCONSUMED_RESPONSES, refusing a producer index no honest back end can publish."""
        with self._lock:
            self._check_open()
            return self._unconsumed_responses_locked()

    def _unconsumed_responses_locked(self) -> int:
        prod = self._index[_RSP_PROD].load()
        if self.response_prod_overflow(prod):
            raise RingOverflowError(f"rsp_prod {prod} is more than {self.nr_ents} past rsp_cons {self.rsp_cons}")
        return _sub(prod, self.rsp_cons)

    def response_prod_overflow(self, prod: int) -> bool:
        """RING_RESPONSE_PROD_OVERFLOW."""
        return _sub(prod, self.rsp_cons) > self.nr_ents

    def get_response_bytes(self) -> bytes:
        """Copy out the next response and consume it."""
        with self._lock:
            self._check_open()
            if self._unconsumed_responses_locked() == 0:
                raise RingEmptyError("no unconsumed response")
            data = self._copy_slot(self.rsp_cons, self.response.size)
            self.rsp_cons = (self.rsp_cons + 1) & _IDX_MASK
            return data

    def get_response(self) -> tuple[Any, ...]:
        return self.response.unpack(self.get_response_bytes())

    def get_responses(self) -> list[tuple[Any, ...]]:
        """Copy out, unpack and consume every unconsumed response (one lock and one index check for the
        batch); each slot is read once, so what the caller sees is one consistent copy."""
        with self._lock:
            self._check_open()
            count = self._unconsumed_responses_locked()
            view, mask, size, cons = self._view, self.nr_ents - 1, self.slot_size, self.rsp_cons
            unpack_from = self.response.unpack_from
            out = [unpack_from(view, SRING_RING_OFFSET + (i & mask) * size) for i in range(cons, cons + count)]
            self.rsp_cons = (cons + count) & _IDX_MASK
            return out

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES: re-arm rsp_event, then look again so no response is missed."""
        with self._lock:
            self._check_open()
            return self._final_check(self._unconsumed_responses_locked, _RSP_EVENT, (self.rsp_cons + 1) & _IDX_MASK)


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
        with self._lock:
            self._check_open()
            return self._unconsumed_requests_locked()

    def _unconsumed_requests_locked(self) -> int:
        prod = self._index[_REQ_PROD].load()
        if self.request_prod_overflow(prod):
            raise RingOverflowError(
                f"req_prod {prod} is more than {self.nr_ents} past rsp_prod_pvt {self.rsp_prod_pvt}")
        return min(_sub(prod, self.req_cons), self.nr_ents - _sub(self.req_cons, self.rsp_prod_pvt))

    def get_request_bytes(self) -> bytes:
        """Copy out the next request (once) and consume it; validate the returned copy, not the slot."""
        with self._lock:
            self._check_open()
            if self._unconsumed_requests_locked() == 0:
                raise RingEmptyError("no unconsumed request")
            data = self._copy_slot(self.req_cons, self.request.size)
            self.req_cons = (self.req_cons + 1) & _IDX_MASK
            return data

    def get_request(self) -> tuple[Any, ...]:
        return self.request.unpack(self.get_request_bytes())

    def get_requests_bytes(self, count: int) -> list[bytes]:
        """Copy out and consume up to ``count`` requests at once (one index check for the batch)."""
        with self._lock:
            self._check_open()
            count = min(count, self._unconsumed_requests_locked())
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
        with self._lock:
            self._check_open()
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
        with self._lock:
            self._check_open()
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
        self._publish(_RSP_PROD, self.rsp_prod_pvt)

    def push_responses_and_check_notify(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: True if the front end asked to be notified."""
        return self._push_and_check_notify(_RSP_PROD, _RSP_EVENT, self.rsp_prod_pvt)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: re-arm req_event, then look again so no request is missed."""
        with self._lock:
            self._check_open()
            return self._final_check(self._unconsumed_requests_locked, _REQ_EVENT, (self.req_cons + 1) & _IDX_MASK)
