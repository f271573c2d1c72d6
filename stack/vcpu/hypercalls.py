"""Typed hypercalls for guest code: each op struct is written to a scratch page of guest RAM, the
vCPU traps with its guest-physical address, and the struct is read back with Xen's OUT fields.

One exception, every event's path: an EVTCHNOP_send that the port's doorbell takes (stack/vcpu/doorbells.py)
is an eventfd write and nothing more, so its struct does not go through guest RAM (no one would read it
there, and evtchn_send has no OUT field)."""
from __future__ import annotations

import ctypes
from typing import TypeVar

from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import grant_table as G
from xenpv.xenabi import hvm
from xenpv.xenabi import xen as X

S = TypeVar("S", bound=ctypes.Structure)
HC = X.HYPERCALL_NUMBERS
_EVENT_CHANNEL_OP = HC["event_channel_op"]


class HypercallFailed(Exception):
    def __init__(self, what: str, rc: int) -> None:
        self.rc = rc
        super().__init__(f"{what} failed: {rc}")


class Hypercalls:
    def __init__(self, vcpu: Vcpu, scratch_gpa: int) -> None:
        self.vcpu = vcpu
        self.scratch = scratch_gpa
        self._doorbell = vcpu.send_by_doorbell

    def op(self, nr: int, cmd: int, arg: S, count: int | None = None) -> tuple[int, S]:
        # The struct type is checked, not only the command: the long way the port is whatever the first
        # word in guest RAM holds, which is arg.port only for an evtchn_send.
        if (nr == _EVENT_CHANNEL_OP and cmd == E.EVTCHNOP_send and type(arg) is E.EvtchnSend
                and self._doorbell(arg.port)):
            return 0, arg  # evtchn_send has no OUT field: what the long way reads back equals what went in
        self.vcpu.write_phys(self.scratch, bytes(arg))
        args = (cmd, self.scratch) if count is None else (cmd, self.scratch, count)
        rc = self.vcpu.hypercall(nr, *args)
        return rc, type(arg).from_buffer_copy(self.vcpu.read_phys(self.scratch, ctypes.sizeof(arg)))

    def _ok(self, what: str, nr: int, cmd: int, arg: S) -> S:
        rc, out = self.op(nr, cmd, arg)
        if rc:
            raise HypercallFailed(what, rc)
        return out

    def add_to_physmap(self, space: int, idx: int, gfn: int) -> None:
        self._ok("add_to_physmap", HC["memory_op"], X.XENMEM_add_to_physmap,
                 X.XenAddToPhysmap(domid=E.DOMID_SELF, space=space, idx=idx, gpfn=gfn))

    def get_param(self, index: int) -> int:
        return self._ok("get_param", HC["hvm_op"], hvm.HVMOP_get_param,
                        hvm.XenHvmParam(domid=E.DOMID_SELF, index=index)).value

    def evtchn_alloc_unbound(self, remote_dom: int) -> int:
        return self._ok("alloc_unbound", HC["event_channel_op"], E.EVTCHNOP_alloc_unbound,
                        E.EvtchnAllocUnbound(dom=E.DOMID_SELF, remote_dom=remote_dom)).port

    def evtchn_send(self, port: int) -> None:
        self._ok("send", _EVENT_CHANNEL_OP, E.EVTCHNOP_send, E.EvtchnSend(port=port))

    def evtchn_unmask(self, port: int) -> None:
        self._ok("unmask", HC["event_channel_op"], E.EVTCHNOP_unmask, E.EvtchnUnmask(port=port))

    def evtchn_close(self, port: int) -> None:
        self._ok("close", HC["event_channel_op"], E.EVTCHNOP_close, E.EvtchnClose(port=port))

    def evtchn_status(self, port: int) -> E.EvtchnStatus:
        return self._ok("status", HC["event_channel_op"], E.EVTCHNOP_status,
                        E.EvtchnStatus(dom=E.DOMID_SELF, port=port))

    def gnttab_query_size(self) -> G.GnttabQuerySize:
        rc, out = self.op(HC["grant_table_op"], G.GNTTABOP_query_size, G.GnttabQuerySize(dom=E.DOMID_SELF), 1)
        if rc or out.status:
            raise HypercallFailed("query_size", rc or out.status)
        return out
