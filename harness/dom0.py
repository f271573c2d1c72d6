"""dom0's back-ends for guests that do I/O: blkback, and netback in a network namespace of its own whose
kernel is the peer on the wire. `prepare(guest, domid)` gives each of a domain's vifs its TAP in the
namespace, addressed as the guest definition says (harness.netns.addressing), before the domain boots.

Tests that kill or inspect a back-end start their own instead (see tests/integration/test_blkback.py);
this is for the main job, benchmarks, replays and explorations (harness.replay). `kill`, `start_backend`
and `restart` put a `dom0` event in the run record of every guest of this process (base.runrecord).
"""
from __future__ import annotations

import contextlib
import signal
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.backends.blkback.launch import start_blkback
from xenpv.backends.netback.launch import start_netback
from xenpv.guests.schema import GuestDefinition
from xenpv.harness.netns import NetNamespace, TapAddressing, addressing
from xenpv.base.process import Supervised
from xenpv.base.runrecord import DOM0, broadcast
from xenpv.backends.host import HostServices


BACKENDS = ("blkback", "netback")


@dataclass
class Dom0Backends:
    host: HostServices
    netns: NetNamespace
    blkback: Supervised | None
    netback: Supervised | None
    taps: dict[int, list[TapAddressing]] = field(default_factory=dict)
    logs: Path = Path(".")
    starts: dict[str, int] = field(default_factory=lambda: {name: 1 for name in BACKENDS})

    @classmethod
    def start(cls, host: HostServices, logs: Path) -> "Dom0Backends":
        with contextlib.ExitStack() as undo:
            blkback = start_blkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, logs / "blkback.log")
            undo.callback(blkback.stop)
            ns = NetNamespace.create("dom0")
            undo.callback(ns.close)
            netback = cls._start_netback(host, ns, logs, "netback")
            undo.pop_all()
        return cls(host, ns, blkback, netback, logs=logs)

    @staticmethod
    def _start_netback(host: HostServices, ns: NetNamespace, logs: Path, stem: str) -> Supervised:
        return start_netback(host.xenstored_socket, host.xenhv_socket, host.run_dir / "netback.sock",
                             ns.name, logs / f"{stem}.log", logs / f"{stem}-stats.json")

    def backend(self, name: str) -> Supervised | None:
        if name not in BACKENDS:
            raise ValueError(f"no back-end {name!r} (there are {', '.join(BACKENDS)})")
        return getattr(self, name)

    def kill(self, name: str) -> None:
        """SIGKILL a back-end (no teardown, as a crash would leave it); a dead one is only reaped."""
        proc = self.backend(name)
        if proc is not None:
            if proc.alive():
                proc.signal_group(signal.SIGKILL)
            proc.stop()
            setattr(self, name, None)
        broadcast(DOM0, action="backend-kill", backend=name)

    def start_backend(self, name: str) -> None:
        """Start a killed back-end again; each start logs to <name>-<n>.log."""
        if self.backend(name) is not None:
            raise ValueError(f"{name} is running: kill it first")
        self.starts[name] += 1
        stem = f"{name}-{self.starts[name]}"
        if name == "blkback":
            self.blkback = start_blkback(self.host.run_dir, self.host.xenstored_socket, self.host.xenhv_socket,
                                         self.logs / f"{stem}.log")
        else:
            self.netback = self._start_netback(self.host, self.netns, self.logs, stem)
        broadcast(DOM0, action="backend-start", backend=name)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.start_backend(name)

    def release(self, domid: int) -> None:
        """The domain is gone: its TAPs go, so a later domain's vifs can take the same addresses."""
        for a in self.taps.pop(domid, []):
            self.netns.remove_tap(a.tap)

    def prepare(self, guest: GuestDefinition, domid: int) -> list[TapAddressing]:
        """The TAPs of domain `domid`'s vifs, made and addressed before it boots."""
        taps = [addressing(nic, domid, devid) for devid, nic in enumerate(guest.pv_nics)]
        for a in taps:
            self.netns.add_tap(a)
        self.taps[domid] = taps
        return taps

    def processes(self) -> list[Supervised]:
        return [p for p in (self.blkback, self.netback) if p is not None]

    def stop(self) -> None:
        for p in (self.netback, self.blkback):
            if p is not None:
                p.stop()
        self.netns.close()
