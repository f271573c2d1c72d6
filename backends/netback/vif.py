"""One vif: the backend side of the xenbus handshake for `backend/vif/<domid>/<devid>` and, once the
frontend is Connected, its queues (rings, event channels, one tx worker each) and its TAP reader.

Handshake and teardown run on the daemon's main thread (the only xenstore user); the data path runs on
the vif's own threads and reports a fatal protocol error through `on_fatal`, which the main thread
turns into a disconnect."""
from __future__ import annotations

import logging
import os
import select
import threading
from dataclasses import dataclass, field
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
    tx_wake: threading.Event = field(default_factory=threading.Event)
    rx_cond: threading.Condition = field(default_factory=threading.Condition)
    tx_lock: threading.Lock = field(default_factory=threading.Lock)
    thread: threading.Thread | None = None

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
        self._wake_r, self._wake_w = -1, -1
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
        self._wake_r, self._wake_w = os.pipe()
        try:
            self.tap = Tap(tap_name(self.domid, self.devid))
            for q in range(nq):
                self.queues.append(self._connect_queue(q, f"queue-{q}/" if nq > 1 else "", grants, sg))
        except BaseException:
            self.disconnect()
            raise
        if self.xs.exists(f"{self.path}/error"):
            self.xs.rm(f"{self.path}/error")
        for q in self.queues:
            q.thread = threading.Thread(target=self._tx_loop, args=(q,), name=f"{self.name}-tx{q.index}",
                                        daemon=True)
            self._threads.append(q.thread)
        self._threads.append(threading.Thread(target=self._rx_loop, name=f"{self.name}-rx", daemon=True))
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
            if split:
                channels.append(self.link.bind(ports[0], q.tx_wake.set))
                channels.append(self.link.bind(ports[1], lambda: self._rx_kick(q)))
            else:
                channels.append(self.link.bind(ports[0], lambda: (q.tx_wake.set(), self._rx_kick(q))))
        except BaseException:
            for ch in channels:
                self.link.unbind(ch)
            for r in rings:
                r.close()
            for h in handles:
                self.backend.call("gnttab_unmap", handle=h)
            raise
        return q

    @staticmethod
    def _rx_kick(q: Queue) -> None:
        with q.rx_cond:
            q.rx_cond.notify_all()

    def disconnect(self) -> None:
        """Stop the vif's threads, then give back its rings, channels, grants, TAP and wake pipe.

        The threads use all of those, so nothing is released until every one of them has ended: one that
        does not end in time makes this raise WaitTimeout with everything left in place (calling
        disconnect() again later finishes the job)."""
        self._stop.set()
        for q in self.queues:
            q.tx_wake.set()
            self._rx_kick(q)
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
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
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # ---- data path (vif threads) -----------------------------------------------------------------

    def _tx_loop(self, q: Queue) -> None:
        try:
            while not self._stop.is_set():
                q.tx_wake.wait()
                q.tx_wake.clear()
                while not self._stop.is_set():
                    frames, notify = q.tx.poll()
                    tap = self.tap
                    for hdr, frame in frames:
                        try:
                            if tap is not None:
                                tap.write(hdr, frame)
                        except OSError as exc:
                            self.stats.tx_drops += 1
                            log.warning("%s: TAP refused a %d-byte frame: %s", self.name, len(frame), exc)
                    if notify:
                        self.link.notify(q.tx_channel)
                    if not q.tx.ring.final_check_for_requests():
                        break
        except RingError as exc:
            self.on_fatal(self, f"queue {q.index} tx ring: {exc}")
        except Exception as exc:
            log.exception("%s: tx queue %d failed", self.name, q.index)
            self.on_fatal(self, f"queue {q.index} tx: {exc}")

    def _rx_loop(self) -> None:
        tap = self.tap
        assert tap is not None
        poller = select.poll()
        poller.register(tap.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        # Queues owed a notification: one per batch of frames read from the TAP, as Linux netback's
        # xenvif_rx_action notifies once per batch rather than per frame.
        owed: set[int] = set()
        try:
            while not self._stop.is_set():
                if not poller.poll(1000) or self._stop.is_set():
                    continue
                for _ in range(RX_BATCH):
                    try:
                        hdr, frame = tap.read()
                    except BlockingIOError:
                        break
                    if not self._rx_frame(hdr, frame, owed):
                        return
                self._rx_notify(owed)
        except RingError as exc:
            self.on_fatal(self, f"rx ring: {exc}")
        except Exception as exc:
            log.exception("%s: rx failed", self.name)
            self.on_fatal(self, f"rx: {exc}")

    def _rx_frame(self, hdr: VnetHdr, frame: bytes, owed: set[int]) -> bool:
        """Deliver one frame from the TAP (or drop it); False when the vif is stopping."""
        q = self.queues[flow_queue(frame, len(self.queues))]
        if not q.rx.fits(frame):
            self.stats.rx_drops += 1
            return True
        if not q.rx.ready(frame):
            # The frontend reposts buffers once it has seen the responses: tell it before waiting.
            self._rx_notify(owed)
            with q.rx_cond:
                # rx_cond.wait releases it for the kick; re-arm rx req_event so the frontend's next
                # posting notifies us (it was asked to with feature-rx-notify).
                ok = q.rx_cond.wait_for(lambda: self._stop.is_set() or q.rx.ready(frame)
                                        or (q.rx.ring.final_check_for_requests() and q.rx.ready(frame)),
                                        RX_WAIT)
            if self._stop.is_set():
                return False
            if not ok:
                self.stats.rx_drops += 1
                return True
        if q.rx.deliver(hdr, frame):
            owed.add(q.index)
        return True

    def _rx_notify(self, owed: set[int]) -> None:
        for index in owed:
            self.link.notify(self.queues[index].rx_channel)
        owed.clear()
