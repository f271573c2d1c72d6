"""A dom0 back-end's grant mappings last as long as its vhost-user link: when the back-end dies (its link
closes) or is detached, xenhv releases what it mapped, as Xen releases a dying driver domain's mappings,
and the guest can revoke and reuse its pages."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from xenpv.backends.xenhv.control import XenhvError
from xenpv.base.process import Supervised, wait_for
from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.pci import PciBus
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import xen as X
from xenpv.xenabi.grant_table import GTF_permit_access, GTF_reading, GTF_writing

pytestmark = pytest.mark.integration

SCRATCH = 0x10000  # a guest RAM page for hypercall arguments
MAILBOX = 0x20000  # the page granted to the back-end
REF = 8  # the first unreserved grant entry


def _granting_guest(d, request) -> tuple[GrantTableFrontend, int]:
    """The guest's grant table mapped, REF granting MAILBOX to dom0, and an unbound port for the back-end."""
    v = d.vcpu
    (dev,) = [f for f in PciBus(v).assign_resources() if f.vendor_id == 0x5853]
    base = dev.bars[0].address >> 12
    hc = Hypercalls(v, SCRATCH)
    hc.add_to_physmap(X.XENMAPSPACE_shared_info, 0, base)
    hc.add_to_physmap(X.XENMAPSPACE_grant_table, 0, base + 1)
    frontend = GrantTableFrontend([v.page(base + 1)])
    request.addfinalizer(frontend.release)
    frontend.grant_access(REF, 0, MAILBOX >> 12)
    return frontend, hc.evtchn_alloc_unbound(0)


def _peer(host, d, port: int, log: Path) -> Supervised:
    sock = host.run_dir / f"peer-link{d.domid}.sock"
    peer = Supervised("peer back-end", [sys.executable, "-m", "xenpv.backends.peer", "--xenhv", str(host.xenhv_socket),
                                        "--socket", str(sock), "--domid", str(d.domid), "--port", str(port),
                                        "--grant", str(REF)], log).start()
    wait_for(lambda: "bound port" in log.read_text(), timeout=10, what="the back-end to map and bind", alive=[peer])
    return peer


def _port_status(d, port: int) -> int:
    return Hypercalls(d.vcpu, SCRATCH).op(X.HYPERCALL_NUMBERS["event_channel_op"], E.EVTCHNOP_status,
                                          E.EvtchnStatus(dom=E.DOMID_SELF, port=port))[1].status


def test_a_killed_backends_mappings_are_released_when_its_link_closes(xen_guest_factory, host, artifacts,
                                                                       request) -> None:
    d = xen_guest_factory("default")
    frontend, port = _granting_guest(d, request)
    peer = _peer(host, d, port, artifacts / "peer.log")
    try:
        assert frontend.entry(REF).flags == GTF_permit_access | GTF_reading | GTF_writing
        assert not frontend.end_foreign_access(REF), "a mapped grant cannot be revoked"
        peer.signal_group(signal.SIGKILL)  # no unmap, no detach: only its sockets close
        peer.stop()
        wait_for(lambda: frontend.entry(REF).flags == GTF_permit_access, timeout=5,
                 what="xenhv to release the dead back-end's mapping")
        assert frontend.end_foreign_access(REF)
        assert _port_status(d, port) == E.EVTCHNSTAT_unbound  # its channel went with its link
        with pytest.raises(XenhvError, match="not attached"):
            d.control("detach_backend", name="peer")  # already detached by xenhv
    finally:
        peer.stop()


def test_detaching_a_backend_releases_its_mappings(xen_guest_factory, host, artifacts, request) -> None:
    d = xen_guest_factory("default")
    frontend, port = _granting_guest(d, request)
    peer = _peer(host, d, port, artifacts / "peer.log")
    try:
        assert frontend.entry(REF).flags & GTF_writing
        d.control("detach_backend", name="peer")
        assert frontend.entry(REF).flags == GTF_permit_access  # released before the call returned
        assert frontend.end_foreign_access(REF)
    finally:
        peer.stop()


def test_a_backend_cannot_map_for_a_domain_it_is_not_attached_to(xen_guest_factory, request) -> None:
    d = xen_guest_factory("default")
    frontend, _port = _granting_guest(d, request)
    with pytest.raises(XenhvError, match="not attached"):
        d.toolstack.ctl.call("gnttab_map", domid=d.domid, ref=REF, readonly=False, backend="blkback")
    assert frontend.entry(REF).flags == GTF_permit_access
