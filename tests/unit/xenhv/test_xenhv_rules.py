"""Rules of the hypervisor model that a one-line change would break without the older tests noticing
(issue 18), against an in-process Hypervisor with one guest (its RAM a temporary file):

* the grant map permission is checked on every pin that adds write access, not only the first: a read-only
  grant is never mapped writable, whatever was mapped before (Xen's map_grant_ref calls _set_status when
  the entry has no pin, or when a writable mapping finds no writable pin);
* HVM param indexes are 0..HVM_NR_PARAMS-1 (hvm.c: ``a.index >= HVM_NR_PARAMS`` is EINVAL);
* XENMEM_add_to_physmap checks the index per space: shared_info has index 0 only, grant frames
  0..max_grant_frames-1, any other space is refused;
* GNTTABOP_copy bounds the source range as well as the destination (grant_table.c gnttab_copy_one:
  ``src.offset + len > PAGE_SIZE || dest.offset + len > PAGE_SIZE`` is GNTST_bad_copy_arg);
* sched_op's shutdown reasons end at SHUTDOWN_MAX; an HVM param never set reads 0; EVTCHNOP_status writes
  the union member of the port's state only (event_channel.c evtchn_status), and port tables exist for
  domids below DOMID_FIRST_RESERVED, with 1..4096 ports and 1..XEN_LEGACY_MAX_VCPUS vcpus.
"""
from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenpv.backends.xenhv.domain import Domain
from xenpv.backends.xenhv.errors import GrantError, XenError
from xenpv.backends.xenhv.evtchn import EventChannelHub, EventChannels
from xenpv.backends.xenhv.hypervisor import Hypervisor
from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import grant_table as G
from xenpv.xenabi import hvm
from xenpv.xenabi import xen as X
from xenpv.xenabi.event_channel import DOMID_SELF
from xenpv.xenabi.layout import from_bytes

RAM = 1 << 20
PAGE = 4096
GUEST = 1
HC = X.HYPERCALL_NUMBERS
OP_GPA = 0x3000      # where the op structs go
DATA_GFN = 0x10      # pages the copy tests read and write
BAR_GFN = 0xF0       # where hypervisor frames are placed


@dataclass
class World:
    hv: Hypervisor
    guest: Domain
    front: GrantTableFrontend

    def call(self, name: str, cmd: int, op: ctypes.Structure, count: int = 0) -> int:
        self.guest.memory.write(OP_GPA, bytes(op))
        return self.hv.hypercalls.dispatch(self.guest, HC[name], [cmd, OP_GPA, count, 0, 0])

    def result(self, layout: type[ctypes.Structure]) -> ctypes.Structure:
        return layout.from_buffer_copy(self.guest.memory.read(OP_GPA, ctypes.sizeof(layout)))

    def flags(self, ref: int) -> int:
        return self.front.entry(ref).flags


@pytest.fixture
def w() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="xhvrules") as d:
        ram = Path(d) / "ram"
        ram.write_bytes(b"")
        os.truncate(ram, RAM)
        hv = Hypervisor()
        try:
            hv.control_create_domain(domid=GUEST, name="rules", ram_path=str(ram), ram_size=RAM)
            guest = hv.domains[GUEST]
            front = GrantTableFrontend([guest.memory.hv_frame(guest.grant_frame_index(0))])
            try:
                yield World(hv, guest, front)
            finally:
                front.release()
        finally:
            hv.destroy_all()


def _map_status(w: World, ref: int, readonly: bool) -> int:
    with pytest.raises(GrantError) as info:
        w.hv.control_gnttab_map(GUEST, ref, readonly)
    return info.value.status


# ---- grant map permission on every pin -------------------------------------------------------------

def test_readonly_grant_is_not_mapped_writable_after_a_readonly_map(w: World) -> None:
    w.front.grant_access(8, 0, DATA_GFN, readonly=True)
    first = w.hv.control_gnttab_map(GUEST, 8, True)
    assert _map_status(w, 8, False) == G.GNTST_general_error
    assert w.flags(8) == G.GTF_permit_access | G.GTF_readonly | G.GTF_reading  # never GTF_writing
    second = w.hv.control_gnttab_map(GUEST, 8, True)   # more read-only pins are fine
    for m in (first, second):
        w.hv.control_gnttab_unmap(m["handle"])
    assert w.flags(8) == G.GTF_permit_access | G.GTF_readonly
    assert _map_status(w, 8, False) == G.GNTST_general_error  # and after the last unpin too


def test_grant_made_readonly_while_pinned_is_not_mapped_writable(w: World) -> None:
    # The guest may rewrite its entry's flags while a reader holds it; the next writable pin must see it.
    w.front.grant_access(9, 0, DATA_GFN)
    reader = w.hv.control_gnttab_map(GUEST, 9, True)
    with w.guest.memory.hv_frame(w.guest.grant_frame_index(0)) as frame:
        flags = int.from_bytes(frame[9 * 8:9 * 8 + 2], "little")
        frame[9 * 8:9 * 8 + 2] = (flags | G.GTF_readonly).to_bytes(2, "little")
    assert _map_status(w, 9, False) == G.GNTST_general_error
    assert not w.flags(9) & G.GTF_writing
    w.hv.control_gnttab_unmap(reader["handle"])


def test_writable_pin_after_a_readonly_pin_sets_writing(w: World) -> None:
    w.front.grant_access(10, 0, DATA_GFN)
    reader = w.hv.control_gnttab_map(GUEST, 10, True)
    assert w.flags(10) == G.GTF_permit_access | G.GTF_reading
    writer = w.hv.control_gnttab_map(GUEST, 10, False)
    assert w.flags(10) == G.GTF_permit_access | G.GTF_reading | G.GTF_writing
    assert w.front.end_foreign_access(10) is False
    w.hv.control_gnttab_unmap(writer["handle"])
    assert w.flags(10) == G.GTF_permit_access | G.GTF_reading
    w.hv.control_gnttab_unmap(reader["handle"])
    assert w.front.end_foreign_access(10) is True


# ---- HVM param indexes -----------------------------------------------------------------------------

@pytest.mark.parametrize("op", [hvm.HVMOP_get_param, hvm.HVMOP_set_param])
def test_hvm_param_index_bounds(w: World, op: int) -> None:
    last = hvm.HVM_NR_PARAMS - 1
    assert w.call("hvm_op", op, hvm.XenHvmParam(domid=DOMID_SELF, index=last, value=7)) == 0
    for index in (hvm.HVM_NR_PARAMS, hvm.HVM_NR_PARAMS + 1, 0xFFFFFFFF):
        assert w.call("hvm_op", op, hvm.XenHvmParam(domid=DOMID_SELF, index=index, value=7)) == -X.XEN_EINVAL
        assert index not in w.guest.params
    if op == hvm.HVMOP_set_param:
        assert w.guest.params == {last: 7}
        assert w.call("hvm_op", hvm.HVMOP_get_param, hvm.XenHvmParam(domid=DOMID_SELF, index=last)) == 0
        assert w.result(hvm.XenHvmParam).value == 7


def test_a_param_never_set_reads_zero(w: World) -> None:
    w.guest.params[hvm.HVM_PARAM_CALLBACK_IRQ] = 5
    for index in (hvm.HVM_PARAM_CALLBACK_IRQ, hvm.HVM_PARAM_MCA_CAP):
        assert w.call("hvm_op", hvm.HVMOP_get_param, hvm.XenHvmParam(domid=DOMID_SELF, index=index,
                                                                     value=0xFFFF)) == 0
        assert w.result(hvm.XenHvmParam).value == (5 if index == hvm.HVM_PARAM_CALLBACK_IRQ else 0)


# ---- sched_op ----------------------------------------------------------------------------------------

def _sched(w: World, cmd: int, op: ctypes.Structure | None = None) -> int:
    if op is not None:
        w.guest.memory.write(OP_GPA, bytes(op))
    return w.hv.hypercalls.dispatch(w.guest, HC["sched_op"], [cmd, OP_GPA, 0, 0, 0])


def test_sched_op_shutdown_reasons_up_to_the_last(w: World) -> None:
    w.hv.control_unpause(GUEST)
    assert _sched(w, X.SCHEDOP_yield) == 0
    assert _sched(w, X.SCHEDOP_poll, X.SchedPoll()) == 0
    # poll reads its argument (a guest pointer), as Xen's copy_from_guest does: a bad one is EFAULT.
    assert w.hv.hypercalls.dispatch(w.guest, HC["sched_op"], [X.SCHEDOP_poll, RAM + PAGE, 0, 0, 0]) == -X.XEN_EFAULT
    assert w.hv.hypercalls.dispatch(w.guest, HC["sched_op"], [X.SCHEDOP_shutdown, RAM + PAGE, 0, 0, 0]) \
        == -X.XEN_EFAULT
    assert _sched(w, X.SCHEDOP_remote_shutdown, X.SchedShutdown()) == -X.XEN_ENOSYS
    for reason in (X.SHUTDOWN_MAX + 1, 0xFFFFFFFF):
        assert _sched(w, X.SCHEDOP_shutdown, X.SchedShutdown(reason=reason)) == -X.XEN_EINVAL
    assert w.guest.state.value == "running" and w.guest.shutdown_reason is None
    assert _sched(w, X.SCHEDOP_shutdown, X.SchedShutdown(reason=X.SHUTDOWN_MAX)) == 0
    assert (w.guest.state.value, w.guest.shutdown_reason) == ("shutdown", X.SHUTDOWN_MAX)


def test_sched_op_shutdown_reports_its_reason(w: World) -> None:
    assert _sched(w, X.SCHEDOP_shutdown, X.SchedShutdown(reason=X.SHUTDOWN_reboot)) == 0
    assert (w.guest.state.value, w.guest.shutdown_reason) == ("shutdown", X.SHUTDOWN_reboot)


# ---- XENMEM_add_to_physmap index per space ---------------------------------------------------------

def _add_to_physmap(w: World, space: int, idx: int, gpfn: int) -> int:
    return w.call("memory_op", X.XENMEM_add_to_physmap,
                  X.XenAddToPhysmap(domid=DOMID_SELF, space=space, idx=idx, gpfn=gpfn))


def test_shared_info_has_index_zero_only(w: World) -> None:
    for idx in (1, 2, 1 << 32):
        assert _add_to_physmap(w, X.XENMAPSPACE_shared_info, idx, BAR_GFN) == -X.XEN_EINVAL
    assert w.guest.memory.hv_mappings() == {}
    assert _add_to_physmap(w, X.XENMAPSPACE_shared_info, 0, BAR_GFN) == 0
    assert w.guest.memory.frame_at(BAR_GFN) == 0


def test_grant_frame_indexes_up_to_the_maximum(w: World) -> None:
    top = w.guest.config.max_grant_frames
    table = w.hv.grant_table(w.guest)
    for idx in (top, top + 1, X.XENMAPIDX_grant_table_status, X.XENMAPIDX_grant_table_status | 1, 1 << 32):
        assert _add_to_physmap(w, X.XENMAPSPACE_grant_table, idx, BAR_GFN) == -X.XEN_EINVAL
    assert table.nr_frames == 1 and w.guest.memory.hv_mappings() == {}
    assert _add_to_physmap(w, X.XENMAPSPACE_grant_table, top - 1, BAR_GFN + 1) == 0
    assert table.nr_frames == top
    assert w.guest.memory.frame_at(BAR_GFN + 1) == w.guest.grant_frame_index(top - 1)
    assert _add_to_physmap(w, X.XENMAPSPACE_grant_table, 0, BAR_GFN + 2) == 0
    assert w.guest.memory.frame_at(BAR_GFN + 2) == w.guest.grant_frame_index(0)


@pytest.mark.parametrize("space", [X.XENMAPSPACE_gmfn, X.XENMAPSPACE_gmfn_range, X.XENMAPSPACE_gmfn_foreign,
                                   X.XENMAPSPACE_dev_mmio, 99])
def test_other_spaces_are_refused(w: World, space: int) -> None:
    assert _add_to_physmap(w, space, 0, BAR_GFN) == -X.XEN_EINVAL
    assert w.guest.memory.hv_mappings() == {}


# ---- GNTTABOP_copy bounds on both ends -------------------------------------------------------------

def _copy(w: World, src: tuple[int, int], dst: tuple[int, int], length: int,
          src_ref: int | None = None) -> int:
    op = G.GnttabCopy()
    op.flags = G.GNTCOPY_source_gref if src_ref is not None else 0
    if src_ref is not None:
        op.source.u.ref = src_ref
    else:
        op.source.u.gmfn = src[0]
    op.dest.u.gmfn = dst[0]
    op.source.domid = op.dest.domid = DOMID_SELF
    op.source.offset, op.dest.offset, op.len = src[1], dst[1], length
    assert w.call("grant_table_op", G.GNTTABOP_copy, op, 1) == 0
    return w.result(G.GnttabCopy).status


def _fill(w: World, gfn: int, byte: int) -> None:
    w.guest.memory.write(gfn * PAGE, bytes([byte]) * PAGE)


def test_copy_source_range_must_be_inside_its_page(w: World) -> None:
    src, dst = DATA_GFN, DATA_GFN + 1
    _fill(w, src, 0xAA)
    _fill(w, src + 1, 0xBB)  # what a copy running past the source page would read
    _fill(w, dst, 0)
    assert _copy(w, (src, PAGE - 4), (dst, 0), 5) == G.GNTST_bad_copy_arg
    assert _copy(w, (src, PAGE - 1), (dst, 0), 2) == G.GNTST_bad_copy_arg
    assert w.guest.memory.read(dst * PAGE, PAGE) == bytes(PAGE), "a refused copy copies nothing"
    assert _copy(w, (src, PAGE - 4), (dst, 0), 4) == G.GNTST_okay      # exactly to the end of the page
    assert w.guest.memory.read(dst * PAGE, 5) == b"\xaa" * 4 + b"\0"


def test_copy_destination_range_must_be_inside_its_page(w: World) -> None:
    src, dst = DATA_GFN, DATA_GFN + 1
    _fill(w, src, 0xAA)
    _fill(w, dst, 0)
    _fill(w, dst + 1, 0)
    assert _copy(w, (src, 0), (dst, PAGE - 2), 3) == G.GNTST_bad_copy_arg
    assert w.guest.memory.read((dst + 1) * PAGE, 1) == b"\0"
    assert _copy(w, (src, 0), (dst, PAGE - 2), 2) == G.GNTST_okay
    assert w.guest.memory.read(dst * PAGE + PAGE - 3, 4) == b"\0\xaa\xaa\0"


def test_copy_from_a_grant_is_bounded_and_unpinned(w: World) -> None:
    # A guest copying from its own grant (a ref it granted to itself) goes through the same bounds.
    _fill(w, DATA_GFN, 0xCC)
    _fill(w, DATA_GFN + 1, 0)
    w.front.grant_access(11, GUEST, DATA_GFN, readonly=True)
    assert _copy(w, (0, PAGE - 8), (DATA_GFN + 1, 0), 9, src_ref=11) == G.GNTST_bad_copy_arg
    assert w.flags(11) == G.GTF_permit_access | G.GTF_readonly
    assert _copy(w, (0, PAGE - 8), (DATA_GFN + 1, 0), 8, src_ref=11) == G.GNTST_okay
    assert w.guest.memory.read((DATA_GFN + 1) * PAGE, 9) == b"\xcc" * 8 + b"\0"
    assert w.flags(11) == G.GTF_permit_access | G.GTF_readonly


# ---- event channels: who may have a port table, and EVTCHNOP_status's fields per state --------------

def test_port_table_bounds() -> None:
    hub = EventChannelHub()
    hub.create(E.DOMID_FIRST_RESERVED - 1)
    for domid in (E.DOMID_FIRST_RESERVED, DOMID_SELF, -1):
        with pytest.raises(ValueError):
            hub.create(domid)
    one = hub.create(1, max_ports=1, max_vcpus=X.XEN_LEGACY_MAX_VCPUS)  # port 0 only, and it is reserved
    with pytest.raises(XenError) as info:
        one.alloc_unbound(DOMID_SELF, 0)
    assert info.value.errno == X.XEN_ENOSPC
    assert one.max_vcpus == X.XEN_LEGACY_MAX_VCPUS
    hub.create(2, max_ports=E.EVTCHN_2L_NR_CHANNELS)
    for bad in ({"max_ports": 0}, {"max_ports": E.EVTCHN_2L_NR_CHANNELS + 1}, {"max_vcpus": 0},
                {"max_vcpus": X.XEN_LEGACY_MAX_VCPUS + 1}):
        with pytest.raises(ValueError):
            hub.create(3, **bad)  # type: ignore[arg-type]
    assert hub.get(3) is None


def _status(ch: EventChannels, port: int) -> E.EvtchnStatus:
    out = E.EvtchnStatus(dom=DOMID_SELF, port=port)
    ctypes.memset(ctypes.addressof(out.u), 0xAB, ctypes.sizeof(out.u))  # what the guest left there
    ch.status(DOMID_SELF, port).fill(out)
    return out


def test_status_fields_of_every_state() -> None:
    hub = EventChannelHub()
    dom0 = hub.create(0, privileged=True)
    guest = hub.create(5, max_vcpus=2)
    to_dom0 = guest.alloc_unbound(DOMID_SELF, 0)
    to_dom7 = guest.alloc_unbound(DOMID_SELF, 7)
    s = _status(guest, to_dom0)
    assert (s.status, s.vcpu, s.u.unbound.dom) == (E.EVTCHNSTAT_unbound, 0, 0)
    assert _status(guest, to_dom7).u.unbound.dom == 7
    back = dom0.bind_interdomain(5, to_dom0)
    s = _status(guest, to_dom0)
    assert (s.status, s.u.interdomain.dom, s.u.interdomain.port) == (E.EVTCHNSTAT_interdomain, 0, back)
    s = _status(dom0, back)
    assert (s.status, s.u.interdomain.dom, s.u.interdomain.port) == (E.EVTCHNSTAT_interdomain, 5, to_dom0)
    timer = guest.bind_virq(E.VIRQ_TIMER, 1)
    s = _status(guest, timer)
    assert (s.status, s.vcpu, s.u.virq) == (E.EVTCHNSTAT_virq, 1, E.VIRQ_TIMER)
    assert _status(guest, guest.bind_virq(E.VIRQ_DEBUG, 0)).u.virq == E.VIRQ_DEBUG
    ipi = guest.bind_ipi(1)
    s = _status(guest, ipi)
    assert (s.status, s.vcpu) == (E.EVTCHNSTAT_ipi, 1)
    assert bytes(s.u) == b"\xab" * ctypes.sizeof(s.u), "an IPI's status has no union fields to write"
    s = _status(guest, 100)
    assert (s.status, s.vcpu) == (E.EVTCHNSTAT_closed, 0) and bytes(s.u) == b"\xab" * ctypes.sizeof(s.u)


def test_a_guest_has_one_vcpu_for_its_event_channels(w: World) -> None:
    ch = w.hv.channels(w.guest)
    ch.bind_ipi(0)
    for bind in (lambda: ch.bind_ipi(1), lambda: ch.bind_virq(E.VIRQ_TIMER, 1)):
        with pytest.raises(XenError) as info:
            bind()
        assert info.value.errno == X.XEN_ENOENT  # event_channel.c: no such vcpu


class SharedPage:
    """A guest's shared_info page, read and written as the guest does (xenabi's SharedInfo layout)."""

    def __init__(self, hub: EventChannelHub, domid: int, vcpus: int) -> None:
        self.page = bytearray(PAGE)
        self.ch = hub.create(domid, shared_info=memoryview(self.page), max_vcpus=vcpus)

    def info(self) -> X.SharedInfo:
        return from_bytes(X.SharedInfo, self.page[:ctypes.sizeof(X.SharedInfo)])

    def selector(self, vcpu: int) -> int:
        return self.info().vcpu_info[vcpu].evtchn_pending_sel

    def upcall(self, vcpu: int) -> int:
        return self.info().vcpu_info[vcpu].evtchn_upcall_pending

    def pending(self, port: int) -> bool:
        word, bit = divmod(port, X.EVTCHN_WORD_BITS)
        return bool(self.info().evtchn_pending[word] >> bit & 1)

    def mask(self, port: int) -> None:
        word, bit = divmod(port, X.EVTCHN_WORD_BITS)
        offset = X.SharedInfo.evtchn_mask.offset + word * 8
        value = int.from_bytes(self.page[offset:offset + 8], "little") | 1 << bit
        self.page[offset:offset + 8] = value.to_bytes(8, "little")


def test_unmask_delivers_on_the_ports_vcpu_and_word() -> None:
    hub = EventChannelHub()
    g = SharedPage(hub, 1, vcpus=2)
    for _ in range(70):                       # ports 1..70: the IPI below lands in the second word
        g.ch.alloc_unbound(DOMID_SELF, 0)
    ipi = g.ch.bind_ipi(1)
    assert ipi // X.EVTCHN_WORD_BITS == 1
    g.mask(ipi)
    g.ch.send(ipi)
    assert g.pending(ipi) and g.selector(1) == 0 and g.upcall(1) == 0   # masked: pending only
    g.ch.unmask(ipi)
    assert g.selector(1) == 1 << 1 and g.upcall(1) == 1
    assert g.selector(0) == 0 and g.upcall(0) == 0


def test_raise_virq_finds_global_virqs_on_vcpu0_and_per_vcpu_ones_on_their_vcpu() -> None:
    hub = EventChannelHub()
    g = SharedPage(hub, 1, vcpus=2)
    console = g.ch.bind_virq(E.VIRQ_CONSOLE, 0)  # global
    timer = g.ch.bind_virq(E.VIRQ_TIMER, 1)      # per vcpu
    assert g.ch.raise_virq(E.VIRQ_CONSOLE) and g.pending(console)
    g.ch.close(console)
    console = g.ch.bind_virq(E.VIRQ_CONSOLE, 0)
    assert g.ch.raise_virq(E.VIRQ_CONSOLE, 1) and g.pending(console)
    assert not g.ch.raise_virq(E.VIRQ_TIMER)  # vcpu 0 has no timer bound
    assert not g.pending(timer)
    assert g.ch.raise_virq(E.VIRQ_TIMER, 1) and g.pending(timer) and g.selector(1)


def _second_word_ipi(ch: EventChannels, vcpu: int = 0) -> int:
    """An IPI port in the second 64-bit word of the bitmaps (ports 1..70 are taken first)."""
    for _ in range(70):
        ch.alloc_unbound(DOMID_SELF, 0)
    port = ch.bind_ipi(vcpu)
    assert port // X.EVTCHN_WORD_BITS == 1
    return port


def test_pending_and_mask_of_a_port_in_a_later_word() -> None:
    hub = EventChannelHub()
    g = SharedPage(hub, 1, vcpus=1)
    port = _second_word_ipi(g.ch)
    assert not g.ch.is_pending(port) and not g.ch.is_masked(port)
    g.mask(port)
    assert g.ch.is_masked(port) and not g.ch.is_masked(port - X.EVTCHN_WORD_BITS)
    g.ch.send(port)
    assert g.ch.is_pending(port) and not g.ch.is_pending(port - X.EVTCHN_WORD_BITS)


def test_notifier_takes_over_an_event_pending_in_a_later_word() -> None:
    hub = EventChannelHub()
    g = SharedPage(hub, 1, vcpus=1)
    port = _second_word_ipi(g.ch)
    g.ch.send(port)
    calls: list[int] = []
    g.ch.set_port_notifier(port, lambda: calls.append(port))
    assert calls == [port] and not g.pending(port)


def test_attaching_shared_info_carries_over_pending_events_and_selectors() -> None:
    hub = EventChannelHub()
    ch = hub.create(1, max_vcpus=2)          # no shared_info yet: a private page
    low, high = ch.bind_ipi(1), _second_word_ipi(ch, 1)
    ch.send(low)
    ch.send(high)
    page = bytearray(PAGE)
    ch.attach_shared_info(memoryview(page))
    info = from_bytes(X.SharedInfo, page[:ctypes.sizeof(X.SharedInfo)])
    assert info.evtchn_pending[0] == 1 << low and info.evtchn_pending[1] == 1 << (high - X.EVTCHN_WORD_BITS)
    assert info.vcpu_info[1].evtchn_pending_sel == 0b11 and info.vcpu_info[1].evtchn_upcall_pending == 1
    assert info.vcpu_info[0].evtchn_pending_sel == 0
    with pytest.raises(ValueError):
        ch.attach_shared_info(memoryview(bytearray(PAGE)))  # only once
    ch.release()
