"""`lifecycle ...`: what the harness (playing the toolstack and the machine's power button) tells a guest that
lost its domain, and what it asks it.

- `lifecycle resume QTEST RAM HV NEWDOMID`: the guest's saved state now runs in domain NEWDOMID, on the QEMU whose
  qtest socket is QTEST with guest RAM in the file RAM, its trap socket HV. The vCPU, parked in the suspend
  hypercall since the save, moves there (stack.vcpu.relocation) and the hypercall returns 0; XENBUS then
  runs the EARLY and LATE callbacks. The command answers once the guest runs again (SUSPEND.Trigger done),
  or with why the vCPU could not move (it stays parked).
- `lifecycle poweron QTEST RAM HV NEWDOMID`: the power button after hibernation: the vCPU moves to the new
  machine and domain, the resume loader reads the hiberfile through the emulated IDE disk and the guest
  resumes (or boots afresh when there is no usable image); see stack.agent.hibernate.
- `lifecycle status`: running, suspended (parked) or powered off; the domain and SUSPEND's count.
- `lifecycle memory-mark PATTERN` / `lifecycle memory-check`: a page of guest RAM a driver would hold (taken
  from the kernel's page allocator and filled with PATTERN), and its sha256 now: what must survive
  hibernation in the hiberfile.
- `lifecycle ignore-suspend on|off`: fault injection - XENBUS leaves control/shutdown=suspend unanswered,
  as a guest whose PV drivers hang would, so the toolstack's save must fail and the guest keep running.
- `lifecycle background-write T LBA PATTERN COUNT` / `lifecycle background-result`: a disk write (as `vbd
  write`) on a thread of its own, so it can be in flight while the domain is saved and restored; the
  result says how it ended and how many times it completed.

These commands never take the processor: the vCPU may be parked holding it.
"""
from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.stack.agent.cmd_vbd import _target, sector_pattern
from xenpv.stack.agent.console import UsageError, command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.kernel import BugCheck
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.agent.hibernate import power_on
from xenpv.stack.vcpu.relocation import WAITING_POWERED_OFF, WAITING_SUSPENDED, MachineContext, RelocationError

# From the machine named to the guest running there again: the move, the EARLY and LATE callbacks.
RESUME_SECONDS = 60.0


# A background write waits this long for its back-end (a save and a restore may lie in between).
BACKGROUND_IO_SECONDS = 120.0


@dataclass
class BackgroundWrite:
    description: str
    thread: threading.Thread | None = None
    outcomes: list[str] = field(default_factory=list)  # one per completion: "ok sha256 ..." or "failed: ..."
    started: float = field(default_factory=time.monotonic)


_background: dict[int, BackgroundWrite] = {}  # by GuestRuntime id: one at a time


def _background_write(rt: GuestRuntime, target_id: int, lba: int, pattern: str, count: int) -> str:
    current = _background.get(id(rt))
    if current is not None and current.thread is not None and current.thread.is_alive():
        return f"error: {current.description} is still in flight"
    job = BackgroundWrite(f"write of {count} sectors at {lba} of target {target_id}")

    def run() -> None:
        try:
            with rt.kernel.cpu.lock:
                target = _target(rt, target_id)
                data = sector_pattern(pattern, lba, count, target.features.sector_size)
                target.TargetWrite(lba, data, BACKGROUND_IO_SECONDS)
            job.outcomes.append(f"ok sha256 {hashlib.sha256(data).hexdigest()}")
        except (BugCheck, HarnessTooSlow) as stop:
            job.outcomes.append(f"failed: the processor stopped: {stop}")
        except Exception as exc:  # a failed write is a result, reported to whoever asks
            job.outcomes.append(f"failed: {type(exc).__name__}: {exc}")

    job.thread = threading.Thread(target=run, name="lifecycle-background-write", daemon=True)
    _background[id(rt)] = job
    job.thread.start()
    return f"started {job.description}"


def _background_result(rt: GuestRuntime) -> str:
    job = _background.get(id(rt))
    if job is None:
        return "error: no background write was started"
    if job.thread is not None and job.thread.is_alive():
        return f"in flight for {time.monotonic() - job.started:.1f}s: {job.description}"
    return f"completed {len(job.outcomes)} time(s): " + "; ".join(job.outcomes)


_marked: dict[int, int] = {}  # by GuestRuntime id: the gfn of `memory-mark`'s page


def _memory(rt: GuestRuntime, args: list[str]) -> str:
    mm = rt.kernel.mm
    if mm is None:
        return "error: no memory manager"
    if args[0] == "memory-mark":
        try:
            unit = bytes.fromhex(args[1])
        except ValueError:
            unit = b""
        if not unit:
            raise UsageError(f"PATTERN must be hex bytes, got {args[1]!r}")
        gfn = _marked.get(id(rt)) or mm.pages.alloc(1)[0]
        _marked[id(rt)] = gfn
        rt.vcpu.write_phys(gfn << 12, (unit * (4096 // len(unit) + 1))[:4096])
    gfn = _marked.get(id(rt))
    if gfn is None:
        return "error: no page was marked"
    return f"gfn {gfn:#x} sha256 {hashlib.sha256(rt.vcpu.read_phys(gfn << 12, 4096)).hexdigest()}"


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
         ("resume QTEST RAM HV NEWDOMID", "poweron QTEST RAM HV NEWDOMID", "status", "ignore-suspend on|off",
          "background-write T LBA PATTERN COUNT", "background-result", "memory-mark PATTERN", "memory-check"),
         details="resume: hand the vCPU parked in the suspend hypercall the machine its saved state runs on now "
                 "(QTEST: the new QEMU's qtest socket; RAM: its RAM file; HV: the new domain's trap socket)")
def _lifecycle(rt: GuestRuntime, args: list[str]) -> str:
    op = args[0]
    if op == "status":
        return _status(rt)
    if op in ("memory-mark", "memory-check"):
        return _memory(rt, args)
    if op == "background-result":
        return _background_result(rt)
    if op == "background-write":
        target_id, lba, count = (parse_int(args[i], name, 0) for i, name in ((1, "T"), (2, "LBA"), (4, "COUNT")))
        try:
            bytes.fromhex(args[3])
        except ValueError:
            raise UsageError(f"PATTERN must be hex bytes, got {args[3]!r}") from None
        return _background_write(rt, target_id, lba, args[3], count)
    if op == "ignore-suspend":
        fdo = _fdo(rt)
        fdo.ignore_suspend = args[1] == "on"
        return f"control/shutdown=suspend is {'ignored' if fdo.ignore_suspend else 'answered'}"
    domid = parse_int(args[4], "NEWDOMID", 1, 0x7FEF)
    line = rt.vcpu.relocation
    if op == "poweron":
        if line.waiting != WAITING_POWERED_OFF:
            return f"error: the machine is not powered off ({_status(rt)})"
        try:
            return power_on(rt, MachineContext(Path(args[1]), Path(args[2]), Path(args[3]), domid))
        except RelocationError as exc:
            return f"error: the vCPU stays off: {exc}"
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
