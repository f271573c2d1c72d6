"""Network namespaces and TAP devices for netback tests, with iproute2.

Each test gets a namespace of its own (a unique name from the run) holding one persistent TAP per vif,
addressed from the guest definition (PvNic.peer is the namespace side, PvNic.address the guest's) or from
10.200.<devid>.0/24, which exists only inside that namespace. Nothing is routed out of it: the namespace
has no other interface than its loopback and its TAPs. `close()` deletes the TAPs and the namespace and is
safe to call after any failure.

A namespace's name records its owner (`xpv-<tag>-<pid>.<start>-<hex>`, base.owner), and its TAPs live
only inside it, so a namespace left by a run that died is removed with its TAPs by the next run or by
`xenpv clean` (harness.cleanup). `ip` runs shielded from the signals that end a run (base.process
.run_shielded): a Ctrl-C reaches the harness, which cleans up, and never kills an `ip netns del` half-way."""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from typing import Iterator

from xenpv.backends.netback.tap import tap_name
from xenpv.guests.schema import PvNic
from xenpv.base.errors import HarnessError
from xenpv.base.process import run_shielded
from xenpv.base.rundir import owned_prefix

log = logging.getLogger("harness.netns")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


class NetnsError(HarnessError):
    pass


def _ip(*args: str) -> str:
    try:
        r = run_shielded(["ip", *args], timeout=30)
    except subprocess.TimeoutExpired:
        raise NetnsError(f"ip {' '.join(args)}: no answer within 30 s") from None
    if r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r.stdout


def list_namespaces() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def delete_namespace(name: str) -> bool:
    """Delete namespace `name` (its TAPs go with it); False when there was none. `ip netns del` also
    removes a /run/netns entry whose mount an interrupted `ip netns add` never made."""
    if not os.path.lexists(f"{NETNS_DIR}/{name}"):
        return False
    _ip("netns", "del", name)
    log.info("namespace %s removed", name)
    return True


@dataclass(frozen=True)
class TapAddressing:
    tap: str
    peer: ipaddress.IPv4Interface    # the namespace (kernel) side, on the TAP
    guest: ipaddress.IPv4Address     # what the test frontend answers ARP for
    mtu: int


def addressing(nic: PvNic, domid: int, devid: int, mtu: int = 1500) -> TapAddressing:
    peer = ipaddress.IPv4Interface(nic.peer if nic.peer and "/" in nic.peer
                                   else f"{nic.peer}/24" if nic.peer else f"10.200.{devid}.1/24")
    guest = ipaddress.IPv4Address(nic.address.split("/")[0]) if nic.address else peer.ip + 1
    if guest not in peer.network:
        raise NetnsError(f"vif {devid}: guest address {guest} is outside the namespace network {peer.network}")
    return TapAddressing(tap_name(domid, devid), peer, guest, mtu)


@dataclass
class NetNamespace:
    name: str
    taps: list[str] = field(default_factory=list)

    @classmethod
    def create(cls, tag: str = "") -> "NetNamespace":
        name = f"{owned_prefix(tag)}{uuid.uuid4().hex[:8]}"
        ns = cls(name)
        try:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            # Also when `ip netns add` itself was interrupted: it may have made the entry already.
            ns.close()
            raise
        log.info("namespace %s created", name)
        return ns

    def add_tap(self, a: TapAddressing) -> None:
        """A persistent TAP with vnet headers (netback attaches with IFF_VNET_HDR), addressed and up."""
        _ip("-n", self.name, "tuntap", "add", "dev", a.tap, "mode", "tap", "vnet_hdr")
        self.taps.append(a.tap)
        _ip("-n", self.name, "link", "set", a.tap, "mtu", str(a.mtu))
        _ip("-n", self.name, "addr", "add", str(a.peer), "dev", a.tap)
        _ip("-n", self.name, "link", "set", a.tap, "up")

    def remove_tap(self, tap: str) -> None:
        """Delete one TAP (its domain is gone), so the next domain's TAP can take its addresses."""
        if tap in self.taps:
            self.taps.remove(tap)
            _ip("-n", self.name, "link", "del", tap)

    def add_veth(self, outside: ipaddress.IPv4Interface, inside: ipaddress.IPv4Interface,
                 inside_name: str = "eth0") -> str:
        """A veth pair linking this namespace to ours: `inside_name` in it with address `inside`, the
        other end here with `outside`, both up (a second host as far as the network goes). Returns the
        outside end's name. Deleting the namespace deletes the pair, so close() needs no step of its own
        and a namespace the reaper removes takes its veth with it."""
        outside_name = f"xv{self.name[-8:]}"  # IFNAMSIZ: 15 characters; the namespace's random part
        _ip("link", "add", outside_name, "type", "veth", "peer", "name", inside_name, "netns", self.name)
        try:
            _ip("addr", "add", str(outside), "dev", outside_name)
            _ip("link", "set", outside_name, "up")
            _ip("-n", self.name, "addr", "add", str(inside), "dev", inside_name)
            _ip("-n", self.name, "link", "set", inside_name, "up")
        except BaseException:
            _ip("link", "del", outside_name)
            raise
        return outside_name

    def pids(self) -> list[int]:
        """Every process whose network namespace this is (`ip netns pids`)."""
        return [int(p) for p in _ip("netns", "pids", self.name).split()]

    def exec_argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with the calling thread inside the namespace (sockets made there stay there)."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise NetnsError(f"setns into {self.name}: {os.strerror(ctypes.get_errno())}")
            try:
                yield
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise NetnsError(f"setns back from {self.name}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(target)
            os.close(home)

    def close(self) -> None:
        for tap in reversed(self.taps):
            try:
                _ip("-n", self.name, "link", "del", tap)
            except NetnsError as exc:
                log.debug("%s: %s", self.name, exc)
        self.taps.clear()
        delete_namespace(self.name)
