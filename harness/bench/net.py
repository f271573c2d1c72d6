"""`xenpv bench net`: frames per second, guest to namespace and back, for 64-byte and 1,500-byte frames
through the whole path (test-side frontend in a real guest's RAM -> tx ring -> event channel through
xenhv -> netback -> TAP -> the namespace's kernel, which answers ICMP echo itself -> TAP -> netback ->
rx-copy into posted buffers -> the frontend), beside the same frames written straight to a TAP of the
same namespace from this process and their replies read back.

The namespace's kernel is the only peer: no user-space echo server shares the CPU with the path being
measured. Frames are ICMP echo requests padded to the frame size (Ethernet header included)."""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import select
import subprocess
import threading
import time
from pathlib import Path

import dpkt

from xenpv.backends.netback.tap import Tap, VnetHdr
from xenpv.harness.bench import BenchReport, benchmark
from xenpv.harness.bench.cpu import CpuMeter

FRAME_SIZES = (64, 1500)
# Echo requests in flight at once: enough to keep both the frontend and netback busy, well below the
# 256 slots of a ring.
WINDOW = 32
ETH_IP_ICMP = 14 + 20 + 8
BASELINE_TAP = "xpvbench0"
BASELINE_PEER = ipaddress.IPv4Interface("10.201.0.1/24")
BASELINE_SENDER = ipaddress.IPv4Address("10.201.0.2")
BASELINE_MAC = bytes.fromhex("02163e0000fe")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=2.0, help="time per figure (default %(default)s s)")


def _echo_frame(size: int, src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes) -> bytes:
    icmp = dpkt.icmp.ICMP(type=dpkt.icmp.ICMP_ECHO,
                          data=dpkt.icmp.ICMP.Echo(id=0xBE, seq=1, data=bytes(size - ETH_IP_ICMP)))
    ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_ICMP, id=1, data=icmp)
    frame = bytes(dpkt.ethernet.Ethernet(dst=dst_mac, src=src_mac, type=dpkt.ethernet.ETH_TYPE_IP, data=ip))
    assert len(frame) == size, (len(frame), size)
    return frame


def _is_echo_reply(frame: bytes, size: int) -> bool:
    # Ethertype IPv4, protocol ICMP, type echo reply, and as long as the request: anything else the
    # kernel sends (IPv6 neighbour discovery, ARP) is not counted.
    return (len(frame) == size and frame[12:14] == b"\x08\x00" and frame[23] == dpkt.ip.IP_PROTO_ICMP
            and frame[ETH_IP_ICMP - 8] == dpkt.icmp.ICMP_ECHOREPLY)


def _through_netback(nf, frame: bytes, seconds: float) -> tuple[float, int]:
    """Echo round trips per second through the frontend with WINDOW requests in flight, and how many."""
    size = len(frame)
    credits = threading.Semaphore(WINDOW)
    replies = [0]

    def on_frame(q: int, raw: bytes) -> bool:
        if not _is_echo_reply(raw, size):
            # The rest goes to the guest's stack as before the run: the namespace's kernel asks for the
            # guest's MAC again when its neighbour entry goes stale (15-45 s), and a request left
            # unanswered stops every reply after it.
            return previous(q, raw) if previous is not None else False
        replies[0] += 1
        credits.release()
        return True

    previous, nf.on_frame = nf.on_frame, on_frame
    try:
        sent, t0 = 0, time.perf_counter()
        while (now := time.perf_counter()) - t0 < seconds:
            # A lost reply (e.g. an rx buffer shortage) must not stall the run: its credit comes back
            # after a short wait and the frame is simply not counted.
            credits.acquire(timeout=0.05)
            nf.send(frame)
            sent += 1
        elapsed = now - t0
        deadline = time.monotonic() + 1.0
        while replies[0] < sent and time.monotonic() < deadline:
            time.sleep(0.005)
        return replies[0] / elapsed, replies[0]
    finally:
        nf.on_frame = previous


def _through_tap(tap: Tap, frame: bytes, seconds: float) -> float:
    """Echo round trips per second writing the frames to a TAP and reading the replies back, WINDOW in
    flight: the kernel's own cost of the exchange, with Python on this end."""
    size, hdr = len(frame), VnetHdr()
    poller = select.poll()
    poller.register(tap.fd, select.POLLIN)
    inflight = replies = 0
    t0 = time.perf_counter()
    while (now := time.perf_counter()) - t0 < seconds:
        while inflight < WINDOW:
            tap.write(hdr, frame)
            inflight += 1
        if not poller.poll(50):
            inflight = 0  # replies lost: refill the window rather than wait forever
            continue
        while poller.poll(0):
            _, raw = tap.read()
            if _is_echo_reply(raw, size):
                replies += 1
                inflight -= 1
    return replies / (now - t0)


def _ns_mac(ns, dev: str) -> bytes:
    out = subprocess.run(ns.exec_argv("cat", f"/sys/class/net/{dev}/address"), capture_output=True, text=True,
                         check=True).stdout
    return bytes.fromhex(out.strip().replace(":", ""))


@benchmark("net", help="netback: 64 B and 1,500 B frames/s guest -> namespace -> guest vs a TAP written from Python",
           arguments=_arguments)
def bench_net(args: argparse.Namespace) -> BenchReport:
    from xenpv.backends.host import HostServices
    from xenpv.backends.netback.launch import start_netback
    from xenpv.harness.frontends.netfront import GuestIp, MiniNetfront
    from xenpv.harness.netns import NetNamespace, TapAddressing, addressing
    from xenpv.harness.bench.rig import xen_domain_rig
    from xenpv.stack.vcpu.platform import XenPlatform

    r = BenchReport(f"netback round trips through the whole path vs a TAP from Python ({WINDOW} frames in flight, "
                    "the namespace's kernel answering ICMP echo)")
    with contextlib.ExitStack() as cleanup:
        ns = NetNamespace.create("bench")
        cleanup.callback(ns.close)

        netbacks = []

        def start_netback_first(work: Path, host: HostServices) -> None:
            # Before the domain: its vif gets a backend directory only when a back-end serves vifs.
            netbacks.append(start_netback(host.xenstored_socket, host.xenhv_socket, work / "netback.sock",
                                          ns.name, work / "netback.log", work / "netback-stats.json"))
            cleanup.callback(netbacks[0].stop)

        rig = xen_domain_rig(cleanup, "benchnet", before_domain=start_netback_first)
        work, host, machine, dom, nb = rig.work, rig.host, rig.machine, rig.dom, netbacks[0]
        vif = addressing(machine.guest.pv_nics[0], dom.domid, 0)
        ns.add_tap(vif)
        base = TapAddressing(BASELINE_TAP, BASELINE_PEER, BASELINE_SENDER, 1500)
        ns.add_tap(base)
        # The baseline's sender is this process, which answers no ARP: the kernel is told its MAC.
        subprocess.run(ns.exec_argv("ip", "neigh", "add", str(BASELINE_SENDER), "lladdr",
                                    BASELINE_MAC.hex(":"), "dev", BASELINE_TAP), check=True)
        platform = XenPlatform.start(dom.vcpu, machine.guest.memory_mib << 8)
        cleanup.callback(platform.close)
        nf = MiniNetfront(platform, 0)
        nf.connect()
        cleanup.callback(nf.close)
        ip = GuestIp(nf, vif.guest, vif.mtu)
        peer_mac = ip.resolve(vif.peer.ip)
        with ns.entered():
            tap = Tap(BASELINE_TAP)
        cleanup.callback(tap.close)
        tap_mac = _ns_mac(ns, BASELINE_TAP)

        ctl = host.xenhv_control()
        cleanup.callback(ctl.close)

        def xenhv_calls() -> int:
            # Every control request xenhv served (netback's and the toolstack's), but this count's own.
            return sum(n for op, n in ctl.call("control_calls").items() if op != "control_calls")

        for size in FRAME_SIZES:
            pv_frame = _echo_frame(size, ip.mac, peer_mac, vif.guest.packed, vif.peer.ip.packed)
            tap_frame = _echo_frame(size, BASELINE_MAC, tap_mac, BASELINE_SENDER.packed, BASELINE_PEER.ip.packed)
            _through_netback(nf, pv_frame, 0.2)   # warm-up: rx buffers cycled, caches hot
            _through_tap(tap, tap_frame, 0.2)
            calls = xenhv_calls()
            cpu = CpuMeter({"netback": [nb.pid], "the frontend (this process)": [os.getpid()]}).start()
            rate, frames = _through_netback(nf, pv_frame, args.seconds)
            cpu.stop()
            calls = xenhv_calls() - calls
            a = r.add(f"{size} B frames through netback", rate, "frames/s")
            b = r.add(f"{size} B frames via TAP from Python", _through_tap(tap, tap_frame, args.seconds), "frames/s")
            r.ratio(f"{size} B ratio", a, b).target = ">= 0.25"
            r.add(f"{size} B xenhv control calls per frame", calls / frames if frames else float("nan"), "calls",
                  "<= 0")
            r.add(f"{size} B CPU busy during the netback run, whole machine", cpu.machine_cores,
                  f"cores of {os.cpu_count()}")
            for group, cores in cpu.group_cores.items():
                r.add(f"{size} B CPU of {group}", cores, "cores")
        nb.check_alive()
    r.notes.append("a frame is one ICMP echo request of that size (Ethernet header included) and its reply; "
                   "frames/s counts completed round trips; xenhv control calls per frame: every control request "
                   "xenhv served during the timed run (netback's grant map/unmap, anyone's), per round trip")
    r.notes.append("frontend: harness/frontends/netfront.py MiniNetfront in this process (one queue, rx-copy, "
                   "split event channels); baseline: the same frames written to another TAP of the same "
                   "namespace and the replies read back, from this process")
    return r
