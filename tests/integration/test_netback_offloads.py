"""netback's tx offloads as the Linux kernel receives them (issue 18): a real QEMU guest's test frontend puts
TCP/UDP frames over IPv4 and IPv6 on its tx ring with NETTXF_csum_blank and GSO extras, the real netback
process writes them to a real TAP in a namespace of the test's own, and a packet socket on that TAP with
PACKET_VNET_HDR reads back what the kernel made of each: the skb's GSO type and size and its partial-checksum
location (virtio_net_hdr_from_skb). A GSO type mapped to the wrong family is either refused by the kernel
(virtio_net_hdr_match_proto) or reported back as the wrong type; both fail here."""
from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dpkt
import pytest

from xenpv.backends.netback.launch import read_vif_stats, start_netback
from xenpv.backends.netback.tap import (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
                                        VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VNET_HDR, VnetHdr)
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.harness.frontends.netfront import MiniNetfront
from xenpv.harness.netns import NetNamespace, TapAddressing, addressing
from xenpv.harness.plugin import resolve_guest
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi import netif as N
from xenpv.xenabi.ring import XEN_PAGE_SIZE

pytestmark = pytest.mark.integration

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4   # sll_pkttype of what the namespace's kernel itself sends on the TAP
ETH_HLEN, IP4_HLEN, IP6_HLEN, TCP_CSUM, UDP_CSUM = 14, 20, 40, 16, 6
RECEIVE_DEADLINE = 5.0


@dataclass
class OffloadEnv:
    ns: NetNamespace
    tap: TapAddressing
    nf: MiniNetfront
    stats_path: Path

    def stats(self) -> dict[str, int]:
        return read_vif_stats(self.stats_path, self.tap.tap)


@pytest.fixture
def env(xen_guest_factory, host, artifacts: Path) -> Iterator[OffloadEnv]:
    run = make_run_dir("nboffload")
    with contextlib.ExitStack() as stack:
        stack.callback(remove_run_dir, run)
        ns = NetNamespace.create("nbo")
        stack.callback(ns.close)
        # netback runs before the domain is made: the toolstack gives a vif a backend directory only when
        # a back-end serves vifs (backends.serving).
        domid = host.next_domid()
        tap = addressing(resolve_guest("default").pv_nics[0], domid, 0)
        ns.add_tap(tap)
        stats = artifacts / "netback-stats.json"
        netback = start_netback(host.xenstored_socket, host.xenhv_socket, run / "netback.sock", ns.name,
                                artifacts / "netback.log", stats)
        stack.callback(netback.stop)
        d = xen_guest_factory("default")
        assert d.domid == domid
        platform = XenPlatform.start(d.vcpu, d.machine.guest.memory_mib << 8)
        stack.callback(platform.close)
        nf = MiniNetfront(platform, 0)
        stack.callback(nf.close)
        nf.connect()
        yield OffloadEnv(ns, tap, nf, stats)
        netback.check_alive()


@contextlib.contextmanager
def kernel_view(env: OffloadEnv) -> Iterator[socket.socket]:
    """A packet socket on the TAP, in the namespace, with a virtio_net_hdr in front of every frame."""
    with env.ns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    with sock:
        sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        sock.bind((env.tap.tap, 0))
        yield sock


def _frame(env: OffloadEnv, family: int, proto: int, sport: int, payload: bytes) -> bytes:
    src_mac = bytes.fromhex(env.nf.mac.replace(":", ""))
    l4: dpkt.Packet
    if proto == dpkt.ip.IP_PROTO_TCP:
        l4 = dpkt.tcp.TCP(sport=sport, dport=9, seq=1, flags=dpkt.tcp.TH_ACK, data=payload)
    else:
        l4 = dpkt.udp.UDP(sport=sport, dport=9, ulen=8 + len(payload), data=payload)
    if family == 4:
        ip: dpkt.Packet = dpkt.ip.IP(src=env.tap.guest.packed, dst=env.tap.peer.ip.packed, p=proto, ttl=64, data=l4)
        ethertype = dpkt.ethernet.ETH_TYPE_IP
    else:
        ip = dpkt.ip6.IP6(src=b"\xfd" + bytes(14) + b"\2", dst=b"\xfd" + bytes(14) + b"\1", nxt=proto, hlim=64,
                          data=l4, plen=len(bytes(l4)))
        ethertype = dpkt.ethernet.ETH_TYPE_IP6
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=src_mac, type=ethertype, data=ip))


def _tx(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return N.NETIF_TX_REQUEST_STRUCT.pack(gref, offset, flags, rid, size)


def _gso_extra(gso_type: int, gso_size: int) -> bytes:
    extra = N.NetifExtraInfo(type=N.XEN_NETIF_EXTRA_TYPE_GSO)
    extra.u.gso.type, extra.u.gso.size = gso_type, gso_size
    return bytes(extra).ljust(N.NETIF_TX_REQUEST_STRUCT.size, b"\0")


def _send(env: OffloadEnv, frame: bytes, flags: int, gso: tuple[int, int] | None) -> None:
    """The frame over page-sized slots (buffer ids 0, 1, ...), GSO extra after the first; all answered OKAY."""
    q = env.nf.queues[0]
    chunks = [frame[i:i + XEN_PAGE_SIZE] for i in range(0, len(frame), XEN_PAGE_SIZE)]
    entries = []
    for bid, chunk in enumerate(chunks):
        ref = env.nf.tx_buffer(q, bid, chunk)
        more = N.NETTXF_more_data if bid + 1 < len(chunks) else 0
        first = flags | (N.NETTXF_extra_info if gso else 0) if bid == 0 else 0
        entries.append(_tx(ref, 0, first | more, bid, len(frame) if bid == 0 else len(chunk)))
        if bid == 0 and gso:
            entries.append(_gso_extra(*gso))
    env.nf.send_raw(entries)
    for bid in range(len(chunks)):
        assert env.nf.wait_tx_status(q, bid) == N.NETIF_RSP_OKAY


def _received(env: OffloadEnv, sock: socket.socket, sport: int) -> tuple[VnetHdr, bytes]:
    """The first frame the guest sent from `sport`, as the kernel received it on the TAP."""
    deadline = time.monotonic() + RECEIVE_DEADLINE
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        data, address = sock.recvfrom(VNET_HDR.size + 65536 + ETH_HLEN)
        if address[2] == PACKET_OUTGOING:
            continue
        frame = data[VNET_HDR.size:]
        eth = dpkt.ethernet.Ethernet(frame)
        l4 = getattr(eth.data, "data", None)
        if isinstance(l4, (dpkt.tcp.TCP, dpkt.udp.UDP)) and l4.sport == sport:
            return VnetHdr.unpack(data), frame
    raise AssertionError(f"the kernel never received the frame from port {sport} on {env.tap.tap} "
                         f"(netback stats {env.stats()}: a frame the kernel refused is a tx drop)")


# (name, family, L4 protocol, payload bytes, NETTXF flags, GSO extra, expected kernel view)
CASES = [
    ("tcpv4-gso", 4, dpkt.ip.IP_PROTO_TCP, 6000, N.NETTXF_csum_blank, (N.XEN_NETIF_GSO_TYPE_TCPV4, 1448),
     (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, 1448, ETH_HLEN + IP4_HLEN, TCP_CSUM)),
    ("tcpv6-gso", 6, dpkt.ip.IP_PROTO_TCP, 6000, N.NETTXF_csum_blank, (N.XEN_NETIF_GSO_TYPE_TCPV6, 1428),
     (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV6, 1428, ETH_HLEN + IP6_HLEN, TCP_CSUM)),
    ("tcpv4-csum", 4, dpkt.ip.IP_PROTO_TCP, 500, N.NETTXF_csum_blank, None,
     (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, ETH_HLEN + IP4_HLEN, TCP_CSUM)),
    ("tcpv6-csum", 6, dpkt.ip.IP_PROTO_TCP, 500, N.NETTXF_csum_blank, None,
     (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, ETH_HLEN + IP6_HLEN, TCP_CSUM)),
    ("udpv6-csum", 6, dpkt.ip.IP_PROTO_UDP, 500, N.NETTXF_csum_blank, None,
     (VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE, 0, ETH_HLEN + IP6_HLEN, UDP_CSUM)),
    ("udpv4-plain", 4, dpkt.ip.IP_PROTO_UDP, 500, 0, None, (0, VIRTIO_NET_HDR_GSO_NONE, 0, 0, 0)),
]


def test_each_offload_reaches_the_kernel_as_its_own_type(env: OffloadEnv) -> None:
    with kernel_view(env) as sock:
        for i, (name, family, proto, size, flags, gso, want) in enumerate(CASES):
            sport = 41000 + i
            frame = _frame(env, family, proto, sport, bytes((j * 5 + i) & 0xFF for j in range(size)))
            if flags & N.NETTXF_csum_blank:  # a csum_blank frame carries only the pseudo-header sum: zero it
                at = want[3] + want[4]
                frame = frame[:at] + b"\0\0" + frame[at + 2:]
            _send(env, frame, flags, gso)
            hdr, got = _received(env, sock, sport)
            assert got == frame, name
            assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == want, name
    stats = env.stats()
    assert stats.get("tx_errors") == 0 and stats.get("tx_drops") == 0, stats
