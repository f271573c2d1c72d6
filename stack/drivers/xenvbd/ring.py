"""One blkif ring of a target (VBD src/xenvbd/ring.c; reference windows-pv-drivers.md 8, xen-abi.md 3-4).

RingConnect: the shared ring in `1 << order` physically contiguous pages (MmAllocatePagesForMdl),
SHARED_RING_INIT through xenabi's FrontRing, each page granted to the backend domain, an UNBOUND event
channel to it (Mask = TRUE, so the ISR masks the port and the DPC unmasks it with Force once the ring
is drained). The ISR only queues the DPC; the DPC (RingPoll) consumes responses, matches them to
submitted requests by id, revokes the data grants and completes the request, then submits more.

Requests wait in `prepared` until there is a free slot (queue depth is at most the ring size). A request
carries its own pages (the I/O's buffer), granted when it goes on the ring and revoked when its response
comes back. RingDisconnect hands back everything that was submitted but not answered, in order, so the
target can fail or replay it (with new grants, on new rings). A grant the backend still maps cannot be
revoked: it goes to the target's GrantReaper, which retries until the backend lets go (xenhv releases a
dead backend's mappings when its link closes), and the pages behind it (ring, indirect table, or the
I/O's buffer, which the target parks) stay out of the allocator until then: a page is never reused
while a backend can still read or write it.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xenpv.stack.kernel.dpc import KDpc, KeInitializeDpc, KeInsertQueueDpc
from xenpv.stack.kernel.irql import KSpinLock
from xenpv.stack.kernel.mm import Mdl, current_mm
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_INSUFFICIENT_RESOURCES, STATUS_SUCCESS, NTSTATUS
from xenpv.stack.vcpu.pages import OutOfGuestMemory
from xenpv.xenabi.blkif import BLKIF_OP_READ
from xenpv.xenabi.ring import FrontRing, RingOverflowError

from .request import OPERATION_NAMES, REQUEST, RESPONSE, BlkRequest, decode_response, encode

if TYPE_CHECKING:
    from xenpv.stack.drivers.interface import InterfaceTable

log = logging.getLogger("stack.drivers.xenvbd.ring")

PAGE_SIZE = 4096
EVTCHN_UNBOUND = 2
GRANT_CACHE_CAP = 4096
# Stale grants are retried after this many seconds, doubling up to the maximum (each failed revoke is
# GNTTAB's 100 attempts and a warning).
REAP_FIRST_DELAY = 0.05
REAP_MAX_DELAY = 2.0


class RingError(Exception):
    """The ring could not be set up, or the backend broke it (bad response id, impossible index)."""


def allocate_pages(count: int) -> Mdl | None:
    """MmAllocatePagesForMdl as the driver sees it: None (not an exception) when memory is short."""
    try:
        return current_mm().MmAllocatePagesForMdl(count)
    except OutOfGuestMemory as exc:
        log.warning("allocating %d page(s): %s", count, exc)
        return None


@dataclass(eq=False)
class StaleGrants:
    """Grants whose revoke failed because the backend still mapped them. `pages` (ring pages, an indirect
    table) go back to the allocator once every entry is revoked; pages owned elsewhere (an I/O buffer)
    wait for `done`."""

    what: str
    cache: Any
    entries: list[Any]
    pages: Mdl | None = None

    @property
    def done(self) -> bool:
        return not self.entries


class GrantReaper:
    """A target's grants that could not be revoked yet, retried (with backoff) from the adapter thread.

    A ring's GNTTAB cache outlives the ring while any of its entries is stale: it is destroyed once the last
    one is revoked (destroying a cache with entries out is a BUG).
    """

    def __init__(self, gnttab: InterfaceTable) -> None:
        self.gnttab = gnttab
        self.records: list[StaleGrants] = []
        self._retired: list[Any] = []
        self._lock = threading.Lock()  # add() runs in the DPC, retry() on the adapter thread
        self._delay = REAP_FIRST_DELAY
        self._next = 0.0

    @property
    def outstanding(self) -> int:
        with self._lock:
            return sum(len(r.entries) for r in self.records)

    def add(self, record: StaleGrants) -> None:
        log.warning("%s: %d grant(s) still mapped by the backend; pages kept out of use until revoked",
                    record.what, len(record.entries))
        with self._lock:
            self.records.append(record)
            self._delay, self._next = REAP_FIRST_DELAY, time.monotonic() + REAP_FIRST_DELAY

    def retire(self, cache: Any) -> None:
        """The cache's ring is gone: destroy the cache now, or once its stale entries are revoked."""
        with self._lock:
            self._retired.append(cache)
        self._destroy_idle_caches()

    def retry(self, force: bool = False) -> int:
        """Try the stale grants again (when their backoff has run out, or `force`); returns how many are left."""
        now = time.monotonic()
        with self._lock:
            if not self.records or (not force and now < self._next):
                return sum(len(r.entries) for r in self.records)
            records = list(self.records)
        progress = False
        for record in records:
            left = [e for e in record.entries
                    if not NT_SUCCESS(self.gnttab.GnttabRevokeForeignAccess(record.cache, False, e))]
            progress |= len(left) < len(record.entries)
            record.entries = left
            if record.done:
                log.info("%s: the backend let go; its stale grants are revoked", record.what)
                if record.pages is not None:
                    current_mm().MmFreePagesFromMdl(record.pages)
                    record.pages = None
        with self._lock:
            self.records = [r for r in self.records if not r.done]
            self._delay = REAP_FIRST_DELAY if progress else min(self._delay * 2, REAP_MAX_DELAY)
            self._next = now + self._delay
            left = sum(len(r.entries) for r in self.records)
        self._destroy_idle_caches()
        return left

    def _destroy_idle_caches(self) -> None:
        with self._lock:
            busy = {id(r.cache) for r in self.records}
            idle = [c for c in self._retired if id(c) not in busy]
            self._retired = [c for c in self._retired if id(c) in busy]
        for cache in idle:
            self.gnttab.GnttabDestroyCache(cache)


@dataclass(eq=False)
class Submitted:
    """A request on its way through the ring, and what it holds until its response comes back."""

    request: BlkRequest
    buffer: Mdl | None
    on_complete: Callable[[Submitted, int], None]
    id: int = 0
    grants: list[Any] = field(default_factory=list)
    indirect: Mdl | None = None
    submitted_at: float = 0.0
    cancelled: bool = False
    # Grants of earlier submissions the backend still mapped when they were revoked (see GrantReaper).
    stale: list[StaleGrants] = field(default_factory=list)

    @property
    def granted(self) -> bool:
        """True while a backend may still reach the request's pages (live or stale grants)."""
        return bool(self.grants) or any(not r.done for r in self.stale)

    def describe(self) -> str:
        r = self.request
        return f"{OPERATION_NAMES.get(r.operation, r.operation)} id {self.id} sector {r.sector}"


@dataclass
class RingInterfaces:
    evtchn: InterfaceTable
    gnttab: InterfaceTable


class BlkifRing:
    def __init__(self, name: str, index: int, order: int, interfaces: RingInterfaces, backend_domid: int,
                 reaper: GrantReaper) -> None:
        self.name = f"{name}q{index}"
        self.index = index
        self.order = order
        self.interfaces = interfaces
        self.backend_domid = backend_domid
        self.reaper = reaper
        self.lock = KSpinLock(f"{self.name} ring")
        self.prepared: deque[Submitted] = deque()
        self.submitted: dict[int, Submitted] = {}
        self.mdl: Mdl | None = None
        self.view: memoryview | None = None
        self.front: FrontRing | None = None
        self.ring_grants: list[Any] = []
        self.channel: Any = None
        self.gnttab_cache: Any = None
        self.dpc: KDpc = KeInitializeDpc(self._dpc, None, module="xenvbd.sys")
        self.broken: str | None = None
        self.completed = 0
        self._ids = itertools.count(1)
        self._last_progress = time.monotonic()

    # -- connect / disconnect ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.front is not None

    def RingConnect(self) -> dict[str, str]:
        """Build the ring and return the keys that describe it (relative to the queue's directory)."""
        gnttab, evtchn = self.interfaces.gnttab, self.interfaces.evtchn
        # Every Locked=TRUE use of the cache is under the ring's spin lock; the others (ring pages) run
        # at PASSIVE while the ring has no channel, so no DPC can race them: the cache needs no lock of its own.
        status, self.gnttab_cache = gnttab.GnttabCreateCache(
            self.name, 0, GRANT_CACHE_CAP, lambda _a: None, lambda _a: None, None)
        if not NT_SUCCESS(status):
            raise RingError(f"{self.name}: GnttabCreateCache: {status:#x}")
        self.mdl = allocate_pages(1 << self.order)
        if self.mdl is None:
            self.RingDisconnect()
            raise RingError(f"{self.name}: no memory for a {1 << self.order}-page ring")
        self.view = current_mm().view(self.mdl)
        self.front = FrontRing(self.view, REQUEST, RESPONSE, init=True)
        for pfn in self.mdl.pfns:
            status, entry = gnttab.GnttabPermitForeignAccess(self.gnttab_cache, False, self.backend_domid, pfn, False)
            if not NT_SUCCESS(status):
                self.RingDisconnect()
                raise RingError(f"{self.name}: granting ring page {pfn:#x}: {status:#x}")
            self.ring_grants.append(entry)
        self.channel = evtchn.EvtchnOpen(EVTCHN_UNBOUND, self._interrupt, None, self.backend_domid, True)
        if self.channel is None:
            self.RingDisconnect()
            raise RingError(f"{self.name}: no event channel to dom{self.backend_domid}")
        evtchn.EvtchnUnmask(self.channel, False, True)
        self.broken = None
        self._last_progress = time.monotonic()
        refs = [gnttab.GnttabGetReference(e) for e in self.ring_grants]
        keys = {"event-channel": str(evtchn.EvtchnGetPort(self.channel))}
        if self.order == 0:
            keys["ring-ref"] = str(refs[0])
        else:
            keys |= {f"ring-ref{i}": str(r) for i, r in enumerate(refs)}
        log.info("%s: %d-page ring, %d slots, port %s", self.name, 1 << self.order, self.front.nr_ents,
                 keys["event-channel"])
        return keys

    def RingDisconnect(self) -> list[Submitted]:
        """Tear the ring down; returns the requests that were submitted but not answered, oldest first,
        followed by those still waiting to be submitted."""
        with self.lock.held():
            orphans = sorted(self.submitted.values(), key=lambda s: s.id) + list(self.prepared)
            self.submitted.clear()
            self.prepared.clear()
            for each in orphans:
                self._revoke(each)
        if self.channel is not None:
            self.interfaces.evtchn.EvtchnClose(self.channel)
            self.channel = None
        if self.front is not None:
            self.front.close()
            self.front = None
        if self.view is not None:
            self.view.release()
            self.view = None
        stale = [e for e in self.ring_grants
                 if not NT_SUCCESS(self.interfaces.gnttab.GnttabRevokeForeignAccess(self.gnttab_cache, False, e))]
        self.ring_grants = []
        if stale:
            self.reaper.add(StaleGrants(f"{self.name} ring", self.gnttab_cache, stale, self.mdl))
        elif self.mdl is not None:
            current_mm().MmFreePagesFromMdl(self.mdl)
        self.mdl = None
        if self.gnttab_cache is not None:
            self.reaper.retire(self.gnttab_cache)
            self.gnttab_cache = None
        return orphans

    # -- submission -------------------------------------------------------------------------------

    def RingQueue(self, items: list[Submitted]) -> None:
        with self.lock.held():
            self.prepared.extend(items)
        self.RingPoke()

    def RingCancel(self, item: Submitted) -> None:
        """The caller stopped waiting: an unsubmitted request is dropped, a submitted one is answered
        into the void (its grants are still revoked when the response arrives)."""
        with self.lock.held():
            item.cancelled = True
            if item in self.prepared:
                self.prepared.remove(item)

    def RingPoke(self) -> None:
        """Move prepared requests onto the ring while it has room, then notify the backend once."""
        with self.lock.held():
            if self.front is None or self.broken is not None:
                return
            pushed = False
            while self.prepared and not self.front.full():
                item = self.prepared.popleft()
                if item.cancelled:
                    continue
                status = self._grant(item)
                if not NT_SUCCESS(status):
                    self.prepared.appendleft(item)
                    log.warning("%s: out of grant entries or memory; %d requests wait", self.name,
                                len(self.prepared))
                    break
                item.id = next(self._ids)
                grefs = [self.interfaces.gnttab.GnttabGetReference(g) for g in item.grants]
                data_refs = grefs[:len(item.request.segments)]
                indirect_refs = grefs[len(item.request.segments):]
                entry, table = encode(item.request, item.id, data_refs, indirect_refs)
                if table:
                    assert item.indirect is not None
                    current_mm().write(item.indirect, 0, table)
                self.front.put_request_bytes(entry)
                item.submitted_at = time.monotonic()
                self.submitted[item.id] = item
                pushed = True
            notify = pushed and self.front.push_requests_and_check_notify()
            if notify:
                self.interfaces.evtchn.EvtchnSend(self.channel)

    def _grant(self, item: Submitted) -> NTSTATUS:
        gnttab = self.interfaces.gnttab
        read_only = item.request.operation != BLKIF_OP_READ  # the backend writes into the pages only for a READ
        pfns = [item.buffer.pfns[p] for p in item.request.pages] if item.buffer is not None else []
        if item.request.indirect:
            if item.indirect is None:
                item.indirect = allocate_pages(item.request.indirect_pages)
                if item.indirect is None:
                    return STATUS_INSUFFICIENT_RESOURCES
            pages = [(pfn, read_only) for pfn in pfns] + [(pfn, True) for pfn in item.indirect.pfns]
        else:
            pages = [(pfn, read_only) for pfn in pfns]
        for pfn, ro in pages:
            status, entry = gnttab.GnttabPermitForeignAccess(self.gnttab_cache, True, self.backend_domid, pfn, ro)
            if not NT_SUCCESS(status):
                self._revoke(item)
                return status or STATUS_INSUFFICIENT_RESOURCES
            item.grants.append(entry)
        return STATUS_SUCCESS

    def _revoke(self, item: Submitted) -> bool:
        """Revoke the request's grants; False if the backend still maps one. Those go to the reaper with the
        indirect table, and the request keeps a note of them (its buffer must stay out of use until they
        are revoked); a replay grants the pages afresh."""
        stale = [e for e in item.grants
                 if not NT_SUCCESS(self.interfaces.gnttab.GnttabRevokeForeignAccess(self.gnttab_cache, True, e))]
        item.grants = []
        if stale:
            record = StaleGrants(f"{self.name} {item.describe()}", self.gnttab_cache, stale, item.indirect)
            item.stale.append(record)
            self.reaper.add(record)
        elif item.indirect is not None:
            current_mm().MmFreePagesFromMdl(item.indirect)
        item.indirect = None
        return not stale

    # -- completion -------------------------------------------------------------------------------

    def _interrupt(self, _interrupt: Any, _argument: Any) -> bool:
        KeInsertQueueDpc(self.dpc)
        return True

    def _dpc(self, _dpc: KDpc, _context: Any, _a1: Any, _a2: Any) -> None:
        self.RingPoll()
        if self.channel is not None:
            self.interfaces.evtchn.EvtchnUnmask(self.channel, False, True)

    def RingPoll(self) -> None:
        done: list[tuple[Submitted, int]] = []
        with self.lock.held():
            if self.front is None:
                return
            try:
                while True:
                    while self.front.unconsumed_responses():
                        request_id, _operation, status = decode_response(self.front.get_response_bytes())
                        item = self.submitted.pop(request_id, None)
                        if item is None:
                            self.broken = f"response for unknown id {request_id}"
                            break
                        self._revoke(item)
                        self._last_progress = time.monotonic()
                        done.append((item, status))
                    if self.broken is not None or not self.front.final_check_for_responses():
                        break
            except RingOverflowError as exc:
                self.broken = str(exc)
            if self.broken is not None:
                log.error("%s: backend broke the ring: %s", self.name, self.broken)
        for item, status in done:
            self.completed += 1
            if not item.cancelled:
                item.on_complete(item, status)
        self.RingPoke()

    def stalled_for(self) -> float:
        """Seconds the oldest submitted request has waited without any response arriving."""
        if not self.submitted:
            return 0.0
        oldest = min(s.submitted_at for s in self.submitted.values())
        return time.monotonic() - max(oldest, self._last_progress)
