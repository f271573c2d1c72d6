"""netback end to end: a real QEMU guest (the test-side frontend on its platform services), the real
netback process, and real TAPs in a namespace of the test's own whose kernel is the peer."""
from __future__ import annotations

import ipaddress
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import dpkt
import pytest

from xenpv.backends.netback.datapath import flow_queue
from xenpv.backends.netback.launch import read_vif_stats, start_netback
from xenpv.backends.xenstored.client import XsClient
from xenpv.harness.frontends.netfront import GuestIp, MiniNetfront
from xenpv.harness.netns import NetNamespace, TapAddressing, addressing, list_namespaces
from xenpv.harness.plugin import resolve_guest
from xenpv.base.process import Supervised, wait_for
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi import netif as N

pytestmark = pytest.mark.integration


@dataclass
class NetEnv:
    ns: NetNamespace
    domain: object
    platform: XenPlatform
    addrs: list[TapAddressing]
    start_netback: Callable[[], Supervised]
    stats_path: Path
    netback: Supervised | None = None
    fronts: list[MiniNetfront] = field(default_factory=list)

    def front(self, devid: int = 0, **kw: object) -> tuple[MiniNetfront, GuestIp]:
        nf = MiniNetfront(self.platform, devid, **kw)
        self.fronts.append(nf)
        nf.connect()
        return nf, GuestIp(nf, self.addrs[devid].guest, self.addrs[devid].mtu)

    def stats(self, devid: int = 0) -> dict[str, int]:
        return read_vif_stats(self.stats_path, f"vif{self.domain.domid}.{devid}", self.netback)


@pytest.fixture
def net_env(request: pytest.FixtureRequest, xen_guest_factory, host, artifacts: Path) -> Iterator[Callable[..., NetEnv]]:
    envs: list[NetEnv] = []
    run = make_run_dir("netback")

    def make(guest: str = "default", mtu: int = 1500) -> NetEnv:
        ns = NetNamespace.create("nb")
        # netback runs before the domain is made: the toolstack gives a vif a backend directory only when
        # a back-end serves vifs (backends.serving).
        domid = host.next_domid()
        addrs = [addressing(nic, domid, i, mtu) for i, nic in enumerate(resolve_guest(guest).pv_nics)]
        stats = artifacts / "netback-stats.json"

        def launch() -> Supervised:
            env.netback = start_netback(host.xenstored_socket, host.xenhv_socket, run / "netback.sock", ns.name,
                                        artifacts / "netback.log", stats)
            return env.netback

        env = NetEnv(ns, None, None, addrs, launch, stats)  # type: ignore[arg-type]
        envs.append(env)
        for a in addrs:
            ns.add_tap(a)
        launch()
        env.domain = d = xen_guest_factory(guest)
        assert d.domid == domid
        env.platform = XenPlatform.start(d.vcpu, d.machine.guest.memory_mib << 8)
        return env

    yield make
    for env in envs:
        for nf in env.fronts:
            nf.close()
        if env.platform is not None:
            env.platform.close()
        if env.netback is not None:
            env.netback.stop()
        env.ns.close()
        assert env.ns.name not in list_namespaces()
    remove_run_dir(run)


def _ns_icmp_echo(ns: NetNamespace, dst: ipaddress.IPv4Address, seq: int) -> bool:
    """The namespace's kernel pings the guest (a raw ICMP socket there; no ping binary needed)."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with s:
        s.settimeout(3.0)
        echo = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO, data=dpkt.icmp.ICMP.Echo(id=0x55, seq=seq, data=b"from-ns"))
        s.sendto(bytes(echo), (str(dst), 0))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            try:
                data, src = s.recvfrom(2048)
            except socket.timeout:
                return False
            reply = dpkt.ip.IP(data).data
            if src[0] == str(dst) and reply.type == dpkt.icmp.ICMP_ECHOREPLY and reply.data.seq == seq:
                return True
    return False


class UdpEcho:
    """A UDP echo server in the namespace: the socket is made there, served by a thread here."""

    def __init__(self, ns: NetNamespace, address: ipaddress.IPv4Address, port: int = 7000) -> None:
        with ns.entered():
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind((str(address), port))
        self.sock.settimeout(0.1)
        self.port = port
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(70000)
            except socket.timeout:
                continue
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(1.0)
        self.sock.close()


def _echo(ip: GuestIp, peer: ipaddress.IPv4Address, port: int, sport: int, payload: bytes, queue_index: int = 0,
          slot_bytes: int = 4096) -> tuple[bytes, int]:
    ip.send_udp(peer, sport, port, payload, queue_index, slot_bytes)
    src, rsport, rdport, data, qi = ip.recv_udp(5.0)
    assert (src, rsport, rdport) == (str(peer), port, sport)
    return data, qi


def test_arp_and_ping_both_ways(net_env) -> None:
    env = net_env()
    nf, ip = env.front()
    peer = env.addrs[0].peer.ip
    assert ip.resolve(peer)
    assert ip.ping(peer, 1)
    # Forget what the kernel learnt from our ARP request, so that it must ask and we must answer.
    subprocess.run(env.ns.exec_argv("ip", "neigh", "flush", "dev", env.addrs[0].tap), check=True)
    assert _ns_icmp_echo(env.ns, env.addrs[0].guest, 7)
    assert ip.answered["arp"] >= 1 and ip.answered["echo"] >= 1
    wait_for(lambda: env.stats()["tx_frames"] >= 3 and env.stats()["rx_frames"] >= 3, timeout=2, what="stats")


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_udp_echo_1_to_65000_bytes(net_env, mtu: int) -> None:
    env = net_env(mtu=mtu)
    nf, ip = env.front()
    peer = env.addrs[0].peer.ip
    ip.resolve(peer)
    server = UdpEcho(env.ns, peer)
    try:
        for n, slot in [(1, 4096), (18, 4096), (1000, 300), (1472, 512), (1473, 4096), (8000, 1024),
                        (30000, 2048), (65000, 4096)]:
            payload = bytes((i * 7 + n) & 0xFF for i in range(n))
            data, _ = _echo(ip, peer, server.port, 40000 + n % 1000, payload, slot_bytes=slot)
            assert data == payload, f"{n} bytes"
    finally:
        server.close()
    st = env.stats()
    assert st["tx_errors"] == 0 and st["rx_errors"] == 0


def test_two_vifs(net_env) -> None:
    env = net_env("two-disks-two-nics")
    pairs = [env.front(0), env.front(1)]
    servers = [UdpEcho(env.ns, a.peer.ip) for a in env.addrs]
    try:
        for round_ in range(3):
            for devid, (nf, ip) in enumerate(pairs):
                peer = env.addrs[devid].peer.ip
                ip.resolve(peer)
                payload = f"vif{devid} round {round_}".encode() * 50
                assert _echo(ip, peer, servers[devid].port, 41000 + devid, payload)[0] == payload
    finally:
        for s in servers:
            s.close()
    wait_for(lambda: env.stats(0)["rx_frames"] >= 3 and env.stats(1)["rx_frames"] >= 3, timeout=2,
             what="rx on both vifs counted")


def test_multi_queue_traffic_on_every_queue(net_env) -> None:
    env = net_env()
    nf, ip = env.front(queues=4)
    assert len(nf.queues) == 4
    peer = env.addrs[0].peer.ip
    ip.resolve(peer)
    server = UdpEcho(env.ns, peer)
    try:
        seen_rx: set[int] = set()
        for qi in range(4):
            # Choose a source port whose reply the backend steers to queue qi.
            for sport in range(42000, 43000):
                reply = bytes(dpkt.ethernet.Ethernet(type=dpkt.ethernet.ETH_TYPE_IP, data=dpkt.ip.IP(
                    src=peer.packed, dst=env.addrs[0].guest.packed, p=17,
                    data=dpkt.udp.UDP(sport=server.port, dport=sport, data=b"x"))))
                if flow_queue(reply, 4) == qi:
                    break
            data, rq = _echo(ip, peer, server.port, sport, f"queue {qi}".encode(), queue_index=qi)
            assert data == f"queue {qi}".encode()
            seen_rx.add(rq)
    finally:
        server.close()
    assert seen_rx == {0, 1, 2, 3}
    assert all(q.tx_frames > 0 and q.rx_frames > 0 for q in nf.queues)


def test_backend_restart_frontend_reconnects(net_env) -> None:
    env = net_env()
    nf, ip = env.front()
    peer = env.addrs[0].peer.ip
    ip.resolve(peer)
    assert ip.ping(peer, 1)
    before = wait_for(lambda: env.stats() if env.stats()["tx_frames"] >= 2 else None, timeout=2,
                      what="stats before the kill")
    env.netback.signal_group(9)
    env.netback.stop()
    env.start_netback()
    nf.wait_backend({N_INITWAIT})
    nf.close()
    nf.connect()
    assert ip.ping(peer, 2)
    wait_for(lambda: env.stats()["tx_frames"] >= 1, timeout=2, what="stats of the new netback")
    assert before["tx_frames"] >= 1


from xenpv.xenabi.xenbus import XenbusState  # noqa: E402

N_INITWAIT = XenbusState.InitWait


def _tx(gref: int, offset: int, flags: int, rid: int, size: int) -> bytes:
    return N.NETIF_TX_REQUEST_STRUCT.pack(gref, offset, flags, rid, size)


def test_hostile_tx_entries_get_errors_and_the_backend_lives(net_env) -> None:
    env = net_env("two-disks-two-nics")
    nf, ip = env.front(0)
    other, other_ip = env.front(1)
    q = nf.queues[0]
    peer = env.addrs[0].peer.ip
    frame = b"\xff" * 6 + bytes.fromhex(nf.mac.replace(":", "")) + b"\x08\x06" + bytes(46)
    good_ref = nf.tx_buffer(q, 0, frame)

    def check(entries: list[bytes], ids: list[int]) -> None:
        nf.send_raw(entries)
        for rid in ids:
            assert nf.wait_tx_status(q, rid) == N.NETIF_RSP_ERROR, entries

    check([_tx(good_ref, 0, 0, 0, 0)], [0])                                   # size 0
    check([_tx(good_ref, 4000, 0, 0, 200)], [0])                              # offset + size beyond the page
    check([_tx(good_ref, 0, N.NETTXF_more_data, 0, 100), _tx(good_ref, 0, 0, 1, 200)], [0, 1])  # size < fragments
    check([_tx(9999, 0, 0, 0, 60)], [0])                                      # bad grant ref
    extra = struct.pack("<BBH4x", 0x77, 0, 0) + bytes(4)                      # unknown extra-info type
    check([_tx(good_ref, 0, N.NETTXF_extra_info, 0, 60), extra], [0])
    chain = [_tx(good_ref, 0, N.NETTXF_more_data, i, 60 if i == 0 else 1) for i in range(20)]
    chain.append(_tx(good_ref, 0, 0, 20, 1))                                  # 21 slots: over the limit
    check(chain, list(range(21)))
    # A good frame still goes through on this vif, and the other vif is untouched.
    nf.send_raw([_tx(good_ref, 0, 0, 0, len(frame))])
    assert nf.wait_tx_status(q, 0) == N.NETIF_RSP_OKAY
    other_ip.resolve(env.addrs[1].peer.ip)
    assert other_ip.ping(env.addrs[1].peer.ip, 1)
    assert ip.resolve(peer)
    wait_for(lambda: env.stats(0)["tx_errors"] >= 6, timeout=2, what="tx errors counted")
    env.netback.check_alive()


def test_rx_requests_beyond_the_ring_disconnect_only_that_vif(net_env) -> None:
    env = net_env("two-disks-two-nics")
    nf, ip = env.front(0)
    other, other_ip = env.front(1)
    ring = nf.queues[0].rx
    ring.req_prod_pvt = (ring.req_prod_pvt + 1000) & 0xFFFFFFFF  # a req_prod no honest frontend publishes
    ring.push_requests()
    nf.notify(nf.queues[0], rx=True)
    # Give the backend a frame to deliver so it looks at the rx ring.
    with env.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.sendto(b"poke", (str(env.addrs[0].guest), 9))
    nf.wait_backend({XenbusState.Closing}, timeout=5)
    with XsClient(env.domain.host.xenstored_socket) as xs:
        assert b"rx ring" in xs.read(f"{nf.backend}/error")
    other_ip.resolve(env.addrs[1].peer.ip)
    assert other_ip.ping(env.addrs[1].peer.ip, 1)
    env.netback.check_alive()


def test_a_vif_whose_channel_cannot_be_bound_gives_its_rings_back(net_env) -> None:
    """netback maps a queue's rings before it binds the queue's event channel. When the bind is refused
    (here a port the guest allocated for another domain), the vif goes Closing and its ring mappings go
    with it at once, not when the domain's link closes: the frontend can revoke the ring grants. (A
    frontend that cannot is left with a leaked grant cache, which XENBUS's GnttabRelease stops the guest
    for: `xenpv explore` found that STOP after a migration left a vif's keys pointing at another driver's
    port.)"""
    from xenpv.xenabi.grant_table import GTF_reading, GTF_writing
    env = net_env()
    nf = MiniNetfront(env.platform, 0, split=False)
    env.fronts.append(nf)
    store, hc = env.platform.store, env.platform.hypercalls
    store.write(f"{nf.path}/state", XenbusState.Initialising.wire())
    nf.wait_backend({XenbusState.InitWait})
    q = nf._make_queue(0, False)
    nf.queues = [q]
    foreign = hc.evtchn_alloc_unbound(1)  # unbound, but for dom1: dom0 may not bind it
    try:
        for key, value in (("tx-ring-ref", q.tx_ref), ("rx-ring-ref", q.rx_ref), ("event-channel", foreign),
                           ("request-rx-copy", 1)):
            store.write(f"{nf.path}/{key}", str(value))
        store.write(f"{nf.path}/state", XenbusState.Connected.wire())
        assert nf.wait_backend({XenbusState.Connected, XenbusState.Closing}) == XenbusState.Closing
        for ref in (q.tx_ref, q.rx_ref):
            assert not env.platform.grants.entry(ref).flags & (GTF_reading | GTF_writing), f"ref {ref} still mapped"
    finally:
        hc.evtchn_close(foreign)
