"""What most benchmarks stand on: a run directory, the dom0 services, a launched machine and its Xen
domain (with the harness's own vCPU), all undone by the caller's ExitStack."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

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


def xen_domain_rig(cleanup: contextlib.ExitStack, tag: str = "bench", guest: str = "default",
                   before_domain: Callable[[Path, HostServices], None] | None = None) -> BenchRig:
    """`before_domain(work, host)` starts what must run before the domain is made: a back-end whose devices
    the toolstack is to create (it adds a backend directory only for a kind a back-end serves)."""
    work = make_run_dir(tag)
    cleanup.callback(remove_run_dir, work)
    host = HostServices.start(work / "host")
    cleanup.callback(host.stop)
    if before_domain is not None:
        before_domain(work, host)
    machine = Machine(resolve_guest(guest), work / "machine").launch()
    cleanup.callback(machine.shutdown)
    dom = XenDomain.create(host, machine)
    cleanup.callback(dom.destroy)
    return BenchRig(work, host, machine, dom)
