"""The platform unplug model on the real QEMU: the guest's port protocol through the vCPU to xenhv,
and QEMU really losing the devices (checked over QMP and by re-enumerating PCI)."""
from __future__ import annotations

import pytest

from xenpv.stack.vcpu.pci import PciBus
from xenpv.xenabi import unplug as U

pytestmark = pytest.mark.integration


def register(vcpu, product: int = 0xFFFF, build: int = 0x090100) -> None:
    """The driver side of the protocol up to the mask write (reference windows-pv-drivers.md 6)."""
    assert vcpu.inw(U.UNPLUG_PORT_MAGIC) == U.UNPLUG_MAGIC
    assert vcpu.inb(U.UNPLUG_PORT_VERSION) == U.UNPLUG_PROTOCOL_VERSION
    vcpu.outw(U.UNPLUG_PORT_PRODUCT, product)
    vcpu.outl(U.UNPLUG_PORT_BUILD, build)
    assert vcpu.inw(U.UNPLUG_PORT_MAGIC) == U.UNPLUG_MAGIC  # not blacklisted


def nics(qmp) -> list[str]:
    return [d["qdev_id"] for b in qmp.command("query-pci") for d in b["devices"] if d["class_info"]["class"] == 0x0200]


def inserted(qmp) -> dict[str, bool]:
    return {b["qdev"]: "inserted" in b for b in qmp.command("query-block")}


def test_unplug_all_removes_nics_and_ide_disks_but_not_the_cdrom(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    m, vcpu = d.machine, d.vcpu
    nic_slot = next(f.slot for f in PciBus(vcpu).enumerate() if f.class_code >> 8 == 0x0200)
    register(vcpu)
    vcpu.outw(U.UNPLUG_PORT_MASK, U.UNPLUG_ALL_IDE_DISKS | U.UNPLUG_ALL_NICS)
    m.qmp.wait_event("DEVICE_DELETED", timeout=5, match={"device": "nic0"}, alive=[m.process])
    assert nics(m.qmp) == []
    assert inserted(m.qmp) == {"hda": False, "cd0": True}
    assert PciBus(vcpu).read(nic_slot, 0, 0) == 0xFFFFFFFF  # the ejected slot, through config space
    assert not [f for f in PciBus(vcpu).enumerate() if f.class_code >> 8 == 0x0200]
    state = d.control("platform")
    assert (state["product"], state["build"], state["unplugged_mask"]) == (0xFFFF, 0x090100, 3)
    assert (state["nics"], state["disks"]) == (["nic0"], ["hda"])


def test_aux_unplug_keeps_the_primary_master(xen_guest_factory) -> None:
    d = xen_guest_factory("two-disks-two-nics")
    register(d.vcpu)
    d.vcpu.outw(U.UNPLUG_PORT_MASK, U.UNPLUG_AUX_IDE_DISKS)
    assert inserted(d.machine.qmp) == {"hda": True, "hdb": False}
    assert sorted(nics(d.machine.qmp)) == ["nic0", "nic1"]
    assert d.control("platform")["kept"] == ["hda"]


def test_nics_only(xen_guest_factory) -> None:
    d = xen_guest_factory("two-disks-two-nics")
    register(d.vcpu)
    d.vcpu.outw(U.UNPLUG_PORT_MASK, U.UNPLUG_ALL_NICS)
    m = d.machine
    for nic in ("nic0", "nic1"):
        m.qmp.wait_event("DEVICE_DELETED", timeout=5, match={"device": nic}, alive=[m.process])
    assert nics(m.qmp) == []
    assert inserted(m.qmp) == {"hda": True, "hdb": True}


def test_log_port_collects_lines(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    for ch in b"XEN: hello from the guest\n":
        d.vcpu.outb(U.UNPLUG_PORT_LOG, ch)
    assert d.control("platform")["log"] == ["XEN: hello from the guest"]


def test_without_a_platform_device_the_ports_are_not_there(xen_guest_factory) -> None:
    d = xen_guest_factory("no-platform")
    assert not d.link.platform_ports
    assert d.vcpu.inw(U.UNPLUG_PORT_MAGIC) == 0xFFFF  # unassigned port I/O on QEMU
    d.vcpu.outw(U.UNPLUG_PORT_MASK, U.UNPLUG_ALL)  # goes to QEMU, where nothing listens
    assert nics(d.machine.qmp) == ["nic0"]
    assert inserted(d.machine.qmp) == {"hda": True}
