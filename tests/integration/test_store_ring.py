"""The guest talks to xenstored over its real ring: the page the toolstack chose in guest RAM, the store
event channel through xenhv (events reach the guest by its upcall dispatcher), xenstored attached as a
vhost-user back-end."""
from __future__ import annotations

from typing import Iterator

import pytest

from xenpv.backends.xenstored.client import XsClient
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.pci import PciBus
from xenpv.stack.vcpu.upcall import UpcallDispatcher
from xenpv.stack.vcpu.xenstore import EventChannelDoorbell, GuestXenstore, XenstoreError
from xenpv.xenabi import hvm
from xenpv.xenabi import xen as X

pytestmark = pytest.mark.integration

SCRATCH = 0x10000


@pytest.fixture
def guest_store(xen_guest_factory) -> Iterator[tuple[object, GuestXenstore]]:
    d = xen_guest_factory("default")
    hc = Hypercalls(d.vcpu, SCRATCH)
    (platform,) = [f for f in PciBus(d.vcpu).assign_resources() if f.vendor_id == 0x5853]
    shared_gfn = platform.bars[0].address >> 12
    hc.add_to_physmap(X.XENMAPSPACE_shared_info, 0, shared_gfn)
    store_gfn = hc.get_param(hvm.HVM_PARAM_STORE_PFN)
    port = hc.get_param(hvm.HVM_PARAM_STORE_EVTCHN)
    assert (store_gfn, port) == (d.created.store_gfn, d.created.store_evtchn)
    with d.vcpu.page(shared_gfn) as shared, d.vcpu.page(store_gfn) as page:
        dispatcher = UpcallDispatcher(d.link, shared)
        doorbell = EventChannelDoorbell(Hypercalls(d.vcpu, SCRATCH + 0x1000), dispatcher, port)
        store = GuestXenstore(page, doorbell)
        try:
            yield d, store
        finally:
            store.close()
            doorbell.close()
            dispatcher.close()


def test_guest_reads_and_writes_its_xenstore_over_the_ring(guest_store) -> None:
    d, xs = guest_store
    assert xs.read("name") == b"default"
    xs.write("data/greeting", "hello from the ring")
    assert "greeting" in xs.directory("data")
    with pytest.raises(XenstoreError) as ei:
        xs.write("/local/domain/0/forbidden", "x")
    assert ei.value.errno == "EACCES"
    with XsClient(d.host.xenstored_socket) as dom0:
        assert dom0.read(f"/local/domain/{d.domid}/data/greeting") == b"hello from the ring"


def test_watches_and_transactions_over_the_ring(guest_store) -> None:
    d, xs = guest_store
    xs.watch("data", "tok")
    assert xs.wait_event(2.0) == ("data", "tok")  # the initial event
    with XsClient(d.host.xenstored_socket) as dom0:
        dom0.write(f"/local/domain/{d.domid}/data/from-dom0", b"1")
    assert xs.wait_event(2.0) == ("data/from-dom0", "tok")
    tx = xs.transaction_start()
    xs.write("data/a", "1", tx)
    with XsClient(d.host.xenstored_socket) as dom0:
        dom0.write(f"/local/domain/{d.domid}/data/b", b"2")  # a conflicting global write
    with pytest.raises(XenstoreError) as ei:
        xs.transaction_end(tx)
    assert ei.value.errno == "EAGAIN"
    assert xs.wait_event(2.0) == ("data/b", "tok")
    xs.unwatch("data", "tok")


def test_platform_services_come_up_on_a_xen_guest(xen_guest_factory) -> None:
    from xenpv.stack.vcpu.platform import XenPlatform

    d = xen_guest_factory("vendor-c000")
    p = XenPlatform.start(d.vcpu, d.machine.guest.memory_mib << 8)
    try:
        assert p.domid == d.domid
        assert p.device.device_id == 0xC000  # the first platform function the bus scan finds
        assert d.created.store_gfn not in p.pages.alloc(3)
        ref = p.grant(0, 0x500)
        assert p.grants.entry(ref).frame == 0x500 and p.end_grant(ref)
        assert p.store.read("name") == b"vendor-c000"
    finally:
        p.close()
