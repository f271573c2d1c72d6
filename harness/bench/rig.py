"""What most benchmarks stand on: a run directory, the dom0 services, a launched machine and its Xen
domain (with the harness's own vCPU), all undone by the caller's ExitStack."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from xenpv.harness.machine import Machine
from xenpv.harness.plugin import resolve_guest
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.backends.host import HostServices
from xenpv.harness.xendomain import XenDomain


@dataclass
class BenchRig:
    work: Path
    host: HostServices
    machine: Machine
    dom: XenDomain


def xen_domain_rig(cleanup: contextlib.ExitStack, tag: str = "bench", guest: str = "default") -> BenchRig:
    work = make_run_dir(tag)
    cleanup.callback(remove_run_dir, work)
    host = HostServices.start(work / "host")
    cleanup.callback(host.stop)
    machine = Machine(resolve_guest(guest), work / "machine").launch()
    cleanup.callback(machine.shutdown)
    dom = XenDomain.create(host, machine)
    cleanup.callback(dom.destroy)
    return BenchRig(work, host, machine, dom)
