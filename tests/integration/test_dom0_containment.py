"""A guest must not be able to take down dom0: hostile port I/O and hypercalls against the real xenhv
process, through the trap socket a guest's vCPU uses.

For every unplug port (0x10-0x1f) and every hypercall class (memory_op, hvm_op, sched_op,
event_channel_op, grant_table_op, unknown numbers, bad guest addresses) each hostile request must get
Xen's answer, and afterwards xenhv must be alive, must have contained no internal error (its
`internal_errors` count stays 0: a refusal is a rule of the model, not a caught exception), and must
still serve a second domain. The module runs its own xenhv and xenstored, so a regression that kills
xenhv fails these tests and not every test after them.
"""
from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenpv.backends.host import HostServices
from xenpv.backends.xenhv.control import XenhvControl
from xenpv.base.process import wait_for
from xenpv.harness.xendomain import XenDomain
from xenpv.stack.vcpu.hypervisor import HypervisorError, HypervisorLink
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import grant_table as G
from xenpv.xenabi import hvm
from xenpv.xenabi import unplug as U
from xenpv.xenabi import xen as X
from xenpv.xenabi.trap import REPLY, TRAP, TrapKind

pytestmark = pytest.mark.integration

RAM = 16 << 20
HC = X.HYPERCALL_NUMBERS
OP = 0x1000  # where the op structs go in a sparse domain's RAM


@pytest.fixture(scope="module")
def host() -> Iterator[HostServices]:
    """This module's own dom0 services (overrides the session's)."""
    logs = Path(tempfile.mkdtemp(prefix="xpv-contain-"))
    services = HostServices.start(logs)
    try:
        yield services
    finally:
        services.stop()
        shutil.rmtree(logs, ignore_errors=True)


@dataclass
class SparseDomain:
    """A domain whose RAM is a sparse file (no QEMU), with the vCPU's trap link."""

    domid: int
    ram: Path
    link: HypervisorLink
    ram_fd: int

    def put(self, gpa: int, value: object) -> int:
        os.pwrite(self.ram_fd, bytes(value), gpa)  # type: ignore[call-overload]
        return gpa

    def get(self, layout: type, gpa: int) -> object:
        import ctypes

        return layout.from_buffer_copy(os.pread(self.ram_fd, ctypes.sizeof(layout), gpa))

    def hypercall(self, name: str, *args: int) -> int:
        return self.link.hypercall(HC[name], *args)


@pytest.fixture
def sparse_domain(host: HostServices, tmp_path: Path) -> Iterator[Callable[[], SparseDomain]]:
    made: list[SparseDomain] = []
    ctl = host.xenhv_control()

    def make() -> SparseDomain:
        ram = tmp_path / f"ram{len(made)}"
        ram.write_bytes(b"")
        os.truncate(ram, RAM)
        domid = host.allocate_domid()
        ctl.call("create_domain", domid=domid, name=f"contain{domid}", ram_path=str(ram), ram_size=RAM)
        ctl.call("unpause", domid=domid)
        d = SparseDomain(domid, ram, HypervisorLink(host.xenhv_socket.parent / f"hv-{domid}.sock", domid),
                         os.open(ram, os.O_RDWR))
        made.append(d)
        return d

    yield make
    for d in made:
        d.link.close()
        os.close(d.ram_fd)
        ctl.call("destroy_domain", domid=d.domid)
    ctl.close()


@pytest.fixture
def bystander(sparse_domain: Callable[[], SparseDomain]) -> SparseDomain:
    """The second domain, created before the hostile one acts, that must go on being served."""
    return sparse_domain()


def assert_contained(host: HostServices, bystander: SparseDomain, *served: HypervisorLink) -> None:
    host.check_alive("after hostile input")
    ctl = XenhvControl(host.xenhv_socket)
    try:
        errors = ctl.call("internal_errors")
        assert errors["count"] == 0, f"xenhv contained internal errors: {errors['recent']}"
        assert ctl.call("list_domains")
    finally:
        ctl.close()
    for link in (bystander.link, *served):
        assert link.hypercall(HC["sched_op"], X.SCHEDOP_yield, 0) == 0


def xenhv_log(host: HostServices) -> str:
    return (host.logs / "xenhv.log").read_text(errors="replace")


# -- the unplug ports ------------------------------------------------------------------------------

def register(d: XenDomain) -> None:
    assert d.vcpu.inw(U.UNPLUG_PORT_MAGIC) == U.UNPLUG_MAGIC
    d.vcpu.outw(U.UNPLUG_PORT_PRODUCT, 0xFFFF)
    d.vcpu.outl(U.UNPLUG_PORT_BUILD, 0x090100)


def nics(d: XenDomain) -> list[str]:
    return [dev["qdev_id"] for b in d.machine.qmp.command("query-pci") for dev in b["devices"]
            if dev["class_info"]["class"] == 0x0200]


def test_unplug_of_a_nic_twice_before_its_eject(host: HostServices, bystander: SparseDomain,
                                                 xen_guest_factory: Callable[..., XenDomain]) -> None:
    """The reproduced defect: a second NIC unplug before the guest ejects the slot made QEMU refuse the
    second device_del, and the QmpError ended xenhv. An unplug of what is leaving is a no-op."""
    d = xen_guest_factory("default")
    register(d)
    for _ in range(3):  # the link traps as the guest's vCPU does, without the OSPM eject in between
        d.link.pio_write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert_contained(host, bystander, d.link)
    d.vcpu.acpi_eject_pending()
    d.machine.qmp.wait_event("DEVICE_DELETED", timeout=5, match={"device": "nic0"}, alive=[d.machine.process])
    assert nics(d) == []
    d.link.pio_write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)  # and after the eject: nothing left to do
    assert d.control("platform")["nics"] == ["nic0"]
    assert_contained(host, bystander, d.link)


def _mask(size: int) -> int:
    return (1 << (8 * size)) - 1


@pytest.mark.parametrize("port", range(U.UNPLUG_PORT_BASE, U.UNPLUG_PORT_BASE + U.UNPLUG_PORT_COUNT),
                         ids=lambda p: f"port{p:#x}")
def test_hostile_access_to_an_unplug_port(port: int, host: HostServices, bystander: SparseDomain,
                                          xen_guest_factory: Callable[..., XenDomain]) -> None:
    d = xen_guest_factory("default")
    link = d.link
    for size in (1, 2, 4):
        for value in (0, 1, 2, 3, 4, 0x49D2, 0x0A, 0xFFFFFFFF, 0x5A5A5A5A):
            link.pio_write(port, size, value & _mask(size))  # every write a platform device accepts completes
        assert 0 <= link.pio_read(port, size) <= _mask(size)
        with pytest.raises(HypervisorError, match=f"-{X.XEN_EINVAL}"):  # wider than the access
            link.pio_write(port, size, _mask(size) + 1)
    for size in (0, 3, 8, (1 << 64) - 1):  # no such access width
        with pytest.raises(HypervisorError, match=f"-{X.XEN_EINVAL}"):
            link.pio_write(port, size, 0)
        with pytest.raises(HypervisorError, match=f"-{X.XEN_EINVAL}"):
            link.pio_read(port, size)
    # What the port means stayed what the ABI says.
    assert link.pio_read(U.UNPLUG_PORT_MAGIC, 2) == U.UNPLUG_MAGIC
    assert link.pio_read(U.UNPLUG_PORT_VERSION, 1) == U.UNPLUG_PROTOCOL_VERSION
    assert_contained(host, bystander, link)


def test_unplug_with_the_device_model_gone(host: HostServices, bystander: SparseDomain,
                                           xen_guest_factory: Callable[..., XenDomain]) -> None:
    """The domain's QEMU died (its QMP socket is gone) and the guest writes the unplug mask: the write
    completes, the failure is logged against that domain, and dom0 carries on."""
    d = xen_guest_factory("default")
    register(d)
    d.machine.process.signal_group(signal.SIGKILL)
    wait_for(lambda: not d.machine.process.alive(), timeout=5, what="QEMU to die")
    d.link.pio_write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL)
    assert_contained(host, bystander, d.link)
    assert f"dom{d.domid}: device model unreachable; unplug of 0x3 not carried out" in xenhv_log(host)


# -- hypercalls, per class -------------------------------------------------------------------------

def _memory_op(g: SparseDomain) -> list[tuple[str, int, int]]:
    atp = X.XenAddToPhysmap
    return [
        ("unknown memory_op", g.hypercall("memory_op", 0x7777, OP), X.XEN_ENOSYS),
        ("increase_reservation (not modelled)", g.hypercall("memory_op", X.XENMEM_increase_reservation, OP),
         X.XEN_ENOSYS),
        ("unknown map space", g.hypercall("memory_op", X.XENMEM_add_to_physmap,
                                          g.put(OP, atp(domid=E.DOMID_SELF, space=99, gpfn=0xF0))), X.XEN_EINVAL),
        ("shared_info index 1", g.hypercall("memory_op", X.XENMEM_add_to_physmap, g.put(
            OP, atp(domid=E.DOMID_SELF, space=X.XENMAPSPACE_shared_info, idx=1, gpfn=0xF0))), X.XEN_EINVAL),
        ("grant frame past the maximum", g.hypercall("memory_op", X.XENMEM_add_to_physmap, g.put(
            OP, atp(domid=E.DOMID_SELF, space=X.XENMAPSPACE_grant_table, idx=1 << 40, gpfn=0xF0))), X.XEN_EINVAL),
        ("gpfn beyond 40 bits", g.hypercall("memory_op", X.XENMEM_add_to_physmap, g.put(
            OP, atp(domid=E.DOMID_SELF, space=X.XENMAPSPACE_shared_info, gpfn=(1 << 64) - 1))), X.XEN_EINVAL),
        ("another domain's physmap", g.hypercall("memory_op", X.XENMEM_add_to_physmap, g.put(
            OP, atp(domid=0, space=X.XENMAPSPACE_shared_info, gpfn=0xF0))), X.XEN_EPERM),
        ("a reserved domid", g.hypercall("memory_op", X.XENMEM_add_to_physmap, g.put(
            OP, atp(domid=0x7FF5, space=X.XENMAPSPACE_shared_info, gpfn=0xF0))), X.XEN_ESRCH),
    ]


def _hvm_op(g: SparseDomain) -> list[tuple[str, int, int]]:
    param = hvm.XenHvmParam
    return [
        ("unknown hvm_op", g.hypercall("hvm_op", 0x4242, OP), X.XEN_ENOSYS),
        ("param out of range", g.hypercall("hvm_op", hvm.HVMOP_get_param,
                                           g.put(OP, param(domid=E.DOMID_SELF, index=0xFFFFFFFF))), X.XEN_EINVAL),
        ("toolstack-only param", g.hypercall("hvm_op", hvm.HVMOP_set_param, g.put(
            OP, param(domid=E.DOMID_SELF, index=hvm.HVM_PARAM_STORE_PFN, value=1))), X.XEN_EPERM),
        ("another domain's param", g.hypercall("hvm_op", hvm.HVMOP_get_param,
                                               g.put(OP, param(domid=0, index=0))), X.XEN_EPERM),
    ]


def _sched_op(g: SparseDomain) -> list[tuple[str, int, int]]:
    return [
        ("unknown sched_op", g.hypercall("sched_op", 0xFFFFFFFF, OP), X.XEN_ENOSYS),
        ("remote_shutdown (not modelled)", g.hypercall("sched_op", X.SCHEDOP_remote_shutdown, OP), X.XEN_ENOSYS),
        ("unknown shutdown reason", g.hypercall("sched_op", X.SCHEDOP_shutdown,
                                                g.put(OP, X.SchedShutdown(reason=0x7FFFFFFF))), X.XEN_EINVAL),
    ]


def _event_channel_op(g: SparseDomain) -> list[tuple[str, int, int]]:
    def op(cmd: int, st: object) -> int:
        return g.hypercall("event_channel_op", cmd, g.put(OP, st))

    return [
        ("send on port 0", op(E.EVTCHNOP_send, E.EvtchnSend(port=0)), X.XEN_EINVAL),
        ("close of a port past the table", op(E.EVTCHNOP_close, E.EvtchnClose(port=1 << 31)), X.XEN_EINVAL),
        ("unmask past the table", op(E.EVTCHNOP_unmask, E.EvtchnUnmask(port=5000)), X.XEN_EINVAL),
        ("bind to a reserved domain", op(E.EVTCHNOP_bind_interdomain,
                                         E.EvtchnBindInterdomain(remote_dom=0x7FF4, remote_port=1)), X.XEN_ESRCH),
        ("bind to a port not offered", op(E.EVTCHNOP_bind_interdomain,
                                          E.EvtchnBindInterdomain(remote_dom=0, remote_port=1)), X.XEN_EINVAL),
        ("alloc_unbound for dom0", op(E.EVTCHNOP_alloc_unbound, E.EvtchnAllocUnbound(dom=0, remote_dom=0)),
         X.XEN_EPERM),
        ("virq out of range", op(E.EVTCHNOP_bind_virq, E.EvtchnBindVirq(virq=1000, vcpu=0)), X.XEN_EINVAL),
        ("ipi to a vcpu that does not exist", op(E.EVTCHNOP_bind_ipi, E.EvtchnBindIpi(vcpu=5)), X.XEN_ENOENT),
        ("status of dom0's port", op(E.EVTCHNOP_status, E.EvtchnStatus(dom=0, port=1)), X.XEN_EPERM),
        ("bind_pirq (not modelled)", op(E.EVTCHNOP_bind_pirq, E.EvtchnBindPirq(pirq=1)), X.XEN_ENOSYS),
        ("unknown event_channel_op", op(99, E.EvtchnSend(port=1)), X.XEN_ENOSYS),
    ]


def _grant_table_op(g: SparseDomain) -> list[tuple[str, int, int]]:
    setup = g.put(OP, G.GnttabSetupTable(dom=E.DOMID_SELF, nr_frames=1 << 20, frame_list=OP + 0x100))
    calls = [
        ("map_grant_ref (HVM guests map none here)", g.hypercall("grant_table_op", G.GNTTABOP_map_grant_ref, OP, 1),
         X.XEN_ENOSYS),
        ("unknown grant_table_op", g.hypercall("grant_table_op", 0x999, OP, 1), X.XEN_ENOSYS),
        ("a batch too large", g.hypercall("grant_table_op", G.GNTTABOP_query_size, OP, 1 << 32), X.XEN_EINVAL),
        # Per-op failures are a GNTST status in the op, the hypercall itself succeeds (as in Xen).
        ("setup_table of a million frames", g.hypercall("grant_table_op", G.GNTTABOP_setup_table, setup, 1), 0),
    ]
    assert g.get(G.GnttabSetupTable, setup).status < 0
    # Xen's gnttab_setup_table: a frame list it cannot write is GNTST_bad_virt_addr in the op, rc 0.
    unwritable = g.put(OP + 0x200, G.GnttabSetupTable(dom=E.DOMID_SELF, nr_frames=1, frame_list=1 << 52))
    calls.append(("setup_table with an unwritable frame list",
                  g.hypercall("grant_table_op", G.GNTTABOP_setup_table, unwritable, 1), 0))
    assert g.get(G.GnttabSetupTable, unwritable).status == G.GNTST_bad_virt_addr
    copy_op = G.GnttabCopy(len=4096, flags=G.GNTCOPY_source_gref)
    copy_op.source.u.ref, copy_op.source.domid, copy_op.dest.u.gmfn, copy_op.dest.domid = 7, 0, 2, E.DOMID_SELF
    g.put(OP, copy_op)
    calls.append(("copy from dom0's ungranted ref", g.hypercall("grant_table_op", G.GNTTABOP_copy, OP, 1), 0))
    assert g.get(G.GnttabCopy, OP).status < 0
    return calls


def _unknown_numbers(g: SparseDomain) -> list[tuple[str, int, int]]:
    return [(f"hypercall {nr:#x}", g.link.hypercall(nr, 1, 2, 3, 4, 5), X.XEN_ENOSYS)
            for nr in (0, 1, 2, 56, 63, 64, 0xFFFF, (1 << 64) - 1)]


def _bad_guest_addresses(g: SparseDomain) -> list[tuple[str, int, int]]:
    calls = []
    for gpa in (RAM, RAM - 2, RAM + (1 << 30), (1 << 52) - 8, (1 << 64) - 1):
        calls += [
            (f"add_to_physmap at {gpa:#x}", g.hypercall("memory_op", X.XENMEM_add_to_physmap, gpa), X.XEN_EFAULT),
            (f"get_param at {gpa:#x}", g.hypercall("hvm_op", hvm.HVMOP_get_param, gpa), X.XEN_EFAULT),
            (f"shutdown at {gpa:#x}", g.hypercall("sched_op", X.SCHEDOP_shutdown, gpa), X.XEN_EFAULT),
            (f"poll at {gpa:#x}", g.hypercall("sched_op", X.SCHEDOP_poll, gpa), X.XEN_EFAULT),
            (f"evtchn status at {gpa:#x}", g.hypercall("event_channel_op", E.EVTCHNOP_status, gpa), X.XEN_EFAULT),
            (f"query_size at {gpa:#x}", g.hypercall("grant_table_op", G.GNTTABOP_query_size, gpa, 1), X.XEN_EFAULT),
        ]
    return calls


HYPERCALL_CLASSES: dict[str, Callable[[SparseDomain], list[tuple[str, int, int]]]] = {
    "memory_op": _memory_op, "hvm_op": _hvm_op, "sched_op": _sched_op, "event_channel_op": _event_channel_op,
    "grant_table_op": _grant_table_op, "unknown numbers": _unknown_numbers,
    "bad guest addresses": _bad_guest_addresses,
}


@pytest.mark.parametrize("klass", list(HYPERCALL_CLASSES))
def test_hostile_hypercalls(klass: str, host: HostServices, bystander: SparseDomain,
                            sparse_domain: Callable[[], SparseDomain]) -> None:
    g = sparse_domain()
    results = HYPERCALL_CLASSES[klass](g)
    wrong = [(what, got, -want) for what, got, want in results if got != -want]
    assert not wrong, f"(request, result, expected): {wrong}"
    assert_contained(host, bystander, g.link)


def test_unknown_trap_kinds(host: HostServices, bystander: SparseDomain,
                            sparse_domain: Callable[[], SparseDomain]) -> None:
    g = sparse_domain()
    for kind in (0, max(TrapKind) + 1, 0xFFFFFFFF):
        g.link.sock.sendall(TRAP.pack(kind, 0, 1, 2, 3, 4, 5, 6))
        result, *_ = REPLY.unpack(g.link.sock.recv(REPLY.size))
        assert result == -X.XEN_ENOSYS, kind
    assert_contained(host, bystander, g.link)
