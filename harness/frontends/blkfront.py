"""A minimal blkif frontend for tests and `xenpv bench blk`, running as the guest through XenPlatform:
ring pages and data pages in guest RAM granted to dom0, an unbound event channel, the frontend keys written
in one transaction, requests pushed with xenabi's FrontRing and responses awaited through the upcall
dispatcher.  It also writes raw (possibly hostile) ring entries for the back-end's robustness tests.

`add_vbd` is the dom0 side: a device directory pair like the toolstack's, for an image of the test's own.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.backends.toolstack import layout as L
from xenpv.backends.xenstored.client import XsClient
from xenpv.guests.schema import PvDisk
from xenpv.base.errors import HarnessError, WaitTimeout
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi.blkif import (BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE,
                          BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER,
                          BLKIF_SECTOR_SIZE, BLKIF_SEGS_PER_INDIRECT_FRAME, BLKIF_NATIVE, BlkifRequestSegment,
                          XEN_IO_PROTO_ABI_X86_64)
from xenpv.xenabi.layout import struct_of
from xenpv.xenabi.ring import XEN_PAGE_SIZE, FrontRing
from xenpv.xenabi.xenbus import XenbusState

log = logging.getLogger("harness.blk")

SECTORS_PER_PAGE = XEN_PAGE_SIZE // BLKIF_SECTOR_SIZE
_DISCARD = struct_of(BLKIF_NATIVE.request_discard)
_INDIRECT = struct_of(BLKIF_NATIVE.request_indirect)
_SEGMENT = struct_of(BlkifRequestSegment)
# Where a cached request's id and sector go (see BlkFront._encode).
_U64 = struct.Struct("<Q")
_ID_OFFSET = BLKIF_NATIVE.request.id.offset
_SECTOR_OFFSET = BLKIF_NATIVE.request.sector_number.offset
_INDIRECT_SECTOR_OFFSET = BLKIF_NATIVE.request_indirect.sector_number.offset




class BlkFrontError(HarnessError):
    pass


def add_vbd(xs: XsClient, domid: int, devid: int, image: Path, fmt: str = "raw", mode: str = "w",
            discard: bool | None = None) -> str:
    """Create the frontend and backend directories of a vbd in one transaction; returns the backend path."""
    features = {} if discard is None else {"discard": discard}
    dev = L.vbd_device(PvDisk(devid, 0, fmt, image, features), image, domid, L.DOM0)
    dev.backend["mode"] = mode

    def write(tx: int) -> None:
        for n in L.device_nodes(dev, domid, L.DOM0):
            if n.value is None:
                xs.mkdir(n.path, tx)
            else:
                xs.write(n.path, n.value, tx)
            if n.perms is not None:
                xs.set_perms(n.path, list(n.perms), tx)

    xs.transact(write)
    return L.backend_path(L.DOM0, "vbd", domid, devid)


def pack_request(op: int, rid: int, sector: int, segments: list[tuple[int, int, int]],
                 nr_segments: int | None = None) -> bytes:
    """A native blkif_request; `nr_segments` may lie about the segment count (for hostile tests)."""
    segs = list(segments) + [(0, 0, 0)] * (BLKIF_MAX_SEGMENTS_PER_REQUEST - len(segments))
    flat = [v for s in segs[:BLKIF_MAX_SEGMENTS_PER_REQUEST] for v in s]
    n = len(segments) if nr_segments is None else nr_segments
    return BLKIF_NATIVE.request_struct.pack(op, n, 0, rid, sector, *flat)


def pack_discard(rid: int, sector: int, count: int, flag: int = 0) -> bytes:
    raw = _DISCARD.pack(BLKIF_OP_DISCARD, flag, 0, rid, sector, count)
    return raw + bytes(BLKIF_NATIVE.request_struct.size - len(raw))


def pack_indirect(op: int, rid: int, sector: int, nr_segments: int, grefs: list[int]) -> bytes:
    raw = _INDIRECT.pack(BLKIF_OP_INDIRECT, op, nr_segments, rid, sector, 0, *(grefs + [0] * (8 - len(grefs))))
    return raw + bytes(BLKIF_NATIVE.request_struct.size - len(raw))


@dataclass
class Op:
    """One block operation for `BlkFront.run`: kind is read, write, flush, barrier or discard."""

    kind: str
    sector: int = 0
    count: int = 0  # sectors
    data: bytes = b""


@dataclass
class Result:
    op: Op
    status: int
    data: bytes = b""


@dataclass
class _Slot:
    """A request's buffer: granted data pages, and a granted indirect page."""

    gfns: list[int]
    refs: list[int]
    indirect_gfn: int
    indirect_ref: int


@dataclass
class _Queue:
    ring: FrontRing
    gfns: list[int]
    refs: list[int]
    port: int
    view: memoryview
    event: threading.Event = field(default_factory=threading.Event)


class BlkFront:
    def __init__(self, platform: XenPlatform, devid: int, *, order: int = 0, queues: int = 1,
                 persistent: bool = False, slot_pages: int = 16, slots: int = 32, timeout: float = 15.0,
                 poll: float = 0.0) -> None:
        self.p = platform
        self.devid = devid
        self.order = order
        self.nqueues = queues
        self.persistent = persistent
        self.slot_pages = slot_pages
        self.nslots = slots
        self.timeout = timeout
        # Seconds to poll the ring for responses before re-arming rsp_event and sleeping: a busy backend
        # then answers without a notification (two wake-ups: blkback -> upcall thread -> here).
        self.poll = poll
        self.fe = f"device/vbd/{devid}"
        self.backend = ""
        self.sectors = 0
        self.features: dict[str, str] = {}
        self.queues: list[_Queue] = []
        self.slots: list[_Slot] = []
        self._next_id = 1
        # (slot, kind, sectors) -> (segments, indirect page bytes or None, the packed request): the bench
        # reuses a few shapes per slot, and building and packing requests was most of the frontend's time.
        self._shapes: dict[tuple[int, str, int], tuple[list[tuple[int, int, int]], bytes | None, bytearray]] = {}

    # ---- xenbus ------------------------------------------------------------------------------------------

    def _read(self, path: str) -> str | None:
        try:
            return self.p.store.read(path).decode()
        except XenstoreError as exc:
            if exc.errno == "ENOENT":
                return None
            raise

    def backend_state(self) -> XenbusState:
        return XenbusState.parse(self._read(f"{self.backend}/state"))

    def wait_backend(self, *states: XenbusState, timeout: float | None = None) -> XenbusState:
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            s = self.backend_state()
            if s in states:
                return s
            if time.monotonic() > deadline:
                raise WaitTimeout(f"vbd {self.devid}: backend is {s.name}, not {[x.name for x in states]}")
            time.sleep(0.005)

    def set_state(self, state: XenbusState) -> None:
        self.p.store.write(f"{self.fe}/state", state.wire())

    def connect(self) -> "BlkFront":
        self.backend = self._read(f"{self.fe}/backend") or ""
        if not self.backend:
            raise BlkFrontError(f"vbd {self.devid}: no backend key")
        self.wait_backend(XenbusState.InitWait)
        for key in ("max-ring-page-order", "multi-queue-max-queues", "feature-max-indirect-segments",
                    "feature-persistent", "feature-discard", "sectors"):
            self.features[key] = self._read(f"{self.backend}/{key}") or "0"
        keys = self._setup_rings()
        self._setup_slots()

        def attempt() -> bool:
            tx = self.p.store.transaction_start()
            try:
                for k, v in keys.items():
                    self.p.store.write(f"{self.fe}/{k}", v, tx)
                self.p.store.write(f"{self.fe}/state", XenbusState.Initialised.wire(), tx)
            except BaseException:
                self.p.store.transaction_end(tx, commit=False)
                raise
            try:
                self.p.store.transaction_end(tx)
            except XenstoreError as exc:
                if exc.errno == "EAGAIN":
                    return False
                raise
            return True

        while not attempt():
            pass
        self.wait_backend(XenbusState.Connected)
        self.sectors = int(self._read(f"{self.backend}/sectors") or 0)
        self.set_state(XenbusState.Connected)
        return self

    def _setup_rings(self) -> dict[str, str]:
        keys = {"protocol": XEN_IO_PROTO_ABI_X86_64}
        if self.persistent:
            keys["feature-persistent"] = "1"
        if self.order:
            keys["ring-page-order"] = str(self.order)
        if self.nqueues > 1:
            keys["multi-queue-num-queues"] = str(self.nqueues)
        for q in range(self.nqueues):
            gfns = self.p.pages.alloc(1 << self.order)
            view = self.p.vcpu.memory.view(gfns[0] * XEN_PAGE_SIZE, XEN_PAGE_SIZE << self.order)
            view[:] = bytes(len(view))
            ring = FrontRing(view, BLKIF_NATIVE.request_struct, BLKIF_NATIVE.response_struct, init=True)
            refs = [self.p.grant(0, g) for g in gfns]
            port = self.p.hypercalls.evtchn_alloc_unbound(0)
            queue = _Queue(ring, gfns, refs, port, view)
            self.p.upcalls.bind(port, lambda _port, e=queue.event: e.set())
            self.queues.append(queue)
            base = "" if self.nqueues == 1 else f"queue-{q}/"
            if self.order:
                keys |= {f"{base}ring-ref{i}": str(r) for i, r in enumerate(refs)}
            else:
                keys[f"{base}ring-ref"] = str(refs[0])
            keys[f"{base}event-channel"] = str(port)
        return keys

    def _setup_slots(self) -> None:
        for _ in range(self.nslots):
            gfns = self.p.pages.alloc(self.slot_pages)
            (indirect,) = self.p.pages.alloc(1)
            self.slots.append(_Slot(gfns, [self.p.grant(0, g) for g in gfns], indirect, self.p.grant(0, indirect)))

    def close(self) -> None:
        """Closing then Closed, as a frontend does on removal; then give every page and grant back."""
        if self.backend and self.backend_state() == XenbusState.Connected:
            self.set_state(XenbusState.Closing)
            self.wait_backend(XenbusState.Closing, XenbusState.Closed)
        if self.backend:
            self.set_state(XenbusState.Closed)
            self.wait_backend(XenbusState.Closed)
        for q in self.queues:
            self.p.upcalls.unbind(q.port)
            self.p.hypercalls.evtchn_close(q.port)
            q.ring.close()
            q.view.release()
            self._release(q.refs, q.gfns)
        for s in self.slots:
            self._release(s.refs + [s.indirect_ref], s.gfns + [s.indirect_gfn])
        self.queues.clear()
        self.slots.clear()
        self._shapes.clear()

    def abandon(self) -> None:
        """Drop the rings without a handshake (the backend is dead); grants and pages are not reused."""
        for q in self.queues:
            self.p.upcalls.unbind(q.port)
            q.ring.close()
            q.view.release()
        self.queues.clear()

    def _release(self, refs: list[int], gfns: list[int]) -> None:
        if all(self.p.end_grant(r) for r in refs):
            self.p.pages.free(gfns)
        else:
            log.warning("vbd %d: grants still mapped by the backend; pages %s kept", self.devid, gfns)

    # ---- raw ring access ---------------------------------------------------------------------------------

    def push(self, raw: bytes, queue: int = 0) -> None:
        q = self.queues[queue]
        q.ring.put_request_bytes(raw)
        if q.ring.push_requests_and_check_notify():
            self.p.hypercalls.evtchn_send(q.port)

    def kick(self, queue: int = 0) -> None:
        self.p.hypercalls.evtchn_send(self.queues[queue].port)

    def responses(self, queue: int = 0, timeout: float | None = None, want: int = 1) -> list[tuple[int, int, int]]:
        """At least `want` responses (id, operation, status) of `queue`, waiting up to `timeout`."""
        q = self.queues[queue]
        out: list[tuple[int, int, int]] = []
        now = time.monotonic()
        deadline = now + (timeout or self.timeout)
        poll_until = now + self.poll
        while True:
            out += q.ring.get_responses()
            if len(out) >= want:
                return out
            if self.poll and time.monotonic() < poll_until:
                # Bounded (self.poll), and yielding between looks: on a loaded machine blkback needs the CPU to
                # answer.  A yield, not a timed sleep: here a 100 us sleep costs about 16 us of CPU and lasts
                # about 180 us (blkback's POLL_SECONDS has the figures).
                os.sched_yield()
                if q.event.is_set():
                    q.event.clear()
                continue
            if q.ring.final_check_for_responses():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"vbd {self.devid} queue {queue}: {len(out)} of {want} responses")
            q.event.wait(min(remaining, 0.05))
            q.event.clear()

    def request(self, raw: bytes, queue: int = 0) -> int:
        """Push one raw request and return its response status."""
        self.push(raw, queue)
        ((_, _, status),) = self.responses(queue)
        return status

    def slot(self, i: int) -> _Slot:
        return self.slots[i]

    def write_page(self, gfn: int, data: bytes, offset: int = 0) -> None:
        self.p.vcpu.memory.write(gfn * XEN_PAGE_SIZE + offset, data)

    def read_page(self, gfn: int, length: int = XEN_PAGE_SIZE, offset: int = 0) -> bytes:
        return self.p.vcpu.memory.read(gfn * XEN_PAGE_SIZE + offset, length)

    # ---- block operations --------------------------------------------------------------------------------

    def read(self, sector: int, count: int, queue: int = 0) -> bytes:
        (r,) = self.run([Op("read", sector, count)], queue=queue)
        self._check(r)
        return r.data

    def write(self, sector: int, data: bytes, queue: int = 0) -> None:
        self._check(self.run([Op("write", sector, len(data) // BLKIF_SECTOR_SIZE, data)], queue=queue)[0])

    def flush(self, queue: int = 0) -> None:
        self._check(self.run([Op("flush")], queue=queue)[0])

    def discard(self, sector: int, count: int, queue: int = 0) -> None:
        self._check(self.run([Op("discard", sector, count)], queue=queue)[0])

    @staticmethod
    def _check(r: Result) -> None:
        if r.status != 0:
            raise BlkFrontError(f"{r.op.kind} at {r.op.sector}+{r.op.count}: status {r.status}")

    def run(self, ops: list[Op], depth: int | None = None, queue: int = 0, copy: bool = True) -> list[Result]:
        """Issue `ops` in order with up to `depth` in flight on `queue`; results in the same order.
        With copy=False the bench leaves data in the slots (no guest-side copy, as a zero-copy driver)."""
        q = self.queues[queue]
        ring, encode, slots = q.ring, self._encode, self.slots
        depth = min(depth or self.nslots, self.nslots, ring.nr_ents)
        results: list[Result | None] = [None] * len(ops)
        free = list(range(depth))
        inflight: dict[int, tuple[int, int]] = {}  # request id -> (op index, slot)
        n, i = len(ops), 0
        while i < n or inflight:
            if i < n and free:
                batch = []
                rid = self._next_id
                while i < n and free:
                    slot = free.pop()
                    batch.append(encode(ops[i], rid, slot, copy))
                    inflight[rid] = (i, slot)
                    rid += 1
                    i += 1
                self._next_id = rid
                ring.put_requests_bytes(batch)
                if ring.push_requests_and_check_notify():
                    self.p.hypercalls.evtchn_send(q.port)
            # Refill only once half the slots are back: one notification then covers a batch of requests
            # instead of a hypercall per completion.
            want = max(1, len(inflight) - depth // 2) if i < n else 1
            for rid, _, status in self.responses(queue, want=want):
                index, slot = inflight.pop(rid)
                op = ops[index]
                data = b""
                if copy and status == 0 and op.kind == "read":
                    data = self._gather(slots[slot], op.count)
                results[index] = Result(op, status, data)
                free.append(slot)
        return [r for r in results if r is not None]

    def _gather(self, slot: _Slot, count: int) -> bytes:
        out = bytearray()
        for p in range(-(-count // SECTORS_PER_PAGE)):
            n = min(SECTORS_PER_PAGE, count - p * SECTORS_PER_PAGE)
            out += self.read_page(slot.gfns[p], n * BLKIF_SECTOR_SIZE)
        return bytes(out)

    def _encode(self, op: Op, rid: int, index: int, copy: bool) -> bytes | bytearray:
        if op.kind == "discard":
            return pack_discard(rid, op.sector, op.count)
        if op.kind in ("flush", "barrier"):
            code = BLKIF_OP_FLUSH_DISKCACHE if op.kind == "flush" else BLKIF_OP_WRITE_BARRIER
            return pack_request(code, rid, 0, [])
        slot = self.slots[index]
        key = (index, op.kind, op.count)
        shape = self._shapes.get(key)
        if shape is None:
            shape = self._shapes[key] = self._shape(slot, op)
        segs, indirect, request = shape
        if op.kind == "write" and copy:
            for p, (_, _, last) in enumerate(segs):
                start = p * XEN_PAGE_SIZE
                self.write_page(slot.gfns[p], op.data[start:start + (last + 1) * BLKIF_SECTOR_SIZE])
        if indirect is not None:
            # Rewritten every time: a test may have scribbled on the slot's indirect page since.
            self.write_page(slot.indirect_gfn, indirect)
        # The slot's request with this id and sector: the slot is in flight once at a time, and the ring
        # copies the bytes before the slot is used again.
        _U64.pack_into(request, _ID_OFFSET, rid)
        _U64.pack_into(request, _INDIRECT_SECTOR_OFFSET if indirect is not None else _SECTOR_OFFSET, op.sector)
        return request

    def _shape(self, slot: _Slot, op: Op) -> tuple[list[tuple[int, int, int]], bytes | None, bytearray]:
        """(segments, indirect page bytes or None, the request with id and sector 0) of `op` in `slot`."""
        pages = -(-op.count // SECTORS_PER_PAGE)
        if pages > self.slot_pages:
            raise BlkFrontError(f"{op.count} sectors do not fit a {self.slot_pages}-page slot")
        segs = [(slot.refs[p], 0, min(SECTORS_PER_PAGE, op.count - p * SECTORS_PER_PAGE) - 1)
                for p in range(pages)]
        code = BLKIF_OP_WRITE if op.kind == "write" else BLKIF_OP_READ
        if pages <= BLKIF_MAX_SEGMENTS_PER_REQUEST:
            return segs, None, bytearray(pack_request(code, 0, 0, segs))
        if pages > min(int(self.features.get("feature-max-indirect-segments", "0")), BLKIF_SEGS_PER_INDIRECT_FRAME):
            raise BlkFrontError(f"{pages} segments need indirect descriptors the backend does not offer")
        return (segs, b"".join(_SEGMENT.pack(*s) for s in segs),
                bytearray(pack_indirect(code, 0, 0, len(segs), [slot.indirect_ref])))
