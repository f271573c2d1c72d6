"""dom0's back-ends for guests that do I/O: blkback, and netback in a network namespace of its own whose
kernel is the peer on the wire. `prepare(guest, domid)` gives each of a domain's vifs its TAP in the
namespace, addressed as the guest definition says (harness.netns.addressing), before the domain boots.

Tests that kill or inspect a back-end start their own instead (see tests/integration/test_blkback.py);
this is for the main job, benchmarks and tests that just need a working dom0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.backends.blkback.launch import start_blkback
from xenpv.backends.netback.launch import start_netback
from xenpv.guests.schema import GuestDefinition
from xenpv.harness.netns import NetNamespace, TapAddressing, addressing
from xenpv.base.process import Supervised
from xenpv.backends.host import HostServices


@dataclass
class Dom0Backends:
    host: HostServices
    netns: NetNamespace
    blkback: Supervised
    netback: Supervised
    taps: dict[int, list[TapAddressing]] = field(default_factory=dict)

    @classmethod
    def start(cls, host: HostServices, logs: Path) -> "Dom0Backends":
        with contextlib.ExitStack() as undo:
            blkback = start_blkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, logs / "blkback.log")
            undo.callback(blkback.stop)
            ns = NetNamespace.create("dom0")
            undo.callback(ns.close)
            netback = start_netback(host.xenstored_socket, host.xenhv_socket, host.run_dir / "netback.sock",
                                    ns.name, logs / "netback.log", logs / "netback-stats.json")
            undo.pop_all()
        return cls(host, ns, blkback, netback)

    def prepare(self, guest: GuestDefinition, domid: int) -> list[TapAddressing]:
        """The TAPs of domain `domid`'s vifs, made and addressed before it boots."""
        taps = [addressing(nic, domid, devid) for devid, nic in enumerate(guest.pv_nics)]
        for a in taps:
            self.netns.add_tap(a)
        self.taps[domid] = taps
        return taps

    def processes(self) -> list[Supervised]:
        return [self.blkback, self.netback]

    def stop(self) -> None:
        for p in (self.netback, self.blkback):
            p.stop()
        self.netns.close()
