"""`xenpv run`, `xenpv pci` and `xenpv version`."""
from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from xenpv.harness.machine import Machine, qemu_binary

if TYPE_CHECKING:
    from xenpv.harness.agent import Guest
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.stack.vcpu.pci import PciBus, PciFunction

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


def _boot(args: argparse.Namespace) -> tuple[Machine, Path]:
    from xenpv.harness.plugin import resolve_guest

    guest = resolve_guest(args.guest)
    artifacts = Path(args.artifacts) if args.artifacts else make_run_dir("art")
    return Machine(guest, artifacts, binary=args.qemu), artifacts


def cmd_run(args: argparse.Namespace) -> int:
    """The main job: dom0 (xenhv, xenstored, blkback, netback), the machine, its domain and the guest
    agent; what the guest finds (PCI, device tree, interfaces); then a reboot, so the unplug its PV
    drivers asked for takes effect, and I/O through the PV disk and NIC."""
    from xenpv.harness.agent import Guest
    from xenpv.harness.dom0 import Dom0Backends
    from xenpv.backends.host import HostServices

    machine, artifacts = _boot(args)
    with contextlib.ExitStack() as cleanup:
        if not args.artifacts:
            cleanup.callback(remove_run_dir, artifacts)
        host = HostServices.start(artifacts / "host")
        cleanup.callback(host.stop)
        backends = Dom0Backends.start(host, artifacts / "host")
        cleanup.callback(backends.stop)
        machine.launch()
        cleanup.callback(machine.shutdown)
        guest = Guest.boot(host, machine, backends=backends)
        cleanup.callback(guest.shutdown)
        g = machine.guest
        domain = f"domain {guest.domain.domid}" if guest.domain else "no Xen platform device: not a Xen domain"
        print(f"guest {g.name}: {g.memory_mib} MiB, seed {g.seed}, {domain}; QEMU {machine.binary} "
              f"(pid {machine.process.pid}) ready in {machine.launch_seconds * 1000:.0f} ms")
        show = guest.console.run
        for title, command in (("PCI bus 0, as the firmware left it", "pci"), ("Device tree (first boot)", "devices"),
                               ("Interfaces", "interfaces")):
            print(f"\n== {title} ==\n{show(command)}")
        if guest.domain is not None:
            print("\n== Reboot: the unplug the PV drivers requested takes effect ==")
            show("reboot", timeout=60)
            emulated = [f"{b['qdev']}: {'present' if 'inserted' in b else 'unplugged'}"
                        for b in machine.qmp.command("query-block")]
            nics = [d["qdev_id"] for b in machine.qmp.command("query-pci") for d in b["devices"]
                    if d["class_info"]["class"] == 0x0200]
            print("emulated disks (QMP): " + (", ".join(emulated) or "none"))
            print("emulated NICs (QMP): " + (", ".join(nics) or "none left"))
            print(f"\n== Device tree (second boot) ==\n{show('devices')}")
            print(f"\n== PV disk ==\n{show('vbd list')}")
            if "target 0" in show("vbd list"):
                print(show("vbd write 0 2048 seq 16"))
                print(show("vbd read 0 2048 16"))
            print(f"\n== PV NIC ==\n{show('net list')}")
            taps = backends.taps.get(guest.domain.domid, [])
            if taps:
                print(show(f"net ping {taps[0].peer.ip} 3"))
        if args.console:
            _interactive(guest)
    return 0


def _interactive(guest: Guest) -> None:
    print("\nguest console; 'quit' to leave")
    while True:
        try:
            line = input("guest> ")
        except EOFError:
            return
        if line.strip() in ("quit", "exit"):
            return
        print(guest.console.run(line))


def cmd_pci(args: argparse.Namespace) -> int:
    machine, artifacts = _boot(args)
    with machine:
        bus = PciBus(machine.qtest)
        print_bus(bus.assign_resources() if args.assign else bus.enumerate())
    if not args.artifacts:
        remove_run_dir(artifacts)
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
        p.add_argument("--artifacts", default=None, help="keep logs and the qtest transcript in this directory")

    p = sub.add_parser("run", help="boot a guest (dom0 services, machine, agent) and show what it finds")
    machine_args(p)
    p.add_argument("--console", action="store_true", help="then drive the guest's console interactively")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("pci", help="enumerate a guest's PCI bus through the vCPU")
    machine_args(p)
    p.add_argument("--assign", action="store_true", help="assign BARs first, as firmware would")
    p.set_defaults(func=cmd_pci)
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)
