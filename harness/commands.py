"""`xenpv run`, `xenpv pci` and `xenpv version`."""
from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from harness.machine import Machine, qemu_binary
from harness.rundir import make_run_dir, remove_run_dir
from stack.vcpu.pci import PciBus, PciFunction

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
    from harness.plugin import resolve_guest

    guest = resolve_guest(args.guest)
    artifacts = Path(args.artifacts) if args.artifacts else make_run_dir("art")
    return Machine(guest, artifacts, binary=args.qemu), artifacts


def cmd_run(args: argparse.Namespace) -> int:
    machine, artifacts = _boot(args)
    with machine:
        g = machine.guest
        print(f"guest {g.name}: {g.memory_mib} MiB, seed {g.seed}, QEMU {machine.binary} "
              f"(pid {machine.process.pid}), ready in {machine.launch_seconds * 1000:.0f} ms")
        print("PCI bus 0 (enumerated through 0xCF8/0xCFC; BARs assigned as firmware would):")
        print_bus(PciBus(machine.qtest).assign_resources())
    if not args.artifacts:
        remove_run_dir(artifacts)
    return 0


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

    p = sub.add_parser("run", help="boot a guest and show what it finds")
    machine_args(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("pci", help="enumerate a guest's PCI bus through the vCPU")
    machine_args(p)
    p.add_argument("--assign", action="store_true", help="assign BARs first, as firmware would")
    p.set_defaults(func=cmd_pci)
    p = sub.add_parser("version", help="print versions")
    p.set_defaults(func=cmd_version)
