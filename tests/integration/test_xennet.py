"""XENVIF and XENNET end to end: the booted guest agent's driver stack, the real netback process, and a
TAP in a namespace of the test's own whose kernel is the peer; driven through the guest console."""
from __future__ import annotations

import hashlib
import ipaddress
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import dpkt
import pytest

from xenpv.backends.netback.launch import start_netback
from xenpv.harness.agent import Guest
from xenpv.harness.netns import NetNamespace, TapAddressing, addressing, list_namespaces
from xenpv.base.process import Supervised
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.harness.plugin import resolve_guest
from xenpv.stack.drivers.revision import XENNET_BINDS_XENVIF_REVISION, XENVIF_REVISIONS, newest_first

pytestmark = pytest.mark.integration

TEN_MIB = 10 << 20


@dataclass
class NetGuest:
    ns: NetNamespace
    addrs: list[TapAddressing]
    guest: Guest
    host: object
    netback: Supervised
    launch: Callable[[], Supervised]
    extra: list[Guest] = field(default_factory=list)

    @property
    def peer(self) -> ipaddress.IPv4Address:
        return self.addrs[0].peer.ip

    @property
    def me(self) -> ipaddress.IPv4Address:
        return self.addrs[0].guest

    def run(self, command: str, timeout: float = 30.0) -> str:
        return self.guest.console.run(command, timeout)


def _add_taps(host, ns: NetNamespace, guest_spec: str) -> list[TapAddressing]:
    # The TAP is named for the domain (vifD.N) and netback attaches when the frontend connects, which
    # XENVIF does while the guest boots: create it for the domid the toolstack will hand out next.
    domid = host.next_domid()
    addrs = [addressing(nic, domid, i) for i, nic in enumerate(resolve_guest(guest_spec).pv_nics)]
    for a in addrs:
        ns.add_tap(a)
    return addrs


@pytest.fixture
def net_guest(host, guest_factory, artifacts: Path) -> Iterator[Callable[..., NetGuest]]:
    """A booted guest with netback serving its vifs. Torn down guest first, then netback: XENVIF's close
    handshake needs the back-end that is still there to answer it."""
    made: list[NetGuest] = []
    booted: list[Guest] = []
    run = make_run_dir("xennet")
    namespaces: list[NetNamespace] = []
    netbacks: list[Supervised] = []

    def make(spec: str = "default", *, unplugged: bool = True) -> NetGuest:
        """`unplugged`: rebooted once, so that the NIC unplug the NET PDOs armed has taken effect and they
        started (XV pdo.c PdoStartDevice fails the first boot's START with STATUS_PNP_REBOOT_REQUIRED)."""
        ns = NetNamespace.create("xn")
        namespaces.append(ns)
        addrs = _add_taps(host, ns, spec)

        def launch() -> Supervised:
            netback = start_netback(host.xenstored_socket, host.xenhv_socket, run / "netback.sock", ns.name,
                                    artifacts / f"netback{len(netbacks)}.log", artifacts / "netback-stats.json")
            netbacks.append(netback)
            return netback

        netback = launch()
        booted.append(Guest.boot(host, guest_factory(spec)))
        env = NetGuest(ns, addrs, booted[-1], host, netback, launch)
        made.append(env)
        if unplugged:
            _reboot_for_unplug(env)
        return env

    yield make
    try:
        for env in made:
            for extra in env.extra:
                extra.shutdown()
        for g in reversed(booted):
            g.shutdown()
        host.check_alive("after the test")
    finally:
        for netback in netbacks:
            netback.stop()
        for ns in namespaces:
            ns.close()
            assert ns.name not in list_namespaces()
        remove_run_dir(run)


def _reboot_for_unplug(env: NetGuest) -> None:
    assert env.run("reboot", timeout=60).startswith("boot 2")
    deadline = time.monotonic() + 20.0
    while env.run("net list").count(" up ") < len(env.addrs):
        assert time.monotonic() < deadline, (env.run("net list"), env.run("devices"))
        time.sleep(0.1)


def _stats(env: NetGuest, instance: str = "0") -> dict[str, int]:
    """`net stats` of one adapter as one dict (adapter, IPv4, XENVIF and frontend queue counters)."""
    found: dict[str, int] = {}
    for line in env.run("net stats").splitlines():
        name, _, rest = line.partition(" ")
        if name == instance:
            found.update((k, int(v)) for k, v in (item.split("=") for item in rest.split()))
    return found


def _ns_ping(ns: NetNamespace, dst: ipaddress.IPv4Address, seq: int = 1) -> bool:
    """The namespace's kernel pings the guest (a raw ICMP socket made there; no ping binary needed)."""
    with ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    with s:
        s.settimeout(3.0)
        s.sendto(bytes(dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO,
                                      data=dpkt.icmp.ICMP.Echo(id=0x66, seq=seq, data=b"from-ns"))), (str(dst), 0))
        try:
            while True:
                data, src = s.recvfrom(2048)
                reply = dpkt.ip.IP(data).data
                if src[0] == str(dst) and reply.type == dpkt.icmp.ICMP_ECHOREPLY and reply.data.seq == seq:
                    return True
        except socket.timeout:
            return False


class NsServer:
    """A TCP or UDP server in the namespace: the socket is made there, served by a thread here."""

    def __init__(self, ns: NetNamespace, address: ipaddress.IPv4Address, kind: int, handler) -> None:
        with ns.entered():
            self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((str(address), 0))
        self.port = self.sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            self.sock.listen(1)
        self.sock.settimeout(0.2)
        self.result: dict[str, object] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=handler, args=(self,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5.0)
        self.sock.close()


def _udp_echo(server: NsServer) -> None:
    while not server._stop.is_set():
        try:
            data, peer = server.sock.recvfrom(70000)
        except socket.timeout:
            continue
        server.sock.sendto(data, peer)


def _accept(server: NsServer) -> socket.socket | None:
    while not server._stop.is_set():
        try:
            conn, _ = server.sock.accept()
            conn.settimeout(30.0)
            return conn
        except socket.timeout:
            continue
    return None


def _tcp_source(payload: bytes):
    def serve(server: NsServer) -> None:
        conn = _accept(server)
        if conn is not None:
            with conn:
                conn.sendall(payload)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
    return serve


def _tcp_sink(server: NsServer) -> None:
    conn = _accept(server)
    if conn is None:
        return
    digest, total = hashlib.sha256(), 0
    with conn:
        while chunk := conn.recv(1 << 16):
            digest.update(chunk)
            total += len(chunk)
    server.result.update(bytes=total, sha256=digest.hexdigest())


def test_vif_and_net_pdos_get_xenvif_and_xennet(net_guest) -> None:
    env = net_guest()
    tree = env.run("devices")
    vif = next(line for line in tree.splitlines() if "XENBUS\\VEN_XP&DEV_VIF\\_" in line)
    assert "service=XENVIF" in vif and "problem" not in vif, tree
    net = next(line for line in tree.splitlines() if "XENVIF\\VEN_XP&DEV_NET\\0" in line)
    assert "service=XENNET" in net and "[started]" in net.lower() or "STARTED" in net, tree
    registry = env.run(r"registry 'HKLM\SYSTEM\CurrentControlSet\Enum\XENVIF\VEN_XP&DEV_NET\0'")
    assert [f"XENVIF\\VEN_XP0001&DEV_NET&REV_{r:08X}" in registry for r in newest_first(XENVIF_REVISIONS)] \
        == [True] * len(XENVIF_REVISIONS)
    assert f"REV_{XENNET_BINDS_XENVIF_REVISION:08X}" in registry
    listing = env.run("net list")
    assert "mac 00:16:3e:00:00:01" in listing and f"ip {env.me}/24" in listing and " up " in listing, listing
    assert "XENVIF" not in env.run("xs read device/vif/0/state") and env.run("xs read device/vif/0/state") == "4"
    assert env.run("xs read device/vif/0/request-rx-copy") == "1"
    assert env.run("xs read device/vif/0/event-channel-tx").isdigit()


def test_arp_and_ping_both_ways(net_guest) -> None:
    env = net_guest()
    out = env.run(f"net ping {env.peer} 3")
    assert out == f"3/3 replies from {env.peer}", out
    subprocess.run(env.ns.exec_argv("ip", "neigh", "flush", "dev", env.addrs[0].tap), check=True)
    assert _ns_ping(env.ns, env.me)
    neigh = subprocess.run(env.ns.exec_argv("ip", "neigh", "show", str(env.me)), capture_output=True,
                           text=True).stdout
    assert "00:16:3e:00:00:01" in neigh, neigh
    stats = env.run("net stats")
    assert re.search(r"arp_answered=[1-9]", stats) and re.search(r"echo_answered=[1-9]", stats), stats


def test_udp_echo_1_to_65000_bytes(net_guest) -> None:
    env = net_guest()
    server = NsServer(env.ns, env.peer, socket.SOCK_DGRAM, _udp_echo)
    try:
        for size in (1, 18, 1000, 1472, 1473, 8000, 30000, 65000):
            out = env.run(f"net udp-echo {env.peer} {server.port} {size}")
            assert out == f"echo {size} ok", out
    finally:
        server.close()
    stats = env.run("net stats")
    assert "transmitter_backend_errors=0" in stats and "receiver_backend_errors=0" in stats, stats


def test_tcp_10_mib_from_a_server_in_the_namespace(net_guest) -> None:
    env = net_guest()
    payload = (hashlib.sha256(b"xennet tcp").digest() * (TEN_MIB // 32 + 1))[:TEN_MIB]
    server = NsServer(env.ns, env.peer, socket.SOCK_STREAM, _tcp_source(payload))
    try:
        out = env.run(f"net tcp-get {env.peer} {server.port} {TEN_MIB}", timeout=150)
    finally:
        server.close()
    assert out.startswith(f"tcp-get {TEN_MIB} bytes sha256 {hashlib.sha256(payload).hexdigest()}"), out
    print(out)


def test_tcp_upload_to_a_server_in_the_namespace(net_guest) -> None:
    env = net_guest()
    server = NsServer(env.ns, env.peer, socket.SOCK_STREAM, _tcp_sink)
    size = 1 << 20
    try:
        out = env.run(f"net tcp-put {env.peer} {server.port} {size}", timeout=150)
    finally:
        server.thread.join(10.0)
        server.close()
    digest = out.split("sha256 ")[1].split()[0]
    assert server.result == {"bytes": size, "sha256": digest}, (out, server.result)
    print(out)


def test_emulated_nic_unplugged_on_the_second_boot_and_the_mac_kept(net_guest, host) -> None:
    env = net_guest(unplugged=False)
    assert "DEV_8139" in env.run("devices")
    first = env.guest
    # Power off (the net_guest fixture still closes the first guest's toolstack): same hive, same
    # machine, a new domain on the next boot.
    first.console.close()
    first.toolstack.destroy(first.domain.domid)
    first.domain = None
    # The next domain's vif gets a TAP of its own on the same network: the old one must go first.
    for a in env.addrs:
        subprocess.run(env.ns.exec_argv("ip", "link", "del", a.tap), check=True)
        env.ns.taps.remove(a.tap)
    env.addrs = _add_taps(host, env.ns, "default")
    second = Guest.boot(host, first.machine)
    env.extra.append(second)
    env.guest = second
    assert "DEV_8139" not in env.run("devices")
    assert "mac 00:16:3e:00:00:01 permanent 00:16:3e:00:00:01" in env.run("net list")
    # The first echo may go while the new vif's neighbour entry is being re-validated.
    assert not env.run(f"net ping {env.peer} 3").startswith("0/"), env.run("net stats")


def test_two_vifs_on_one_guest(net_guest) -> None:
    env = net_guest("two-nics")
    listing = env.run("net list")
    assert len(listing.splitlines()) == 2, listing
    for a, mac in zip(env.addrs, ("00:16:3e:00:03:01", "00:16:3e:00:03:02")):
        assert f"mac {mac}" in listing and f"ip {a.guest}/24" in listing, listing
    for i, a in enumerate(env.addrs):
        assert env.run(f"net -i {i} ping {a.peer.ip} 2") == f"2/2 replies from {a.peer.ip}"
        assert _ns_ping(env.ns, a.guest, seq=i + 1)
        server = NsServer(env.ns, a.peer.ip, socket.SOCK_DGRAM, _udp_echo)
        try:
            for size in (1, 1472, 9000):
                assert env.run(f"net -i {i} udp-echo {a.peer.ip} {server.port} {size}") == f"echo {size} ok"
        finally:
            server.close()
    # Each adapter carried its own traffic: both transmitted and received on their own vif.
    for i in ("0", "1"):
        stats = _stats(env, i)
        assert stats["tx_ok"] >= 5 and stats["rx_frames"] >= 5 and stats["echo_replies"] >= 2, stats


def test_backend_restart_reconnects_and_accounts_for_drops(net_guest) -> None:
    env = net_guest()
    assert env.run(f"net ping {env.peer} 2") == f"2/2 replies from {env.peer}"
    before = _stats(env)
    assert before["reconnects"] == 0, before
    env.netback.stop(soft=lambda: env.netback.signal_group(signal.SIGKILL))  # no teardown at all
    assert env.run(f"net ping {env.peer} 2").startswith("0/2"), env.run("net stats")
    away = _stats(env)
    sent_away = away["tx_queued"] - before["tx_queued"]
    assert sent_away >= 2, away
    env.netback = env.launch()
    deadline = time.monotonic() + 20.0
    while not (" up " in env.run("net list") and _stats(env)["reconnects"] >= 1):
        assert time.monotonic() < deadline, (env.run("net list"), env.run("net stats"))
        time.sleep(0.2)
    assert env.run(f"net ping {env.peer} 3") == f"3/3 replies from {env.peer}", env.run("net stats")
    after = _stats(env)
    # Every frame sent while the backend was away was dropped and counted once by XENVIF (returned
    # DROPPED at the reconnect, or refused while the frontend was offline) and by XENNET; nothing else was.
    assert after["transmitter_packets_dropped"] - before["transmitter_packets_dropped"] == sent_away, (before, after)
    assert after["tx_dropped"] - before["tx_dropped"] == sent_away, (before, after)
    assert after["tx_queued"] == after["tx_ok"] + after["tx_dropped"] + after["tx_error"], after
    assert after["transmitter_backend_errors"] == 0, after


def test_two_queues_carry_traffic_each(net_guest) -> None:
    env = net_guest("two-queues")
    assert env.run("xs read device/vif/0/multi-queue-num-queues") == "2"
    assert env.run("xs read device/vif/0/queue-1/tx-ring-ref").isdigit()
    server = NsServer(env.ns, env.peer, socket.SOCK_DGRAM, _udp_echo)
    try:
        # Each echo uses a new source port: a new flow, hashed to a queue by XENNET (tx) and netback (rx).
        for size in (1, 100, 1000, 1472, 3000, 8000, 20, 200, 2000, 4000, 16, 64):
            assert env.run(f"net udp-echo {env.peer} {server.port} {size}") == f"echo {size} ok"
    finally:
        server.close()
    stats = _stats(env)
    assert stats["queues"] == 2, stats
    for q in (0, 1):
        assert stats[f"queue{q}_tx_packets"] > 0 and stats[f"queue{q}_rx_packets"] > 0, stats
    assert stats["queue0_rx_packets"] + stats["queue1_rx_packets"] == stats["receiver_unicast_packets"] \
        + stats["receiver_multicast_packets"] + stats["receiver_broadcast_packets"], stats
