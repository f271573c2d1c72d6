"""The guest talks to xenstored over its real ring: the page the toolstack chose in guest RAM, the store
event channel through xenhv, xenstored attached as a vhost-user back-end."""
from __future__ import annotations

import pytest

from backends.xenstored.ring import GuestRing
from stack.vcpu.hypercalls import Hypercalls
from stack.vcpu.pci import PciBus
from xenabi import hvm
from xenabi import xen as X
from xenabi.xs_wire import XsdSockmsgType as T

pytestmark = pytest.mark.integration

SCRATCH = 0x10000


class StoreDoorbell:
    """The guest's store event channel as GuestRing wants it: notify sends, wait takes the upcall and
    clears what the guest's event channel ISR would."""

    def __init__(self, d, port: int, shared_gfn: int) -> None:
        self.d, self.port = d, port
        self.hc = Hypercalls(d.vcpu, SCRATCH)
        self.shared = shared_gfn << 12

    def notify(self) -> None:
        self.hc.evtchn_send(self.port)

    def wait(self, timeout: float) -> bool:
        woke = self.d.link.wait_upcall(max(0.0, timeout))
        if woke:
            v, info = self.d.vcpu, X.SharedInfo
            v.write_phys(self.shared + info.vcpu_info.offset + X.VcpuInfo.evtchn_upcall_pending.offset, b"\0")
            v.write_phys(self.shared + info.vcpu_info.offset + X.VcpuInfo.evtchn_pending_sel.offset, bytes(8))
            v.write_phys(self.shared + info.evtchn_pending.offset + 8 * (self.port // 64), bytes(8))
        return woke


def test_guest_reads_and_writes_its_xenstore_over_the_ring(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    hc = Hypercalls(d.vcpu, SCRATCH)
    (platform,) = [f for f in PciBus(d.vcpu).assign_resources() if f.vendor_id == 0x5853]
    shared_gfn = platform.bars[0].address >> 12
    hc.add_to_physmap(X.XENMAPSPACE_shared_info, 0, shared_gfn)
    store_gfn = hc.get_param(hvm.HVM_PARAM_STORE_PFN)
    port = hc.get_param(hvm.HVM_PARAM_STORE_EVTCHN)
    assert (store_gfn, port) == (d.created.store_gfn, d.created.store_evtchn)

    page = d.vcpu.page(store_gfn)
    try:
        ring = GuestRing(page, StoreDoorbell(d, port, shared_gfn))
        ring.send(T.READ, b"name\0")
        assert ring.read_message()[::3] == (T.READ, b"default")
        ring.send(T.WRITE, b"data/greeting\0hello from the ring")
        assert ring.read_message()[3] == b"OK\0"
        ring.send(T.GET_DOMAIN_PATH, f"{d.domid}\0".encode())
        assert ring.read_message()[3] == f"/local/domain/{d.domid}\0".encode()
        ring.send(T.WRITE, b"/local/domain/0/forbidden\0x")
        assert ring.read_message()[::3] == (T.ERROR, b"EACCES\0")
        del ring
    finally:
        page.release()
    # dom0 sees what the guest wrote, through the same daemon
    from backends.xenstored.client import XsClient

    with XsClient(d.host.xenstored_socket) as xs:
        assert xs.read(f"/local/domain/{d.domid}/data/greeting") == b"hello from the ring"
