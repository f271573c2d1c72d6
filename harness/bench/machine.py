"""`xenpv bench machine`: launch-to-ready and teardown times of the real QEMU machine."""
from __future__ import annotations

import argparse
import time

from xenpv.harness.bench import BenchReport, benchmark, median
from xenpv.harness.machine import Machine
from xenpv.base.rundir import make_run_dir, remove_run_dir


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=20, help="launches to measure (default %(default)s)")
    p.add_argument("--guest", default="default", help="guest YAML (default: %(default)s)")


@benchmark("machine", help="machine launch-to-ready and teardown times", arguments=_arguments)
def bench_machine(args: argparse.Namespace) -> BenchReport:
    from xenpv.harness.plugin import resolve_guest

    guest = resolve_guest(args.guest)
    artifacts = make_run_dir("bench")
    launch, teardown = [], []
    try:
        for i in range(args.runs):
            m = Machine(guest, artifacts / str(i), name=f"bench{i}")
            m.launch()
            launch.append(m.launch_seconds)
            t0 = time.monotonic()
            m.shutdown()
            teardown.append(time.monotonic() - t0)
    finally:
        remove_run_dir(artifacts)
    r = BenchReport(f"machine ({guest.name}, median of {args.runs})")
    r.add("launch to ready", median(launch) * 1000, "ms", "< 150 ms")
    r.add("teardown", median(teardown) * 1000, "ms", "< 100 ms")
    r.add("launch to ready, worst", max(launch) * 1000, "ms")
    r.add("teardown, worst", max(teardown) * 1000, "ms")
    r.notes.append("ready = QMP negotiated, qtest answering, RAM mapped; teardown = QMP quit until reaped, run dir removed")
    return r
