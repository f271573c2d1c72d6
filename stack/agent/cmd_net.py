"""`net ...`: the guest's network adapters (XENNET over XENVIF) from the console.

The adapter's IPv4 address comes from the guest definition (guests.schema.PvNic.addressing: PvNic.address,
else the address after PvNic.peer, else 10.200.<devid>.2/24), the rule harness/netns.addressing() follows
for the namespace side. `adapters(rt)` is the Python API behind the commands."""
from __future__ import annotations

import hashlib
import ipaddress
import time

from xenpv.guests.schema import nic_addressing
from xenpv.stack.agent.console import UsageError, command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.drivers.xennet.driver import XennetAdapter
from xenpv.stack.drivers.xenvif.frontend import Frontend, format_mac
from xenpv.stack.drivers.xenvif.pdo import XenvifPdo
from xenpv.stack.drivers.xenvif.vif import XenvifVifStatistic

TRANSFER_TIMEOUT = 120.0


def guest_interface(rt: GuestRuntime, devid: int) -> ipaddress.IPv4Interface:
    nics = rt.config.guest.pv_nics
    if devid < len(nics):
        return nics[devid].addressing(devid)[1]  # validated when the definition was loaded
    return nic_addressing(None, None, devid)[1]


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


@command("net", "the XENNET adapters", (
    "list", "stats", "[-i VIF] ping ADDR [COUNT]", "[-i VIF] udp-echo ADDR PORT SIZE",
    "[-i VIF] tcp-get ADDR PORT BYTES", "[-i VIF] tcp-put ADDR PORT BYTES"), details="""\
list       adapters: instance, MAC, address, state
stats      adapter and XENVIF statistics, then per adapter its frontend's queues, reconnects and
           per-queue packet counts
ping       ICMP echo; prints "N/M replies"
udp-echo   one datagram of SIZE bytes to an echo server; prints "echo SIZE ok|MISMATCH"
tcp-get    connect, read BYTES, close; prints "tcp-get N bytes sha256 HEX SECONDS s"
tcp-put    connect, send BYTES of the seeded pattern, close; prints its sha256
-i VIF     use adapter (vif) VIF instead of the one on ADDR's network""")
def _net(rt: GuestRuntime, args: list[str]) -> str:
    instance = None
    if args[0] == "-i":
        instance, args = args[1], args[2:]
    op, rest = args[0], args[1:]
    # The values, checked before any driver code runs.
    if op in ("ping", "udp-echo", "tcp-get", "tcp-put"):
        try:
            address = ipaddress.IPv4Address(rest[0])
        except ValueError:
            raise UsageError(f"ADDR must be an IPv4 address, got {rest[0]!r}") from None
    if op == "ping":
        count = parse_int(rest[1], "COUNT", 1, 1000) if len(rest) > 1 else 1
    elif op in ("udp-echo", "tcp-get", "tcp-put"):
        port = parse_int(rest[1], "PORT", 1, 0xFFFF)
        size = parse_int(rest[2], "SIZE" if op == "udp-echo" else "BYTES", 0, 1 << 32)
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
        if op == "ping":
            ip = _adapter(rt, address, instance).ip
            replies = sum(ip.ping(address, seq, f"xennet ping {seq}".encode()) for seq in range(1, count + 1))
            return f"{replies}/{count} replies from {address}"
        if op == "udp-echo":
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
        # tcp-get or tcp-put: the usage admits nothing else.
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
