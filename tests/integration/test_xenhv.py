"""xenhv end to end on the real QEMU: the guest's vCPU maps shared_info, allocates an event channel
for dom0, and a back-end process connected over vhost-user binds it, reads the guest's bytes, replies
and notifies back; the guest sees the pending bit and the upcall."""
from __future__ import annotations

import ctypes
import sys
import pytest

from xenpv.base.process import Supervised, wait_for
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.pci import PciBus
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import hvm
from xenpv.xenabi import xen as X

pytestmark = pytest.mark.integration

SCRATCH = 0x10000  # a guest RAM page for hypercall arguments
MAILBOX = 0x20000  # the page shared with the back-end
HC = X.HYPERCALL_NUMBERS


def call(vcpu, nr: int, cmd: int, op: ctypes.Structure) -> tuple[int, ctypes.Structure]:
    return Hypercalls(vcpu, SCRATCH).op(nr, cmd, op)


def platform_gfn(vcpu) -> int:
    bus = PciBus(vcpu)
    (dev,) = [f for f in bus.assign_resources() if f.vendor_id == 0x5853]
    return dev.bars[0].address >> 12


def map_shared_info(vcpu, gfn: int) -> None:
    Hypercalls(vcpu, SCRATCH).add_to_physmap(X.XENMAPSPACE_shared_info, 0, gfn)


def alloc_unbound(vcpu, remote: int = 0) -> int:
    return Hypercalls(vcpu, SCRATCH).evtchn_alloc_unbound(remote)


def pending(vcpu, gfn: int, port: int) -> bool:
    info = X.SharedInfo.from_buffer_copy(vcpu.read_phys(gfn << 12, ctypes.sizeof(X.SharedInfo)))
    return bool(info.evtchn_pending[port // 64] >> (port % 64) & 1)


def upcall_pending(vcpu, gfn: int) -> int:
    info = X.SharedInfo.from_buffer_copy(vcpu.read_phys(gfn << 12, ctypes.sizeof(X.SharedInfo)))
    return info.vcpu_info[0].evtchn_upcall_pending


def test_shared_info_is_mapped_into_the_bar_hole(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    gfn = platform_gfn(d.vcpu)
    map_shared_info(d.vcpu, gfn)
    # Seen through the vCPU at the chosen frame, and it is not RAM (the BAR hole is above RAM).
    assert gfn >= d.machine.guest.memory_mib << 8
    d.vcpu.write_phys((gfn << 12) + 3072, b"\x07")  # wc_version, a field the guest may write
    assert d.link.frames[3072] == 7


def test_hypercall_errors_are_xen_errnos(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    v = d.vcpu
    assert v.hypercall(HC["memory_op"], X.XENMEM_add_to_physmap, 0xFFFF_FFFF_0000) == -X.XEN_EFAULT
    other = d.domid + 1  # another domain's id, whichever this one got
    rc, _ = call(v, HC["memory_op"], X.XENMEM_add_to_physmap,
                 X.XenAddToPhysmap(domid=other, space=X.XENMAPSPACE_shared_info, idx=0, gpfn=0x100))
    assert rc == -X.XEN_EPERM
    rc, _ = call(v, HC["event_channel_op"], E.EVTCHNOP_send, E.EvtchnSend(port=4000))
    assert rc == -X.XEN_EINVAL
    rc, _ = call(v, HC["event_channel_op"], E.EVTCHNOP_alloc_unbound,
                 E.EvtchnAllocUnbound(dom=0x7000, remote_dom=0))
    assert rc == -X.XEN_ESRCH
    rc, _ = call(v, HC["hvm_op"], hvm.HVMOP_set_param,
                 hvm.XenHvmParam(domid=E.DOMID_SELF, index=hvm.HVM_PARAM_STORE_PFN, value=1))
    assert rc == -X.XEN_EPERM
    assert v.hypercall(HC["mmu_update"], 0, 0) == -X.XEN_ENOSYS
    d.control("set_param", index=hvm.HVM_PARAM_STORE_EVTCHN, value=3)
    rc, op = call(v, HC["hvm_op"], hvm.HVMOP_get_param, hvm.XenHvmParam(domid=E.DOMID_SELF, index=hvm.HVM_PARAM_STORE_EVTCHN))
    assert (rc, op.value) == (0, 3)


def test_event_channel_round_trip_with_a_vhost_user_backend(xen_guest_factory, host, artifacts) -> None:
    d = xen_guest_factory("default")
    v = d.vcpu
    gfn = platform_gfn(v)
    map_shared_info(v, gfn)
    port = alloc_unbound(v)

    sock = host.run_dir / f"peer-{d.domid}.sock"
    peer = Supervised("peer back-end", [sys.executable, "-m", "xenpv.backends.peer", "--xenhv", str(host.xenhv_socket),
                                        "--socket", str(sock), "--domid", str(d.domid), "--port", str(port),
                                        "--gpa", hex(MAILBOX)], artifacts / "peer.log").start()
    try:
        wait_for(lambda: "bound port" in peer.log_path.read_text(), timeout=10, what="the back-end to bind",
                 alive=[peer])
        # bind_interdomain marks the binder's own end pending (xen-abi.md 8), not the guest's
        assert not pending(v, gfn, port)
        assert not d.link.wait_upcall(0.05)

        message = b"hello through the ring"
        v.write_phys(MAILBOX + 4, message)
        v.write_phys(MAILBOX, len(message).to_bytes(4, "little"))
        rc, _ = call(v, HC["event_channel_op"], E.EVTCHNOP_send, E.EvtchnSend(port=port))
        assert rc == 0
        assert d.link.wait_upcall(5.0), "no upcall after the back-end's notify"
        assert pending(v, gfn, port) and upcall_pending(v, gfn) == 1
        assert v.read_phys(MAILBOX + 4, len(message)) == message[::-1]
        assert "event 1: hello through the ring" in peer.log_path.read_text()

        rc, op = call(v, HC["event_channel_op"], E.EVTCHNOP_status, E.EvtchnStatus(dom=E.DOMID_SELF, port=port))
        assert (rc, op.status, op.u.interdomain.dom) == (0, E.EVTCHNSTAT_interdomain, 0)
    finally:
        peer.stop()
    # The back-end went away: xenhv saw its link close and closed dom0's end, so the guest's port reverts
    # to unbound without anyone detaching it.
    wait_for(lambda: call(v, HC["event_channel_op"], E.EVTCHNOP_status,
                          E.EvtchnStatus(dom=E.DOMID_SELF, port=port))[1].status == E.EVTCHNSTAT_unbound,
             timeout=5, what="the guest's port to revert to unbound")


def map_grant_frame(vcpu, gfn: int, idx: int = 0) -> None:
    Hypercalls(vcpu, SCRATCH).add_to_physmap(X.XENMAPSPACE_grant_table, idx, gfn)


def test_granted_page_is_mapped_by_the_backend_and_revocation_waits_for_unmap(xen_guest_factory, host,
                                                                            artifacts, request) -> None:
    from xenpv.stack.vcpu.grants import GrantTableFrontend
    from xenpv.xenabi.grant_table import GTF_permit_access, GTF_reading, GTF_writing

    d = xen_guest_factory("default")
    v = d.vcpu
    base = platform_gfn(v)
    map_shared_info(v, base)
    map_grant_frame(v, base + 1)
    frontend = GrantTableFrontend([v.page(base + 1)])
    request.addfinalizer(frontend.release)
    ref = 8  # the first unreserved entry
    frontend.grant_access(ref, 0, MAILBOX >> 12)
    port = alloc_unbound(v)

    size = Hypercalls(v, SCRATCH).gnttab_query_size()
    assert (size.status, size.nr_frames, size.max_nr_frames) == (0, 1, 32)

    sock = host.run_dir / f"peer-g{d.domid}.sock"
    peer = Supervised("peer back-end", [sys.executable, "-m", "xenpv.backends.peer", "--xenhv", str(host.xenhv_socket),
                                        "--socket", str(sock), "--domid", str(d.domid), "--port", str(port),
                                        "--grant", str(ref)], artifacts / "peer.log").start()
    try:
        wait_for(lambda: "bound port" in peer.log_path.read_text(), timeout=10, what="the back-end to bind",
                 alive=[peer])
        assert f"mapped grant {ref} at gfn {MAILBOX >> 12:#x}" in peer.log_path.read_text()
        e = frontend.entry(ref)
        assert e.flags == GTF_permit_access | GTF_reading | GTF_writing
        assert not frontend.end_foreign_access(ref), "revoking a mapped grant must report busy"

        message = b"granted bytes"
        v.write_phys(MAILBOX + 4, message)
        v.write_phys(MAILBOX, len(message).to_bytes(4, "little"))
        assert call(v, HC["event_channel_op"], E.EVTCHNOP_send, E.EvtchnSend(port=port))[0] == 0
        assert d.link.wait_upcall(5.0)
        assert v.read_phys(MAILBOX + 4, len(message)) == message[::-1]
    finally:
        peer.stop()
    wait_for(lambda: frontend.entry(ref).flags == GTF_permit_access, timeout=5,
             what="the back-end's unmap to clear GTF_reading/GTF_writing")
    assert frontend.end_foreign_access(ref)


def test_grant_checks_domid_and_readonly(xen_guest_factory) -> None:
    from xenpv.backends.xenhv.control import XenhvError
    from xenpv.stack.vcpu.grants import GrantTableFrontend
    from xenpv.xenabi.grant_table import GNTST_bad_gntref, GNTST_general_error

    d = xen_guest_factory("default")
    v = d.vcpu
    base = platform_gfn(v)
    map_grant_frame(v, base)
    fe = GrantTableFrontend([v.page(base)])
    try:
        fe.grant_access(9, 7, MAILBOX >> 12)  # granted to dom7, not dom0
        fe.grant_access(10, 0, MAILBOX >> 12, readonly=True)
        # Xen fails a wrong domid and a write pin of a read-only grant alike (_set_status_v1).
        cases = [(9, False, GNTST_general_error), (10, False, GNTST_general_error), (4096, True, GNTST_bad_gntref)]
        for ref, ro, status in cases:
            with pytest.raises(XenhvError) as ei:
                _dom0_map(d, ref, ro)
            assert ei.value.gntst == status, (ref, ro)
        m = _dom0_map(d, 10, True)
        assert m["gfn"] == MAILBOX >> 12
        assert not fe.end_foreign_access(10)
        ctl = d.host.xenhv_control()
        try:
            ctl.call("gnttab_unmap", handle=m["handle"])
        finally:
            ctl.close()
        assert fe.end_foreign_access(10)
    finally:
        fe.release()


def _dom0_map(d, ref: int, readonly: bool) -> dict:
    ctl = d.host.xenhv_control()
    try:
        return ctl.call("gnttab_map", domid=d.domid, ref=ref, readonly=readonly)
    finally:
        ctl.close()


def test_save_and_restore_keep_params_frames_and_their_placement(xen_guest_factory, tmp_path) -> None:
    from xenpv.stack.vcpu.grants import GrantTableFrontend

    d = xen_guest_factory("default")
    v = d.vcpu
    base = platform_gfn(v)
    map_shared_info(v, base)
    map_grant_frame(v, base + 1)
    with v.page(base + 1) as frame:
        fe = GrantTableFrontend([frame])
        fe.grant_access(8, 0, MAILBOX >> 12)
        fe.release()
    port = alloc_unbound(v)
    d.control("pause")
    saved = tmp_path / "dom.json"
    d.control("save_domain", path=str(saved))
    ctl = d.toolstack.ctl
    new = d.domid + 1000
    ctl.call("create_domain", domid=new, name="restored", ram_path=str(d.machine.paths.ram),
             ram_size=d.machine.guest.memory_mib << 20)
    try:
        ctl.call("restore_domain", domid=new, path=str(saved))
        assert ctl.call("get_param", domid=new, index=hvm.HVM_PARAM_STORE_PFN) == d.created.store_gfn
        m = ctl.call("gnttab_map", domid=new, ref=8, readonly=True)  # the grant entry survived
        assert m["gfn"] == MAILBOX >> 12
        ctl.call("gnttab_unmap", handle=m["handle"])
        # Event channels are not carried over: the resumed guest rebinds them.
        assert ctl.call("evtchn_status", dom=new, port=port)["state"] == "CLOSED"
    finally:
        ctl.call("destroy_domain", domid=new)
    d.control("unpause")
