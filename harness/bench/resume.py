"""`xenpv bench resume`: how long a guest is without its domain, per way of losing it (issue 13).

Each round trip is measured from the moment the guest is asked (the toolstack's control/shutdown=suspend,
or the S4 command) to I/O flowing again: a PV disk read that completes in the new domain (it waits for the
frontend to reconnect). Save and restore are measured apart and together; a checkpoint and a local
migration as one figure each; S4 is hibernation through power-on (when the harness has it). QEMU's own
migration time (device state out, and in) is measured in the same run as the baseline the rest sits on.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections.abc import Callable

from xenpv.harness.bench import BenchReport, benchmark, median

TARGET = "< 1500 ms"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=5, help="round trips of each kind (default %(default)s)")
    p.add_argument("--guest", default="default", help="guest YAML (default: %(default)s)")


def _io(guest) -> None:
    out = guest.console.run("vbd read 0 2048 8", timeout=60)
    if not re.search(r"^sha256 \w+", out, re.M):
        raise RuntimeError(f"no I/O after the resume: {out!r}")


@benchmark("resume", help="save, restore, checkpoint, migrate and S4 round trips (asked -> I/O again)",
           arguments=_arguments)
def bench_resume(args: argparse.Namespace) -> BenchReport:
    from xenpv.backends.host import HostServices
    from xenpv.base.rundir import make_run_dir, remove_run_dir
    from xenpv.harness.agent import Guest
    from xenpv.harness.dom0 import Dom0Backends
    from xenpv.harness.machine import Machine
    from xenpv.harness.plugin import resolve_guest

    guest_def = resolve_guest(args.guest)
    samples: dict[str, list[float]] = {}

    def sample(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    def timed(name: str, body: Callable[[], object]) -> object:
        t0 = time.monotonic()
        result = body()
        _io(guest)
        sample(name, time.monotonic() - t0)
        return result

    with contextlib.ExitStack() as cleanup:
        work = make_run_dir("bench")
        cleanup.callback(remove_run_dir, work)
        host = HostServices.start(work / "host")
        cleanup.callback(host.stop)
        backends = Dom0Backends.start(host, work)
        cleanup.callback(backends.stop)
        machine = Machine(guest_def, work / "guest", name=guest_def.name).launch()
        cleanup.callback(machine.shutdown)
        guest = Guest.boot(host, machine, backends=backends)
        cleanup.callback(guest.shutdown)
        guest.console.run("reboot", timeout=60)  # the PV drivers own the disk and NIC from here on
        _io(guest)
        image = work / "guest.save"
        for _ in range(args.runs):
            t0 = time.monotonic()
            saved = guest.save(image)
            t1 = time.monotonic()
            restored = guest.restore(image)
            _io(guest)
            t2 = time.monotonic()
            sample("save", t1 - t0)
            sample("restore (to I/O)", t2 - t1)
            sample("save + restore round trip", t2 - t0)
            sample("QEMU migrate out (device state)", saved.steps["qemu_migrate"])
            sample("QEMU migrate in (device state)", restored.steps["qemu_migrate"])
            for step, seconds in list(saved.steps.items()) + [(f"restore {k}", v) for k, v in restored.steps.items()]:
                sample(f"  step {step}", seconds)
            timed("checkpoint round trip", lambda: guest.save(image, checkpoint=True))
            timed("local migration round trip", guest.migrate)
            hibernate = getattr(guest, "hibernate", None)
            if hibernate is not None:
                timed("S4 round trip (hibernate, power on)", lambda: (hibernate(), guest.power_on()))
    r = BenchReport(f"resume ({guest_def.name}, {guest_def.memory_mib} MiB, median of {args.runs})")
    for name, values in samples.items():
        target = TARGET if "round trip" in name else ""
        r.add(name, median(values) * 1000, "ms", target)
    for name in ("save + restore round trip", "local migration round trip"):
        if name in samples:
            r.ratio(f"{name} / QEMU's own migrate (out + in)",
                    r.figures[[f.name for f in r.figures].index(name)],
                    r.add("QEMU's own migrate (out + in)",
                          (median(samples["QEMU migrate out (device state)"])
                           + median(samples["QEMU migrate in (device state)"])) * 1000, "ms")
                    if "QEMU's own migrate (out + in)" not in [f.name for f in r.figures]
                    else r.figures[[f.name for f in r.figures].index("QEMU's own migrate (out + in)")])
    r.notes.append("round trip = asked (control/shutdown=suspend, or power S4) -> a PV disk read completes in the "
                   "new domain; the save image holds the RAM the guest touched (the RAM file's data extents, zero chunks left out)")
    return r
