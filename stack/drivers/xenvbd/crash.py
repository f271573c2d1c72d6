"""xencrsh: XENVBD's crash-dump and hibernation path (VBD src/xencrsh; reference windows-pv-drivers.md 7).

When Windows writes a crash dump or the hibernation image, the normal storage stack is down (at S4 every
device has gone D3 and released its XENBUS interfaces), so the boot disk is driven by a small driver of its
own that uses none of XENBUS's interfaces: its own hypercalls (an event channel allocated and notified
directly), grant references from the range XENBUS keeps back for it (8-31, GNTTAB_CRASH_RESERVATION:
6b697d1 was the crash driver using references >= 32, which XENBUS hands out), a single ring of one page,
and the multi-queue and multi-page keys a normal connection left cleaned away (a529184, 019dcc2, 24e8653).
It polls for responses, as it runs with interrupts off.

The model connects the system disk's frontend (device/vbd/<devid>) the same way over the guest's own
xenstore connection (the platform's, which outlives XENBUS's interfaces), writes in requests of at most 11
segments through bounce pages granted read-only, and closes the frontend again. Every wait has a deadline.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi.blkif import (BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_WRITE, BLKIF_RSP_OKAY, BLKIF_SECTOR_SIZE,
                                XEN_IO_PROTO_ABI_X86_64)
from xenpv.xenabi.ring import FrontRing
from xenpv.xenabi.xenbus import XenbusState

from .request import REQUEST, RESPONSE, PrepareReadWrite, decode_response, encode

log = logging.getLogger("stack.drivers.xenvbd.crash")

GNTTAB_CRASH_FIRST = 8          # GNTTAB_NR_RESERVED_ENTRIES: Xen's own end here
GNTTAB_CRASH_RESERVATION = 32   # XENBUS hands out references from here on
RING_REF = GNTTAB_CRASH_FIRST
DATA_REFS = list(range(GNTTAB_CRASH_FIRST + 1, GNTTAB_CRASH_RESERVATION))
PAGE = 4096
BACKEND_SECONDS = 5.0
RESPONSE_SECONDS = 10.0
# Keys a normal connection may have left that a single-ring, single-page connection must not carry.
STALE_KEYS = ("ring-page-order", "num-ring-pages", "multi-queue-num-queues", "ring-ref", "event-channel")


class CrashPathError(Exception):
    """The crash/hibernate path could not use the disk; says which step and why."""


@dataclass
class CrashFrontend:
    platform: XenPlatform
    devid: int
    backend: str = ""
    backend_domid: int = 0
    sectors: int = 0
    sector_size: int = BLKIF_SECTOR_SIZE
    _pages: list[int] = field(default_factory=list)
    _hc: Hypercalls | None = None
    _port: int | None = None
    _ring: FrontRing | None = None
    _view: memoryview | None = None
    _granted: list[int] = field(default_factory=list)
    requests: int = 0

    @property
    def frontend(self) -> str:
        return f"device/vbd/{self.devid}"

    # -- xenstore ---------------------------------------------------------------------------------------

    def _read(self, path: str) -> str | None:
        try:
            return self.platform.store.read(path).decode(errors="replace")
        except XenstoreError as exc:
            if exc.errno == "ENOENT":
                return None
            raise

    def backend_state(self) -> XenbusState:
        return XenbusState.parse(self._read(f"{self.backend}/state"))

    def _set_state(self, state: XenbusState) -> None:
        self.platform.store.write(f"{self.frontend}/state", state.wire())

    def _wait_backend(self, wanted: tuple[XenbusState, ...], what: str) -> XenbusState:
        timeout = scaled(BACKEND_SECONDS)
        deadline = time.monotonic() + timeout
        while True:
            state = self.backend_state()
            if state in wanted:
                return state
            if time.monotonic() >= deadline:
                raise CrashPathError(f"vbd {self.devid}: backend {self.backend} stayed {state.name} {what}")
            time.sleep(0.002)

    # -- connection -------------------------------------------------------------------------------------

    def connect(self) -> None:
        """Frontend Initialising -> backend InitWait -> one ring, one channel -> Initialised -> Connected."""
        backend, domid = self._read(f"{self.frontend}/backend"), self._read(f"{self.frontend}/backend-id")
        if backend is None or domid is None or not domid.isdigit():
            raise CrashPathError(f"vbd {self.devid}: no backend in xenstore")
        self.backend, self.backend_domid = backend, int(domid)
        self._set_state(XenbusState.Initialising)
        self._wait_backend((XenbusState.InitWait,), "after the crash path's Initialising")
        store = self.platform.store
        for key in STALE_KEYS:
            self._remove(f"{self.frontend}/{key}")
        for key in self._children():
            if key.startswith(("queue-", "ring-ref")):
                self._remove(f"{self.frontend}/{key}")
        self._pages = self.platform.pages.alloc(1 + len(DATA_REFS))
        scratch = self._pages[0]
        self._hc = Hypercalls(self.platform.vcpu, scratch << 12)
        ring_gfn = self._pages[1]
        self._view = self.platform.vcpu.memory.page(ring_gfn)
        self._ring = FrontRing(self._view, REQUEST, RESPONSE, init=True)
        self.platform.grants.grant_access(RING_REF, self.backend_domid, ring_gfn, False)
        self._granted.append(RING_REF)
        self._port = self._hc.evtchn_alloc_unbound(self.backend_domid)
        for key, value in (("ring-ref", str(RING_REF)), ("event-channel", str(self._port)),
                           ("protocol", XEN_IO_PROTO_ABI_X86_64)):
            store.write(f"{self.frontend}/{key}", value)
        self._set_state(XenbusState.Initialised)
        self._wait_backend((XenbusState.Connected,), "after the crash path's Initialised")
        self.sectors = int(self._read(f"{self.backend}/sectors") or 0)
        self.sector_size = int(self._read(f"{self.backend}/sector-size") or BLKIF_SECTOR_SIZE)
        self._set_state(XenbusState.Connected)
        log.info("xencrsh: vbd %d connected to %s: one ring (ref %d), port %d, %d sectors", self.devid,
                 self.backend, RING_REF, self._port, self.sectors)

    def _children(self) -> list[str]:
        try:
            return self.platform.store.directory(self.frontend)
        except XenstoreError:
            return []

    def _remove(self, path: str) -> None:
        try:
            self.platform.store.rm(path)
        except XenstoreError as exc:
            if exc.errno != "ENOENT":
                raise

    # -- I/O --------------------------------------------------------------------------------------------

    def write(self, lba: int, data: bytes) -> None:
        """Write `data` (whole sectors) at `lba`: requests of at most 11 segments, each through bounce
        pages granted with references 9-31, one request at a time, its response polled for."""
        if self.sector_size != BLKIF_SECTOR_SIZE:
            raise CrashPathError(f"vbd {self.devid}: sector size {self.sector_size} is not supported here")
        if len(data) % BLKIF_SECTOR_SIZE or lba < 0 or (self.sectors and lba + len(data) // BLKIF_SECTOR_SIZE > self.sectors):
            raise CrashPathError(f"vbd {self.devid}: {len(data)} bytes at sector {lba} do not fit the disk")
        assert self._ring is not None and self._hc is not None
        bounce = self._pages[2:2 + BLKIF_MAX_SEGMENTS_PER_REQUEST]
        refs = DATA_REFS[:BLKIF_MAX_SEGMENTS_PER_REQUEST]
        for request in PrepareReadWrite(BLKIF_OP_WRITE, lba, len(data) // BLKIF_SECTOR_SIZE,
                                        BLKIF_MAX_SEGMENTS_PER_REQUEST):
            base = (request.sector - lba) * BLKIF_SECTOR_SIZE
            for i, segment in enumerate(request.segments):
                offset = base + i * PAGE
                chunk = data[offset:offset + segment.sectors * BLKIF_SECTOR_SIZE]
                self.platform.vcpu.write_phys(bounce[i] << 12, chunk)
                self.platform.grants.grant_access(refs[i], self.backend_domid, bounce[i], True)
            raw, _ = encode(request, self.requests, refs[:len(request.segments)])
            self._ring.put_request_bytes(raw)
            self._ring.push_requests()
            self._hc.evtchn_send(self._port)
            status = self._poll(self.requests)
            for ref in refs[:len(request.segments)]:
                self._end(ref)
            if status != BLKIF_RSP_OKAY:
                raise CrashPathError(f"vbd {self.devid}: write of sectors {request.sector}+ failed with status {status}")
            self.requests += 1

    def _poll(self, request_id: int) -> int:
        assert self._ring is not None
        timeout = scaled(RESPONSE_SECONDS)
        deadline = time.monotonic() + timeout
        while not self._ring.unconsumed_responses():
            if time.monotonic() >= deadline:
                raise HarnessTooSlow(f"blkback answering the crash path's request {request_id} on vbd {self.devid}",
                                     timeout)
            time.sleep(0)
        rid, _operation, status = decode_response(self._ring.get_response_bytes())
        if rid != request_id:
            raise CrashPathError(f"vbd {self.devid}: response to request {rid}, {request_id} expected")
        return status

    def _end(self, ref: int) -> None:
        timeout = scaled(RESPONSE_SECONDS)
        deadline = time.monotonic() + timeout
        while not self.platform.grants.end_foreign_access(ref):
            if time.monotonic() >= deadline:
                raise CrashPathError(f"vbd {self.devid}: grant {ref} still mapped by the backend")
            time.sleep(0.001)

    # -- close ------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Closing -> backend Closing/Closed -> Closed -> backend Closed; everything given back."""
        try:
            if self.backend:
                self._set_state(XenbusState.Closing)
                self._wait_backend((XenbusState.Closing, XenbusState.Closed), "while the crash path closes")
                self._set_state(XenbusState.Closed)
                self._wait_backend((XenbusState.Closed,), "after the crash path's Closed")
        finally:
            self._release()

    def _release(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._view is not None:
            self._view.release()
            self._view = None
        for ref in self._granted:
            self.platform.grants.end_foreign_access(ref)
        self._granted.clear()
        if self._port is not None and self._hc is not None:
            self._hc.evtchn_close(self._port)
            self._port = None
        if self._pages:
            self.platform.pages.free(self._pages)
            self._pages = []
