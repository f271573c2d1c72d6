"""One blkif ring of a device: its grants mapped through xenhv, its event channel, and the thread that
serves it.  Requests are served in ring order, each to completion, so a flush or barrier response means
every earlier request's data reached the image and was made durable."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from xenpv.backends.blkback.image import Image
from xenpv.backends.grants import BackendGrants, GrantAccessError
from xenpv.backends.blkback.requests import (SEGMENT, BadRequest, Codecs, Request, Segment, decode,
                                       decode_indirect_segments, indirect_pages, total_sectors)
from xenpv.backends.vhost_user.memory import GuestMemoryError
from xenpv.backends.xenhv.control import XenhvError
from xenpv.base.threads import join_stopped
from xenpv.xenabi.blkif import (BLKIF_DISCARD_SECURE, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT,
                          BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP,
                          BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_SECTOR_SIZE, BlkifLayouts)
from xenpv.xenabi.ring import XEN_PAGE_SIZE, BackRing, RingOverflowError

if TYPE_CHECKING:
    from xenpv.backends.xenbackend import DomainLink, XenBackend

log = logging.getLogger("blkback.queue")

# Linux blkback's default cap on persistent grants per ring: enough for a full ring of maximal requests.
MAX_PERSISTENT_GRANTS = 1056
# Responses are pushed (and the frontend notified if it asked) after this many requests rather than
# after the whole batch: the frontend refills the ring while the rest of the batch is served.
PUSH_EVERY = 8
# Transfer plans kept per queue; a frontend reusing its buffers needs about one per ring slot and size.
MAX_PLANS = 4096
# After a drain the ring is polled for POLL_SECONDS before req_event is re-armed: while it is not, a frontend
# pushing more requests sends no event (its evtchn_send trap costs more than the requests it announces), and
# the next batch is picked up here without a wake-up.  Between looks the thread yields the CPU (sched_yield)
# instead of sleeping: on this VM a timed sleep of 100 us costs about 16 us of CPU and lasts about 180 us,
# more than a whole batch, while a yield costs about 1 us and still lets a frontend on the same CPU run.
# The polls end when the queue stops or the vhost-user link to the domain closes.
POLL_SECONDS = 0.002
# The operations whose planned requests _serve_batch serves without going through _serve.
_READ_WRITE = (BLKIF_OP_READ, BLKIF_OP_WRITE)


@dataclass(frozen=True)
class _Plan:
    """A checked READ or WRITE (direct or indirect) whose grants are all persistent: the guest ranges it
    moves, as views ready for preadv/pwritev (adjacent pages merged into one view)."""

    write: bool
    sectors: int
    views: list[memoryview]


class QueueSetupError(Exception):
    """A ring cannot be mapped or its channel bound; names the queue."""


@dataclass(frozen=True)
class DiskConfig:
    """What every queue of a device needs to check and serve requests."""

    image: Image
    sectors: int
    readonly: bool
    discard: bool
    max_indirect_segments: int
    persistent: bool


@dataclass
class BlkQueue:
    name: str
    backend: "XenBackend"
    link: "DomainLink"
    layouts: BlkifLayouts
    disk: DiskConfig
    ring_grefs: list[int]
    remote_port: int
    on_fatal: Callable[[str], None]
    _handles: list[int] = field(default_factory=list)
    _persistent: dict[int, memoryview] = field(default_factory=dict)  # gref -> its page, mapped writable
    _persistent_handles: list[int] = field(default_factory=list)
    _persistent_gfns: dict[int, int] = field(default_factory=dict)  # gref -> its guest frame
    # Request bytes other than id and sector (plus an indirect request's segment pages) -> its plan: a
    # frontend that reuses buffers sends the same few shapes again and again, and a persistent mapping
    # never changes while the queue lives, so the decode, checks and views of a shape are done once.
    _plans: dict[bytes, _Plan] = field(default_factory=dict)
    # Transient grants are pinned in this process (backends.grants), created at first use.
    _access: BackendGrants | None = None
    _channel: int | None = None
    _ring: BackRing | None = None
    _ring_view: memoryview | None = None
    _thread: threading.Thread | None = None
    _kick: threading.Event = field(default_factory=threading.Event)
    _stopping: bool = False
    served: int = 0

    def __post_init__(self) -> None:
        self._codecs = Codecs.of(self.layouts)
        self._id_offset = self._codecs.id_offset
        self._sector_offset = self.layouts.request.sector_number.offset
        self._indirect_sector_offset = self.layouts.request_indirect.sector_number.offset
        self._id_sector = self.layouts.request_id_sector.unpack_from

    @property
    def domid(self) -> int:
        return self.link.domid

    def start(self) -> None:
        try:
            self._map_ring()
            self._thread = threading.Thread(target=self._run, name=f"blkback {self.name}", daemon=True)
            self._thread.start()
            self._channel = self.link.bind(self.remote_port, self._kick.set)
        except BaseException:
            self.stop()
            raise

    def _map_ring(self) -> None:
        gfns = []
        for gref in self.ring_grefs:
            try:
                m = self.backend.call("gnttab_map", domid=self.domid, ref=gref, readonly=False)
            except XenhvError as exc:
                raise QueueSetupError(f"{self.name}: mapping ring gref {gref}: {exc}") from exc
            self._handles.append(m["handle"])
            gfns.append(m["gfn"])
        # BackRing works on one contiguous buffer: a multi-page ring must sit in consecutive guest frames.
        if gfns != list(range(gfns[0], gfns[0] + len(gfns))):
            raise QueueSetupError(f"{self.name}: ring pages are not consecutive guest frames ({gfns})")
        try:
            view = self.link.memory.view(gfns[0] << 12, XEN_PAGE_SIZE * len(gfns))
        except GuestMemoryError as exc:
            raise QueueSetupError(f"{self.name}: ring frames outside guest RAM: {exc}") from exc
        self._ring_view = view
        self._ring = BackRing(view, self.layouts.request_struct, self.layouts.response_struct)

    def stop(self) -> None:
        """Stop serving and give back the ring, the channel and every mapping.

        The serving thread reads the ring and the granted pages: they are released only once it has ended.
        If it does not end in time this raises WaitTimeout and releases nothing (a leak, not an unmap
        under a running request); calling stop() again later finishes the job."""
        self._stopping = True
        self._kick.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            join_stopped(self._thread, f"stopping blkback queue {self.name}")
        if self._channel is not None:
            self._quietly("unbinding its channel", self.link.unbind, self._channel)
            self._channel = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._ring_view is not None:
            self._ring_view.release()
            self._ring_view = None
        for handle in self._handles + self._persistent_handles:
            self._quietly(f"unmapping handle {handle}", self._unmap, handle)
        self._clear_plans()
        for page in self._persistent.values():
            page.release()
        self._persistent_gfns.clear()
        self._handles.clear()
        self._persistent_handles.clear()
        self._persistent.clear()
        if self._access is not None:
            self._access.close()
            self._access = None

    def _quietly(self, what: str, fn: Callable[..., object], *args: object) -> None:
        # Teardown runs when the domain may already be gone (its link closed, its grants released by
        # xenhv): a failure here is expected and must not stop the rest of the teardown.
        try:
            fn(*args)
        except Exception as exc:
            log.debug("%s: %s failed: %s", self.name, what, exc)

    def _unmap(self, handle: int) -> None:
        self.backend.call("gnttab_unmap", handle=handle)

    def _grants(self) -> BackendGrants:
        if self._access is None:
            self._access = BackendGrants(self.backend, self.link)
        return self._access

    # ---- serving -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            # _stopping is checked before each wait: _drain's polling may have consumed stop()'s kick.
            while not self._stopping:
                self._kick.wait()
                self._kick.clear()
                if self._stopping:
                    return
                self._drain()
        except RingOverflowError as exc:
            self.on_fatal(f"{self.name}: ring corrupt: {exc}")
        except Exception as exc:  # the ring or the link broke: this device stops, nothing else does
            log.exception("%s: serving failed", self.name)
            self.on_fatal(f"{self.name}: serving failed: {exc}")

    def _drain(self) -> None:
        ring = self._ring
        assert ring is not None
        poll_until = 0.0
        while not self._stopping:
            pending = ring.unconsumed_requests()
            if pending:
                while pending and not self._stopping:
                    ring.put_responses(self._serve_batch(ring.get_requests_bytes(min(pending, PUSH_EVERY))))
                    if ring.push_responses_and_check_notify() and self._channel is not None:
                        self.link.notify(self._channel)
                    pending = ring.unconsumed_requests()
                poll_until = time.monotonic() + POLL_SECONDS
            if time.monotonic() < poll_until and not self.link.session.closed:
                os.sched_yield()
                if self._kick.is_set():
                    self._kick.clear()  # an event while polling: what it announces is read next
                continue
            if not ring.final_check_for_requests():
                return

    def _serve_batch(self, raws: list[bytes]) -> list[tuple[int, int, int]]:
        """The responses to request copies, in order.  A READ or WRITE whose shape has a plan goes straight
        to _run_plan (the calls through _serve and _plan_key, and decoding id and sector apart, were most of
        a 4 KiB request's time in Python); everything else goes through _serve."""
        plans, serve, run_plan, id_sector = self._plans, self._serve, self._run_plan, self._id_sector
        i, s = self._id_offset, self._sector_offset
        out = []
        for raw in raws:
            op = raw[0]
            # The key of _plan_key for READ and WRITE: the request without id and sector.
            plan = plans.get(raw[:i] + raw[i + 8:s] + raw[s + 8:]) if op in _READ_WRITE and plans else None
            if plan is None:
                out.append(serve(raw))
                continue
            rid, sector = id_sector(raw)
            self.served += 1
            try:
                run_plan(plan, rid, sector)
                out.append((rid, op, BLKIF_RSP_OKAY))
            except Exception as exc:
                out.append((rid, op, self._failure_status(exc, rid, op)))
        return out

    def _serve(self, raw: bytes) -> tuple[int, int, int]:
        """(id, operation, status) of the response to one request copy; never raises for guest input."""
        codecs = self._codecs
        rid, op = codecs.request_id(raw), raw[0]
        try:
            key, pages = self._plan_key(raw)
            plan = self._plans.get(key) if key is not None else None
            if plan is not None:
                offset = self._indirect_sector_offset if op == BLKIF_OP_INDIRECT else self._sector_offset
                self._run_plan(plan, rid, int.from_bytes(raw[offset:offset + 8], "little"))
            else:
                request = decode(raw, codecs, self.disk.max_indirect_segments)
                self._execute(request, key, pages)
            status = BLKIF_RSP_OKAY
        except Exception as exc:
            status = self._failure_status(exc, rid, op)
        self.served += 1
        return rid, op, status

    def _failure_status(self, exc: Exception, rid: int, op: int) -> int:
        """The response status of a request that raised `exc` (called in its except block), logged."""
        if isinstance(exc, BadRequest):
            log.warning("dom%d %s: request refused: %s", self.domid, self.name, exc)
            return exc.status
        if isinstance(exc, (XenhvError, GrantAccessError, GuestMemoryError, OSError)):
            log.warning("dom%d %s: request %#x (op %d) failed: %s", self.domid, self.name, rid, op, exc)
        else:
            log.exception("dom%d %s: request %#x (op %d) failed unexpectedly", self.domid, self.name, rid, op)
        return BLKIF_RSP_ERROR

    def _plan_key(self, raw: bytes) -> tuple[bytes | None, list[bytes] | None]:
        """The plan cache key of a READ, WRITE or INDIRECT request (None for other operations or when an
        indirect page is not persistently mapped), and for INDIRECT the one copy of its indirect pages
        that both the key and any decode use, so what is cached is what was checked."""
        op = raw[0]
        if op not in (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_INDIRECT) or not self._persistent:
            return None, None
        i, s = self._id_offset, self._indirect_sector_offset if op == BLKIF_OP_INDIRECT else self._sector_offset
        # id and sector vary per request and the plan does not depend on them; i < s in every ABI.
        shape = raw[:i] + raw[i + 8:s] + raw[s + 8:]
        if op != BLKIF_OP_INDIRECT:
            return shape, None
        values = self._codecs.indirect.unpack_from(raw)
        nr_segments = values[2]
        if not 0 < nr_segments <= self.disk.max_indirect_segments:
            return None, None
        pages = []
        left = nr_segments * SEGMENT.size
        for gref in values[6:6 + indirect_pages(nr_segments)]:
            page = self._persistent.get(gref)
            if page is None:
                return None, None
            # One copy of each page (the part holding segments), decoded from the copy only.
            pages.append(bytes(page[:min(left, XEN_PAGE_SIZE)]))
            left -= XEN_PAGE_SIZE
        return b"".join([shape, *pages]), pages

    def _run_plan(self, plan: _Plan, rid: int, sector: int) -> None:
        if plan.write and self.disk.readonly:
            raise BadRequest(f"request {rid:#x}: write to a read-only disk")
        if sector >= self.disk.sectors or plan.sectors > self.disk.sectors - sector:
            raise BadRequest(f"request {rid:#x}: sectors {sector}+{plan.sectors} beyond the disk's "
                             f"{self.disk.sectors}")
        if plan.write:
            self.disk.image.write(sector * BLKIF_SECTOR_SIZE, plan.views)
        else:
            self.disk.image.read_into(sector * BLKIF_SECTOR_SIZE, plan.views)

    def _make_plan(self, write: bool, segments: tuple[Segment, ...]) -> _Plan:
        """The plan of checked segments whose grants are all persistent."""
        views: list[memoryview] = []
        run_gpa, run_len = -1, 0
        for s in segments:
            gpa = (self._persistent_gfns[s.gref] << 12) + s.first_sect * BLKIF_SECTOR_SIZE
            length = (s.last_sect - s.first_sect + 1) * BLKIF_SECTOR_SIZE
            if gpa == run_gpa + run_len:
                run_len += length
                continue
            if run_len:
                views += self._guest_views(run_gpa, run_len)
            run_gpa, run_len = gpa, length
        views += self._guest_views(run_gpa, run_len)
        return _Plan(write, total_sectors(segments), views)

    def _guest_views(self, gpa: int, length: int) -> list[memoryview]:
        try:
            return [self.link.memory.view(gpa, length)]
        except GuestMemoryError:
            # Adjacent frames in two memory regions: a view per page, each inside one region.
            end, views = gpa + length, []
            while gpa < end:
                page_end = min(end, (gpa & ~(XEN_PAGE_SIZE - 1)) + XEN_PAGE_SIZE)
                views.append(self.link.memory.view(gpa, page_end - gpa))
                gpa = page_end
            return views

    def _clear_plans(self) -> None:
        for plan in self._plans.values():
            for v in plan.views:
                v.release()
        self._plans.clear()

    def _execute(self, r: Request, key: bytes | None = None, indirect_copies: list[bytes] | None = None) -> None:
        """Serve a decoded request; `key` (from _plan_key) caches its plan when all its grants are persistent."""
        image = self.disk.image
        if r.operation == BLKIF_OP_READ:
            self._transfer(r, write=False, segments=self._segments(r), key=key)
        elif r.operation == BLKIF_OP_WRITE:
            self._transfer(r, write=True, segments=self._segments(r), key=key)
        elif r.operation in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
            # Requests are served one at a time in ring order, so the barrier's ordering holds already;
            # data carried by the request is written between the two flushes of a pre-flush+FUA write.
            if r.segments:
                self._check_writable(r)
                image.flush()
                self._transfer(r, write=True, segments=r.segments)
            image.flush()
        elif r.operation == BLKIF_OP_DISCARD:
            self._discard(r)
        elif r.operation == BLKIF_OP_INDIRECT:
            self._transfer(r, write=r.indirect_op == BLKIF_OP_WRITE,
                           segments=self._indirect_segments(r, indirect_copies), key=key)
        else:
            raise BadRequest(f"request {r.id:#x}: unknown operation {r.operation}")

    def _segments(self, r: Request) -> tuple[Segment, ...]:
        if not r.segments:
            raise BadRequest(f"request {r.id:#x}: a read or write without segments")
        return r.segments

    def _check_writable(self, r: Request) -> None:
        if self.disk.readonly:
            raise BadRequest(f"request {r.id:#x}: write to a read-only disk")

    def _check_range(self, r: Request, sector: int, count: int) -> None:
        # Linux xen_vbd_translate checks the range only of a request with sectors: a DISCARD of none is
        # answered OKAY wherever it points. (A start at or past the end leaves no room for one sector.)
        if count and count > self.disk.sectors - sector:
            raise BadRequest(f"request {r.id:#x}: sectors {sector}+{count} beyond the disk's "
                             f"{self.disk.sectors}")

    def _discard(self, r: Request) -> None:
        if not self.disk.discard:
            raise BadRequest(f"request {r.id:#x}: discard is not offered", BLKIF_RSP_EOPNOTSUPP)
        if r.flag & BLKIF_DISCARD_SECURE:
            raise BadRequest(f"request {r.id:#x}: secure discard is not offered", BLKIF_RSP_EOPNOTSUPP)
        self._check_writable(r)
        self._check_range(r, r.sector, r.nr_sectors)
        if r.nr_sectors:
            self.disk.image.discard(r.sector * BLKIF_SECTOR_SIZE, r.nr_sectors * BLKIF_SECTOR_SIZE)

    def _indirect_segments(self, r: Request, copies: list[bytes] | None) -> tuple[Segment, ...]:
        if copies is not None:
            return decode_indirect_segments(copies, r.nr_indirect_segments, r.id)
        grefs = r.indirect_grefs[:indirect_pages(r.nr_indirect_segments)]
        with self._mapped(set(grefs), writable=False) as pages:
            # One copy of each page (the part holding segments), decoded from the copy only.
            copies = [bytes(pages[gref]) for gref in grefs]
        return decode_indirect_segments(copies, r.nr_indirect_segments, r.id)

    def _transfer(self, r: Request, *, write: bool, segments: tuple[Segment, ...], key: bytes | None = None) -> None:
        if key is not None and all(s.gref in self._persistent for s in segments):
            plan = self._make_plan(write, segments)
            if len(self._plans) >= MAX_PLANS:
                self._clear_plans()
            self._plans[key] = plan
            self._run_plan(plan, r.id, r.sector)
            return
        if write:
            self._check_writable(r)
        self._check_range(r, r.sector, total_sectors(segments))
        # Reading from the disk writes into guest memory, so a READ needs writable mappings.
        with self._mapped({s.gref for s in segments}, writable=not write) as pages:
            views = [pages[s.gref][s.first_sect * BLKIF_SECTOR_SIZE:(s.last_sect + 1) * BLKIF_SECTOR_SIZE]
                     for s in segments]
            try:
                if write:
                    self.disk.image.write(r.sector * BLKIF_SECTOR_SIZE, views)
                else:
                    self.disk.image.read_into(r.sector * BLKIF_SECTOR_SIZE, views)
            finally:
                for v in views:
                    v.release()

    def _mapped(self, grefs: set[int], *, writable: bool) -> "_Mappings":
        return _Mappings(self, grefs, writable)

    def map_one(self, gref: int, writable: bool) -> tuple[memoryview, Pin | None]:
        """(the granted page, its transient pin or None when the mapping is persistent). A transient
        page view is the caller's to release, and its pin the caller's to drop (:meth:`unpin`)."""
        page = self._persistent.get(gref)
        if page is not None:
            return page, None
        if self.disk.persistent and len(self._persistent) < MAX_PERSISTENT_GRANTS:
            # Persistent grants are granted writable by the frontend, whatever the first use of them is.
            try:
                m = self.backend.call("gnttab_map", domid=self.domid, ref=gref, readonly=False)
            except XenhvError:
                if writable:
                    raise
            else:
                self._persistent_handles.append(m["handle"])
                self._persistent_gfns[gref] = m["gfn"]
                # The page view lives as long as the mapping, so a persistent grant costs no look-up
                # of guest memory per request.
                page = self.link.memory.view(m["gfn"] << 12, XEN_PAGE_SIZE)
                self._persistent[gref] = page
                return page, None
        gfn, handle = self._grants().pin(gref, writable)
        pin = Pin(gref, writable, handle)
        try:
            return self.link.memory.view(gfn << 12, XEN_PAGE_SIZE), pin
        except BaseException:
            self.unpin(pin)
            raise

    def unpin(self, pin: Pin) -> None:
        self._grants().unpin(pin.gref, pin.writable, pin.handle)


@dataclass(frozen=True)
class Pin:
    """A grant pinned for one request; ``handle`` is xenhv's when xenhv holds it (see backends.grants)."""

    gref: int
    writable: bool
    handle: int | None


class _Mappings:
    """Grants mapped for the duration of one request (persistent ones stay mapped)."""

    def __init__(self, queue: BlkQueue, grefs: set[int], writable: bool) -> None:
        self.queue = queue
        self.grefs = grefs
        self.writable = writable
        self.pins: list[Pin] = []
        self.transient: list[memoryview] = []

    def __enter__(self) -> dict[int, memoryview]:
        if self.grefs <= self.queue._persistent.keys():
            return self.queue._persistent  # the steady state with persistent grants: nothing to map
        pages = {}
        try:
            for gref in self.grefs:
                page, pin = self.queue.map_one(gref, self.writable)
                if pin is not None:
                    self.pins.append(pin)
                    self.transient.append(page)
                pages[gref] = page
        except BaseException:
            self.__exit__()
            raise
        return pages

    def __exit__(self, *exc: object) -> None:
        for page in self.transient:
            page.release()
        self.transient.clear()
        for pin in self.pins:
            self.queue._quietly(f"unpinning gref {pin.gref}", self.queue.unpin, pin)
        self.pins.clear()
