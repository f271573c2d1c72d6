"""Doorbells (xenabi/trap.py DOORBELL, stack/vcpu/doorbells.py): a guest's event channel to a dom0 back-end
without xenhv on the path, and xenhv still in charge of bind, close and revocation.

A real QEMU guest's vCPU and a back-end in this process (XenBackend over vhost-user, attached by the
session's xenhv). Before each send the guest writes the send's number into a mailbox page; the back-end's
handler records the numbers it finds when kicked. Kicks coalesce and a bind has a kick of its own (Xen's
bind-time event, which may reach the handler or find none registered yet), so the tests ask "did the kick
of send n arrive", never "how many kicks".
"""
from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.integration.test_xenhv import (MAILBOX, SCRATCH, alloc_unbound, call, map_shared_info, pending,
                                          platform_gfn)
from xenpv.backends.xenbackend import DomainLink, XenBackend
from xenpv.base.process import wait_for
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import xen as X
from xenpv.xenabi.trap import DOORBELL_PORTS

pytestmark = pytest.mark.integration

HC = X.HYPERCALL_NUMBERS


class Sends:
    """The back-end channel's handler: the send numbers found in the mailbox at each kick."""

    def __init__(self, link: DomainLink, hold: Callable[[int], None] = lambda n: None) -> None:
        self.link = link
        self.seen: set[int] = set()
        self._hold = hold
        self._cond = threading.Condition()

    def __call__(self) -> None:
        n = int.from_bytes(self.link.memory.read(MAILBOX, 4), "little")
        if n:
            with self._cond:
                self.seen.add(n)
                self._cond.notify_all()
            self._hold(n)

    def wait_for(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: n in self.seen, timeout)


@pytest.fixture
def backend(host, tmp_path) -> Iterator[XenBackend]:
    be = XenBackend("doorbell-test", tmp_path / "be.sock", host.xenhv_socket).start()
    yield be
    be.stop()


def send(vcpu, port: int, n: int | None = None) -> int:
    """EVTCHNOP_send on `port`, as send number `n` (written to the mailbox first)."""
    if n is not None:
        vcpu.write_phys(MAILBOX, n.to_bytes(4, "little"))
    return call(vcpu, HC["event_channel_op"], E.EVTCHNOP_send, E.EvtchnSend(port=port))[0]


def guest_with_port(xen_guest_factory):
    d = xen_guest_factory("default")
    gfn = platform_gfn(d.vcpu)
    map_shared_info(d.vcpu, gfn)
    return d, gfn, alloc_unbound(d.vcpu)


def bind(backend: XenBackend, domid: int, port: int, **hold) -> tuple[DomainLink, int, Sends]:
    """Bind `port`, and wait until the back-end has read the bind-time kick (before any mailbox write,
    so that kick finds no send number)."""
    link = backend.attach(domid)
    sends = Sends(link, **hold)
    index = link.bind(port, sends)
    kick = link.session.vrings[index].kick_fd
    wait_for(lambda: not select.select([kick], [], [], 0)[0], timeout=5, what="the back-end to read the bind-time kick")
    return link, index, sends


def test_a_send_to_a_back_end_is_an_eventfd_write_and_its_notification_is_delivered_by_the_vcpu(
        xen_guest_factory, backend) -> None:
    d, gfn, port = guest_with_port(xen_guest_factory)
    link, index, sends = bind(backend, d.domid, port)
    bells = d.link.doorbells

    for n in range(1, 4):
        assert send(d.vcpu, port, n) == 0
        assert sends.wait_for(n), f"send {n} did not kick the back-end"
    assert bells.sends == 3, "the sends went through xenhv, not the doorbell"

    assert not pending(d.vcpu, gfn, port)
    link.notify(index)
    assert d.link.wait_upcall(5.0), "the back-end's notification raised no upcall"
    assert pending(d.vcpu, gfn, port)
    assert bells.deliveries == 1, "xenhv delivered the notification: the vCPU does not hold the call eventfd"


def test_a_send_the_doorbell_takes_does_not_go_through_guest_ram(xen_guest_factory, backend) -> None:
    """Hypercalls.op hands an evtchn_send's port to the doorbell itself: nothing is written to the scratch
    page, and the struct it returns is the send's."""
    d, _, port = guest_with_port(xen_guest_factory)
    _, _, sends = bind(backend, d.domid, port)
    sentinel = b"\xa5" * 8
    d.vcpu.write_phys(SCRATCH, sentinel)
    d.vcpu.write_phys(MAILBOX, (1).to_bytes(4, "little"))
    rc, out = Hypercalls(d.vcpu, SCRATCH).op(HC["event_channel_op"], E.EVTCHNOP_send, E.EvtchnSend(port=port))
    assert (rc, type(out), out.port) == (0, E.EvtchnSend, port)
    assert sends.wait_for(1) and d.link.doorbells.sends == 1
    assert d.vcpu.read_phys(SCRATCH, 8) == sentinel, "the send's struct went through guest RAM"


def test_only_an_evtchn_send_on_event_channel_op_takes_the_doorbell_from_its_struct(
        xen_guest_factory, backend) -> None:
    """The shortcut past guest RAM is for EVTCHNOP_send with an evtchn_send; anything else goes the long
    way, where what counts is what guest RAM holds: another op with the same command number, another
    command with the same layout (a close closes), a send given another op's struct (its first word, not
    its port field, is the port)."""
    d, _, port = guest_with_port(xen_guest_factory)
    _, _, sends = bind(backend, d.domid, port)
    hc = Hypercalls(d.vcpu, SCRATCH)
    bells = d.link.doorbells
    d.vcpu.write_phys(MAILBOX, (1).to_bytes(4, "little"))

    assert hc.op(HC["hvm_op"], E.EVTCHNOP_send, E.EvtchnSend(port=port))[0] == -X.XEN_ENOSYS
    # The first word of an evtchn_status is its domid (DOMID_SELF): a port beyond the domain's.
    assert hc.op(HC["event_channel_op"], E.EVTCHNOP_send,
                 E.EvtchnStatus(dom=E.DOMID_SELF, port=port))[0] == -X.XEN_EINVAL
    assert bells.sends == 0 and not sends.wait_for(1, timeout=0.3), "the back-end was kicked"

    assert hc.op(HC["event_channel_op"], E.EVTCHNOP_close, E.EvtchnSend(port=port))[0] == 0
    assert not bells.holds(port) and bells.sends == 0
    assert hc.evtchn_status(port).status == E.EVTCHNSTAT_closed


def test_a_masked_port_is_marked_pending_without_an_upcall(xen_guest_factory, backend) -> None:
    d, gfn, port = guest_with_port(xen_guest_factory)
    link, index, _ = bind(backend, d.domid, port)
    assert send(d.vcpu, port) == 0  # takes the doorbell
    word = X.SharedInfo.evtchn_mask.offset + 8 * (port // 64)
    d.vcpu.write_phys((gfn << 12) + word, (1 << port % 64).to_bytes(8, "little"))

    link.notify(index)
    assert not d.link.wait_upcall(0.5), "a masked port interrupted the vCPU"
    assert pending(d.vcpu, gfn, port)
    assert d.link.doorbells.deliveries == 1


def test_a_port_the_guest_closed_is_not_kicked_through_its_old_doorbell(xen_guest_factory, backend) -> None:
    d, _, port = guest_with_port(xen_guest_factory)
    _, _, sends = bind(backend, d.domid, port)
    assert send(d.vcpu, port, 1) == 0
    assert sends.wait_for(1)
    bells = d.link.doorbells
    generation = bells.generation(port)

    assert Hypercalls(d.vcpu, SCRATCH).evtchn_close(port) is None
    # The vCPU drops the doorbell before the close traps (its interrupt thread delivers nothing to the port
    # after xenhv cleared it), and xenhv revokes it all the same.
    assert not bells.holds(port)
    assert bells.generation(port) != generation
    assert send(d.vcpu, port, 2) == -X.XEN_EINVAL, "a send on a closed port must be xenhv's -EINVAL"
    assert not sends.wait_for(2, timeout=0.3), "the closed port's old channel was kicked"
    assert bells.sends == 1


def test_a_back_end_that_unbinds_revokes_the_doorbell_and_its_last_notification_arrives(
        xen_guest_factory, backend) -> None:
    d, gfn, port = guest_with_port(xen_guest_factory)
    link, index, sends = bind(backend, d.domid, port)
    assert send(d.vcpu, port, 1) == 0
    assert sends.wait_for(1)
    bells = d.link.doorbells

    # The back-end notifies and unbinds before the guest's vCPU takes the interrupt: xenhv reads the
    # notification while it revokes the doorbell, and delivers it.
    link.notify(index)
    link.unbind(index)
    assert d.link.wait_upcall(5.0), "the notification sent before the unbind was lost"
    assert pending(d.vcpu, gfn, port)
    assert bells.deliveries == 0

    # The guest's port reverts to unbound: a send is xenhv's (dropped), not a kick of the old channel.
    assert send(d.vcpu, port, 2) == 0
    assert bells.sends == 1
    assert not sends.wait_for(2, timeout=0.3), "the unbound channel was kicked"
    assert Hypercalls(d.vcpu, SCRATCH).evtchn_status(port).status == E.EVTCHNSTAT_unbound


def test_a_port_bound_after_the_guest_asked_gets_its_doorbell(xen_guest_factory, backend) -> None:
    d, _, port = guest_with_port(xen_guest_factory)
    bells = d.link.doorbells
    assert send(d.vcpu, port) == 0  # unbound: xenhv drops it, and there is no doorbell yet
    assert send(d.vcpu, port) == 0
    assert bells.sends == 0

    _, _, sends = bind(backend, d.domid, port)
    assert send(d.vcpu, port, 1) == 0
    assert sends.wait_for(1)
    assert bells.sends == 1, "the binding did not make the vCPU ask again"


def test_doorbell_traps_name_their_errors(xen_guest_factory, backend) -> None:
    d, _, port = guest_with_port(xen_guest_factory)
    ipi = Hypercalls(d.vcpu, SCRATCH).op(HC["event_channel_op"], E.EVTCHNOP_bind_ipi, E.EvtchnBindIpi(vcpu=0))[1].port
    for bad in (0, 1023, 1024, DOORBELL_PORTS, 1 << 40):
        result, _, _, fds = d.link.doorbell(bad)
        assert (result, fds) == (-X.XEN_EINVAL if bad >= 1024 else -X.XEN_ENOENT, []), bad
    assert d.link.doorbell(ipi)[0] == -X.XEN_ENOENT
    assert d.link.doorbell(port)[0] == -X.XEN_ENOENT  # unbound
    bind(backend, d.domid, port)
    result, generation, vcpu, fds = d.link.doorbell(port)
    try:
        assert (result, vcpu, len(fds)) == (0, 0, 2)
        assert generation == d.link.doorbells.generation(port)
    finally:
        for fd in fds:
            os.close(fd)


def test_a_guest_that_saturates_its_doorbell_eventfds_harms_only_itself(xen_guest_factory, backend, host) -> None:
    """The vCPU holds the channel's eventfds, so a hostile guest can push their counters to the maximum:
    the back-end's notify, the vCPU's send and xenhv's relay of a trapped send must all still work (a
    saturated eventfd is signalled), and nobody's connection ends."""
    d, _, port = guest_with_port(xen_guest_factory)
    held, release = threading.Event(), threading.Event()

    def hold(n: int) -> None:
        if n == 1:  # hold the back-end's thread: nobody reads the kick eventfd meanwhile
            held.set()
            release.wait(10)

    link, index, sends = bind(backend, d.domid, port, hold=hold)
    assert send(d.vcpu, port, 1) == 0
    assert held.wait(5)
    bell = d.link.doorbells._ports[port]
    saturated = (1 << 64) - 2  # the largest value an eventfd holds
    try:
        os.eventfd_write(bell.kick, saturated - 1)
        try:  # one kick may be unread still
            os.eventfd_write(bell.kick, 1)
        except BlockingIOError:
            pass
        assert send(d.vcpu, port, 2) == 0  # through the doorbell
        d.vcpu.write_phys(SCRATCH, bytes(E.EvtchnSend(port=port)))
        assert d.link.hypercall(HC["event_channel_op"], E.EVTCHNOP_send, SCRATCH) == 0  # xenhv's relay
    finally:
        release.set()
    assert sends.wait_for(2)

    os.eventfd_write(bell.call, saturated)
    link.notify(index)  # must not raise: that would end the back-end's connection to the domain
    assert link.session.notify(index), "the back-end's notify failed on a saturated call eventfd"
    host.check_alive("after a guest saturated its doorbells")


def test_a_guest_that_closes_and_binds_its_back_ends_port_again_is_notified_and_revoked_on_the_new_port(
        xen_guest_factory, backend) -> None:
    """Closing the guest's end leaves dom0's port unbound, and the guest may bind it again from a new port
    (EVTCHNOP_bind_interdomain). xenhv watches the channel's call eventfd again once the old doorbell is
    gone, so the back-end's notifications reach the new port, and the doorbell the new port takes is the
    one revoked when the back-end unbinds."""
    d, gfn, port = guest_with_port(xen_guest_factory)
    link, index, sends = bind(backend, d.domid, port)
    hc = Hypercalls(d.vcpu, SCRATCH)
    assert send(d.vcpu, port, 1) == 0 and sends.wait_for(1)
    hc.evtchn_close(port)
    assert alloc_unbound(d.vcpu) == port  # the old number is taken: the new binding gets another

    rc, op = hc.op(HC["event_channel_op"], E.EVTCHNOP_bind_interdomain,
                   E.EvtchnBindInterdomain(remote_dom=0, remote_port=link.ports[index]))
    assert rc == 0
    again = op.local_port
    assert again != port
    assert d.link.wait_upcall(5.0)  # the binder's own bind-time event (xen-abi.md 8); handled as a guest
    vcpu0 = (gfn << 12) + X.SharedInfo.vcpu_info.offset  # would: clear upcall_pending, selector, pending bit
    d.vcpu.write_phys(vcpu0 + X.VcpuInfo.evtchn_upcall_pending.offset, b"\0")
    d.vcpu.write_phys(vcpu0 + X.VcpuInfo.evtchn_pending_sel.offset, bytes(8))
    d.vcpu.write_phys((gfn << 12) + X.SharedInfo.evtchn_pending.offset + 8 * (again // 64), bytes(8))

    link.notify(index)
    assert d.link.wait_upcall(5.0), "xenhv no longer relays the channel's notifications"
    assert pending(d.vcpu, gfn, again)

    assert send(d.vcpu, again, 2) == 0 and sends.wait_for(2)
    assert d.link.doorbells.holds(again)
    generation = d.link.doorbells.generation(again)
    link.unbind(index)
    assert d.link.doorbells.generation(again) != generation, "the new port's doorbell outlived the channel"
