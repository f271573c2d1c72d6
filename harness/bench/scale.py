"""`xenpv bench scale --guests 1,2,4`: how one dom0 carries several guests' network traffic at once.

For each count N, N domains of the default guest share one xenhv, one xenstored and one netback; each
guest's frontend runs in a process of its own (as each guest's agent does) and sends 64-byte ICMP echo
requests through its vif to the namespace's kernel, `net`'s window in flight, all N for the same
seconds. Figures: the aggregate and per-guest round trips per second, and the aggregate against one
guest's (issue 16's target: 4 guests >= 3x one guest). Each guest has a /24 of its own in the namespace,
so replies leave by the TAP they came in on.
"""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import multiprocessing
import multiprocessing.connection
import os
from pathlib import Path

from xenpv.base.errors import ConfigError
from xenpv.harness.bench import BenchReport, benchmark
from xenpv.harness.bench.cpu import CpuMeter
from xenpv.harness.bench.net import WINDOW, _echo_frame, _through_netback

FRAME_SIZE = 64
READY_TIMEOUT = 60.0  # seconds for a guest's frontend to connect and resolve its peer


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--guests", default="1,2,4", help="guest counts to run, comma-separated (default %(default)s)")
    p.add_argument("--seconds", type=float, default=2.0, help="timed run per count (default %(default)s s)")


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--guests {text!r}: want counts such as 1,2,4") from None
    if not counts or any(not 1 <= n <= 8 for n in counts):
        raise ConfigError(f"--guests {text!r}: each count must be from 1 to 8 (2 cores, 128 MiB a guest)")
    if counts[0] != 1:
        counts.insert(0, 1)  # the ratio's denominator is always measured in the same run
    return counts


def _guest_side(dom, vif, seconds: float, start: multiprocessing.synchronize.Event,
                out: multiprocessing.connection.Connection) -> None:
    """In a forked child: this guest's frontend, connected, then the timed run when `start` is set."""
    from xenpv.harness.frontends.netfront import GuestIp, MiniNetfront
    from xenpv.stack.vcpu.platform import XenPlatform

    try:
        with contextlib.ExitStack() as cleanup:
            platform = XenPlatform.start(dom.vcpu, dom.machine.guest.memory_mib << 8)
            cleanup.callback(platform.close)
            nf = MiniNetfront(platform, 0)
            nf.connect()
            cleanup.callback(nf.close)
            ip = GuestIp(nf, vif.guest, vif.mtu)
            frame = _echo_frame(FRAME_SIZE, ip.mac, ip.resolve(vif.peer.ip), vif.guest.packed, vif.peer.ip.packed)
            _through_netback(nf, frame, 0.2)  # warm-up
            out.send(("ready", None))
            if not start.wait(READY_TIMEOUT):
                raise TimeoutError("the start signal never came")
            rate, _ = _through_netback(nf, frame, seconds)
            out.send(("rate", rate))
    except BaseException as exc:  # noqa: BLE001  (reported to the parent, which names the guest)
        out.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        out.close()
        os._exit(0)  # the parent owns every inherited resource (machine, domain, sockets)


def _run(n: int, seconds: float, work: Path) -> tuple[list[float], CpuMeter]:
    from xenpv.backends.host import HostServices
    from xenpv.backends.netback.launch import start_netback
    from xenpv.guests.schema import GUESTS_DIR, load_guest
    from xenpv.harness.machine import Machine
    from xenpv.harness.netns import NetNamespace, TapAddressing, tap_name
    from xenpv.harness.xendomain import XenDomain

    guest_def = load_guest(GUESTS_DIR / "default.yaml")
    with contextlib.ExitStack() as cleanup:
        host = HostServices.start(work / "host")
        cleanup.callback(host.stop)
        ns = NetNamespace.create("scale")
        cleanup.callback(ns.close)
        netback = start_netback(host.xenstored_socket, host.xenhv_socket, work / "netback.sock", ns.name,
                                work / "netback.log", work / "netback-stats.json")
        cleanup.callback(netback.stop)
        doms, vifs = [], []
        for i in range(n):
            machine = Machine(guest_def, work / f"g{i}", name=f"g{i}").launch()
            cleanup.callback(machine.shutdown)
            dom = XenDomain.create(host, machine)
            cleanup.callback(dom.destroy)
            peer = ipaddress.IPv4Interface(f"10.210.{i}.1/24")
            vif = TapAddressing(tap_name(dom.domid, 0), peer, peer.ip + 1, 1500)
            ns.add_tap(vif)
            doms.append(dom)
            vifs.append(vif)
        ctx = multiprocessing.get_context("fork")
        start = ctx.Event()
        children = []
        for dom, vif in zip(doms, vifs):
            ours, theirs = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_guest_side, args=(dom, vif, seconds, start, theirs), daemon=True)
            proc.start()
            theirs.close()
            children.append((proc, ours))
        cleanup.callback(_reap, children)
        for i, (proc, conn) in enumerate(children):
            _expect(conn, proc, f"guest {i} of {n}", "ready", READY_TIMEOUT)
        cpu = CpuMeter({"netback": [netback.pid], "frontends": [proc.pid for proc, _ in children],
                        "xenhv and xenstored": [p.pid for p in host.processes()]}).start()
        start.set()
        rates = [float(_expect(conn, proc, f"guest {i} of {n}", "rate", seconds + 30) or 0.0)
                 for i, (proc, conn) in enumerate(children)]
        cpu.stop()
        netback.check_alive(f"after {n} guests")
        return rates, cpu


def _expect(conn: multiprocessing.connection.Connection, proc: multiprocessing.process.BaseProcess, who: str,
            kind: str, timeout: float) -> object:
    if not conn.poll(timeout):
        raise RuntimeError(f"{who}: no {kind} within {timeout:.0f} s (its process is "
                           f"{'alive' if proc.is_alive() else f'gone, status {proc.exitcode}'})")
    got, value = conn.recv()
    if got == "error":
        raise RuntimeError(f"{who}: {value}")
    if got != kind:
        raise RuntimeError(f"{who}: sent {got!r} where {kind!r} was due")
    return value


def _reap(children: list) -> None:
    for proc, conn in children:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()


@benchmark("scale", help="N guests on one dom0: aggregate and per-guest 64 B frames/s through one netback",
           arguments=_arguments)
def bench_scale(args: argparse.Namespace) -> BenchReport:
    from xenpv.base.rundir import make_run_dir, remove_run_dir

    counts = _counts(args.guests)
    r = BenchReport(f"guests at once on one dom0: 64 B echo round trips through one netback, {WINDOW} in flight "
                    f"per guest, {args.seconds:g} s")
    one = None
    for n in counts:
        work = make_run_dir("scale")
        try:
            rates, cpu = _run(n, args.seconds, work)
        finally:
            remove_run_dir(work)
        total = r.add(f"{n} guest(s): aggregate", sum(rates), "frames/s")
        r.add(f"{n} guest(s): per guest, mean", sum(rates) / n, "frames/s")
        r.add(f"{n} guest(s): per guest, slowest", min(rates), "frames/s")
        r.add(f"{n} guest(s): CPU busy, whole machine", cpu.machine_cores, f"cores of {os.cpu_count()}")
        for group, cores in cpu.group_cores.items():
            r.add(f"{n} guest(s): CPU of {group}", cores, "cores")
        if n == 1:
            one = total
        elif one is not None:
            r.ratio(f"{n} guests: aggregate / one guest", total, one).target = ">= 3" if n == 4 else ""
    r.notes.append("each guest's frontend (harness/frontends/netfront.py MiniNetfront) runs in a process of its "
                   "own; one xenhv, one xenstored and one netback serve them all, as one dom0 does; the peer is "
                   "the namespace's kernel answering ICMP echo on each guest's TAP")
    r.notes.append(f"this machine has {os.cpu_count()} CPU(s): every guest's frontend, QEMU, and dom0's processes "
                   "share them; CPU figures are over the timed run, in cores (1 = one CPU busy throughout), the "
                   "whole machine's including whatever else runs on it")
    return r
