"""`lifecycle ...`: what the harness (playing the toolstack and the machine's power button) tells a guest that
lost its domain, and what it asks it.

- `lifecycle resume QTEST RAM HV NEWDOMID`: the guest's saved state now runs in domain NEWDOMID, on the QEMU whose
  qtest socket is QTEST with guest RAM in the file RAM, its trap socket HV. The vCPU, parked in the suspend
  hypercall since the save, moves there (stack.vcpu.relocation) and the hypercall returns 0; XENBUS then
  runs the EARLY and LATE callbacks. The command answers once the guest runs again (SUSPEND.Trigger done),
  or with why the vCPU could not move (it stays parked).
- `lifecycle status`: running, suspended (parked) or powered off; the domain and SUSPEND's count.
- `lifecycle ignore-suspend on|off`: fault injection - XENBUS leaves control/shutdown=suspend unanswered,
  as a guest whose PV drivers hang would, so the toolstack's save must fail and the guest keep running.

These commands never take the processor: the vCPU may be parked holding it.
"""
from __future__ import annotations

from pathlib import Path

from xenpv.stack.agent.console import command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.vcpu.relocation import WAITING_SUSPENDED, MachineContext

# From the machine named to the guest running there again: the move, the EARLY and LATE callbacks.
RESUME_SECONDS = 60.0


def _fdo(rt: GuestRuntime):
    fdo = rt.drivers.xenbus.active_fdo if rt.drivers is not None else None
    if fdo is None or fdo.platform is None:
        raise RuntimeError("no active XENBUS: not a Xen guest")
    return fdo


def _status(rt: GuestRuntime) -> str:
    waiting = rt.vcpu.relocation.waiting
    domain = f"dom{rt.vcpu.hv.domid}" if rt.vcpu.hv is not None else "no domain"
    fdo = rt.drivers.xenbus.active_fdo if rt.drivers is not None else None
    count = fdo.interfaces["SUSPEND"].count if fdo is not None and "SUSPEND" in fdo.interfaces else 0
    return f"{waiting or 'running'} in {domain}; suspend count {count}"


@command("lifecycle", "the guest losing and regaining its domain (the harness drives this)",
         ("resume QTEST RAM HV NEWDOMID", "status", "ignore-suspend on|off"),
         details="resume: hand the vCPU parked in the suspend hypercall the machine its saved state runs on now "
                 "(QTEST: the new QEMU's qtest socket; RAM: its RAM file; HV: the new domain's trap socket)")
def _lifecycle(rt: GuestRuntime, args: list[str]) -> str:
    op = args[0]
    if op == "status":
        return _status(rt)
    if op == "ignore-suspend":
        fdo = _fdo(rt)
        fdo.ignore_suspend = args[1] == "on"
        return f"control/shutdown=suspend is {'ignored' if fdo.ignore_suspend else 'answered'}"
    domid = parse_int(args[4], "NEWDOMID", 1, 0x7FEF)
    line = rt.vcpu.relocation
    if line.waiting != WAITING_SUSPENDED:
        return f"error: the vCPU is not parked in the suspend hypercall ({_status(rt)})"
    context = MachineContext(Path(args[1]), Path(args[2]), Path(args[3]), domid)
    line.post(context)
    error = line.wait_result(RESUME_SECONDS)
    halted = rt.kernel.cpu.halted
    if halted is not None:
        raise halted  # a STOP in the resume (an EARLY or LATE callback): the console's STOP path reports it
    if error is not None:
        return f"error: the vCPU stays parked: {error}"
    rt.config.qtest_socket, rt.config.ram_path = context.qtest_socket, context.ram_path
    rt.config.hv_socket, rt.config.domid = context.hv_socket, domid
    return f"resumed: {_status(rt)}"
