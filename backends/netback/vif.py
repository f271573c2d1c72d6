"""One vif: the backend side of the xenbus handshake for `backend/vif/<domid>/<devid>` and, once the
frontend is Connected, its queues (rings, event channels) and its TAP.

Handshake and teardown run on the daemon's main thread (the only xenstore user); the data path runs on
the vif's one data thread and reports a fatal protocol error through `on_fatal`, which the main thread
turns into a disconnect. One thread for both directions and every queue, as one Linux netback kthread
serves a queue's tx and rx: threads per direction spent a third of netback's CPU handing the GIL to each
other (measured with `xenpv bench net`: one thread carries 30-50% more frames/s with 25% less CPU per
frame). The frontend's events only wake that thread (an eventfd written by the vhost-user thread)."""
from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from typing import Callable

from xenpv.backends.netback.datapath import GrantFault, RxPath, TxPath, VifStats, flow_queue
from xenpv.backends.grants import BackendGrants, GrantAccessError
from xenpv.backends.netback.tap import Tap, VnetHdr, tap_name
from xenpv.backends.xenbackend import DomainLink, XenBackend
from xenpv.backends.xenstored.client import XsClient, XsRequestError
from xenpv.base.threads import join_stopped
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, BackRing, RingError
from xenpv.xenabi.xenbus import XenbusState as S

log = logging.getLogger("netback.vif")

MAX_QUEUES = 8
# How long a frame from the wire waits for the frontend to post rx buffers before it is dropped.
RX_WAIT = 0.2
# Frames taken from the TAP per notification of the frontend (at most; fewer when the TAP runs dry).
RX_BATCH = 64
# Passes over a queue's tx ring per wake-up before the other queues and rx get their turn: a frontend
# that keeps posting requests must not keep the data thread to itself (Linux's NAPI budget).
TX_ROUNDS = 4

FEATURES = {
    "feature-rx-copy": "1",
    "feature-rx-flip": "0",
    "feature-sg": "1",
    "feature-gso-tcpv4": "1",
    "feature-gso-tcpv6": "1",
    "feature-ipv6-csum-offload": "1",
    "feature-split-event-channels": "1",
    "multi-queue-max-queues": str(MAX_QUEUES),
    "feature-rx-notify": "1",
}


class _QueueFault(Exception):
    """A ring's protocol error, worded for the vif's error node."""


class VifConfigError(Exception):
    """The frontend's keys do not describe a connection this backend can make."""


class LinkGrants:
    """The data path's grant access: pin, copy, unpin for each buffer (the frontend may revoke a buffer as
    soon as its response is out, so nothing stays pinned between requests).  Pins are taken in this
    process on the shared pin table (backends.grants), not by a call to xenhv per buffer."""

    def __init__(self, backend: XenBackend, link: DomainLink) -> None:
        self.backend, self.link = backend, link
        self.access = BackendGrants(backend, link)

    def map_ring(self, ref: int) -> dict[str, int]:
        """A ring page, mapped through xenhv for as long as the queue lives."""
        try:
            return self.backend.call("gnttab_map", domid=self.link.domid, ref=ref, readonly=False)
        except Exception as exc:  # xenhv answers a bad ref with an error reply
            raise GrantFault(f"dom{self.link.domid} ref {ref}: {exc}") from exc

    def read(self, ref: int, offset: int, size: int) -> bytes:
        if offset + size > XEN_PAGE_SIZE:
            raise GrantFault(f"offset {offset} + {size} beyond the page")
        try:
            return self.access.read(ref, offset, size)
        except GrantAccessError as exc:
            raise GrantFault(str(exc)) from exc

    def write(self, ref: int, offset: int, data: bytes | memoryview) -> None:
        if offset + len(data) > XEN_PAGE_SIZE:
            raise GrantFault(f"offset {offset} + {len(data)} beyond the page")
        try:
            self.access.write(ref, offset, data)
        except GrantAccessError as exc:
            raise GrantFault(str(exc)) from exc

    def close(self) -> None:
        self.access.close()


@dataclass
class Queue:
    index: int
    tx: TxPath
    rx: RxPath
    handles: list[int]
    channels: list[int]           # [tx, rx] or one shared channel

    @property
    def tx_channel(self) -> int:
        return self.channels[0]

    @property
    def rx_channel(self) -> int:
        return self.channels[-1]


class Vif:
    def __init__(self, backend: XenBackend, xs: XsClient, domid: int, devid: int,
                 on_fatal: Callable[["Vif", str], None]) -> None:
        self.backend, self.xs, self.domid, self.devid = backend, xs, domid, devid
        self.path = f"/local/domain/0/backend/vif/{domid}/{devid}"
        self.name = f"vif{domid}.{devid}"
        self.frontend = xs.read(f"{self.path}/frontend").decode()
        self.on_fatal = on_fatal
        self.state = S.Unknown
        self.stats = VifStats()
        self.queues: list[Queue] = []
        self.tap: Tap | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._wake = -1
        # Held by a kick while it writes the wake eventfd and by the disconnect that closes it: a kick
        # in flight on the vhost-user thread must not write to an fd number some other file reuses.
        self._wake_lock = threading.Lock()
        self._grants: LinkGrants | None = None
        # The frontend must be seen out of Connected after this backend instance offered InitWait: a
        # Connected left over from a previous netback describes rings this instance never saw.
        self._frontend_fresh = False
        self._stale_events = 0

    # ---- handshake (main thread) -----------------------------------------------------------------

    def _set_state(self, state: S) -> None:
        self.state = state
        self.xs.write(f"{self.path}/state", state.wire())
        log.info("%s: backend state %s", self.name, state.name)

    def frontend_state(self) -> S:
        try:
            return S.parse(self.xs.read(f"{self.frontend}/state"))
        except XsRequestError:
            return S.Unknown

    def start(self, watch_registered_now: bool = False) -> None:
        """Advertise features and go to InitWait. A frontend already Connected then is left over from a
        previous netback; it must write its state again before this instance connects. The daemon
        registers the frontend watch just before the first start, and that registration's event (queued
        ahead of anything the frontend writes in reply to InitWait) is the one to skip."""
        self._frontend_fresh = self.frontend_state() != S.Connected
        self._stale_events = 1 if watch_registered_now and not self._frontend_fresh else 0

        def body(tx: int) -> None:
            for k, v in FEATURES.items():
                self.xs.write(f"{self.path}/{k}", v, tx)
            self.xs.write(f"{self.path}/state", S.InitWait.wire(), tx)
        self.xs.transact(body)
        self.state = S.InitWait
        log.info("%s: features advertised, backend state InitWait", self.name)

    def frontend_changed(self) -> None:
        fe = self.frontend_state()
        if not self._frontend_fresh and self._stale_events:
            self._stale_events -= 1
            return
        # Any state write after that (even one rewriting Connected, as watch events coalesce) is a
        # frontend that has seen this backend's InitWait.
        self._frontend_fresh = True
        if fe == S.Connected and self.state == S.InitWait and self._frontend_fresh:
            try:
                self.connect()
            except Exception as exc:  # whatever failed, this vif alone stays down with the reason logged
                log.error("%s: cannot connect: %s", self.name, exc)
                self.disconnect()
                self._set_state(S.Closing)
        elif fe == S.Closing and self.state not in (S.Closing, S.Closed):
            self.disconnect()
            self._set_state(S.Closing)
        elif fe in (S.Closed, S.Unknown) and self.state not in (S.Closed, S.InitWait):
            self.disconnect()
            self._set_state(S.Closed)
        elif fe == S.Initialising and self.state in (S.Closed, S.Closing):
            if self.xs.read(f"{self.path}/online") == b"1":
                self.start()

    def fatal(self, reason: str) -> None:
        """A data path protocol error: the vif is disconnected, the reason stays in the log and in
        `<backend>/error` for the frontend's and the tests' benefit."""
        if self.state != S.Connected:
            return
        log.error("%s: disconnected: %s", self.name, reason)
        self.disconnect()
        self.xs.write(f"{self.path}/error", reason)
        self._set_state(S.Closing)

    def _fe(self, key: str, qdir: str = "") -> str | None:
        try:
            return self.xs.read(f"{self.frontend}/{qdir}{key}").decode()
        except XsRequestError:
            return None

    def _fe_int(self, key: str, qdir: str = "", default: int | None = None) -> int:
        text = self._fe(key, qdir)
        if text is None:
            if default is None:
                raise VifConfigError(f"frontend key {qdir}{key} missing")
            return default
        try:
            return int(text)
        except ValueError:
            raise VifConfigError(f"frontend key {qdir}{key} is not a number: {text!r}") from None

    def connect(self) -> None:
        if self._fe_int("request-rx-copy", default=0) != 1:
            raise VifConfigError("frontend did not request rx-copy (the only rx mode this backend has)")
        nq = self._fe_int("multi-queue-num-queues", default=1)
        if not 1 <= nq <= MAX_QUEUES:
            raise VifConfigError(f"multi-queue-num-queues {nq} outside 1..{MAX_QUEUES}")
        sg = self._fe_int("feature-sg", default=0) == 1
        self.link = self.backend.links.get(self.domid) or self._attach()
        self._grants = grants = LinkGrants(self.backend, self.link)
        self._stop.clear()
        with self._wake_lock:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.tap = Tap(tap_name(self.domid, self.devid))
            for q in range(nq):
                self.queues.append(self._connect_queue(q, f"queue-{q}/" if nq > 1 else "", grants, sg))
        except BaseException:
            self.disconnect()
            raise
        if self.xs.exists(f"{self.path}/error"):
            self.xs.rm(f"{self.path}/error")
        self._threads.append(threading.Thread(target=self._data_loop, name=f"{self.name}-data", daemon=True))
        for t in self._threads:
            t.start()
        self._set_state(S.Connected)
        log.info("%s: connected, %d queue(s), sg=%s, split=%s", self.name, nq, sg,
                 len(self.queues[0].channels) == 2)

    def _attach(self) -> DomainLink:
        # xenhv replaces the link of a killed predecessor of this process by itself.
        return self.backend.attach(self.domid)

    def _connect_queue(self, index: int, qdir: str, grants: LinkGrants, sg: bool) -> Queue:
        tx_ref, rx_ref = self._fe_int("tx-ring-ref", qdir), self._fe_int("rx-ring-ref", qdir)
        split = self._fe("event-channel-tx", qdir) is not None
        ports = ([self._fe_int("event-channel-tx", qdir), self._fe_int("event-channel-rx", qdir)] if split
                 else [self._fe_int("event-channel", qdir)])
        handles: list[int] = []
        rings: list[BackRing] = []
        channels: list[int] = []
        # Until the queue is returned (and disconnect() knows it), a failure gives back here whatever this
        # queue took: a refused bind after the rings were mapped must not leave them mapped until the
        # domain's link closes (the frontend could not revoke its ring grants).
        try:
            for ref, req, rsp in ((tx_ref, N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT),
                                  (rx_ref, N.NETIF_RX_REQUEST_STRUCT, N.NETIF_RX_RESPONSE_STRUCT)):
                m = grants.map_ring(ref)
                handles.append(m["handle"])
                rings.append(BackRing(self.link.memory.view(m["gfn"] << 12, XEN_PAGE_SIZE), req, rsp))
            name = f"{self.name}-q{index}"
            q = Queue(index, TxPath(rings[0], grants, self.stats, name),
                      RxPath(rings[1], grants, self.stats, name, sg), handles, channels)
            # bind() runs the handler once at once, so the queue must be complete before it.
            for port in ports:
                channels.append(self.link.bind(port, self._kick))
        except BaseException:
            for ch in channels:
                self.link.unbind(ch)
            for r in rings:
                r.close()
            for h in handles:
                self.backend.call("gnttab_unmap", handle=h)
            raise
        return q

    def _kick(self) -> None:
        """An event from the frontend (tx requests or rx buffers posted): wake the data thread."""
        with self._wake_lock:
            if self._wake >= 0:
                os.eventfd_write(self._wake, 1)

    def disconnect(self) -> None:
        """Stop the vif's data thread, then give back its rings, channels, grants, TAP and wake eventfd.

        The threads use all of those, so nothing is released until every one of them has ended: one that
        does not end in time makes this raise WaitTimeout with everything left in place (calling
        disconnect() again later finishes the job)."""
        self._stop.set()
        self._kick()
        for t in self._threads:
            if t is not threading.current_thread():
                join_stopped(t, f"disconnecting {self.name}")
        self._threads.clear()
        for q in self.queues:
            for ch in q.channels:
                try:
                    self.link.unbind(ch)
                except Exception as exc:  # the domain may already be gone
                    log.debug("%s: unbind %d: %s", self.name, ch, exc)
            q.tx.ring.close()
            q.rx.ring.close()
            for h in q.handles:
                try:
                    self.backend.call("gnttab_unmap", handle=h)
                except Exception as exc:
                    log.debug("%s: unmap %d: %s", self.name, h, exc)
        self.queues.clear()
        if self._grants is not None:
            self._grants.close()  # after the threads: none of them pins any more
            self._grants = None
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        with self._wake_lock:
            if self._wake >= 0:
                os.close(self._wake)
            self._wake = -1

    # ---- data path (the vif's data thread) -----------------------------------------------------------------

    def _data_loop(self) -> None:
        """The vif's one data thread: each queue's tx ring to the TAP, and the TAP to the queues' rx rings.
        One thread, not one per direction: they would spend their time handing the GIL to each other."""
        tap = self.tap
        assert tap is not None
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        tap_polled = False
        held: tuple[VnetHdr, bytes, Queue, float] | None = None  # a frame waiting for rx buffers, its deadline
        owed: set[int] = set()
        busy = False  # a queue's tx ring still had requests when its budget ran out
        try:
            while not self._stop.is_set():
                if tap_polled != (held is None):
                    if held is None:
                        poller.register(tap.fd, select.POLLIN)
                    else:
                        poller.unregister(tap.fd)
                    tap_polled = held is None
                if busy:
                    timeout = 0
                elif held is None:
                    timeout = 1000
                else:
                    timeout = max(0, int((held[3] - time.monotonic()) * 1000) + 1)
                poller.poll(timeout)
                if self._stop.is_set():
                    return
                try:
                    os.eventfd_read(self._wake)
                except BlockingIOError:
                    pass
                busy = False
                for q in self.queues:
                    busy |= self._tx_service(q, tap)
                if held is not None:
                    held = self._rx_held(held, owed)
                if held is None:
                    held = self._rx_batch(tap, owed)
                self._rx_notify(owed)
        except _QueueFault as exc:
            self.on_fatal(self, str(exc))
        except Exception as exc:
            log.exception("%s: data path failed", self.name)
            self.on_fatal(self, f"data path: {exc}")

    def _tx_service(self, q: Queue, tap: Tap) -> bool:
        """Up to TX_ROUNDS passes over `q`'s tx ring onto the TAP; True when requests are left for the next
        turn."""
        try:
            for _ in range(TX_ROUNDS):
                frames, notify = q.tx.poll()
                for hdr, frame in frames:
                    try:
                        tap.write(hdr, frame)
                    except OSError as exc:
                        self.stats.tx_drops += 1
                        log.warning("%s: TAP refused a %d-byte frame: %s", self.name, len(frame), exc)
                if notify:
                    self.link.notify(q.tx_channel)
                if not q.tx.ring.final_check_for_requests():
                    return False
        except RingError as exc:
            raise _QueueFault(f"queue {q.index} tx ring: {exc}") from None
        return True

    def _rx_held(self, held: "tuple[VnetHdr, bytes, Queue, float]", owed: set[int]
                 ) -> "tuple[VnetHdr, bytes, Queue, float] | None":
        """The held frame onto its rx ring if buffers came, dropped if its time ran out, else still held."""
        hdr, frame, q, deadline = held
        try:
            if self._rx_ready(q, frame):
                if q.rx.deliver(hdr, frame):
                    owed.add(q.index)
                return None
        except RingError as exc:
            raise _QueueFault(f"rx ring: {exc}") from None
        if time.monotonic() >= deadline:
            self.stats.rx_drops += 1
            return None
        return held

    def _rx_batch(self, tap: Tap, owed: set[int]) -> "tuple[VnetHdr, bytes, Queue, float] | None":
        """Up to RX_BATCH frames from the TAP onto the rx rings; a frame whose queue has no buffers posted
        is returned to be held (the TAP is not read meanwhile, as Linux netback stops its queue)."""
        for _ in range(RX_BATCH):
            try:
                hdr, frame = tap.read()
            except BlockingIOError:
                return None
            q = self.queues[flow_queue(frame, len(self.queues))]
            try:
                if not q.rx.fits(frame):
                    self.stats.rx_drops += 1
                    continue
                if not q.rx.ready(frame):
                    # The frontend reposts buffers once it has seen the responses: tell it before waiting.
                    self._rx_notify(owed)
                    if not self._rx_ready(q, frame):
                        return hdr, frame, q, time.monotonic() + RX_WAIT
                if q.rx.deliver(hdr, frame):
                    owed.add(q.index)
            except RingError as exc:
                raise _QueueFault(f"rx ring: {exc}") from None
        return None

    @staticmethod
    def _rx_ready(q: Queue, frame: bytes) -> bool:
        """Whether `q` has the rx buffers `frame` needs; if not, rx req_event is re-armed first, so the
        frontend's next posting notifies us (it was asked to with feature-rx-notify)."""
        return q.rx.ready(frame) or (q.rx.ring.final_check_for_requests() and q.rx.ready(frame))

    def _rx_notify(self, owed: set[int]) -> None:
        for index in owed:
            self.link.notify(self.queues[index].rx_channel)
        owed.clear()
