"""A XENVBD target: one `device/vbd/<devid>`, its blkif frontend and the disk the console and tests use
(VBD src/xenvbd/target.c, frontend.c; reference windows-pv-drivers.md 6 and 8, xen-abi.md 4 and 6).

The frontend state machine runs on the adapter's thread (FrontendStep, on a backend `state` watch and on a
short timer) and follows the backend:

    PREPARED (wrote Initialising) --backend InitWait--> FrontendConnect: rings, then every key and
    state=Initialised in ONE transaction (STATUS_RETRY -> run it again) --> INITIALISED
    --backend Connected--> read sectors/sector-size/info, state=Connected --> CONNECTED

Leaving CONNECTED without being asked (backend Closing or InitWait, its directory gone, a response
stalled for WATCHDOG_SECONDS, a broken ring) disconnects the rings and keeps what was submitted but not
answered for replay, then closes the handshake (Closing -> backend Closing/Closed -> Closed) and, while
the backend is `online`, starts again from Initialising: a restarted blkback is met exactly like a new
one, on new rings (the old ones are never handed to it: their slots hold requests answered long ago).
When the toolstack takes the device away (online=0, or the directories removed) everything queued is
failed instead. TargetDestroy closes cleanly (Closing, Closed) with bounded waits.

Grants a backend still maps when they are revoked go to the target's GrantReaper (ring.py), retried on
every FrontendStep; an I/O whose buffer they cover parks the buffer until they are revoked, so no page a
backend can still reach goes back to the allocator.

The disk: TargetRead/TargetWrite/TargetFlush/TargetDiscard at PASSIVE_LEVEL, in units of the backend's
sector-size, each split into blkif requests (request.py) spread over the rings; each waits for its
completion with a deadline and fails with XenvbdIoError rather than hanging or dropping data.

Every wait on the backend here (the watchdog's stall, the close waits, an I/O's deadline) is scaled by
XENPV_TIME_SCALE (stack.timescale), so a loaded machine does not read as a dead backend.

Kept as the C driver keeps them, for the historical bug switches (guests.bugs): the per-queue ring table
Ring->Ring[MaxQueues] (RingCreate/RingDestroy, switch `xenvbd-9f7f8b2`), the page 0x80/0x83 inquiry
overrides the backend may publish under sm-data (Base64Decode/Base64Free, `xenvbd-4a32464`) and the four
objects the target's destruction waits for (`xenvbd-667456d`).

The target and its adapter (adapter.py) import each other, as target.c and adapter.c do.
"""
from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers import bugs
from xenpv.stack.kernel.event import WAIT_ALL, KEvent, KeWaitForMultipleObjects, KeWaitForSingleObject
from xenpv.stack.kernel.irql import assert_passive
from xenpv.stack.kernel.mm import Mdl, current_mm
from xenpv.stack.kernel.pool import POOL_TYPE, ExAllocatePoolWithTag, ExFreePoolWithTag, MmAccessElement, PoolBlock, pool_tag
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_RETRY, STATUS_SUCCESS,
                                 STATUS_TIMEOUT)
from xenpv.stack.timescale import scaled
from xenpv.xenabi.blkif import (BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BLKIF_SECTOR_SIZE,
                          XEN_IO_PROTO_ABI_X86_64)
from xenpv.xenabi.xenbus import XenbusState

from .request import (OPERATION_NAMES, BlkRequest, PrepareDiscard, PrepareFlush, PrepareReadWrite, RequestError,
                      max_segments)
from .ring import BlkifRing, GrantReaper, RingError, RingInterfaces, Submitted, allocate_pages

if TYPE_CHECKING:
    from .adapter import XenvbdAdapter

log = logging.getLogger("stack.drivers.xenvbd.target")

PAGE_SIZE = 4096
WATCHDOG_SECONDS = 3.0
IO_TIMEOUT_SECONDS = 30.0
TRANSACTION_ATTEMPTS = 10
CLOSE_WAIT_SECONDS = 2.0
# Frontend maxima (xenvbd.inf and driver limits): the backend's offer is cut down to these, and a
# same-name DWORD in XENVBD\Parameters overrides either side.
FRONTEND_MAX_RING_PAGE_ORDER = 1
FRONTEND_MAX_QUEUES = 2
FRONTEND_MAX_INDIRECT_SEGMENTS = 256
# Keys a previous connection may have left that a new one must not inherit.
STALE_KEYS = ("ring-ref", "ring-page-order", "event-channel", "multi-queue-num-queues", "protocol")
RING_POOL_TAG = pool_tag("XRng")  # ring.c 'gnRX'
BASE64_POOL_TAG = pool_tag("XB64")  # base64.c '46BX'
POINTER_SIZE = 8
# sm-data keys of the SCSI INQUIRY pages the toolstack may override (frontend.c FrontendReadInquiryOverrides).
INQUIRY_OVERRIDES = {"page80": "sm-data/scsi/0x12/0x80", "page83": "sm-data/scsi/0x12/0x83"}


def Base64Decode(text: str) -> PoolBlock | None:
    """The decoded bytes in a pool block of their own (base64.c), or None if the text is not base64."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, max(1, len(data)), BASE64_POOL_TAG, contents=data)


def Base64Free(buffer: PoolBlock | None) -> None:
    """Give a decoded buffer back. 4a32464 made it NULL-safe (ExFreePoolWithTag is not)."""
    if buffer is None and not bugs.enabled("xenvbd-4a32464"):
        return
    ExFreePoolWithTag(buffer, BASE64_POOL_TAG)


class FrontendState(Enum):
    CLOSED = "closed"
    PREPARED = "prepared"
    INITIALISED = "initialised"
    CONNECTED = "connected"
    CLOSING = "closing"
    GONE = "gone"


class XenvbdIoError(Exception):
    """A disk operation did not complete successfully."""

    def __init__(self, target: XenvbdTarget, what: str, detail: str) -> None:
        self.target_id = target.target_id
        super().__init__(f"target {target.target_id} (vbd {target.devid}): {what}: {detail}")


@dataclass(eq=False)
class Io:
    """One disk operation: its buffer and the requests it was split into."""

    kind: str
    buffer: Mdl | None
    parts: list[Submitted] = field(default_factory=list)
    remaining: int = 0
    status: int = BLKIF_RSP_OKAY
    event: KEvent = field(default_factory=lambda: KEvent("xenvbd io"))

    def complete(self, part: Submitted, status: int) -> None:
        if status != BLKIF_RSP_OKAY and self.status == BLKIF_RSP_OKAY:
            self.status = status
            log.warning("%s: %s failed with blkif status %d", self.kind, part.describe(), status)
        self.remaining -= 1
        if self.remaining == 0:
            self.event.set()


@dataclass
class Features:
    sectors: int = 0
    sector_size: int = BLKIF_SECTOR_SIZE
    info: int = 0
    flush_cache: bool = False
    barrier: bool = False
    discard: bool = False
    max_indirect_segments: int = 0
    max_ring_page_order: int = 0
    max_queues: int = 1
    persistent: bool = False


class XenvbdTarget:
    def __init__(self, adapter: XenvbdAdapter, devid: int, target_id: int) -> None:
        self.adapter = adapter
        self.devid = devid
        self.target_id = target_id
        self.frontend = f"device/vbd/{devid}"
        self.backend = ""
        self.backend_domid = 0
        self.state = FrontendState.CLOSED
        self.features = Features()
        self.rings: list[BlkifRing] = []
        self.order = 0
        # Requests waiting for a connection: new ones, and those replayed after the backend went away.
        self.waiting: deque[Submitted] = deque()
        self.watch: Any = None
        self.connections = 0
        self.resumes = 0
        self._next_ring = 0
        self._removing = False
        self.reaper = GrantReaper(adapter.gnttab)
        # I/O buffers that completed while a backend could still reach them: freed by _reap.
        self.parked: list[Io] = []
        # The frontend's queue maximum and the ring table sized by it (RingCreate: one BLKIF ring per queue).
        self.max_queues = self._feature("multi-queue-max-queues", FRONTEND_MAX_QUEUES, FRONTEND_MAX_QUEUES)
        self.ring_table: PoolBlock | None = ExAllocatePoolWithTag(
            POOL_TYPE.NonPagedPool, POINTER_SIZE * self.max_queues, RING_POOL_TAG,
            contents=[f"blkif ring {i}" for i in range(self.max_queues)])
        # Inquiry page overrides from the backend's sm-data, read at connect, freed at disconnect.
        self.inquiry: dict[str, PoolBlock | None] = {}
        # What the target's destruction waits for (pdo.c PdoDestroy): the removal of the last reference
        # and the request, segment and mapping lists running empty.
        self.remove_event = KEvent(f"vbd {devid} references")
        self.requests_empty = KEvent(f"vbd {devid} requests empty")
        self.segments_empty = KEvent(f"vbd {devid} segments empty")
        self.mappings_empty = KEvent(f"vbd {devid} mappings empty")

    def _print(self, text: str) -> None:
        self.adapter._print(f"Target[{self.target_id}]: {text}")

    # -- xenstore helpers -------------------------------------------------------------------------

    def _read(self, path: str, transaction: Any = None) -> str | None:
        store = self.adapter.store
        status, buffer = store.StoreRead(transaction, None, path)
        if not NT_SUCCESS(status):
            return None
        value = buffer.Value.decode(errors="replace")
        store.StoreFree(buffer)
        return value

    def _backend(self, key: str) -> str | None:
        return self._read(f"{self.backend}/{key}")

    def _backend_int(self, key: str, default: int = 0) -> int:
        value = self._backend(key)
        try:
            return int(value) if value is not None else default
        except ValueError:
            log.warning("vbd %d: backend %s=%r is not a number", self.devid, key, value)
            return default

    def _set_state(self, state: XenbusState) -> None:
        status = self.adapter.store.StorePrintf(None, None, f"{self.frontend}/state", "%u", int(state))
        if not NT_SUCCESS(status):
            log.warning("vbd %d: writing state %s: %#x", self.devid, state.name, status)
        self._print(f"frontend {state.name}")

    def backend_state(self) -> XenbusState | None:
        value = self._backend("state")
        return None if value is None else XenbusState.parse(value)

    # -- creation ---------------------------------------------------------------------------------

    def TargetStart(self) -> int:
        """Find the backend, watch its state and take the frontend where it can start from."""
        backend = self._read(f"{self.frontend}/backend")
        domid = self._read(f"{self.frontend}/backend-id")
        if backend is None or domid is None or not domid.isdigit():
            return STATUS_OBJECT_NAME_NOT_FOUND
        self.backend, self.backend_domid = backend, int(domid)
        status, self.watch = self.adapter.store.StoreWatchAdd(None, f"{self.backend}/state", self.adapter.event)
        if not NT_SUCCESS(status):
            return status
        fe = XenbusState.parse(self._read(f"{self.frontend}/state"))
        if fe == XenbusState.Initialising:
            self.state = FrontendState.PREPARED
        elif fe in (XenbusState.Closed, XenbusState.Unknown):
            self.state = FrontendState.CLOSED
        else:
            # Left connected by someone before us (a previous boot of this domain): close it first.
            self._set_state(XenbusState.Closing)
            self.state = FrontendState.CLOSING
        self._print(f"vbd {self.devid} -> backend {self.backend} (dom{self.backend_domid})")
        return STATUS_SUCCESS

    # -- the state machine ------------------------------------------------------------------------

    def FrontendStep(self) -> None:
        """Act on the backend's state (adapter thread, PASSIVE_LEVEL, kernel lock held)."""
        self._reap()
        if self.state == FrontendState.GONE:
            return
        be = self.backend_state()
        online = self._backend("online") == "1"
        if be is None or self._read(f"{self.frontend}/state") is None:
            self._lost("device directories removed")
            return
        if self.state == FrontendState.CONNECTED:
            stalled = max((r.stalled_for() for r in self.rings), default=0.0)
            broken = next((r.broken for r in self.rings if r.broken), None)
            if be != XenbusState.Connected:
                self._backend_left(f"backend went {be.name}")
            elif broken or stalled > scaled(WATCHDOG_SECONDS):
                self._backend_left(broken or f"no response for {stalled:.1f}s")
            return
        if self.state == FrontendState.INITIALISED:
            if be == XenbusState.Connected:
                self._connected()
            elif be in (XenbusState.Closing, XenbusState.Closed):
                self._backend_left(f"backend went {be.name} before connecting")
            return
        if self.state == FrontendState.PREPARED:
            if be == XenbusState.InitWait:
                self.FrontendConnect()
            elif be == XenbusState.Closing:
                self._set_state(XenbusState.Closed)
                self.state = FrontendState.CLOSED
            return
        if self.state == FrontendState.CLOSING:
            if be in (XenbusState.Closing, XenbusState.Closed, XenbusState.Unknown):
                self._set_state(XenbusState.Closed)
                self.state = FrontendState.CLOSED
            return
        if self.state == FrontendState.CLOSED:
            if not online and be in (XenbusState.Closed, XenbusState.Closing):
                self._lost("the toolstack unplugged the device")
            elif online and be in (XenbusState.Closed, XenbusState.InitWait, XenbusState.Initialising):
                # The backend leaves Closed for InitWait when it sees us Initialising again.
                self._set_state(XenbusState.Initialising)
                self.state = FrontendState.PREPARED

    # -- suspend/resume (frontend.c FrontendSuspendCallback) ----------------------------------------

    def TargetSuspendLate(self) -> None:
        """In a new domain (SUSPEND LATE, DISPATCH_LEVEL): CLOSED - the rings of the old domain dropped
        without a handshake (its backend went with it; the channels are inactive, the restored grant table
        lets every revoke succeed), what was submitted and not answered kept to be issued again - and then
        back to the state it had. The way back (the backend's InitWait, the new rings, Connected, the
        requests replayed) runs on the adapter's thread at PASSIVE_LEVEL after TargetResume, the model's
        backend waits giving the processor away."""
        if self.state == FrontendState.GONE:
            return
        self._print(f"resumed in a new domain: {self.state.value} -> closed, back to {self.state.value}")
        self._disconnect_rings(replay=True)
        self.state = FrontendState.CLOSED
        self.resumes += 1

    def TargetResume(self) -> None:
        """After TargetSuspendLate, on the adapter's thread: the backend's path in the new domain is read
        again and its state watch (dead since EARLY) replaced."""
        if self.state == FrontendState.GONE:
            return
        if self.watch is not None:
            self.adapter.store.StoreWatchRemove(self.watch)
            self.watch = None
        backend = self._read(f"{self.frontend}/backend")
        domid = self._read(f"{self.frontend}/backend-id")
        if backend is None or domid is None or not domid.isdigit():
            self._lost("no backend in the new domain")
            return
        self.backend, self.backend_domid = backend, int(domid)
        status, self.watch = self.adapter.store.StoreWatchAdd(None, f"{self.backend}/state", self.adapter.event)
        if not NT_SUCCESS(status):
            self.watch = None

    def _backend_left(self, why: str) -> None:
        self._print(f"backend gone ({why}); requests kept for replay")
        self._disconnect_rings(replay=True)
        self._set_state(XenbusState.Closing)
        self.state = FrontendState.CLOSING

    def _lost(self, why: str) -> None:
        self._print(f"device lost: {why}")
        self._disconnect_rings(replay=True)
        self._fail_waiting(why)
        self.state = FrontendState.GONE

    def _fail_waiting(self, why: str) -> None:
        while self.waiting:
            item = self.waiting.popleft()
            if not item.cancelled:
                log.warning("vbd %d: %s failed: %s", self.devid, item.describe(), why)
                item.on_complete(item, BLKIF_RSP_ERROR)

    def _disconnect_rings(self, *, replay: bool) -> None:
        self.FrontendDisconnect()
        orphans: list[Submitted] = []
        for ring in self.rings:
            orphans += ring.RingDisconnect()
        self.rings = []
        orphans = [o for o in orphans if not o.cancelled]
        if orphans:
            self._print(f"{len(orphans)} requests outstanding: {'replayed on reconnect' if replay else 'failed'}")
        self.waiting.extendleft(reversed(orphans))
        if not replay:
            self._fail_waiting("frontend closed")

    def _feature(self, name: str, offered: int, frontend_max: int | None = None) -> int:
        """The backend's offer, cut to the frontend's maximum; a XENVBD\\Parameters DWORD of the same name
        replaces the maximum (or, for a flag, the offer)."""
        override = self.adapter.parameter(name)
        if frontend_max is None:
            return offered if override is None else override
        return min(offered, frontend_max if override is None else override)

    def FrontendConnect(self) -> None:
        """Backend in InitWait: read what it offers, build the rings, publish them and go Initialised."""
        f = Features(
            flush_cache=bool(self._feature("feature-flush-cache", self._backend_int("feature-flush-cache"))),
            barrier=bool(self._feature("feature-barrier", self._backend_int("feature-barrier"))),
            discard=bool(self._feature("feature-discard", self._backend_int("feature-discard"))),
            max_indirect_segments=self._feature("feature-max-indirect-segments",
                                                self._backend_int("feature-max-indirect-segments"),
                                                FRONTEND_MAX_INDIRECT_SEGMENTS),
            max_ring_page_order=self._feature("max-ring-page-order", self._backend_int("max-ring-page-order"),
                                              FRONTEND_MAX_RING_PAGE_ORDER),
            max_queues=max(1, self._feature("multi-queue-max-queues", self._backend_int("multi-queue-max-queues", 1),
                                            FRONTEND_MAX_QUEUES)),
            persistent=self._backend_int("feature-persistent") == 1)
        self.features = f
        # feature-persistent is read and logged only, as XENVBD does: grants are made per request.
        self._print(f"backend offers flush={int(f.flush_cache)} barrier={int(f.barrier)} discard={int(f.discard)} "
                    f"indirect={f.max_indirect_segments} ring-page-order={f.max_ring_page_order} "
                    f"queues={f.max_queues} persistent={int(f.persistent)}")
        self.order = f.max_ring_page_order
        interfaces = RingInterfaces(self.adapter.evtchn, self.adapter.gnttab)
        keys: dict[str, str] = {}
        try:
            for q in range(f.max_queues):
                ring = BlkifRing(f"vbd{self.devid}", q, self.order, interfaces, self.backend_domid, self.reaper)
                self.rings.append(ring)
                base = "" if f.max_queues == 1 else f"queue-{q}/"
                keys |= {base + k: v for k, v in ring.RingConnect().items()}
        except RingError as exc:
            self._print(f"FrontendConnect: {exc}")
            self._disconnect_rings(replay=True)
            self._set_state(XenbusState.Closing)
            self.state = FrontendState.CLOSING
            return
        if self.order:
            keys["ring-page-order"] = str(self.order)
        if f.max_queues > 1:
            keys["multi-queue-num-queues"] = str(f.max_queues)
        keys |= {"protocol": XEN_IO_PROTO_ABI_X86_64, "target-id": str(self.target_id),
                 "feature-surprise-remove": "1", "feature-online-resize": "1", "feature-large-sector-size": "1",
                 "state": str(int(XenbusState.Initialised))}
        status = self._write_keys(keys)
        if not NT_SUCCESS(status):
            self._print(f"FrontendConnect: writing the frontend keys failed ({status:#x})")
            self._disconnect_rings(replay=True)
            self._set_state(XenbusState.Closing)
            self.state = FrontendState.CLOSING
            return
        self.state = FrontendState.INITIALISED
        self._print(f"frontend Initialised: {len(self.rings)} queue(s) of {1 << self.order} page(s)")

    def _write_keys(self, keys: dict[str, str]) -> int:
        """All frontend keys and the state in one transaction, run again while it ends in STATUS_RETRY."""
        store = self.adapter.store
        status = STATUS_RETRY
        for _ in range(TRANSACTION_ATTEMPTS):
            status, transaction = store.StoreTransactionStart()
            if not NT_SUCCESS(status):
                return status
            failed = 0
            stale = list(STALE_KEYS) + [k for k in self._children(transaction) if k.startswith(("queue-", "ring-ref"))]
            for key in stale:
                store.StoreRemove(transaction, self.frontend, key)  # absent keys are fine
            for key, value in keys.items():
                status = store.StorePrintf(transaction, self.frontend, key, value)
                if not NT_SUCCESS(status):
                    failed = status
                    break
            end = store.StoreTransactionEnd(transaction, failed == 0)
            if failed:
                return failed
            if end != STATUS_RETRY:
                return end
            status = end
        return status

    def _children(self, transaction: Any) -> list[str]:
        store = self.adapter.store
        status, buffer = store.StoreDirectory(transaction, None, self.frontend)
        if not NT_SUCCESS(status):
            return []
        names = [n for n in buffer.Value.decode(errors="replace").split("\0") if n]
        store.StoreFree(buffer)
        return names

    def _connected(self) -> None:
        f = self.features
        f.sectors = self._backend_int("sectors")
        f.sector_size = self._backend_int("sector-size", BLKIF_SECTOR_SIZE) or BLKIF_SECTOR_SIZE
        f.info = self._backend_int("info")
        self.FrontendReadInquiryOverrides()
        self._set_state(XenbusState.Connected)
        self.state = FrontendState.CONNECTED
        self.connections += 1
        self._print(f"connected: {f.sectors} sectors of {f.sector_size} bytes, info {f.info:#x}")
        replay, self.waiting = list(self.waiting), deque()
        self._dispatch(replay)

    def FrontendReadInquiryOverrides(self) -> None:
        for page, key in INQUIRY_OVERRIDES.items():
            text = self._backend(key)
            self.inquiry[page] = Base64Decode(text) if text is not None else None

    def FrontendDisconnect(self) -> None:
        """What a connection read is given back: the inquiry overrides (NULL where the backend had none)."""
        for page in list(self.inquiry):
            Base64Free(self.inquiry.pop(page))

    # -- removal ----------------------------------------------------------------------------------

    def TargetDestroy(self) -> None:
        """Close the frontend (Closing, then Closed once the backend follows), give everything back."""
        self._removing = True
        # Only a backend that took the device (InitWait or later) follows our close; with none there
        # is nothing to wait for. PREPARED is our Initialising written and the backend's InitWait not yet
        # acted on: attached only if the backend did go to InitWait (one still Initialising or Closed, a
        # back-end that is not running, would leave both close waits to run out).
        attached = (self.state in (FrontendState.CONNECTED, FrontendState.INITIALISED)
                    or (self.state == FrontendState.PREPARED
                        and self.backend_state() in (XenbusState.InitWait, XenbusState.Connected)))
        if attached:
            self._set_state(XenbusState.Closing)
            self._wait_backend((XenbusState.Closing, XenbusState.Closed))
        self._disconnect_rings(replay=False)
        if self.state != FrontendState.GONE:
            self._set_state(XenbusState.Closed)
            if attached:
                self._wait_backend((XenbusState.Closed,))
        self._fail_waiting("target removed")
        self._reap_before_removal()
        if self.watch is not None:
            self.adapter.store.StoreWatchRemove(self.watch)
            self.watch = None
        self.state = FrontendState.GONE
        self.FrontendDestroy()
        # PdoDestroy: wait until nothing refers to the target and its lists are empty. Whatever the backend
        # still maps at this point was given up on by _reap_before_removal (kept out of use for good), so
        # every list counts as empty here.
        self.remove_event.set()
        if not self.waiting:
            self.requests_empty.set()
        self.segments_empty.set()
        self.mappings_empty.set()
        objects = [self.remove_event, self.requests_empty, self.segments_empty, self.mappings_empty]
        # 667456d: four objects exceed THREAD_WAIT_OBJECTS, so the wait needs a KWAIT_BLOCK array.
        wait_blocks = None if bugs.enabled("xenvbd-667456d") else [object() for _ in objects]
        KeWaitForMultipleObjects(objects, WAIT_ALL, None, wait_blocks)

    def FrontendDestroy(self) -> None:
        # 9f7f8b2 moved `MaxQueues = 0` after RingDestroy, which counts its rings by it.
        if bugs.enabled("xenvbd-9f7f8b2"):
            self.max_queues = 0
        self.RingDestroy()
        self.max_queues = 0

    def RingDestroy(self) -> None:
        """Destroy the BLKIF rings from the last queue down to 1, then free the table. Index is a ULONG:
        MaxQueues = 0 makes the first --Index 0xFFFFFFFF, which `> 0` (and `!= 0`) lets through."""
        if self.ring_table is None:
            return
        index = self.max_queues
        while True:
            index = (index - 1) & 0xFFFFFFFF
            if index == 0:
                break
            MmAccessElement(self.ring_table, index, POINTER_SIZE, "Ring->Ring", write=True)
            self.ring_table.contents[index] = None
        ExFreePoolWithTag(self.ring_table, RING_POOL_TAG)
        self.ring_table = None

    def _reap(self, force: bool = False) -> None:
        """Retry stale grants; free the parked buffers no backend can reach any more."""
        self.reaper.retry(force)
        if self.parked:
            free = [io for io in self.parked if not any(p.granted for p in io.parts)]
            self.parked = [io for io in self.parked if io not in free]
            for io in free:
                log.info("vbd %d: %s buffer %s back in use: the backend let go", self.devid, io.kind,
                         io.buffer.pfns if io.buffer is not None else [])
                if io.buffer is not None:
                    current_mm().MmFreePagesFromMdl(io.buffer)

    def _reap_before_removal(self) -> None:
        """The backend has closed (or was given up on): give it until CLOSE_WAIT_SECONDS to let go of its
        mappings; whatever it still holds stays out of use for good."""
        deadline = time.monotonic() + scaled(CLOSE_WAIT_SECONDS)
        while True:
            self._reap(force=True)
            if not self.parked and not self.reaper.outstanding:
                return
            if time.monotonic() >= deadline:
                self._print(f"{self.reaper.outstanding} grant(s) still mapped by the backend at removal; "
                            f"{len(self.parked)} buffer(s) kept out of use")
                return
            KeWaitForSingleObject(self.adapter.event, 0.05)

    def _wait_backend(self, states: tuple[XenbusState, ...]) -> None:
        deadline = time.monotonic() + scaled(CLOSE_WAIT_SECONDS)
        while True:
            be = self.backend_state()
            if be is None or be in states:
                return
            if time.monotonic() >= deadline:
                self._print(f"backend stayed {be.name} while closing")
                return
            KeWaitForSingleObject(self.adapter.event, 0.05)

    # -- the disk ---------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.state == FrontendState.CONNECTED

    def _dispatch(self, items: list[Submitted]) -> None:
        if self.state != FrontendState.CONNECTED or not self.rings:
            self.waiting.extend(items)
            return
        by_ring: dict[int, list[Submitted]] = {}
        for item in items:
            by_ring.setdefault(self._next_ring, []).append(item)
            self._next_ring = (self._next_ring + 1) % len(self.rings)
        for index, batch in by_ring.items():
            self.rings[index].RingQueue(batch)

    def _units(self, lba: int, count: int) -> tuple[int, int]:
        """(512-byte sector, 512-byte count) of `count` disk sectors at `lba`, checked against the disk."""
        f = self.features
        if count <= 0 or lba < 0 or (f.sectors and lba + count > f.sectors):
            raise XenvbdIoError(self, "range", f"sectors {lba}+{count} outside the disk's {f.sectors}")
        scale = f.sector_size // BLKIF_SECTOR_SIZE
        return lba * scale, count * scale

    def _submit(self, kind: str, requests: list[BlkRequest], buffer: Mdl | None) -> Io:
        assert_passive(f"Target{kind}")
        if self.state == FrontendState.GONE:
            raise XenvbdIoError(self, kind, "the device is gone")
        io = Io(kind, buffer)
        io.parts = [Submitted(r, buffer, io.complete) for r in requests]
        io.remaining = len(io.parts)
        if io.parts:
            self._dispatch(io.parts)
        return io

    def _wait(self, io: Io, timeout: float) -> None:
        timeout = scaled(timeout)
        if io.parts and KeWaitForSingleObject(io.event, timeout) == STATUS_TIMEOUT:
            for part in io.parts:
                part.cancelled = True
                if part in self.waiting:
                    self.waiting.remove(part)
                for ring in self.rings:
                    ring.RingCancel(part)
            raise XenvbdIoError(self, io.kind, f"{io.remaining} of {len(io.parts)} requests unanswered after "
                                f"{timeout:g}s (frontend {self.state.value}); cancelled")
        if io.status != BLKIF_RSP_OKAY:
            raise XenvbdIoError(self, io.kind, f"backend answered blkif status {io.status}")

    def _free(self, io: Io) -> None:
        """Give the buffer back, or park it while a backend may still reach it (a cancelled request still
        on the ring, or grants of an earlier submission that could not be revoked)."""
        if io.buffer is None:
            return
        if any(p.granted for p in io.parts):
            log.warning("vbd %d: %s buffer %s parked: still granted", self.devid, io.kind, io.buffer.pfns)
            self.parked.append(io)
            return
        current_mm().MmFreePagesFromMdl(io.buffer)

    def _segments(self) -> int:
        return max_segments(self.features.max_indirect_segments, FRONTEND_MAX_INDIRECT_SEGMENTS)

    def _io(self, kind: str, requests: list[BlkRequest], buffer: Mdl | None, timeout: float) -> None:
        io = None
        try:
            io = self._submit(kind, requests, buffer)
            self._wait(io, timeout)
        finally:
            if io is not None:
                self._free(io)
            elif buffer is not None:
                current_mm().MmFreePagesFromMdl(buffer)

    def _buffer(self, kind: str, size: int) -> Mdl:
        buffer = allocate_pages(-(-size // PAGE_SIZE))
        if buffer is None:
            raise XenvbdIoError(self, kind, f"no memory for a {size}-byte buffer (STATUS_INSUFFICIENT_RESOURCES)")
        return buffer

    def TargetRead(self, lba: int, count: int, timeout: float = IO_TIMEOUT_SECONDS) -> bytes:
        sector, sectors = self._units(lba, count)
        requests = PrepareReadWrite(BLKIF_OP_READ, sector, sectors, self._segments())
        buffer = self._buffer("read", sectors * BLKIF_SECTOR_SIZE)
        data: list[bytes] = []
        io = None
        try:
            io = self._submit("read", requests, buffer)
            self._wait(io, timeout)
            data.append(current_mm().read(buffer, 0, sectors * BLKIF_SECTOR_SIZE))
        finally:
            if io is not None:
                self._free(io)
            else:
                current_mm().MmFreePagesFromMdl(buffer)
        return data[0]

    def TargetWrite(self, lba: int, data: bytes, timeout: float = IO_TIMEOUT_SECONDS) -> None:
        size = self.features.sector_size
        if not data or len(data) % size:
            raise XenvbdIoError(self, "write", f"{len(data)} bytes is not a whole number of {size}-byte sectors")
        sector, sectors = self._units(lba, len(data) // size)
        requests = PrepareReadWrite(BLKIF_OP_WRITE, sector, sectors, self._segments())
        buffer = self._buffer("write", len(data))
        current_mm().write(buffer, 0, data)
        self._io("write", requests, buffer, timeout)

    def TargetFlush(self, timeout: float = IO_TIMEOUT_SECONDS) -> str:
        """SYNCHRONIZE_CACHE; returns the operation used ("" when the backend has no cache to flush)."""
        requests = PrepareFlush(self.features.flush_cache, self.features.barrier)
        self._io("flush", requests, None, timeout)
        return OPERATION_NAMES[requests[0].operation] if requests else ""

    def TargetDiscard(self, lba: int, count: int, timeout: float = IO_TIMEOUT_SECONDS) -> None:
        if not self.features.discard:
            raise XenvbdIoError(self, "discard", "the backend does not offer feature-discard")
        sector, sectors = self._units(lba, count)
        try:
            requests = PrepareDiscard(sector, sectors)
        except RequestError as exc:
            raise XenvbdIoError(self, "discard", str(exc)) from exc
        self._io("discard", requests, None, timeout)

    def describe(self) -> str:
        f = self.features
        be = self.backend_state() if self.state != FrontendState.GONE else None
        return (f"target {self.target_id} vbd {self.devid} {self.state.value} backend "
                f"{be.name if be is not None else '-'} sectors {f.sectors} sector-size {f.sector_size} "
                f"queues {len(self.rings)} ring-pages {1 << self.order} indirect {f.max_indirect_segments} "
                f"flush {int(f.flush_cache)} discard {int(f.discard)} connections {self.connections}")
