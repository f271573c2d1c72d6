"""XENNET's IPv4 layer: ARP (answers for its address, resolves peers, gratuitous announcements), ICMP
echo (answers, and pings), UDP (with IP fragmentation and reassembly) and TCP client connections.
Frames are built and parsed with dpkt, which also computes every checksum.

Received frames arrive at DISPATCH_LEVEL from XENVIF's DPC; callers (the console) run at PASSIVE_LEVEL and
wait with KeWaitForSingleObject, which lets the DPC run. Their timeouts are scaled by XENPV_TIME_SCALE
(stack.timescale), so a loaded machine does not read as a lost packet."""
from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import dpkt

from xenpv.stack.kernel.event import KEvent, KeWaitForSingleObject
from xenpv.stack.timescale import scaled

from .tcp import TcpConnection, TcpState

log = logging.getLogger("stack.drivers.xennet.ip")

BROADCAST = b"\xff" * 6
IP_HEADER = 20
REASSEMBLY_LIMIT = 64  # datagrams being reassembled at once; the oldest is dropped beyond that
POLL_SECONDS = 0.02
ARP_RETRY_SECONDS = 0.2


class NetError(Exception):
    pass


class Ipv4:
    def __init__(self, mac: bytes, send_frame: Callable[[bytes], bool], mtu: int = 1500, seed: int = 0) -> None:
        self.mac = mac
        self.send_frame = send_frame
        self.mtu = mtu
        self.interface: ipaddress.IPv4Interface | None = None
        self.arp: dict[bytes, bytes] = {}
        self.changed = KEvent("xennet receive")
        self.echo_replies: dict[tuple[int, int], bytes] = {}
        self.udp: dict[int, deque[tuple[str, int, bytes]]] = {}
        self.tcp: dict[tuple[int, bytes, int], TcpConnection] = {}
        self.counters = {"arp_answered": 0, "arp_resolved": 0, "echo_answered": 0, "echo_replies": 0,
                         "udp_in": 0, "udp_out": 0, "tcp_in": 0, "tcp_out": 0, "ip_dropped": 0}
        self._fragments: dict[tuple[bytes, int, int], dict[int, bytes]] = {}
        self._fragment_total: dict[tuple[bytes, int, int], int] = {}
        self._ip_id = 1
        self.random = random.Random(seed)

    @property
    def address(self) -> bytes:
        if self.interface is None:
            raise NetError("the adapter has no IPv4 address")
        return self.interface.ip.packed

    # -- output -----------------------------------------------------------------------------------------

    def _ethernet(self, dst: bytes, kind: int, body: dpkt.Packet | bytes) -> bytes:
        return bytes(dpkt.ethernet.Ethernet(dst=dst, src=self.mac, type=kind, data=body))

    def _arp(self, op: int, tha: bytes, tpa: bytes, dst: bytes) -> None:
        body = dpkt.arp.ARP(op=op, sha=self.mac, spa=self.address, tha=tha, tpa=tpa)
        self.send_frame(self._ethernet(dst, dpkt.ethernet.ETH_TYPE_ARP, body))

    def gratuitous_arp(self) -> None:
        if self.interface is not None:
            self._arp(dpkt.arp.ARP_OP_REQUEST, b"\0" * 6, self.address, BROADCAST)

    def send_ip(self, dst: bytes, protocol: int, body: dpkt.Packet) -> None:
        """One datagram, fragmented to the MTU; the peer must be resolved."""
        dst_mac = self.arp.get(dst)
        if dst_mac is None:
            raise NetError(f"{ipaddress.IPv4Address(dst)} is not resolved")
        ident, self._ip_id = self._ip_id, (self._ip_id + 1) & 0xFFFF
        datagram = dpkt.ip.IP(src=self.address, dst=dst, p=protocol, id=ident, data=body)
        if len(datagram) <= self.mtu:
            self.send_frame(self._ethernet(dst_mac, dpkt.ethernet.ETH_TYPE_IP, datagram))
            return
        payload = bytes(datagram)[IP_HEADER:]  # serialising the whole datagram fills the L4 checksum
        step = (self.mtu - IP_HEADER) // 8 * 8
        for offset in range(0, len(payload), step):
            fragment = dpkt.ip.IP(src=self.address, dst=dst, p=protocol, id=ident, data=payload[offset:offset + step])
            fragment.offset, fragment.mf = offset // 8, int(offset + step < len(payload))
            self.send_frame(self._ethernet(dst_mac, dpkt.ethernet.ETH_TYPE_IP, fragment))

    # -- input (DISPATCH_LEVEL) -----------------------------------------------------------------------------

    def on_frame(self, frame: bytes) -> None:
        try:
            eth = dpkt.ethernet.Ethernet(frame)
        except dpkt.UnpackError:
            self.counters["ip_dropped"] += 1
            return
        if isinstance(eth.data, dpkt.arp.ARP):
            self._on_arp(eth.data)
        elif isinstance(eth.data, dpkt.ip.IP) and self.interface is not None and eth.data.dst == self.address:
            self._on_ip(eth.data)
        self.changed.set()

    def _on_arp(self, arp: dpkt.arp.ARP) -> None:
        if self.interface is None:
            return
        if arp.spa != b"\0" * 4 and (arp.spa in self.arp or arp.tpa == self.address):
            self.arp[arp.spa] = arp.sha
        if arp.op == dpkt.arp.ARP_OP_REQUEST and arp.tpa == self.address and arp.spa != self.address:
            self.counters["arp_answered"] += 1
            self._arp(dpkt.arp.ARP_OP_REPLY, arp.sha, arp.spa, arp.sha)
        elif arp.op == dpkt.arp.ARP_OP_REPLY:
            self.arp[arp.spa] = arp.sha
            self.counters["arp_resolved"] += 1

    def _reassemble(self, ip: dpkt.ip.IP) -> bytes | None:
        more, offset = bool(ip.mf), ip.offset * 8  # dpkt's offset is the header field, in 8-byte units
        if not more and offset == 0:
            return bytes(ip.data)
        key = (ip.src, ip.id, ip.p)
        if key not in self._fragments and len(self._fragments) >= REASSEMBLY_LIMIT:
            oldest = next(iter(self._fragments))
            del self._fragments[oldest]
            self._fragment_total.pop(oldest, None)
        parts = self._fragments.setdefault(key, {})
        parts[offset] = bytes(ip.data)
        if not more:
            self._fragment_total[key] = offset + len(ip.data)
        total = self._fragment_total.get(key)
        if total is None or sum(len(p) for p in parts.values()) < total:
            return None
        del self._fragments[key], self._fragment_total[key]
        return b"".join(parts[k] for k in sorted(parts))

    def _on_ip(self, ip: dpkt.ip.IP) -> None:
        payload = self._reassemble(ip)
        if payload is None:
            return
        try:
            if ip.p == dpkt.ip.IP_PROTO_ICMP:
                self._on_icmp(ip.src, dpkt.icmp.ICMP(payload))
            elif ip.p == dpkt.ip.IP_PROTO_UDP:
                udp = dpkt.udp.UDP(payload)
                queue = self.udp.get(udp.dport)
                if queue is not None:
                    self.counters["udp_in"] += 1
                    queue.append((str(ipaddress.IPv4Address(ip.src)), udp.sport, bytes(udp.data)))
            elif ip.p == dpkt.ip.IP_PROTO_TCP:
                segment = dpkt.tcp.TCP(payload)
                connection = self.tcp.get((segment.dport, ip.src, segment.sport))
                if connection is not None:
                    self.counters["tcp_in"] += 1
                    connection.input(segment)
        except dpkt.UnpackError:
            self.counters["ip_dropped"] += 1

    def _on_icmp(self, src: bytes, icmp: dpkt.icmp.ICMP) -> None:
        if icmp.type == dpkt.icmp.ICMP_ECHO:
            self.counters["echo_answered"] += 1
            if src not in self.arp:
                return  # the kernel asked for us by ARP first, so it is there; else nowhere to answer
            self.send_ip(src, dpkt.ip.IP_PROTO_ICMP, dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHOREPLY, data=icmp.data))
        elif icmp.type == dpkt.icmp.ICMP_ECHOREPLY:
            self.counters["echo_replies"] += 1
            self.echo_replies[(icmp.data.id, icmp.data.seq)] = bytes(icmp.data.data)

    def end_of_batch(self) -> None:
        """After the last packet of a receive pass: one ACK per connection for everything it got."""
        for connection in self.tcp.values():
            connection.flush_ack()

    # -- callers at PASSIVE_LEVEL ---------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float, tick: Callable[[], Any] | None = None) -> bool:
        """Until `predicate()`, for `timeout` seconds (scaled); False if it did not come true in time."""
        deadline = time.monotonic() + scaled(timeout)
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            KeWaitForSingleObject(self.changed, min(remaining, POLL_SECONDS))
            self.changed.clear()
            if tick is not None:
                tick()
        return True

    def resolve(self, address: ipaddress.IPv4Address, timeout: float = 3.0) -> bytes:
        deadline = time.monotonic() + scaled(timeout)
        while address.packed not in self.arp:
            self._arp(dpkt.arp.ARP_OP_REQUEST, b"\0" * 6, address.packed, BROADCAST)
            if not self.wait(lambda: address.packed in self.arp, ARP_RETRY_SECONDS):
                if time.monotonic() >= deadline:
                    raise NetError(f"no ARP reply from {address} within {scaled(timeout):g}s")
        return self.arp[address.packed]

    def ping(self, address: ipaddress.IPv4Address, seq: int, payload: bytes = b"xennet", timeout: float = 2.0) -> bool:
        self.resolve(address)
        key = (0x584E, seq & 0xFFFF)
        echo = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=dpkt.icmp.ICMP.Echo(id=key[0], seq=key[1], data=payload))
        self.send_ip(address.packed, dpkt.ip.IP_PROTO_ICMP, echo)
        ok = self.wait(lambda: self.echo_replies.get(key) == payload, timeout)
        self.echo_replies.pop(key, None)
        return ok

    def ephemeral_port(self) -> int:
        while True:
            port = self.random.randrange(49152, 65536)
            if port not in self.udp and not any(k[0] == port for k in self.tcp):
                return port

    def udp_open(self, port: int) -> None:
        self.udp.setdefault(port, deque())

    def udp_close(self, port: int) -> None:
        self.udp.pop(port, None)

    def udp_send(self, address: ipaddress.IPv4Address, sport: int, dport: int, payload: bytes) -> None:
        self.resolve(address)
        self.counters["udp_out"] += 1
        self.send_ip(address.packed, dpkt.ip.IP_PROTO_UDP,
                     dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload))

    def udp_recv(self, port: int, timeout: float = 5.0) -> tuple[str, int, bytes]:
        queue = self.udp[port]
        if not self.wait(lambda: bool(queue), timeout):
            raise NetError(f"no UDP datagram on port {port} within {scaled(timeout):g}s")
        return queue.popleft()

    def tcp_connect(self, address: ipaddress.IPv4Address, port: int, timeout: float = 5.0) -> TcpConnection:
        self.resolve(address)
        sport = self.ephemeral_port()

        def emit(segment: dpkt.tcp.TCP) -> None:
            self.counters["tcp_out"] += 1
            self.send_ip(address.packed, dpkt.ip.IP_PROTO_TCP, segment)

        connection = TcpConnection(sport, port, self.random.getrandbits(32), emit, mss=self.mtu - 40)
        self.tcp[(sport, address.packed, port)] = connection
        connection.open()
        if not self.wait(lambda: connection.state != TcpState.SYN_SENT, timeout, connection.tick) \
                or connection.state != TcpState.ESTABLISHED:
            self.tcp_forget(connection)
            raise NetError(f"TCP connect to {address}:{port}: {'reset' if connection.reset else 'timed out'}")
        return connection

    def tcp_recv_all(self, connection: TcpConnection, count: int, timeout: float) -> bytes:
        """Until `count` bytes or the peer's FIN."""
        self.wait(lambda: len(connection.received) >= count or connection.peer_fin or connection.reset, timeout,
                  connection.flush_ack)
        data = bytes(connection.received[:count])
        del connection.received[:count]
        return data

    def tcp_send_all(self, connection: TcpConnection, data: bytes, timeout: float) -> None:
        view, sent = memoryview(data), 0
        deadline = time.monotonic() + scaled(timeout)
        while sent < len(data) or connection.unacked:
            if connection.reset:
                raise NetError("TCP connection reset by the peer")
            if time.monotonic() >= deadline:
                raise NetError(f"TCP send: {sent} of {len(data)} bytes after {scaled(timeout):g}s")
            sent += connection.send(bytes(view[sent:]))
            before = connection.snd_una
            self.wait(lambda: connection.snd_una != before or connection.reset, 0.05, connection.tick)

    def tcp_close(self, connection: TcpConnection, timeout: float = 2.0) -> None:
        connection.close()
        self.wait(lambda: connection.state in (TcpState.CLOSED, TcpState.TIME_WAIT)
                  or (connection.state == TcpState.FIN_WAIT_2 and connection.peer_fin), timeout, connection.tick)
        self.tcp_forget(connection)

    def tcp_forget(self, connection: TcpConnection) -> None:
        for key, value in list(self.tcp.items()):
            if value is connection:
                del self.tcp[key]
