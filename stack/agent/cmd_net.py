"""`net ...`: the guest's network adapters (XENNET over XENVIF) from the console.

    net [-i N] OP ...              -i: use adapter (vif) N instead of the one on the address's network
    net list                       adapters: instance, MAC, address, state
    net ping ADDR [COUNT]          ICMP echo; prints "N/M replies"
    net udp-echo ADDR PORT SIZE    one datagram of SIZE bytes to an echo server; prints "echo SIZE ok|MISMATCH"
    net tcp-get ADDR PORT BYTES    connect, read BYTES, close; prints "tcp-get N bytes sha256 HEX SECONDS s"
    net tcp-put ADDR PORT BYTES    connect, send BYTES of the seeded pattern, close; prints its sha256
    net stats                      adapter and XENVIF statistics, then per adapter its frontend's
                                   queues, reconnects and per-queue packet counts

The adapter's IPv4 address comes from the guest definition (PvNic.address, else the address after
PvNic.peer, else 10.200.<devid>.2/24), the same rule as harness/netns.addressing() for the namespace side.
`adapters(rt)` / `configure(rt)` are the Python API behind the commands."""
from __future__ import annotations

import hashlib
import ipaddress
import time

from xenpv.stack.agent.console import command
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.drivers.xennet.driver import XennetAdapter
from xenpv.stack.drivers.xenvif.frontend import Frontend, format_mac
from xenpv.stack.drivers.xenvif.pdo import XenvifPdo
from xenpv.stack.drivers.xenvif.vif import XenvifVifStatistic

TRANSFER_TIMEOUT = 120.0


def guest_interface(rt: GuestRuntime, devid: int) -> ipaddress.IPv4Interface:
    nics = rt.config.guest.pv_nics
    nic = nics[devid] if devid < len(nics) else None
    peer = None
    if nic is not None and nic.peer:
        peer = ipaddress.IPv4Interface(nic.peer if "/" in nic.peer else f"{nic.peer}/24")
    if nic is not None and nic.address:
        return ipaddress.IPv4Interface(nic.address if "/" in nic.address
                                       else f"{nic.address}/{peer.network.prefixlen if peer else 24}")
    if peer is not None:
        return ipaddress.IPv4Interface(f"{peer.ip + 1}/{peer.network.prefixlen}")
    return ipaddress.IPv4Interface(f"10.200.{devid}.2/24")


def adapters(rt: GuestRuntime) -> list[XennetAdapter]:
    """The started XENNET adapters, addressed (first use configures them)."""
    driver = rt.kernel.pnp.drivers.get("XENNET")
    if driver is None or driver.extension is None:
        return []
    found = sorted(driver.extension.adapters, key=lambda a: a.instance)
    for adapter in found:
        if adapter.ip is not None and adapter.ip.interface is None:
            adapter.ip.interface = guest_interface(rt, int(adapter.instance) if adapter.instance.isdigit() else 0)
            adapter.ip.random.seed(rt.config.guest.seed)
            adapter.announce()
    return found


def _adapter(rt: GuestRuntime, address: ipaddress.IPv4Address, instance: str | None = None) -> XennetAdapter:
    for adapter in adapters(rt):
        if instance is not None:
            if adapter.instance == instance:
                return adapter
        elif adapter.ip is not None and address in adapter.ip.interface.network:
            return adapter
    raise RuntimeError(f"no adapter {instance}" if instance is not None else f"no adapter on a network holding {address}")


def frontend_of(adapter: XennetAdapter) -> Frontend | None:
    """The XENVIF frontend under an adapter (its PDO's extension), as a debugger would reach it: the
    VIF interface has no per-queue statistics."""
    pdo = getattr(adapter.lower, "extension", None)
    return pdo.frontend if isinstance(pdo, XenvifPdo) else None


def pattern(seed: int, size: int) -> bytes:
    """The bytes tcp-put sends: reproducible from the seed, so the receiver can check them."""
    block = hashlib.sha256(f"xennet-{seed}".encode()).digest() * 2048  # 64 KiB
    return (block * (size // len(block) + 1))[:size]


@command("net", "net list|ping|udp-echo|tcp-get|tcp-put|stats: the XENNET adapters")
def _net(rt: GuestRuntime, args: list[str]) -> str:
    if not args:
        return __doc__.split("\n\n")[1]
    instance = None
    if args[0] == "-i" and len(args) > 2:
        instance, args = args[1], args[2:]
    op, rest = args[0], args[1:]
    with rt.kernel.cpu.lock:
        if op == "list":
            lines = []
            for a in adapters(rt):
                online, speed, _ = a.vif.VifMacQueryState()
                lines.append(f"{a.instance} mac {format_mac(a.mac)} permanent {format_mac(a.permanent_mac)} "
                             f"ip {a.ip.interface if a.ip else '-'} {'up' if online else 'down'} {speed // 10**6} Mb/s "
                             f"mtu {a.vif.VifMacQueryMaximumFrameSize() - 14}")
            return "\n".join(lines) or "(no adapters)"
        if op == "stats":
            lines = []
            for a in adapters(rt):
                lines.append(f"{a.instance} " + " ".join(f"{k}={v}" for k, v in a.statistics.items()))
                if a.ip is not None:
                    lines.append(f"{a.instance} " + " ".join(f"{k}={v}" for k, v in a.ip.counters.items()))
                vif = " ".join(f"{s.name.removeprefix('XENVIF_').lower()}={a.vif.VifQueryStatistic(s)[1]}"
                               for s in XenvifVifStatistic)
                lines.append(f"{a.instance} {vif}")
                frontend = frontend_of(a)
                if frontend is not None:
                    per_queue = " ".join(f"queue{i}_{k}={v}" for i, c in sorted(frontend.queue_statistics.items())
                                         for k, v in c.items())
                    lines.append(f"{a.instance} queues={len(frontend.queues)} reconnects={frontend.reconnects} "
                                 f"{per_queue}".rstrip())
            return "\n".join(lines) or "(no adapters)"
        if op == "ping" and rest:
            address = ipaddress.IPv4Address(rest[0])
            count = int(rest[1]) if len(rest) > 1 else 1
            ip = _adapter(rt, address, instance).ip
            replies = sum(ip.ping(address, seq, f"xennet ping {seq}".encode()) for seq in range(1, count + 1))
            return f"{replies}/{count} replies from {address}"
        if op == "udp-echo" and len(rest) == 3:
            address, port, size = ipaddress.IPv4Address(rest[0]), int(rest[1]), int(rest[2])
            ip = _adapter(rt, address, instance).ip
            payload = pattern(rt.config.guest.seed or 0, size)
            sport = ip.ephemeral_port()
            ip.udp_open(sport)
            try:
                ip.udp_send(address, sport, port, payload)
                src, rport, data = ip.udp_recv(sport, 5.0)
            finally:
                ip.udp_close(sport)
            ok = data == payload and (src, rport) == (str(address), port)
            return f"echo {size} {'ok' if ok else f'MISMATCH ({len(data)} bytes from {src}:{rport})'}"
        if op in ("tcp-get", "tcp-put") and len(rest) == 3:
            address, port, size = ipaddress.IPv4Address(rest[0]), int(rest[1]), int(rest[2])
            ip = _adapter(rt, address, instance).ip
            start = time.monotonic()
            connection = ip.tcp_connect(address, port)
            try:
                if op == "tcp-get":
                    data = ip.tcp_recv_all(connection, size, TRANSFER_TIMEOUT)
                else:
                    data = pattern(rt.config.guest.seed or 0, size)
                    ip.tcp_send_all(connection, data, TRANSFER_TIMEOUT)
            finally:
                ip.tcp_close(connection)
            seconds = time.monotonic() - start
            return (f"{op} {len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()} {seconds:.2f} s "
                    f"retransmits {connection.retransmits}")
    return "usage: net [-i N] list | ping ADDR [COUNT] | udp-echo ADDR PORT SIZE | tcp-get|tcp-put ADDR PORT BYTES | stats"
