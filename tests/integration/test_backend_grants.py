"""A dom0 back-end pins and copies grants itself (backends.grants) on the guest RAM its vhost-user link maps,
with a real xenhv and a real guest granting: no control call per access, Xen's rules still enforced, and
xenhv still in charge of what outlives an access (the guest's revoke, a detached or dead back-end's pins)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from xenpv.backends.grants import BackendGrants, GrantAccessError
from xenpv.backends.xenbackend import DomainLink, XenBackend
from xenpv.base.process import wait_for
from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.pci import PciBus
from xenpv.xenabi import xen as X
from xenpv.xenabi.grant_table import GTF_permit_access, GTF_reading, GTF_writing

pytestmark = pytest.mark.integration

SCRATCH = 0x10000  # a guest RAM page for hypercall arguments
PAGE_GFN = 0x21  # the page granted to the back-end
REF = 8  # the first unreserved grant entry


@dataclass
class Granting:
    guest: GrantTableFrontend
    backend: XenBackend
    link: DomainLink
    grants: BackendGrants
    d: object

    def calls(self) -> int:
        counts = self.d.toolstack.ctl.call("control_calls")  # type: ignore[attr-defined]
        return sum(n for op, n in counts.items() if op != "control_calls")

    def guest_page(self) -> bytes:
        return self.d.vcpu.memory.read(PAGE_GFN << 12, 4096)  # type: ignore[attr-defined]


@pytest.fixture
def granting(xen_guest_factory, host, request) -> Iterator[Granting]:
    d = xen_guest_factory("default")
    v = d.vcpu
    (dev,) = [f for f in PciBus(v).assign_resources() if f.vendor_id == 0x5853]
    base = dev.bars[0].address >> 12
    hc = Hypercalls(v, SCRATCH)
    hc.add_to_physmap(X.XENMAPSPACE_shared_info, 0, base)
    hc.add_to_physmap(X.XENMAPSPACE_grant_table, 0, base + 1)
    guest = GrantTableFrontend([v.page(base + 1)])
    request.addfinalizer(guest.release)
    backend = XenBackend("grantstest", host.run_dir / f"grantstest-{d.domid}.sock", host.xenhv_socket).start()
    grants = None
    try:
        link = backend.attach(d.domid)
        grants = BackendGrants(backend, link)
        assert grants.local, "xenhv shared the domain's pin table"
        yield Granting(guest, backend, link, grants, d)
    finally:
        if grants is not None:
            grants.close()
        backend.stop()


def test_a_backend_copies_granted_pages_without_calling_xenhv(granting: Granting) -> None:
    g = granting
    g.guest.grant_access(REF, 0, PAGE_GFN)
    g.d.vcpu.memory.write(PAGE_GFN << 12, b"from the guest")  # type: ignore[attr-defined]
    before = g.calls()
    assert g.grants.read(REF, 0, 14) == b"from the guest"
    g.grants.write(REF, 100, b"from dom0")
    assert g.calls() == before, "a grant access asked xenhv"
    assert g.guest_page()[100:109] == b"from dom0"
    assert g.guest.entry(REF).flags == GTF_permit_access  # nothing stays pinned after a copy


def test_a_backend_cannot_read_a_page_after_its_grant_was_revoked_and_unpinned(granting: Granting) -> None:
    g = granting
    g.guest.grant_access(REF, 0, PAGE_GFN)
    gfn, handle = g.grants.pin(REF, True)
    assert (gfn, handle) == (PAGE_GFN, None)
    assert g.guest.entry(REF).flags == GTF_permit_access | GTF_reading | GTF_writing
    assert not g.guest.end_foreign_access(REF), "the guest revoked a grant the back-end holds"
    g.grants.unpin(REF, True, None)
    assert g.guest.end_foreign_access(REF)
    g.d.vcpu.memory.write(PAGE_GFN << 12, b"secret after the revoke")  # type: ignore[attr-defined]
    with pytest.raises(GrantAccessError, match="does not grant access"):
        g.grants.read(REF, 0, 6)
    with pytest.raises(GrantAccessError, match="does not grant access"):
        g.grants.write(REF, 0, b"scribble")
    assert g.guest_page()[:6] == b"secret"


def test_read_only_and_foreign_grants_are_refused(granting: Granting) -> None:
    g = granting
    g.guest.grant_access(REF, 0, PAGE_GFN, readonly=True)
    assert g.grants.read(REF, 0, 4) == g.guest_page()[:4]
    with pytest.raises(GrantAccessError, match="read-only"):
        g.grants.write(REF, 0, b"nope")
    g.guest.grant_access(REF + 1, 7, PAGE_GFN)  # granted to dom7, not to dom0
    with pytest.raises(GrantAccessError, match="does not grant access to dom0"):
        g.grants.read(REF + 1, 0, 4)
    with pytest.raises(GrantAccessError, match="beyond the page"):
        g.grants.read(REF, 4000, 100)
    assert g.guest.entry(REF).flags & (GTF_reading | GTF_writing) == 0


def test_xenhv_maps_and_backend_pins_of_one_grant_count_together(granting: Granting) -> None:
    g = granting
    g.guest.grant_access(REF, 0, PAGE_GFN)
    m = g.backend.call("gnttab_map", domid=g.link.domid, ref=REF, readonly=True)
    g.grants.pin(REF, True)
    g.backend.call("gnttab_unmap", handle=m["handle"])
    assert g.guest.entry(REF).flags == GTF_permit_access | GTF_reading | GTF_writing, \
        "xenhv's unmap cleared the flags of a grant the back-end still pins"
    g.grants.unpin(REF, True, None)
    assert g.guest.end_foreign_access(REF)


def test_detaching_a_backend_drops_the_pins_it_held(granting: Granting) -> None:
    g = granting
    g.guest.grant_access(REF, 0, PAGE_GFN)
    g.grants.pin(REF, False)
    g.d.control("detach_backend", name=g.backend.name)  # type: ignore[attr-defined]
    assert g.guest.entry(REF).flags == GTF_permit_access  # dropped before the call returned
    assert g.guest.end_foreign_access(REF)
    g.guest.grant_access(REF, 0, PAGE_GFN)
    with pytest.raises(GrantAccessError, match="revoked"):
        g.grants.read(REF, 0, 4)  # its party is revoked: it can no longer pin


def test_a_dead_backends_pins_are_dropped_when_its_link_closes(granting: Granting) -> None:
    g = granting
    g.guest.grant_access(REF, 0, PAGE_GFN)
    g.grants.pin(REF, True)
    g.backend.vhost.stop()  # its link closes, as when the process dies holding the pin
    wait_for(lambda: g.guest.entry(REF).flags == GTF_permit_access, timeout=5,
             what="xenhv to drop the gone back-end's pins")
    assert g.guest.end_foreign_access(REF)
