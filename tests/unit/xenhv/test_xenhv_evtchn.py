"""Event channel rules of xen-abi.md section 8, checked on the bits of a real shared_info page."""
from __future__ import annotations

import ctypes

import pytest

from xenpv.backends.xenhv.errors import XenError
from xenpv.backends.xenhv.evtchn import EventChannelHub, EventChannels, PortState
from xenpv.xenabi.event_channel import (
    DOMID_SELF,
    EVTCHNSTAT_interdomain,
    VIRQ_CONSOLE,
    VIRQ_TIMER,
    EvtchnStatus,
)
from xenpv.xenabi.layout import from_bytes
from xenpv.xenabi.xen import (
    EVTCHN_WORD_BITS,
    XEN_EEXIST,
    XEN_EINVAL,
    XEN_ENOENT,
    XEN_ENOSPC,
    XEN_EPERM,
    XEN_ESRCH,
    SharedInfo,
)


class Guest:
    """A guest domain with its shared_info page and a count of upcalls."""

    def __init__(self, hub: EventChannelHub, domid: int, **kwargs: object) -> None:
        self.page = bytearray(4096)
        self.upcalls = 0
        self.ch: EventChannels = hub.create(domid, shared_info=memoryview(self.page), upcall=self._upcall,
                                            **kwargs)

    def _upcall(self) -> None:
        self.upcalls += 1

    def shinfo(self) -> SharedInfo:
        return from_bytes(SharedInfo, self.page[:ctypes.sizeof(SharedInfo)])

    def pending(self, port: int) -> bool:
        word, bit = divmod(port, EVTCHN_WORD_BITS)
        return bool(self.shinfo().evtchn_pending[word] >> bit & 1)

    def selector(self, vcpu: int = 0) -> int:
        return self.shinfo().vcpu_info[vcpu].evtchn_pending_sel

    def upcall_pending(self, vcpu: int = 0) -> int:
        return self.shinfo().vcpu_info[vcpu].evtchn_upcall_pending

    def mask(self, port: int) -> None:
        """The guest masks a port by setting its bit directly, as drivers do."""
        word, bit = divmod(port, EVTCHN_WORD_BITS)
        offset = SharedInfo.evtchn_mask.offset + word * 8
        value = int.from_bytes(self.page[offset:offset + 8], "little") | 1 << bit
        self.page[offset:offset + 8] = value.to_bytes(8, "little")

    def acknowledge(self, vcpu: int = 0) -> None:
        """The guest's upcall handler: clear upcall_pending, the selector and the pending bits."""
        offset = SharedInfo.vcpu_info.offset
        info = type(self.shinfo().vcpu_info[0])
        self.page[offset + info.evtchn_upcall_pending.offset] = 0
        sel = offset + info.evtchn_pending_sel.offset
        self.page[sel:sel + 8] = bytes(8)
        pending = SharedInfo.evtchn_pending.offset
        self.page[pending:pending + SharedInfo.evtchn_pending.size] = bytes(SharedInfo.evtchn_pending.size)


@pytest.fixture
def hub() -> EventChannelHub:
    return EventChannelHub()


@pytest.fixture
def dom0(hub: EventChannelHub) -> EventChannels:
    return hub.create(0, privileged=True)


@pytest.fixture
def guest(hub: EventChannelHub) -> Guest:
    return Guest(hub, 1, max_vcpus=2)


def errno_of(call, *args: object) -> int:
    with pytest.raises(XenError) as info:
        call(*args)
    return info.value.errno


def connect(dom0: EventChannels, guest: Guest) -> tuple[int, int]:
    port = guest.ch.alloc_unbound(DOMID_SELF, 0)
    return port, dom0.bind_interdomain(1, port)


def test_alloc_unbound_lowest_free_port_skipping_zero(guest: Guest) -> None:
    assert [guest.ch.alloc_unbound(DOMID_SELF, 0) for _ in range(3)] == [1, 2, 3]
    guest.ch.close(2)
    assert guest.ch.alloc_unbound(1, 0) == 2
    status = guest.ch.status(DOMID_SELF, 2)
    assert (status.state, status.remote_dom) == (PortState.UNBOUND, 0)


def test_alloc_unbound_domid_self_remote_is_the_caller(dom0: EventChannels, guest: Guest) -> None:
    port = dom0.alloc_unbound(1, DOMID_SELF)
    assert guest.ch.status(DOMID_SELF, port).remote_dom == 0


def test_alloc_unbound_for_another_domain_needs_privilege(hub: EventChannelHub, dom0: EventChannels,
                                                          guest: Guest) -> None:
    other = Guest(hub, 2)
    assert errno_of(guest.ch.alloc_unbound, 2, 0) == XEN_EPERM
    assert other.ch.open_ports() == []
    assert dom0.alloc_unbound(2, 1) == 1


def test_alloc_unbound_bad_domain_is_esrch(guest: Guest) -> None:
    assert errno_of(guest.ch.alloc_unbound, 7, 0) == XEN_ESRCH
    assert errno_of(guest.ch.alloc_unbound, 0x7FF2, 0) == XEN_ESRCH


def test_port_quota_is_enospc(hub: EventChannelHub) -> None:
    small = Guest(hub, 3, max_ports=4)
    assert [small.ch.bind_ipi(0) for _ in range(3)] == [1, 2, 3]
    assert errno_of(small.ch.bind_ipi, 0) == XEN_ENOSPC


def test_bind_interdomain_connects_both_ends_and_marks_local_pending(hub: EventChannelHub,
                                                                     guest: Guest) -> None:
    backend = Guest(hub, 2)
    port = guest.ch.alloc_unbound(DOMID_SELF, 2)
    local = backend.ch.bind_interdomain(1, port)
    assert backend.pending(local)
    assert backend.selector() == 1 << (local // EVTCHN_WORD_BITS)
    assert backend.upcall_pending() == 1 and backend.upcalls == 1
    assert not guest.pending(port) and guest.upcalls == 0
    mine, theirs = guest.ch.status(DOMID_SELF, port), backend.ch.status(DOMID_SELF, local)
    assert (mine.state, mine.remote_dom, mine.remote_port) == (PortState.INTERDOMAIN, 2, local)
    assert (theirs.state, theirs.remote_dom, theirs.remote_port) == (PortState.INTERDOMAIN, 1, port)


def test_bind_interdomain_requires_unbound_port_for_the_caller(hub: EventChannelHub, dom0: EventChannels,
                                                               guest: Guest) -> None:
    other = Guest(hub, 2)
    for_other = guest.ch.alloc_unbound(DOMID_SELF, 2)
    assert errno_of(dom0.bind_interdomain, 1, for_other) == XEN_EINVAL
    ipi = guest.ch.bind_ipi(0)
    assert errno_of(dom0.bind_interdomain, 1, ipi) == XEN_EINVAL
    assert errno_of(dom0.bind_interdomain, 1, 999) == XEN_EINVAL
    assert errno_of(dom0.bind_interdomain, 1, 1 << 31) == XEN_EINVAL
    assert errno_of(dom0.bind_interdomain, 9, 1) == XEN_ESRCH
    port, _local = connect(dom0, guest)
    assert errno_of(dom0.bind_interdomain, 1, port) == XEN_EINVAL  # already bound
    assert dom0.open_ports() == [1] and other.ch.open_ports() == []


def test_send_interdomain_sets_remote_pending_selector_and_upcall(dom0: EventChannels, guest: Guest) -> None:
    for _ in range(70):  # put the port in selector word 1
        guest.ch.bind_ipi(0)
    port, local = connect(dom0, guest)
    assert port == 71
    dom0.send(local)
    assert guest.pending(port)
    assert guest.selector() == 1 << 1
    assert guest.upcall_pending() == 1 and guest.upcalls == 1
    dom0.send(local)  # already pending: nothing more
    assert guest.upcalls == 1
    guest.acknowledge()
    dom0.send(local)
    assert guest.pending(port) and guest.upcall_pending() == 1 and guest.upcalls == 2


def test_send_to_masked_port_sets_only_pending(dom0: EventChannels, guest: Guest) -> None:
    port, local = connect(dom0, guest)
    guest.mask(port)
    dom0.send(local)
    assert guest.pending(port) and guest.selector() == 0 and guest.upcall_pending() == 0 and guest.upcalls == 0


def test_unmask_delivers_event_that_arrived_while_masked(dom0: EventChannels, guest: Guest) -> None:
    port, local = connect(dom0, guest)
    guest.mask(port)
    dom0.send(local)
    guest.ch.unmask(port)
    assert not guest.ch.is_masked(port)
    assert guest.selector() == 1 and guest.upcall_pending() == 1 and guest.upcalls == 1


def test_unmask_without_pending_or_mask_does_nothing(guest: Guest) -> None:
    port = guest.ch.alloc_unbound(DOMID_SELF, 0)
    guest.ch.unmask(port)  # not masked
    guest.mask(port)
    guest.ch.unmask(port)  # masked, not pending
    assert guest.selector() == 0 and guest.upcalls == 0
    assert errno_of(guest.ch.unmask, 5000) == XEN_EINVAL


def test_unmask_of_a_freed_port_delivers_on_vcpu_0(guest: Guest) -> None:
    """Xen's evtchn_free (xen/common/event_channel.c) resets a freed channel's notify_vcpu_id to 0 ("Reset
    binding to vcpu0 when the channel is freed"), and evtchn_2l_unmask delivers on that vcpu: a port bound to
    vcpu 1 and closed, whose pending and mask bits the guest then sets itself in shared_info, is delivered on
    vcpu 0 when unmasked, not on the vcpu it was last bound to."""
    port = guest.ch.bind_ipi(1)
    guest.ch.close(port)
    word, bit = divmod(port, EVTCHN_WORD_BITS)
    offset = SharedInfo.evtchn_pending.offset + word * 8
    guest.page[offset:offset + 8] = (1 << bit).to_bytes(8, "little")  # the guest's own write to its page
    guest.mask(port)
    guest.ch.unmask(port)
    assert guest.selector(0) == 1 << word and guest.upcall_pending(0) == 1 and guest.upcalls == 1
    assert guest.selector(1) == 0 and guest.upcall_pending(1) == 0


def test_send_on_unbound_port_is_dropped(guest: Guest) -> None:
    port = guest.ch.alloc_unbound(DOMID_SELF, 0)
    guest.ch.send(port)
    assert not guest.pending(port) and guest.upcalls == 0


def test_send_on_closed_reserved_or_bad_port_is_einval(guest: Guest) -> None:
    virq = guest.ch.bind_virq(VIRQ_TIMER, 0)
    for port in (0, 2, 4096, -1, virq):
        assert errno_of(guest.ch.send, port) == XEN_EINVAL


def test_ipi_sets_local_pending_on_its_vcpu(guest: Guest) -> None:
    port = guest.ch.bind_ipi(1)
    guest.ch.send(port)
    assert guest.pending(port) and guest.selector(1) == 1 and guest.upcall_pending(1) == 1
    assert guest.selector(0) == 0 and guest.upcall_pending(0) == 0
    assert guest.ch.status(DOMID_SELF, port).state is PortState.IPI
    assert errno_of(guest.ch.bind_ipi, 2) == XEN_ENOENT


def test_bind_virq_rules(guest: Guest) -> None:
    timer = guest.ch.bind_virq(VIRQ_TIMER, 0)
    assert guest.ch.bind_virq(VIRQ_TIMER, 1) != timer  # per-vcpu virq
    assert errno_of(guest.ch.bind_virq, VIRQ_TIMER, 0) == XEN_EEXIST
    assert errno_of(guest.ch.bind_virq, VIRQ_CONSOLE, 1) == XEN_EINVAL  # global virq: vcpu 0 only
    assert errno_of(guest.ch.bind_virq, 24, 0) == XEN_EINVAL
    assert errno_of(guest.ch.bind_virq, -1, 0) == XEN_EINVAL
    assert errno_of(guest.ch.bind_virq, VIRQ_TIMER, 5) == XEN_ENOENT
    status = guest.ch.status(DOMID_SELF, timer)
    assert (status.state, status.virq, status.vcpu) == (PortState.VIRQ, VIRQ_TIMER, 0)
    assert guest.ch.raise_virq(VIRQ_TIMER, 0) and guest.pending(timer) and guest.upcalls == 1
    assert not guest.ch.raise_virq(VIRQ_CONSOLE)
    guest.ch.close(timer)
    assert guest.ch.bind_virq(VIRQ_TIMER, 0) == timer  # closing frees the virq binding


def test_close_interdomain_reverts_remote_to_unbound_and_clears_local_pending(dom0: EventChannels,
                                                                              guest: Guest) -> None:
    port, local = connect(dom0, guest)
    dom0.send(local)
    assert guest.pending(port)
    guest.ch.close(port)
    assert not guest.pending(port)
    status = dom0.status(DOMID_SELF, local)
    assert (status.state, status.remote_dom) == (PortState.UNBOUND, 1)
    assert guest.ch.status(DOMID_SELF, port).state is PortState.CLOSED
    # The reverted end accepts a new binding from the closer.
    assert guest.ch.bind_interdomain(0, local) == port
    assert errno_of(guest.ch.close, 0) == XEN_EINVAL
    assert errno_of(guest.ch.close, 77) == XEN_EINVAL


def test_status_rules_and_struct(dom0: EventChannels, guest: Guest) -> None:
    port, local = connect(dom0, guest)
    assert errno_of(guest.ch.status, 0, local) == XEN_EPERM
    assert errno_of(guest.ch.status, 9, 1) == XEN_ESRCH
    assert errno_of(guest.ch.status, DOMID_SELF, 4096) == XEN_EINVAL
    assert guest.ch.status(DOMID_SELF, 0).state is PortState.CLOSED
    out = EvtchnStatus(dom=1, port=port)
    dom0.status(1, port).fill(out)
    assert (out.status, out.u.interdomain.dom, out.u.interdomain.port) == (EVTCHNSTAT_interdomain, 0, local)


def test_destroy_reverts_peers_and_forgets_domain(hub: EventChannelHub, dom0: EventChannels,
                                                  guest: Guest) -> None:
    _port, local = connect(dom0, guest)
    hub.destroy(1)
    assert hub.get(1) is None
    status = dom0.status(DOMID_SELF, local)
    assert (status.state, status.remote_dom) == (PortState.UNBOUND, 1)
    assert errno_of(dom0.bind_interdomain, 1, 1) == XEN_ESRCH


def test_port_notifier_bypasses_bitmaps(hub: EventChannelHub, dom0: EventChannels, guest: Guest) -> None:
    kicks: list[int] = []
    port, local = connect(dom0, guest)
    assert dom0.is_pending(local)
    dom0.set_port_notifier(local, lambda: kicks.append(local))
    assert kicks == [local] and not dom0.is_pending(local)  # the bind's event moved to the notifier
    guest.ch.send(port)
    guest.ch.send(port)
    assert kicks == [local, local, local] and not dom0.is_pending(local)
    assert errno_of(dom0.set_port_notifier, 99, None) == XEN_EINVAL


def test_private_page_until_shared_info_is_attached(hub: EventChannelHub, dom0: EventChannels) -> None:
    upcalls: list[int] = []
    late = hub.create(5, upcall=lambda: upcalls.append(1))
    port = late.alloc_unbound(DOMID_SELF, 0)
    dom0.send(dom0.bind_interdomain(5, port))
    assert late.is_pending(port) and upcalls == [1]
    page = bytearray(4096)
    late.attach_shared_info(memoryview(page))
    word, bit = divmod(port, EVTCHN_WORD_BITS)
    info = from_bytes(SharedInfo, page[:ctypes.sizeof(SharedInfo)])
    assert info.evtchn_pending[word] >> bit & 1 and info.vcpu_info[0].evtchn_upcall_pending == 1
    assert upcalls == [1, 1]  # the guest's page starts with an upcall to look at


def test_close_clears_exactly_the_pending_bit_of_a_port_past_the_first_word(dom0: EventChannels,
                                                                           guest: Guest) -> None:
    """xen/common/event_channel.c evtchn_free -> evtchn_port_clear_pending (2-level ABI: the port's bit in
    shared_info's evtchn_pending[port / 64]): an event left pending on a closed port must not fire on what
    is bound to that port next. Ports 64 and 129 sit in words 1 and 2, which no port below 64 reaches; the
    rest of the page (other ports' bits, the selectors, vcpu_info) is left as it was."""
    ports = [guest.ch.alloc_unbound(DOMID_SELF, 0) for _ in range(130)]
    assert ports == list(range(1, 131))
    for port in (63, 64, 129):
        dom0.send(dom0.bind_interdomain(1, port))
        assert guest.pending(port)
    for port in (129, 64):
        before = bytearray(guest.page)
        guest.ch.close(port)
        assert not guest.pending(port)
        word, bit = divmod(port, EVTCHN_WORD_BITS)
        offset = SharedInfo.evtchn_pending.offset + word * 8
        expected = int.from_bytes(before[offset:offset + 8], "little") & ~(1 << bit)
        before[offset:offset + 8] = expected.to_bytes(8, "little")
        assert guest.page == before, f"closing port {port} changed more than its pending bit"
    assert guest.pending(63)
