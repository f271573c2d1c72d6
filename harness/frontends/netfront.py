"""A minimal netif frontend for back-end tests, on the guest's platform services (grants, event channels,
xenstore over its ring): per queue a tx and an rx ring in granted pages, posted rx buffers, a poll thread
woken by the queue's event channels; plus a small IPv4 layer over dpkt (ARP and ICMP echo answered on its
own, UDP with IP fragmentation), so the namespace's kernel is a peer like any host.

It also sends raw tx entries for the hostile-input tests."""
from __future__ import annotations

import ipaddress
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import dpkt

from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE, FrontRing
from xenpv.xenabi.xenbus import XenbusState as S
from xenpv.stack.timescale import scaled

BACKEND_SECONDS = 15.0  # for netback to answer a state change (scaled)

log = logging.getLogger("harness.netfront")

TX_BUFFERS = 64
TRANSACTION_ATTEMPTS = 10


class NetfrontError(Exception):
    pass


@dataclass
class FrontQueue:
    index: int
    tx: FrontRing
    rx: FrontRing
    tx_ref: int
    rx_ref: int
    tx_bufs: list[tuple[int, int]]          # (gfn, ref) by id
    rx_bufs: list[tuple[int, int]]
    ports: list[int]
    free_tx: list[int] = field(default_factory=list)
    tx_status: dict[int, int] = field(default_factory=dict)   # id -> last status
    tx_lock: threading.Lock = field(default_factory=threading.Lock)
    partial: list[tuple[bytes, int]] = field(default_factory=list)
    rx_frames: int = 0
    tx_frames: int = 0


class MiniNetfront:
    def __init__(self, platform: XenPlatform, devid: int = 0, *, queues: int = 1, split: bool = True,
                 sg: bool = True) -> None:
        self.p = platform
        self.devid = devid
        self.path = f"device/vif/{devid}"
        self.want_queues = queues
        self.want_split = split
        self.sg = sg
        self.queues: list[FrontQueue] = []
        self.frames: "queue.Queue[tuple[int, bytes, int]]" = queue.Queue()
        self.rx_errors = 0
        self.on_frame: Callable[[int, bytes], bool] | None = None  # True: consumed, not queued
        self._hc_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pages: list[int] = []
        self.backend = self.p.store.read(f"{self.path}/backend").decode()
        self.mac = self.p.store.read(f"{self.path}/mac").decode()

    # ---- xenbus ------------------------------------------------------------------------------------

    def backend_state(self) -> S:
        try:
            return S.parse(self.p.store.read(f"{self.backend}/state"))
        except XenstoreError:
            return S.Unknown

    def wait_backend(self, states: set[S], timeout: float = BACKEND_SECONDS) -> S:
        # Scaled as every deadline of the harness is (XENPV_TIME_SCALE): under load (CI with -n 4 beside other
        # work) netback took more than the 5 s this used to allow to attach and connect.
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        while (st := self.backend_state()) not in states:
            if time.monotonic() > deadline:
                raise NetfrontError(f"backend {self.backend} stayed {st.name}, wanted {[s.name for s in states]}")
            time.sleep(0.01)
        return st

    def _backend_int(self, key: str) -> int:
        try:
            return int(self.p.store.read(f"{self.backend}/{key}"))
        except (XenstoreError, ValueError):
            return 0

    def connect(self, timeout: float = BACKEND_SECONDS) -> None:
        self.p.store.write(f"{self.path}/state", S.Initialising.wire())
        self.wait_backend({S.InitWait}, timeout)
        nq = min(self.want_queues, max(1, self._backend_int("multi-queue-max-queues")))
        split = self.want_split and self._backend_int("feature-split-event-channels") == 1
        self.queues = [self._make_queue(i, split) for i in range(nq)]
        for attempt in range(TRANSACTION_ATTEMPTS):
            tx = self.p.store.transaction_start()
            for q in self.queues:
                d = f"{self.path}/queue-{q.index}/" if nq > 1 else f"{self.path}/"
                self.p.store.write(f"{d}tx-ring-ref", str(q.tx_ref), tx)
                self.p.store.write(f"{d}rx-ring-ref", str(q.rx_ref), tx)
                if split:
                    self.p.store.write(f"{d}event-channel-tx", str(q.ports[0]), tx)
                    self.p.store.write(f"{d}event-channel-rx", str(q.ports[1]), tx)
                else:
                    self.p.store.write(f"{d}event-channel", str(q.ports[0]), tx)
            if nq > 1:
                self.p.store.write(f"{self.path}/multi-queue-num-queues", str(nq), tx)
            for k, v in {"request-rx-copy": "1", "feature-rx-notify": "1", "feature-sg": str(int(self.sg)),
                         "feature-gso-tcpv4": "0", "feature-gso-tcpv6": "0"}.items():
                self.p.store.write(f"{self.path}/{k}", v, tx)
            try:
                self.p.store.transaction_end(tx)
                break
            except XenstoreError as exc:
                if exc.errno != "EAGAIN" or attempt + 1 == TRANSACTION_ATTEMPTS:
                    raise
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name=f"netfront{self.devid}", daemon=True)
        self._thread.start()
        self.p.store.write(f"{self.path}/state", S.Connected.wire())
        self.wait_backend({S.Connected}, timeout)
        log.info("vif %d connected: %d queue(s), split=%s", self.devid, nq, split)

    def _make_queue(self, index: int, split: bool) -> FrontQueue:
        nr = N.NET_RX_RING_SIZE
        gfns = self.p.pages.alloc(2 + TX_BUFFERS + nr)
        self._pages += gfns
        grant = lambda g: self.p.grant(0, g)  # noqa: E731
        tx = FrontRing(self.p.vcpu.page(gfns[0]), N.NETIF_TX_REQUEST_STRUCT, N.NETIF_TX_RESPONSE_STRUCT, init=True)
        rx = FrontRing(self.p.vcpu.page(gfns[1]), N.NETIF_RX_REQUEST_STRUCT, N.NETIF_RX_RESPONSE_STRUCT, init=True)
        ports = [self.p.hypercalls.evtchn_alloc_unbound(0) for _ in range(2 if split else 1)]
        q = FrontQueue(index, tx, rx, grant(gfns[0]), grant(gfns[1]),
                       [(g, grant(g)) for g in gfns[2:2 + TX_BUFFERS]],
                       [(g, grant(g)) for g in gfns[2 + TX_BUFFERS:]], ports)
        q.free_tx = list(range(TX_BUFFERS))
        for port in ports:
            self.p.upcalls.bind(port, lambda _p: self._wake.set())
        for i, (_, ref) in enumerate(q.rx_bufs):
            rx.put_request(i, 0, ref)
        rx.push_requests()
        return q

    def notify(self, q: FrontQueue, rx: bool = False) -> None:
        with self._hc_lock:
            self.p.hypercalls.evtchn_send(q.ports[-1] if rx else q.ports[0])

    def stop_polling(self) -> None:
        """Stop consuming responses: no rx buffer is reposted any more (a frontend whose guest stopped
        taking frames); `send` still reaps the tx ring."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None

    def close(self) -> None:
        """Tear down this frontend's side (rings, channels, grants) without touching the backend."""
        self.stop_polling()
        for q in self.queues:
            for port in q.ports:
                self.p.upcalls.unbind(port)
                with self._hc_lock:
                    self.p.hypercalls.evtchn_close(port)
            q.tx.close()
            q.rx.close()
            for ref in [q.tx_ref, q.rx_ref] + [r for _, r in q.tx_bufs + q.rx_bufs]:
                self.p.end_grant(ref)
        self.queues = []

    # ---- data --------------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            for q in list(self.queues):
                try:
                    with q.tx_lock:
                        self._reap_tx(q)
                    self._reap_rx(q)
                except Exception:
                    log.exception("vif %d queue %d: poll failed", self.devid, q.index)

    def _reap_tx(self, q: FrontQueue) -> None:
        while True:
            while q.tx.unconsumed_responses():
                rid, status = q.tx.get_response()
                if status == N.NETIF_RSP_NULL:
                    continue
                q.tx_status[rid] = status
                if rid < TX_BUFFERS and rid not in q.free_tx:
                    q.free_tx.append(rid)
            if not q.tx.final_check_for_responses():
                return

    def _reap_rx(self, q: FrontQueue) -> None:
        reposted = False
        while True:
            while q.rx.unconsumed_responses():
                rid, offset, flags, status = q.rx.get_response()
                if rid >= len(q.rx_bufs):
                    raise NetfrontError(f"rx response id {rid} beyond the {len(q.rx_bufs)} buffers")
                gfn, ref = q.rx_bufs[rid]
                if status < 0:
                    self.rx_errors += 1
                    q.partial.clear()
                else:
                    q.partial.append((bytes(self.p.vcpu.page(gfn)[offset:offset + status]), flags))
                    if not flags & N.NETRXF_more_data:
                        frame = b"".join(d for d, _ in q.partial)
                        first_flags = q.partial[0][1]
                        q.partial.clear()
                        q.rx_frames += 1
                        if self.on_frame is None or not self.on_frame(q.index, frame):
                            self.frames.put((q.index, frame, first_flags))
                q.rx.put_request(rid, 0, ref)
                reposted = True
            if not q.rx.final_check_for_responses():
                break
        if reposted and q.rx.push_requests_and_check_notify():
            self.notify(q, rx=True)

    def send(self, frame: bytes, queue_index: int = 0, slot_bytes: int = XEN_PAGE_SIZE, flags: int = 0,
             timeout: float = 5.0) -> None:
        """Send one frame as a chain of slots of at most `slot_bytes` each."""
        q = self.queues[queue_index]
        chunks = [frame[i:i + slot_bytes] for i in range(0, len(frame), slot_bytes)] or [b""]
        deadline = time.monotonic() + timeout
        while True:
            with q.tx_lock:
                self._reap_tx(q)
                if len(q.free_tx) >= len(chunks) and q.tx.free_requests() >= len(chunks):
                    for i, chunk in enumerate(chunks):
                        bid = q.free_tx.pop()
                        gfn, ref = q.tx_bufs[bid]
                        self.p.vcpu.page(gfn)[:len(chunk)] = chunk
                        more = N.NETTXF_more_data if i + 1 < len(chunks) else 0
                        q.tx.put_request(ref, 0, (flags if i == 0 else 0) | more, bid,
                                         len(frame) if i == 0 else len(chunk))
                    q.tx_frames += 1
                    notify = q.tx.push_requests_and_check_notify()
                    break
            if time.monotonic() > deadline:
                raise NetfrontError(f"vif {self.devid} queue {queue_index}: no tx slots for {timeout}s")
            time.sleep(0.001)
        if notify:
            self.notify(q)

    def send_raw(self, entries: list[bytes], queue_index: int = 0) -> None:
        """Put raw 12-byte tx slots on the ring (hostile tests) and notify."""
        q = self.queues[queue_index]
        with q.tx_lock:
            for e in entries:
                q.tx.put_request_bytes(e)
            q.tx.push_requests()
        self.notify(q)

    def tx_buffer(self, q: FrontQueue, bid: int, data: bytes) -> int:
        """Fill tx buffer `bid` (reserved from the free list) and return its grant ref."""
        with q.tx_lock:
            q.free_tx.remove(bid)
        gfn, ref = q.tx_bufs[bid]
        self.p.vcpu.page(gfn)[:len(data)] = data
        return ref

    def wait_tx_status(self, q: FrontQueue, bid: int, timeout: float = 5.0) -> int:
        deadline = time.monotonic() + timeout
        while bid not in q.tx_status:
            if time.monotonic() > deadline:
                raise NetfrontError(f"no tx response for id {bid}")
            time.sleep(0.005)
        return q.tx_status.pop(bid)


def _mac(text: str) -> bytes:
    return bytes(int(x, 16) for x in text.split(":"))


class GuestIp:
    """ARP, ICMP echo and UDP over one MiniNetfront, answering ARP and echo requests on the poll thread."""

    def __init__(self, nf: MiniNetfront, address: ipaddress.IPv4Address, mtu: int = 1500) -> None:
        self.nf, self.ip, self.mtu = nf, address, mtu
        self.mac = _mac(nf.mac)
        self.arp: dict[bytes, bytes] = {}
        self.udp: "queue.Queue[tuple[str, int, int, bytes, int]]" = queue.Queue()
        self.echo_replies: "queue.Queue[tuple[int, bytes]]" = queue.Queue()
        self.answered = {"arp": 0, "echo": 0}
        self._frags: dict[tuple[bytes, int], dict[int, bytes]] = {}
        self._frag_total: dict[tuple[bytes, int], int] = {}
        self._ip_id = 1
        self._lock = threading.Lock()
        nf.on_frame = self._frame

    def _frame(self, qi: int, raw: bytes) -> bool:
        eth = dpkt.ethernet.Ethernet(raw)
        if isinstance(eth.data, dpkt.arp.ARP):
            a = eth.data
            if a.op == dpkt.arp.ARP_OP_REQUEST and a.tpa == self.ip.packed:
                reply = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REPLY, sha=self.mac, spa=self.ip.packed, tha=a.sha, tpa=a.spa)
                self.answered["arp"] += 1
                self.nf.send(bytes(dpkt.ethernet.Ethernet(dst=a.sha, src=self.mac, type=dpkt.ethernet.ETH_TYPE_ARP,
                                                          data=reply)), qi)
            elif a.op == dpkt.arp.ARP_OP_REPLY:
                self.arp[a.spa] = a.sha
            return True
        if not isinstance(eth.data, dpkt.ip.IP) or eth.data.dst != self.ip.packed:
            return False
        ip = eth.data
        payload = self._reassemble(ip)
        if payload is None:
            return True
        if ip.p == dpkt.ip.IP_PROTO_ICMP:
            icmp = dpkt.icmp.ICMP(payload)
            if icmp.type == dpkt.icmp.ICMP_ECHO:
                self.answered["echo"] += 1
                out = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHOREPLY, data=icmp.data)
                self._send_ip(ip.src, dpkt.ip.IP_PROTO_ICMP, out, qi)
            elif icmp.type == dpkt.icmp.ICMP_ECHOREPLY:
                self.echo_replies.put((icmp.data.seq, bytes(icmp.data.data)))
        elif ip.p == dpkt.ip.IP_PROTO_UDP:
            u = dpkt.udp.UDP(payload)
            self.udp.put((str(ipaddress.IPv4Address(ip.src)), u.sport, u.dport, bytes(u.data), qi))
        return True

    def _reassemble(self, ip: dpkt.ip.IP) -> bytes | None:
        more, offset = bool(ip.mf), ip.offset * 8  # dpkt's offset is the header field, in 8-byte units
        if not more and offset == 0:
            return bytes(ip.data)
        key = (ip.src, ip.id)
        parts = self._frags.setdefault(key, {})
        parts[offset] = bytes(ip.data)
        if not more:
            self._frag_total[key] = offset + len(ip.data)
        total = self._frag_total.get(key)
        if total is None or sum(len(v) for v in parts.values()) < total:
            return None
        del self._frags[key], self._frag_total[key]
        return b"".join(parts[k] for k in sorted(parts))

    def _send_ip(self, dst: bytes, proto: int, body: dpkt.Packet, queue_index: int = 0,
                 slot_bytes: int = XEN_PAGE_SIZE) -> None:
        dst_mac = self.arp.get(dst)
        if dst_mac is None:
            raise NetfrontError(f"{ipaddress.IPv4Address(dst)} is not resolved")
        with self._lock:
            ident, self._ip_id = self._ip_id, (self._ip_id + 1) & 0xFFFF
        whole = dpkt.ip.IP(src=self.ip.packed, dst=dst, p=proto, id=ident, data=body)
        datagram = bytes(whole)[20:]  # serialising the whole datagram fills the L4 checksum
        step = (self.mtu - 20) // 8 * 8
        for off in range(0, len(datagram), step):
            last = off + step >= len(datagram)
            frag = dpkt.ip.IP(src=self.ip.packed, dst=dst, p=proto, id=ident, data=datagram[off:off + step])
            frag.offset, frag.mf = off // 8, int(not last)
            eth = dpkt.ethernet.Ethernet(dst=dst_mac, src=self.mac, type=dpkt.ethernet.ETH_TYPE_IP, data=frag)
            self.nf.send(bytes(eth), queue_index, slot_bytes)

    def resolve(self, address: ipaddress.IPv4Address, timeout: float = 3.0) -> bytes:
        deadline = time.monotonic() + timeout
        while address.packed not in self.arp:
            req = dpkt.arp.ARP(op=dpkt.arp.ARP_OP_REQUEST, sha=self.mac, spa=self.ip.packed, tha=b"\0" * 6,
                               tpa=address.packed)
            self.nf.send(bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=self.mac,
                                                      type=dpkt.ethernet.ETH_TYPE_ARP, data=req)))
            if time.monotonic() > deadline:
                raise NetfrontError(f"no ARP reply from {address}")
            time.sleep(0.05)
        return self.arp[address.packed]

    def ping(self, address: ipaddress.IPv4Address, seq: int, payload: bytes = b"xenpv", timeout: float = 3.0) -> bool:
        echo = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=dpkt.icmp.ICMP.Echo(id=0x7E, seq=seq, data=payload))
        self._send_ip(address.packed, dpkt.ip.IP_PROTO_ICMP, echo)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                rseq, data = self.echo_replies.get(timeout=left)
            except queue.Empty:
                break
            if rseq == seq and data == payload:
                return True
        return False

    def send_udp(self, address: ipaddress.IPv4Address, sport: int, dport: int, payload: bytes,
                 queue_index: int = 0, slot_bytes: int = XEN_PAGE_SIZE) -> None:
        self._send_ip(address.packed, dpkt.ip.IP_PROTO_UDP, dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload),
                      queue_index, slot_bytes)

    def recv_udp(self, timeout: float = 5.0) -> tuple[str, int, int, bytes, int]:
        try:
            return self.udp.get(timeout=timeout)
        except queue.Empty:
            raise NetfrontError(f"no UDP datagram within {timeout}s") from None
