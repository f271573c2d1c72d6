"""Hypercall dispatch: read the op structs from guest memory, apply them, write results back.

Arguments are guest-physical addresses, as a guest passes them to Xen; every one is hostile. A bad
pointer is EFAULT, a bad domain ESRCH (or EPERM where Xen says so), an unknown op ENOSYS, reserved bits
EINVAL. Results are negative Xen errnos, as the hypercall instruction returns them in rax.

The dispatcher sits below the hypervisor that owns it (hypervisor.py builds it and uses its struct
helpers); the ops it hands on are `HypercallTarget` here, as Xen's hypercall.h declares do_*_op.
"""
from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Callable, Protocol, TypeVar

from xenpv.backends.xenhv.errors import XenError
from xenpv.xenabi import hvm
from xenpv.xenabi import xen as X
from xenpv.xenabi.event_channel import DOMID_SELF

if TYPE_CHECKING:
    from xenpv.backends.xenhv.domain import Domain
    from xenpv.backends.xenhv.gnttab import GrantTable

log = logging.getLogger("xenhv.hypercall")

S = TypeVar("S", bound=ctypes.Structure)

# Parameters a guest may read but only the toolstack may set (Xen's hvm_allow_set_param).
TOOLSTACK_ONLY_PARAMS = frozenset({
    hvm.HVM_PARAM_STORE_PFN, hvm.HVM_PARAM_STORE_EVTCHN,
    hvm.HVM_PARAM_CONSOLE_PFN, hvm.HVM_PARAM_CONSOLE_EVTCHN,
    hvm.HVM_PARAM_IOREQ_PFN, hvm.HVM_PARAM_BUFIOREQ_PFN, hvm.HVM_PARAM_BUFIOREQ_EVTCHN,
})
HVM_NR_PARAMS = 39


def read_struct(dom: "Domain", layout: type[S], gpa: int) -> S:
    return layout.from_buffer_copy(dom.memory.read(gpa, ctypes.sizeof(layout)))


def write_struct(dom: "Domain", gpa: int, value: ctypes.Structure) -> None:
    dom.memory.write(gpa, bytes(value))


def _self_domid(dom: "Domain", domid: int, op: str) -> None:
    if domid not in (DOMID_SELF, dom.domid):
        raise XenError(X.XEN_EPERM if domid < DOMID_SELF else X.XEN_ESRCH,
                       f"{op}: dom{dom.domid} may not act on domain {domid:#x}")


class HypercallTarget(Protocol):
    """What the dispatcher hands on to the hypervisor (hypervisor.Hypervisor)."""

    def grant_table(self, dom: "Domain") -> "GrantTable": ...

    def shutdown(self, dom: "Domain", reason: int) -> None: ...

    def event_channel_op(self, dom: "Domain", cmd: int, arg: int) -> int: ...

    def grant_table_op(self, dom: "Domain", cmd: int, arg: int, count: int) -> int: ...


class Hypercalls:
    def __init__(self, hv: HypercallTarget) -> None:
        self.hv = hv
        self.table: dict[int, Callable[["Domain", list[int]], int]] = {
            X.HYPERCALL_NUMBERS["memory_op"]: self.memory_op,
            X.HYPERCALL_NUMBERS["hvm_op"]: self.hvm_op,
            X.HYPERCALL_NUMBERS["sched_op"]: self.sched_op,
            X.HYPERCALL_NUMBERS["event_channel_op"]: self.event_channel_op,
            X.HYPERCALL_NUMBERS["grant_table_op"]: self.grant_table_op,
        }

    def dispatch(self, dom: "Domain", nr: int, args: list[int]) -> int:
        fn = self.table.get(nr)
        if fn is None:
            log.info("dom%d: hypercall %d not implemented: ENOSYS", dom.domid, nr)
            return -X.XEN_ENOSYS
        try:
            return fn(dom, args)
        except XenError as exc:
            log.info("dom%d: hypercall %d: %s", dom.domid, nr, exc)
            return -exc.errno

    # -- memory_op ---------------------------------------------------------------------------------

    def memory_op(self, dom: "Domain", args: list[int]) -> int:
        cmd = args[0]
        if cmd != X.XENMEM_add_to_physmap:
            raise XenError(X.XEN_ENOSYS, f"memory_op {cmd} is not modelled")
        xatp = read_struct(dom, X.XenAddToPhysmap, args[1])
        _self_domid(dom, xatp.domid, "add_to_physmap")
        if xatp.space == X.XENMAPSPACE_shared_info:
            if xatp.idx != 0:
                raise XenError(X.XEN_EINVAL, f"shared_info has one frame, not index {xatp.idx}")
            index = 0
        elif xatp.space == X.XENMAPSPACE_grant_table:
            if xatp.idx & ~0xFFFFFFFF or xatp.idx >= dom.config.max_grant_frames:
                raise XenError(X.XEN_EINVAL, f"grant frame {xatp.idx:#x} is beyond the table's maximum "
                                             f"of {dom.config.max_grant_frames}")
            self.hv.grant_table(dom).grow(xatp.idx + 1)
            index = dom.grant_frame_index(xatp.idx)
        else:
            raise XenError(X.XEN_EINVAL, f"add_to_physmap space {xatp.space} is not modelled")
        dom.memory.map_hv_frame(index, xatp.gpfn)
        log.info("dom%d: hypervisor frame %d mapped at gfn %#x", dom.domid, index, xatp.gpfn)
        return 0

    # -- hvm_op ------------------------------------------------------------------------------------

    def hvm_op(self, dom: "Domain", args: list[int]) -> int:
        op = args[0]
        if op not in (hvm.HVMOP_set_param, hvm.HVMOP_get_param):
            raise XenError(X.XEN_ENOSYS, f"hvm_op {op} is not modelled")
        p = read_struct(dom, hvm.XenHvmParam, args[1])
        _self_domid(dom, p.domid, "hvm_op")
        if p.index >= HVM_NR_PARAMS:
            raise XenError(X.XEN_EINVAL, f"HVM param {p.index} does not exist")
        if op == hvm.HVMOP_get_param:
            p.value = dom.params.get(p.index, 0)
            write_struct(dom, args[1], p)
            return 0
        if p.index in TOOLSTACK_ONLY_PARAMS:
            raise XenError(X.XEN_EPERM, f"HVM param {p.index} is set by the toolstack only")
        dom.params[p.index] = p.value
        return 0

    # -- sched_op ----------------------------------------------------------------------------------

    def sched_op(self, dom: "Domain", args: list[int]) -> int:
        cmd = args[0]
        if cmd == X.SCHEDOP_yield:
            return 0
        if cmd == X.SCHEDOP_shutdown:
            s = read_struct(dom, X.SchedShutdown, args[1])
            if s.reason > X.SHUTDOWN_MAX:
                raise XenError(X.XEN_EINVAL, f"shutdown reason {s.reason} is unknown")
            self.hv.shutdown(dom, s.reason)
            return 0
        if cmd == X.SCHEDOP_poll:
            # Xen may return before an event arrives (the caller re-checks), and the vCPU is a single
            # thread that must not block xenhv, so poll returns at once.
            read_struct(dom, X.SchedPoll, args[1])
            return 0
        raise XenError(X.XEN_ENOSYS, f"sched_op {cmd} is not modelled")

    # -- event channels and grant tables ---------------------------------------------------------

    def event_channel_op(self, dom: "Domain", args: list[int]) -> int:
        return self.hv.event_channel_op(dom, args[0], args[1])

    def grant_table_op(self, dom: "Domain", args: list[int]) -> int:
        return self.hv.grant_table_op(dom, args[0], args[1], args[2])
