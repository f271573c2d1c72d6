"""A XENVIF frontend: one `device/vif/N`, its state machine and its queues (XV frontend.c, transmitter.c,
receiver.c; reference windows-pv-drivers.md 8).

States UNKNOWN -> CLOSED -> PREPARED -> CONNECTED -> ENABLED, one step at a time in both directions:
- CLOSED: a backend left Connected (by a previous boot of this domain's drivers) is closed first.
- PREPARED: the frontend writes Initialising and waits for the backend's InitWait; it reads the backend's
  features and the MAC and MTU of the device.
- CONNECTED: per queue a tx and an rx ring in a page of guest RAM each (MmAllocatePagesForMdl), granted to
  the backend with GNTTAB, event channels opened UNBOUND to the backend (Mask=TRUE; two when the backend
  offers feature-split-event-channels), every rx-copy buffer posted; then ALL keys in ONE store
  transaction (retried on STATUS_RETRY at most 10 times), then state Connected, awaited from the backend.
- ENABLED: received packets go up to the VIF client; below ENABLED they are dropped and counted.

The watchdog (a thread per frontend once it reached CONNECTED and while it is wanted there or above, as
XENVBD's adapter thread): every WATCHDOG_PERIOD, under the kernel lock, it checks that the
backend is still Connected and that no tx request has waited WATCHDOG_SECONDS for its response (a killed
netback answers nothing and may leave its state Connected). If either fails, FrontendReconnect walks the
frontend down to CLOSED (Closing -> Closed; packets in flight or in the backlog are returned DROPPED and
counted in XENVIF_TRANSMITTER_PACKETS_DROPPED) and up again (Initialising -> Connected), retrying while no
backend answers; a restarted netback is met exactly like a new one. Packets queued while the frontend is
not online are dropped and counted at once.

One walk of the state machine at a time (XV frontend.c FrontendSetState holds Frontend->Lock across the
whole walk): XV's walk polls the store at DISPATCH_LEVEL, where nothing else can run on its processor;
the model's backend waits give the processor away, so its lock is a synchronization event a second
walker waits on (a PnP or power transition arriving while the watchdog's reconnect waits for the
backend, or the other way round). A resume's LATE callback that finds a walk under way leaves its
teardown to that walker, which does it before it lets the lock go (XV: the suspend cannot start while
a processor holds the spin lock, SyncCapture waits for it).

Queues: min(FrontendMaxQueues, the backend's multi-queue-max-queues), where FrontendMaxQueues is the
processor count (the model's one vCPU) capped at FRONTEND_MAX_QUEUES, unless a DWORD of that name in
XENVIF\\Parameters replaces it (the model's way to ask for more queues than processors). Transmit picks
the queue by the client's hash value; each queue counts its packets (queue_statistics).

Data path: an event channel's ISR queues the queue's DPC; the DPC reaps tx responses (returning packets
whose slots are all done), refills the tx ring from the backlog, copies received frames out of the rx
buffers (following NETRXF_more_data chains), reposts the buffers, then unmasks the channels.
Transmit builds a scatter-gather chain: one slot for the L2-L4 headers, then the payload in page-sized
fragments, each in a tx buffer page granted read-only to the backend; NETTXF_csum_blank and a GSO extra
slot when the client asks for checksum offload / large-packet segmentation and the backend offers it.

Simplifications: tx buffers are granted once at connect and revoked at disconnect (XV grants the client's
pages per packet); the rx side does not negotiate GSO (feature-gso-tcpv4 = 0 for receive) and skips any
extra-info slot it is given; no control ring (hashing) and no multicast control.

The waits on the backend (its state, the watchdog's tx stall) are scaled by XENPV_TIME_SCALE
(stack.timescale), so a loaded machine does not read as a missing or dead backend.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_UNBOUND, EvtchnChannel
from xenpv.stack.drivers.xenbus.gnttab import GnttabCache, GnttabEntry
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_EARLY, SUSPEND_CALLBACK_LATE
from xenpv.stack.kernel.dpc import KDpc, KeInitializeDpc, KeInsertQueueDpc
from xenpv.stack.kernel.event import KEvent, KeWaitForSingleObject
from xenpv.stack.kernel.bugcheck import BugCheck
from xenpv.stack.kernel.irql import KeAcquireSpinLock, KeReleaseSpinLock, KSpinLock, assert_passive, current_processor
from xenpv.stack.kernel.mm import Mdl, current_mm
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_RETRY, STATUS_SUCCESS,
                                 STATUS_UNSUCCESSFUL, NTSTATUS, status_name)
from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, FrontRing
from xenpv.xenabi.xenbus import XenbusState as S

from .vif import (ReceiverQueueParameters, VifInterface, XenvifOffloadOptions, XenvifPacketChecksumFlags,
                  XenvifTransmitterPacketStatus, XenvifVifStatistic)

if TYPE_CHECKING:
    from xenpv.stack.drivers.interface import InterfaceTable

log = logging.getLogger("stack.drivers.xenvif.frontend")

TRANSACTION_ATTEMPTS = 10
# Far shorter than the real driver's wait: a guest booted without a netback (most tests) must not stall
# its boot; a running netback answers within milliseconds.
BACKEND_WAIT_SECONDS = 2.0
FRONTEND_MAX_QUEUES = 8          # XENVIF INF FrontendMaxQueues
PROCESSORS = 1                   # the model's one vCPU bounds the queue count as KeQueryActiveProcessorCount
TX_BUFFERS = 128                 # tx buffer pages per queue (a 64 KiB GSO packet needs 17)
MAX_PACKET = 0xFFFF              # XEN_NETIF_MAX_TX_SIZE
DEFAULT_MTU = 1500
DEFAULT_SPEED = 10_000_000_000
# A tx request unanswered this long means the backend is gone (XV's transmitter watchdog idea).
WATCHDOG_SECONDS = 2.0
WATCHDOG_PERIOD = 0.25
# Closing a connection whose backend stopped answering: a short wait, as nobody will follow.
STALLED_CLOSE_WAIT = 0.3


class FrontendState(IntEnum):
    FRONTEND_UNKNOWN = 0
    FRONTEND_CLOSED = 1
    FRONTEND_PREPARED = 2
    FRONTEND_CONNECTED = 3
    FRONTEND_ENABLED = 4


class FrontendError(Exception):
    """A step of the state machine failed; the message says which and why."""


def parse_mac(text: str) -> bytes:
    parts = text.strip().split(":")
    if len(parts) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def header_length(frame: bytes) -> int:
    """Bytes of the Ethernet, IPv4 and TCP/UDP headers at the front of `frame` (the header slot)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return min(14, len(frame))
    l4 = 14 + (frame[14] & 0x0F) * 4
    first_fragment = int.from_bytes(frame[20:22], "big") & 0x1FFF == 0
    protocol = frame[23]
    if first_fragment and protocol == 6 and len(frame) >= l4 + 20:
        l4 += (frame[l4 + 12] >> 4) * 4
    elif first_fragment and protocol == 17:
        l4 += 8
    return min(l4, len(frame))


@dataclass(eq=False)
class TxPacket:
    cookie: Any
    data: bytes
    offload: XenvifOffloadOptions
    mss: int
    slots_left: int = 0
    posted: float = 0.0
    status: XenvifTransmitterPacketStatus = XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_OK


@dataclass(eq=False)
class FrontendQueue:
    """One tx/rx ring pair and what hangs off it."""

    index: int
    tx_ring_mdl: Mdl
    rx_ring_mdl: Mdl
    tx_mdl: Mdl
    rx_mdl: Mdl
    tx_ring: FrontRing
    rx_ring: FrontRing
    tx_view: memoryview
    rx_view: memoryview
    entries: list[GnttabEntry] = field(default_factory=list)   # rings, then tx buffers, then rx buffers
    channels: list[EvtchnChannel] = field(default_factory=list)  # [tx, rx] or [shared]
    dpc: KDpc | None = None
    tx_lock: KSpinLock = field(default_factory=KSpinLock)
    rx_lock: KSpinLock = field(default_factory=KSpinLock)
    free_tx: list[int] = field(default_factory=list)
    in_flight: dict[int, TxPacket] = field(default_factory=dict)   # tx buffer id -> its packet
    backlog: deque[TxPacket] = field(default_factory=deque)
    partial: list[tuple[bytes, int]] = field(default_factory=list)
    skip_extras: bool = False

    @property
    def tx_ring_ref(self) -> int:
        return self.entries[0].Reference

    @property
    def rx_ring_ref(self) -> int:
        return self.entries[1].Reference

    def tx_ref(self, buffer: int) -> int:
        return self.entries[2 + buffer].Reference

    def rx_ref(self, buffer: int) -> int:
        return self.entries[2 + TX_BUFFERS + buffer].Reference


@dataclass
class FrontendInterfaces:
    """The XENBUS interfaces the XENVIF FDO acquired for its frontends."""

    store: InterfaceTable
    evtchn: InterfaceTable
    gnttab: InterfaceTable
    suspend: InterfaceTable


class Frontend:
    def __init__(self, index: int, interfaces: FrontendInterfaces, *, max_queues: int | None = None) -> None:
        self.index = index
        self.path = f"device/vif/{index}"
        self.xi = interfaces
        self.max_queues = max_queues if max_queues is not None else min(PROCESSORS, FRONTEND_MAX_QUEUES)
        self.state = FrontendState.FRONTEND_UNKNOWN
        # What the PDO asked for; the watchdog brings the frontend back to it after a backend loss.
        self.wanted = FrontendState.FRONTEND_UNKNOWN
        self.backend_path = ""
        self.backend_domain = 0
        self.features: dict[str, int] = {}
        self.permanent_address = b"\0" * 6
        self.current_address = b"\0" * 6
        self.mtu = DEFAULT_MTU
        self.speed = DEFAULT_SPEED
        self.split = False
        self.queues: list[FrontendQueue] = []
        self.gnttab_cache: GnttabCache | None = None
        self.vif = VifInterface(self)
        self.statistics = {s: 0 for s in XenvifVifStatistic}
        self.online = False
        self.resumes = 0
        self.reconnects = 0
        self.queue_statistics: dict[int, dict[str, int]] = {}
        self._suspend_callbacks: list[Any] = []
        self._close_wait = BACKEND_WAIT_SECONDS
        self._watchdog_event = KEvent(f"{self.path} watchdog", synchronization=True)
        self._watchdog_running = False
        self._state_lock = KEvent(f"{self.path} state lock", synchronization=True, signaled=True)
        self._resume_pending = False

    def __str__(self) -> str:
        return f"FRONTEND({self.path})"

    # -- store helpers ------------------------------------------------------------------------------------

    def _read(self, prefix: str, node: str) -> str | None:
        status, buffer = self.xi.store.StoreRead(None, prefix, node)
        if not NT_SUCCESS(status):
            return None
        text = buffer.Value.decode(errors="replace")
        self.xi.store.StoreFree(buffer)
        return text

    def _read_int(self, prefix: str, node: str, default: int = 0) -> int:
        text = self._read(prefix, node)
        try:
            return int(text) if text is not None else default
        except ValueError:
            return default

    def _write_state(self, state: S) -> None:
        status = self.xi.store.StorePrintf(None, self.path, "state", "%u", int(state))
        if not NT_SUCCESS(status):
            raise FrontendError(f"{self}: writing state {state.name}: {status_name(status)}")

    def backend_state(self) -> S:
        return S.parse(self._read(self.backend_path, "state"))

    def _wait_backend(self, wanted: set[S], timeout: float = BACKEND_WAIT_SECONDS) -> S:
        """Wait (PASSIVE) on a watch of the backend's state; re-read on a short period too, because a
        watch event can be consumed by another reader of the connection. A backend whose state node does
        not exist is Unknown at once: nothing serves the device (the toolstack made no backend directory)
        or it went away, and no wait brings it back (XV frontend.c
        FrontendWaitForBackendXenbusStateChange: STATUS_OBJECT_NAME_NOT_FOUND -> "disappeared", break)."""
        event = KEvent(f"{self.path} backend state")
        status, watch = self.xi.store.StoreWatchAdd(self.backend_path, "state", event)
        deadline = time.monotonic() + scaled(timeout)
        try:
            while True:
                text = self._read(self.backend_path, "state")
                state = S.parse(text)
                if state in wanted or text is None or time.monotonic() >= deadline:
                    return state
                KeWaitForSingleObject(event, 0.02)
                event.clear()
        finally:
            if NT_SUCCESS(status):
                self.xi.store.StoreWatchRemove(watch)

    # -- the state machine --------------------------------------------------------------------------------

    def FrontendSetState(self, target: FrontendState) -> NTSTATUS:
        assert_passive("FrontendSetState")
        self._lock_state()
        try:
            self.wanted = FrontendState(target)
            status = self._walk(self.wanted)
            # Watched once connected: a frontend that never found a backend stays down, as before.
            if self.state >= FrontendState.FRONTEND_CONNECTED and not self._watchdog_running:
                self._watchdog_running = True
                threading.Thread(target=self._watchdog_run, name=f"xenvif-{self.index}-watchdog",
                                 daemon=True).start()
        finally:
            self._unlock_state()
        return status

    def _lock_state(self) -> None:
        KeWaitForSingleObject(self._state_lock)

    def _unlock_state(self) -> None:
        if self._resume_pending:  # a resume came while this walk waited for the backend: see the docstring
            self._resume_pending = False
            self._resume()
        self._state_lock.set()

    def _walk(self, target: FrontendState) -> NTSTATUS:
        try:
            while self.state < target:
                step = {FrontendState.FRONTEND_UNKNOWN: self.FrontendClose,
                        FrontendState.FRONTEND_CLOSED: self.FrontendPrepare,
                        FrontendState.FRONTEND_PREPARED: self.FrontendConnect,
                        FrontendState.FRONTEND_CONNECTED: self.FrontendEnableStep}[self.state]
                step()
                self.state = FrontendState(self.state + 1)
                log.info("%s: %s", self, self.state.name)
            while self.state > target:
                step = {FrontendState.FRONTEND_ENABLED: self.FrontendDisableStep,
                        FrontendState.FRONTEND_CONNECTED: self.FrontendDisconnect,
                        FrontendState.FRONTEND_PREPARED: self.FrontendRelease,
                        FrontendState.FRONTEND_CLOSED: self.FrontendForget}[self.state]
                step()
                self.state = FrontendState(self.state - 1)
                log.info("%s: %s", self, self.state.name)
        except FrontendError as exc:
            log.error("%s: %s", self, exc)
            return STATUS_UNSUCCESSFUL
        return STATUS_SUCCESS

    def FrontendClose(self) -> None:
        self.backend_path = self._read(self.path, "backend") or ""
        if not self.backend_path:
            raise FrontendError(f"{self.path}/backend is missing")
        self.backend_domain = self._read_int(self.path, "backend-id")
        if self.backend_state() in (S.Connected, S.Closing):
            # Left over from a previous boot of this domain's drivers: close it before starting again.
            self._write_state(S.Closing)
            self._wait_backend({S.Closing, S.Closed, S.Unknown})
            self._write_state(S.Closed)
            self._wait_backend({S.Closed, S.Unknown})

    def FrontendPrepare(self) -> None:
        # XV FrontendPrepare: a backend Closed and not online is a device nobody serves (the toolstack
        # found no back-end for it): FrontendSetOffline, and no Initialising written, no wait.
        if self.backend_state() == S.Closed and self._read(self.backend_path, "online") != "1":
            raise FrontendError(f"backend {self.backend_path} is Closed and offline")
        self._write_state(S.Initialising)
        state = self._wait_backend({S.InitWait})
        if state != S.InitWait:
            raise FrontendError(f"backend {self.backend_path} is {state.name}, not InitWait")
        for key in ("feature-rx-copy", "feature-sg", "feature-gso-tcpv4", "feature-split-event-channels",
                    "multi-queue-max-queues", "feature-ipv6-csum-offload", "feature-no-csum-offload"):
            self.features[key] = self._read_int(self.backend_path, key)
        if not self.features["feature-rx-copy"]:
            raise FrontendError(f"backend {self.backend_path} does not offer feature-rx-copy")
        mac = self._read(self.path, "mac")
        if mac is None:
            raise FrontendError(f"{self.path}/mac is missing")
        try:
            self.permanent_address = parse_mac(mac)
        except ValueError as exc:
            raise FrontendError(f"{self.path}/mac: {exc}") from None
        self.current_address = self.permanent_address
        self.mtu = self._read_int(self.path, "mtu", DEFAULT_MTU) or DEFAULT_MTU
        self.split = self.features["feature-split-event-channels"] == 1

    def _queue_count(self) -> int:
        return max(1, min(self.max_queues, self.features.get("multi-queue-max-queues", 0) or 1))

    def FrontendConnect(self) -> None:
        status, self.gnttab_cache = self.xi.gnttab.GnttabCreateCache(
            f"{self.path}", 0, 4 * (2 + TX_BUFFERS + N.NET_RX_RING_SIZE) * FRONTEND_MAX_QUEUES,
            lambda _a: None, lambda _a: None, None)  # every Get/Put runs with Locked=TRUE under a queue lock
        if not NT_SUCCESS(status):
            raise FrontendError(f"GNTTAB CreateCache: {status_name(status)}")
        try:
            for index in range(self._queue_count()):
                self._queue_create(index)
            self._write_keys()
            for q in self.queues:
                for channel in q.channels:
                    self.xi.evtchn.EvtchnUnmask(channel, False, True)
            self._write_state(S.Connected)
            state = self._wait_backend({S.Connected, S.Closing, S.Closed})
            if state != S.Connected:
                error = self._read(self.backend_path, "error")
                raise FrontendError(f"backend {self.backend_path} went {state.name}, not Connected"
                                    + (f" ({error})" if error else ""))
        except BaseException:
            self._queues_destroy()
            raise
        self.online = True
        log.info("%s: connected to %s: %d queue(s), split=%s, mac %s, mtu %d", self, self.backend_path,
                 len(self.queues), self.split, format_mac(self.permanent_address), self.mtu)

    def _write_keys(self) -> None:
        store = self.xi.store
        multi = len(self.queues) > 1
        for attempt in range(TRANSACTION_ATTEMPTS):
            status, tx = store.StoreTransactionStart()
            if not NT_SUCCESS(status):
                raise FrontendError(f"TransactionStart: {status_name(status)}")
            keys: list[tuple[str, str, int]] = []
            for q in self.queues:
                prefix = f"{self.path}/queue-{q.index}" if multi else self.path
                keys += [(prefix, "tx-ring-ref", q.tx_ring_ref), (prefix, "rx-ring-ref", q.rx_ring_ref)]
                ports = [self.xi.evtchn.EvtchnGetPort(c) for c in q.channels]
                if self.split:
                    keys += [(prefix, "event-channel-tx", ports[0]), (prefix, "event-channel-rx", ports[1])]
                else:
                    keys.append((prefix, "event-channel", ports[0]))
            keys += [(self.path, "request-rx-copy", 1), (self.path, "feature-sg", 1),
                     (self.path, "feature-rx-notify", 1), (self.path, "feature-gso-tcpv4", 0),
                     (self.path, "feature-gso-tcpv6", 0), (self.path, "feature-ipv6-csum-offload", 0),
                     (self.path, "feature-no-csum-offload", 0)]
            if self.features.get("multi-queue-max-queues", 0):
                keys.append((self.path, "multi-queue-num-queues", len(self.queues)))
            for prefix, node, value in keys:
                status = store.StorePrintf(tx, prefix, node, "%u", value)
                if not NT_SUCCESS(status):
                    store.StoreTransactionEnd(tx, False)
                    raise FrontendError(f"writing {prefix}/{node}: {status_name(status)}")
            status = store.StoreTransactionEnd(tx, True)
            if status != STATUS_RETRY:
                break
            log.info("%s: key transaction conflicted (attempt %d)", self, attempt + 1)
        if not NT_SUCCESS(status):
            raise FrontendError(f"TransactionEnd: {status_name(status)}")

    def _grant(self, pfn: int, read_only: bool) -> GnttabEntry:
        status, entry = self.xi.gnttab.GnttabPermitForeignAccess(self.gnttab_cache, True, self.backend_domain,
                                                                  pfn, read_only)
        if not NT_SUCCESS(status):
            raise FrontendError(f"GNTTAB PermitForeignAccess(pfn {pfn:#x}): {status_name(status)}")
        return entry

    def _queue_create(self, index: int) -> FrontendQueue:
        mm = current_mm()
        tx_ring_mdl, rx_ring_mdl = mm.MmAllocatePagesForMdl(1), mm.MmAllocatePagesForMdl(1)
        tx_mdl, rx_mdl = mm.MmAllocatePagesForMdl(TX_BUFFERS), mm.MmAllocatePagesForMdl(N.NET_RX_RING_SIZE)
        q = FrontendQueue(index, tx_ring_mdl, rx_ring_mdl, tx_mdl, rx_mdl,
                          FrontRing(mm.view(tx_ring_mdl), N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT,
                                    init=True),
                          FrontRing(mm.view(rx_ring_mdl), N.NETIF_RX_REQUEST_STRUCT, N.NETIF_RX_RESPONSE_STRUCT,
                                    init=True),
                          mm.view(tx_mdl), mm.view(rx_mdl))
        self.queue_statistics.setdefault(index, {"tx_packets": 0, "tx_octets": 0, "rx_packets": 0, "rx_octets": 0})
        self.queues.append(q)  # listed at once, so that a failure below is undone by _queues_destroy
        q.entries += [self._grant(tx_ring_mdl.pfns[0], False), self._grant(rx_ring_mdl.pfns[0], False)]
        q.entries += [self._grant(pfn, True) for pfn in tx_mdl.pfns]
        q.entries += [self._grant(pfn, False) for pfn in rx_mdl.pfns]
        q.free_tx = list(range(TX_BUFFERS))
        q.dpc = KeInitializeDpc(self._dpc, q, module="xenvif.sys")
        for _ in range(2 if self.split else 1):
            channel = self.xi.evtchn.EvtchnOpen(EVTCHN_UNBOUND, self._interrupt, q, self.backend_domain, True)
            if channel is None:
                raise FrontendError(f"queue {index}: EVTCHN Open UNBOUND to dom{self.backend_domain} failed")
            q.channels.append(channel)
        for buffer in range(N.NET_RX_RING_SIZE):
            q.rx_ring.put_request(buffer, 0, q.rx_ref(buffer))
        q.rx_ring.push_requests()
        return q

    def _queues_destroy(self) -> None:
        mm = current_mm()
        leaked = 0
        for q in self.queues:
            for channel in q.channels:
                self.xi.evtchn.EvtchnClose(channel)
            q.channels.clear()
            for entry in q.entries:
                status = self.xi.gnttab.GnttabRevokeForeignAccess(self.gnttab_cache, True, entry)
                if not NT_SUCCESS(status):
                    # Still mapped by the backend: the page must never be reused, so it is leaked.
                    log.error("%s: grant %d still mapped; its page is leaked", self, entry.Reference)
                    leaked += 1
            q.entries.clear()
            q.tx_ring.close()
            q.rx_ring.close()
            q.tx_view.release()
            q.rx_view.release()
            if not leaked:
                for mdl in (q.tx_ring_mdl, q.rx_ring_mdl, q.tx_mdl, q.rx_mdl):
                    mm.MmFreePagesFromMdl(mdl)
            # What the backend never answered, then what never reached the ring: each packet once.
            lost = list(dict.fromkeys(q.in_flight.values())) + list(q.backlog)
            q.in_flight.clear()
            q.backlog.clear()
            for packet in lost:
                self.statistics[XenvifVifStatistic.XENVIF_TRANSMITTER_PACKETS_DROPPED] += 1
                self.vif.transmitter_return(packet.cookie, XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_DROPPED)
            if lost:
                log.warning("%s: queue %d: %d packet(s) dropped at disconnect", self, q.index, len(lost))
        self.queues.clear()
        if self.gnttab_cache is not None and leaked:
            # A backend that died with grants mapped: those entries can never go back, so neither can
            # their cache (destroying a cache with objects outstanding is a bugcheck).
            log.error("%s: %d grant(s) still mapped; the grant cache is leaked with them", self, leaked)
        elif self.gnttab_cache is not None:
            self.xi.gnttab.GnttabDestroyCache(self.gnttab_cache)
        self.gnttab_cache = None

    def FrontendEnableStep(self) -> None:
        self._suspend_callbacks = [
            self.xi.suspend.SuspendRegister(SUSPEND_CALLBACK_EARLY, self._suspend_early, None)[1],
            self.xi.suspend.SuspendRegister(SUSPEND_CALLBACK_LATE, self._suspend_late, None)[1]]
        self.vif.mac_state_change()

    def FrontendDisableStep(self) -> None:
        for callback in self._suspend_callbacks:
            self.xi.suspend.SuspendDeregister(callback)
        self._suspend_callbacks = []

    def FrontendDisconnect(self) -> None:
        self.online = False
        self._write_state(S.Closing)
        self._wait_backend({S.Closing, S.Closed, S.Unknown}, self._close_wait)
        self._write_state(S.Closed)
        self._wait_backend({S.Closed, S.Unknown}, self._close_wait)
        self._queues_destroy()

    def FrontendRelease(self) -> None:
        """PREPARED -> CLOSED: nothing was allocated while prepared."""

    def FrontendForget(self) -> None:
        """CLOSED -> UNKNOWN."""

    # -- the watchdog ---------------------------------------------------------------------------------

    def _watchdog_run(self) -> None:
        # A period rather than a store watch: the thread must not hold anything of STORE's when the FDO
        # releases its interfaces (D3), and it checks `wanted` before every use.
        cpu = current_processor()
        try:
            while True:
                with cpu.lock:
                    if cpu.crashed is not None or self.wanted < FrontendState.FRONTEND_CONNECTED:
                        self._watchdog_running = False
                        return
                    self.FrontendWatchdog()
                    KeWaitForSingleObject(self._watchdog_event, WATCHDOG_PERIOD)
        except BugCheck:
            self._watchdog_running = False  # the guest stopped; its dump says why
        except HarnessTooSlow as late:
            # A deadline of the harness passed (xenstored, xenhv): the processor stops without a STOP and
            # the main thread reports it (stack.timescale).
            self._watchdog_running = False
            cpu.give_up(late)
        except (OSError, ValueError, AttributeError) as exc:
            # The platform (and its xenstore connection) goes away when the agent shuts down.
            self._watchdog_running = False
            log.info("%s: watchdog ends: %r", self, exc)

    def _tx_stalled_for(self) -> float:
        oldest = time.monotonic()
        for q in self.queues:
            irql = KeAcquireSpinLock(q.tx_lock)
            try:
                self._tx_push(q)  # responses may be on the ring with their event not yet handled
                oldest = min([oldest] + [p.posted for p in q.in_flight.values()])
            finally:
                KeReleaseSpinLock(q.tx_lock, irql)
        return time.monotonic() - oldest

    def FrontendWatchdog(self) -> None:
        """Under the kernel lock and the state lock: reconnect when the backend left Connected or stopped
        answering; retry a reconnect that found no backend."""
        self._lock_state()
        try:
            self._watchdog_check()
        finally:
            self._unlock_state()

    def _watchdog_check(self) -> None:
        if self.state < FrontendState.FRONTEND_CONNECTED:
            if self.wanted >= FrontendState.FRONTEND_CONNECTED:
                self._walk(self.wanted)
            return
        state = self.backend_state()
        if state != S.Connected:
            self.FrontendReconnect(f"backend went {state.name}")
            return
        stalled = self._tx_stalled_for()
        if stalled > scaled(WATCHDOG_SECONDS):
            self.FrontendReconnect(f"no tx response for {stalled:.1f}s", stalled=True)

    def FrontendReconnect(self, reason: str, stalled: bool = False) -> None:
        log.warning("%s: %s: reconnecting", self, reason)
        self.reconnects += 1
        self.online = False
        self._close_wait = STALLED_CLOSE_WAIT if stalled else BACKEND_WAIT_SECONDS
        try:
            self._walk(FrontendState.FRONTEND_CLOSED)
        finally:
            self._close_wait = BACKEND_WAIT_SECONDS
        if self.wanted >= FrontendState.FRONTEND_CONNECTED and NT_SUCCESS(self._walk(self.wanted)):
            log.info("%s: reconnected (%d)", self, self.reconnects)

    # -- suspend/resume hooks -----------------------------------------------------------------------------

    def _suspend_early(self, _argument: Any) -> None:
        """FrontendSuspendCallbackEarly: Online = FALSE."""
        self.online = False

    def _suspend_late(self, _argument: Any) -> None:
        """FrontendSuspendCallbackLate (__FrontendSuspend: UNKNOWN, then __FrontendResume: CLOSED) and the
        VIF's LATE callback (FrontendSetState(ENABLED), the addresses advertised three times).

        What belonged to the old domain goes without a handshake: its backend directory and channels went
        with it (the channels are inactive since EARLY; closing them, like revoking the grants of the
        restored table, asks nothing of a backend). Packets in flight come back DROPPED. The walk up to
        the state the frontend had runs on its watchdog thread at PASSIVE_LEVEL, the model's backend waits
        giving the processor away; reaching ENABLED raises MAC_STATE_CHANGE, on which XENNET sends its
        three gratuitous ARPs (XV's FrontendAdvertiseIpAddresses)."""
        self.resumes += 1
        self.online = False
        if KeWaitForSingleObject(self._state_lock, 0) != STATUS_SUCCESS:
            self._resume_pending = True  # a walk waits for the backend: it does this when it is done
            log.info("%s: resumed in a new domain during a state walk; the walk resets it", self)
            return
        try:
            self._resume()
        finally:
            self._state_lock.set()

    def _resume(self) -> None:
        """With the state lock held: drop what belonged to the old domain, go UNKNOWN and let the watchdog
        thread walk back up to the wanted state."""
        self.online = False
        self.FrontendDisableStep()  # registered again on the way back to ENABLED
        self._queues_destroy()
        self.state = FrontendState.FRONTEND_UNKNOWN
        log.info("%s: resumed in a new domain: %s; back to %s on the watchdog thread", self, self.state.name,
                 self.wanted.name)
        self._watchdog_event.set()

    # -- VIF entry points ---------------------------------------------------------------------------------

    def FrontendEnable(self) -> NTSTATUS:
        return self.FrontendSetState(FrontendState.FRONTEND_ENABLED)

    def FrontendDisable(self) -> None:
        self.FrontendSetState(FrontendState.FRONTEND_CONNECTED)

    @property
    def rx_ring_size(self) -> int:
        return N.NET_RX_RING_SIZE

    @property
    def tx_ring_size(self) -> int:
        return N.NET_TX_RING_SIZE

    @property
    def transmitter_offload(self) -> XenvifOffloadOptions:
        csum = not self.features.get("feature-no-csum-offload", 0)
        return XenvifOffloadOptions(False, csum, csum, bool(self.features.get("feature-gso-tcpv4", 0)))

    @property
    def large_packet_size(self) -> int:
        return MAX_PACKET if self.features.get("feature-gso-tcpv4", 0) else 0

    # -- transmit -----------------------------------------------------------------------------------------

    def _count(self, direction: str, frame: bytes) -> None:
        kind = "BROADCAST" if frame[:6] == b"\xff" * 6 else "MULTICAST" if frame[0] & 1 else "UNICAST"
        self.statistics[XenvifVifStatistic[f"XENVIF_{direction}_{kind}_PACKETS"]] += 1
        self.statistics[XenvifVifStatistic[f"XENVIF_{direction}_{kind}_OCTETS"]] += len(frame)

    def TransmitterQueuePacket(self, data: bytes, offload: XenvifOffloadOptions, mss: int, hash_value: int,
                               more: bool, cookie: Any) -> NTSTATUS:
        if not self.online or not self.queues:
            self.statistics[XenvifVifStatistic.XENVIF_TRANSMITTER_PACKETS_DROPPED] += 1
            return STATUS_UNSUCCESSFUL
        if not 14 <= len(data) <= MAX_PACKET:
            self.statistics[XenvifVifStatistic.XENVIF_TRANSMITTER_FRONTEND_ERRORS] += 1
            return STATUS_INVALID_PARAMETER
        q = self.queues[hash_value % len(self.queues)]
        irql = KeAcquireSpinLock(q.tx_lock)
        try:
            q.backlog.append(TxPacket(cookie, bytes(data), offload, mss))
            if not more:
                self._tx_push(q)
        finally:
            KeReleaseSpinLock(q.tx_lock, irql)
        return STATUS_SUCCESS

    def _tx_slots(self, packet: TxPacket) -> list[bytes]:
        """The packet's fragments: headers first, then the payload in page-sized pieces."""
        data = packet.data
        head = header_length(data)
        return [data[:head]] + [data[i:i + XEN_PAGE_SIZE] for i in range(head, len(data), XEN_PAGE_SIZE)]

    def _tx_push(self, q: FrontendQueue) -> None:
        """With the tx lock held: reap responses, post what fits from the backlog, notify."""
        self._tx_reap(q)
        posted = False
        while q.backlog:
            packet = q.backlog[0]
            fragments = self._tx_slots(packet)
            gso = (packet.offload.OffloadIpVersion4LargePacket and packet.mss
                   and len(packet.data) > self.mtu + 14 and self.large_packet_size)
            csum_blank = bool(gso or packet.offload.OffloadIpVersion4TcpChecksum
                              or packet.offload.OffloadIpVersion4UdpChecksum)
            slots = len(fragments) + (1 if gso else 0)
            if len(fragments) > len(q.free_tx) or slots > q.tx_ring.free_requests():
                break
            q.backlog.popleft()
            packet.slots_left = len(fragments)
            packet.posted = time.monotonic()
            for i, fragment in enumerate(fragments):
                buffer = q.free_tx.pop()
                q.tx_view[buffer * XEN_PAGE_SIZE:buffer * XEN_PAGE_SIZE + len(fragment)] = fragment
                flags = N.NETTXF_more_data if i + 1 < len(fragments) else 0
                if i == 0:
                    flags |= (N.NETTXF_csum_blank | N.NETTXF_data_validated) if csum_blank else 0
                    flags |= N.NETTXF_extra_info if gso else 0
                q.tx_ring.put_request(q.tx_ref(buffer), 0, flags, buffer,
                                      len(packet.data) if i == 0 else len(fragment))
                q.in_flight[buffer] = packet
                if i == 0 and gso:
                    extra = N.NetifExtraInfo()
                    extra.type = N.XEN_NETIF_EXTRA_TYPE_GSO
                    extra.u.gso.size = packet.mss
                    extra.u.gso.type = N.XEN_NETIF_GSO_TYPE_TCPV4
                    q.tx_ring.put_request_bytes(bytes(extra).ljust(N.NETIF_TX_REQUEST_STRUCT.size, b"\0"))
            self._count("TRANSMITTER", packet.data)
            counters = self.queue_statistics[q.index]
            counters["tx_packets"] += 1
            counters["tx_octets"] += len(packet.data)
            posted = True
        if posted and q.tx_ring.push_requests_and_check_notify():
            self.xi.evtchn.EvtchnSend(q.channels[0])

    def _tx_reap(self, q: FrontendQueue) -> None:
        while True:
            while q.tx_ring.unconsumed_responses():
                buffer, status = q.tx_ring.get_response()
                if status == N.NETIF_RSP_NULL:
                    continue  # the response to an extra-info slot
                packet = q.in_flight.pop(buffer, None)
                if packet is None:
                    log.warning("%s: tx response for buffer %d, which is not in flight", self, buffer)
                    self.statistics[XenvifVifStatistic.XENVIF_TRANSMITTER_BACKEND_ERRORS] += 1
                    continue
                q.free_tx.append(buffer)
                if status == N.NETIF_RSP_ERROR:
                    packet.status = XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_ERROR
                elif status == N.NETIF_RSP_DROPPED and packet.status == XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_OK:
                    packet.status = XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_DROPPED
                packet.slots_left -= 1
                if packet.slots_left == 0:
                    if packet.status == XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_ERROR:
                        self.statistics[XenvifVifStatistic.XENVIF_TRANSMITTER_BACKEND_ERRORS] += 1
                    elif packet.status == XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_DROPPED:
                        self.statistics[XenvifVifStatistic.XENVIF_TRANSMITTER_PACKETS_DROPPED] += 1
                    self.vif.transmitter_return(packet.cookie, packet.status)
            if not q.tx_ring.final_check_for_responses():
                return

    # -- receive and the DPC ------------------------------------------------------------------------------

    def _interrupt(self, _interrupt: Any, q: FrontendQueue) -> bool:
        KeInsertQueueDpc(q.dpc)
        return True

    def _dpc(self, _dpc: KDpc, q: FrontendQueue, _a1: Any, _a2: Any) -> None:
        if q not in self.queues:
            return  # disconnected while the DPC was queued
        irql = KeAcquireSpinLock(q.tx_lock)
        try:
            self._tx_push(q)
        finally:
            KeReleaseSpinLock(q.tx_lock, irql)
        irql = KeAcquireSpinLock(q.rx_lock)
        try:
            frames = self._rx_poll(q)
        finally:
            KeReleaseSpinLock(q.rx_lock, irql)
        for i, (frame, flags) in enumerate(frames):
            self._rx_deliver(q, frame, flags, more=i + 1 < len(frames))
        for channel in q.channels:
            self.xi.evtchn.EvtchnUnmask(channel, False, True)

    def _rx_poll(self, q: FrontendQueue) -> list[tuple[bytes, int]]:
        frames: list[tuple[bytes, int]] = []
        reposted = False
        while True:
            while q.rx_ring.unconsumed_responses():
                raw = q.rx_ring.get_response_bytes()
                if q.skip_extras:
                    # An extra-info segment in a response slot: no buffer was used.
                    extra = N.NetifExtraInfo.from_buffer_copy(raw[:N.NETIF_EXTRA_INFO_STRUCT.size])
                    q.skip_extras = bool(extra.flags & N.XEN_NETIF_EXTRA_FLAG_MORE)
                    continue
                buffer, offset, flags, status = N.NETIF_RX_RESPONSE_STRUCT.unpack(raw)
                if buffer >= N.NET_RX_RING_SIZE:
                    log.warning("%s: rx response id %d beyond the ring", self, buffer)
                    self.statistics[XenvifVifStatistic.XENVIF_RECEIVER_BACKEND_ERRORS] += 1
                    continue
                q.skip_extras = bool(flags & N.NETRXF_extra_info)
                if status < 0 or offset + status > XEN_PAGE_SIZE:
                    self.statistics[XenvifVifStatistic.XENVIF_RECEIVER_BACKEND_ERRORS] += 1
                    q.partial.clear()
                else:
                    start = buffer * XEN_PAGE_SIZE + offset
                    q.partial.append((bytes(q.rx_view[start:start + status]), flags))
                    if not flags & N.NETRXF_more_data:
                        frames.append((b"".join(d for d, _ in q.partial), q.partial[0][1]))
                        q.partial.clear()
                q.rx_ring.put_request(buffer, 0, q.rx_ref(buffer))
                reposted = True
            if not q.rx_ring.final_check_for_responses():
                break
        if reposted and q.rx_ring.push_requests_and_check_notify():
            self.xi.evtchn.EvtchnSend(q.channels[-1])
        return frames

    def _rx_deliver(self, q: FrontendQueue, frame: bytes, flags: int, more: bool) -> None:
        if len(frame) < 14:
            self.statistics[XenvifVifStatistic.XENVIF_RECEIVER_FRONTEND_ERRORS] += 1
            return
        if self.state != FrontendState.FRONTEND_ENABLED or not self.vif.enabled:
            self.statistics[XenvifVifStatistic.XENVIF_RECEIVER_PACKETS_DROPPED] += 1
            return
        self._count("RECEIVER", frame)
        counters = self.queue_statistics[q.index]
        counters["rx_packets"] += 1
        counters["rx_octets"] += len(frame)
        validated = bool(flags & (N.NETRXF_data_validated | N.NETRXF_csum_blank))
        checksum = XenvifPacketChecksumFlags(validated, validated, bool(flags & N.NETRXF_csum_blank))
        self.vif.receiver_queue(ReceiverQueueParameters(q.index, frame, checksum, 0, 0, more, frame))
