"""`xenpv run`, `xenpv pci`, `xenpv clean` and `xenpv version`."""
from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from xenpv.base.errors import ConfigError
from xenpv.base.rundir import base_dir, make_artifacts_dir, make_run_dir, remove_run_dir
from xenpv.harness.cleanup import reap, reap_stale, run_guarded
from xenpv.harness.lifecycle_cli import LifecycleServer
from xenpv.harness.machine import Machine, qemu_binary
from xenpv.stack.vcpu.pci import PciBus, PciFunction

if TYPE_CHECKING:
    from xenpv.guests.schema import GuestDefinition
    from xenpv.harness.agent import Guest
    from xenpv.harness.dom0 import Dom0Backends


# Names for what the harness expects to find on its machines; anything else prints as "unknown".
KNOWN_FUNCTIONS = {
    (0x8086, 0x1237): "i440FX host bridge",
    (0x8086, 0x7000): "PIIX3 ISA bridge",
    (0x8086, 0x7010): "PIIX3 IDE controller",
    (0x8086, 0x7113): "PIIX4 ACPI",
    (0x10EC, 0x8139): "RTL8139 NIC",
    (0x8086, 0x100E): "e1000 NIC",
}


def describe(f: PciFunction) -> str:
    if f.vendor_id == 0x5853:
        return f"Xen platform device {f.device_id:04X}"
    return KNOWN_FUNCTIONS.get((f.vendor_id, f.device_id), "unknown")


def print_bus(functions: list[PciFunction]) -> None:
    for f in functions:
        print(f"{f}  {describe(f)}")
        for bar in f.bars:
            print(f"    {bar}")


# What the guest console prints for a command that failed (stack.agent.console), as line prefixes.
CONSOLE_FAILURES = ("error: ", "usage: ", "unknown command ")
# Where the PV disk check writes: past the first MiB, which a guest's boot sector and tables would use.
PV_DISK_CHECK_LBA = 2048
PV_DISK_CHECK_SECTORS = 16
PINGS = 3
_TARGET_LINE = re.compile(r"^target (\d+) vbd (\d+) .*\bsectors (\d+)\b", re.M)
_REFUSED_LINE = re.compile(r"^vbd (\d+) refused: (.*)$", re.M)


def _guest(args: argparse.Namespace) -> GuestDefinition:
    from xenpv.harness.plugin import resolve_guest  # not at import: it brings pytest in

    return resolve_guest(args.guest)


def _artifacts_dir(args: argparse.Namespace) -> Path | None:
    """`--artifacts DIR`: this run's own new subdirectory DIR/<date>-<time>-<pid>, so two runs given the
    same DIR never share (or overwrite) a log, a transcript or a registry hive."""
    if not args.artifacts:
        return None
    return make_artifacts_dir(Path(args.artifacts), "--artifacts")


def _machine(guest: GuestDefinition, artifacts: Path, qemu: str | None, cleanup: contextlib.ExitStack) -> Machine:
    """The guest's machine as its `launcher` says: QEMU started here, or a libvirt domain (of the daemon at
    qemu:///system, else a private libvirtd for this run, harness.libvirt_launcher)."""
    if guest.launcher != "libvirt":
        return Machine(guest, artifacts, binary=qemu)
    from xenpv.harness.libvirt_launcher import LibvirtMachine, session_target

    target = cleanup.enter_context(session_target(None, artifacts / "libvirtd"))
    return LibvirtMachine(guest, artifacts, target=target, binary=qemu)


@dataclass
class MainJob:
    """The main job's checks on a booted guest; every failed check is recorded, printed at the end, and
    makes `xenpv run` exit 1."""

    guest: Guest
    machine: Machine
    backends: Dom0Backends
    failures: list[str] = field(default_factory=list)

    def fail(self, step: str, why: str) -> None:
        self.failures.append(f"{step}: {why}")

    def show(self, step: str, command: str, timeout: float = 30.0) -> str:
        """Run a console command, print its output, and record each line that says it failed."""
        out = self.guest.console.run(command, timeout=timeout)
        print(out)
        for line in out.splitlines():
            if line.startswith(CONSOLE_FAILURES):
                self.fail(step, f"`{command}`: {line}")
        return out

    def run(self) -> None:
        g = self.machine.guest
        for title, command in (("PCI bus 0, as the firmware left it", "pci"), ("Device tree (first boot)", "devices"),
                               ("Interfaces", "interfaces")):
            print(f"\n== {title} ==")
            self.show(title, command)
        expectations = {kind: g.pv_expectation(kind) for kind in ("disks", "nics")}
        if not any(e.expected for e in expectations.values()):
            reasons = sorted({e.reason for e in expectations.values()})
            print("\n== PV checks skipped on purpose ==\n" + "\n".join(reasons))
            return
        if self.guest.domain is None:
            self.fail("boot", "the guest expects PV devices but is not a Xen domain")
            return
        print("\n== Reboot: the unplug the PV drivers requested takes effect ==")
        self.show("reboot", "reboot", timeout=60)
        qmp = self.machine.qmp
        assert qmp is not None, "the machine is running"
        emulated = [f"{b['qdev']}: {'present' if 'inserted' in b else 'unplugged'}" for b in qmp.command("query-block")]
        nics = [d["qdev_id"] for b in qmp.command("query-pci") for d in b["devices"]
                if d["class_info"]["class"] == 0x0200]
        print("emulated disks (QMP): " + (", ".join(emulated) or "none"))
        print("emulated NICs (QMP): " + (", ".join(nics) or "none left"))
        print("\n== Device tree (second boot) ==")
        self.show("device tree (second boot)", "devices")
        print("\n== PV disk ==")
        if expectations["disks"].expected:
            self.check_disks()
        else:
            print(f"skipped on purpose: {expectations['disks'].reason}")
        print("\n== PV NIC ==")
        if expectations["nics"].expected:
            self.check_nics()
        else:
            print(f"skipped on purpose: {expectations['nics'].reason}")

    def check_disks(self) -> None:
        """Every PV disk of the guest is a XENVBD target, and a write to it reads back the same."""
        step = "PV disk"
        listing = self.show(step, "vbd list")
        targets = {int(vbd): (int(t), int(sectors)) for t, vbd, sectors in _TARGET_LINE.findall(listing)}
        refused = {int(vbd): why for vbd, why in _REFUSED_LINE.findall(listing)}
        for disk in self.machine.guest.pv_disks:
            if disk.vdev not in targets:
                self.fail(step, f"vbd {disk.vdev} is not a XENVBD target"
                                + (f" (refused: {refused[disk.vdev]})" if disk.vdev in refused else ""))
                continue
            target, sectors = targets[disk.vdev]
            count = min(PV_DISK_CHECK_SECTORS, sectors)
            lba = min(PV_DISK_CHECK_LBA, sectors - count)
            wrote = re.search(r"sha256 (\w+)", self.show(step, f"vbd write {target} {lba} seq {count}"))
            read = re.search(r"^sha256 (\w+)", self.show(step, f"vbd read {target} {lba} {count}"), re.M)
            if not (wrote and read and wrote.group(1) == read.group(1)):
                self.fail(step, f"target {target} (vbd {disk.vdev}): what was read back is not what was written")

    def check_nics(self) -> None:
        """Every vif answers pings from its peer, the kernel on the other end of its TAP."""
        step = "PV NIC"
        self.show(step, "net list")
        domain = self.guest.domain
        taps = self.backends.taps.get(domain.domid, []) if domain is not None else []
        if len(taps) != len(self.machine.guest.pv_nics):
            self.fail(step, f"{len(self.machine.guest.pv_nics)} PV NICs but {len(taps)} TAPs in dom0")
        for tap in taps:
            out = self.show(step, f"net ping {tap.peer.ip} {PINGS}")
            if f"{PINGS}/{PINGS} replies" not in out:
                self.fail(step, f"{tap.tap}: {out.splitlines()[-1] if out else 'no answer'}")


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: dom0 (xenhv, xenstored, blkback, netback), the machine, its domain and the guest
    agent; what the guest finds (PCI, device tree, interfaces); then a reboot, so the unplug its PV
    drivers asked for takes effect, and I/O through every PV disk and NIC. Exits 1 when any of it failed,
    0 when all of it worked or the guest says why it has no PV devices to check (then it says so).

    SIGINT, SIGTERM and SIGHUP end the run through its teardown (harness.cleanup.run_guarded); what a
    killed run left behind is removed by the next run or by `xenpv clean`."""
    from xenpv.harness.agent import Guest
    from xenpv.harness.dom0 import Dom0Backends
    from xenpv.backends.host import HostServices

    # Everything the user gave is checked before anything is made, so a bad setting leaves nothing behind.
    guest_def = _guest(args)
    base_dir()
    kept = _artifacts_dir(args)
    if kept is not None:
        print(f"artifacts: {kept}")

    def main_job(cleanup: contextlib.ExitStack) -> MainJob:
        reap_stale()
        artifacts = kept or make_run_dir("art")
        if kept is None:
            # Registered first, so it runs last (after every process has stopped writing to it): the run's
            # directory goes, unless the guest bugchecked: then its dump and logs are kept (crashes.py).
            cleanup.push(lambda kind, exc, tb: _artifacts_after(artifacts, exc))
        host = HostServices.start(artifacts / "host")
        cleanup.callback(host.stop)
        backends = Dom0Backends.start(host, artifacts / "host")
        cleanup.callback(backends.stop)
        machine = _machine(guest_def, artifacts, args.qemu, cleanup)
        cleanup.callback(machine.shutdown)
        machine.launch()
        guest = Guest.boot(host, machine, backends=backends)
        cleanup.callback(guest.shutdown)
        g = machine.guest
        domain = f"domain {guest.domain.domid}" if guest.domain else "no Xen platform device: not a Xen domain"
        pid = machine.process.pid if machine.process else "?"
        print(f"guest {g.name}: {g.memory_mib} MiB, seed {g.seed}, {domain}; QEMU {machine.binary} "
              f"(pid {pid}) ready in {machine.launch_seconds * 1000:.0f} ms")
        job = MainJob(guest, machine, backends)
        if args.no_checks:
            print("checks skipped (--no-checks)")
        else:
            job.run()
        if args.console:
            # `xenpv save|restore|migrate` from another shell reach this guest through this socket.
            server = LifecycleServer(guest, host.run_dir)
            cleanup.callback(server.close)
            _interactive(guest, server.lock)
        return job

    job = run_guarded(main_job)
    if job.failures:
        print(f"\nxenpv run: {len(job.failures)} check(s) failed:", file=sys.stderr)
        for f in job.failures:
            print(f"  {f}", file=sys.stderr)
        return 1
    return 0


def _artifacts_after(artifacts: Path, exc: BaseException | None) -> None:
    """Remove the run's artifact directory, or keep it when the guest bugchecked (its dump and logs moved
    to ./artifacts/<date>-<time>-<pid>, and the GuestBugcheck's report made to name the new paths)."""
    from xenpv.harness.agent import GuestBugcheck
    from xenpv.harness.crashes import keep_crash_artifacts, moved

    if not isinstance(exc, GuestBugcheck):
        remove_run_dir(artifacts)
        return
    try:
        target = keep_crash_artifacts(artifacts)
    except (OSError, ConfigError) as err:
        exc.add_note(f"the crash artifacts could not be kept ({err}); they are in {artifacts} until the next "
                     "run or `xenpv clean` removes them")
        return
    remove_run_dir(artifacts)
    exc.dump_path = moved(exc.dump_path, artifacts, target)
    exc.console_log = moved(exc.console_log, artifacts, target) if exc.console_log else None
    exc.agent_log = moved(exc.agent_log, artifacts, target) if exc.agent_log else None
    exc.args = (exc.report() + f"\nartifacts kept in {target}",)


def _interactive(guest: Guest, lifecycle_lock: threading.Lock) -> None:
    """The session's console. Each command holds the lifecycle server's lock: a `xenpv save` from another
    shell must not stop the vCPU under a command half done, nor a command run on a guest being saved."""
    print("\nguest console; 'quit' to leave")
    while True:
        try:
            line = input("guest> ")
        except EOFError:
            return
        if line.strip() in ("quit", "exit"):
            return
        with lifecycle_lock:
            answer = guest.console.run(line)
        print(answer)


def cmd_pci(args: argparse.Namespace) -> int:
    guest_def = _guest(args)
    base_dir()
    kept = _artifacts_dir(args)

    def enumerate_bus(cleanup: contextlib.ExitStack) -> None:
        reap_stale()
        artifacts = kept or make_run_dir("art")
        if kept is None:
            cleanup.callback(remove_run_dir, artifacts)
        machine = _machine(guest_def, artifacts, args.qemu, cleanup)
        cleanup.callback(machine.shutdown)
        machine.launch()
        bus = PciBus(machine.qtest)
        print_bus(bus.assign_resources() if args.assign else bus.enumerate())

    run_guarded(enumerate_bus)
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove what runs that died left behind: their processes, network namespaces (with their TAPs and
    /run/netns mounts) and run directories under $XENPV_RUNDIR_BASE. A live run's are never touched."""
    base_dir()
    reaped = reap(dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for line in reaped.lines():
        print(f"{verb} {line}")
    if not reaped:
        print("nothing left behind by runs that died")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"xenpv-harness {metadata.version('xenpv-harness')}")
    print(f"python {sys.version.split()[0]}")
    try:
        out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, timeout=10)
        print(f"qemu {qemu_binary()}: {out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"qemu {qemu_binary()}: not usable ({exc})")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    def machine_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("guest", nargs="?", default="guests/default.yaml", help="guest YAML (default: %(default)s)")
        p.add_argument("--qemu", default=None, help="QEMU binary (default: $XENPV_QEMU or the Xen build)")
        p.add_argument("--artifacts", default=None, metavar="DIR",
                       help="keep logs and the qtest transcript in a new directory of this run's own inside DIR "
                            "(DIR/<date>-<time>-<pid>; runs given the same DIR never share one)")

    p = sub.add_parser("run", help="boot a guest (dom0 services, machine, agent) and show what it finds")
    machine_args(p)
    p.add_argument("--console", action="store_true", help="then drive the guest's console interactively")
    p.add_argument("--no-checks", action="store_true",
                   help="boot only: no reboot, disk or NIC checks (a pool host's guest, harness.remote_guest)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("pci", help="enumerate a guest's PCI bus through the vCPU")
    machine_args(p)
    p.add_argument("--assign", action="store_true", help="assign BARs first, as firmware would")
    p.set_defaults(func=cmd_pci)
    p = sub.add_parser("clean", help="remove what runs that died left behind (processes, network namespaces, "
                                     "run directories); a live run's are never touched")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(func=cmd_clean)
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)
