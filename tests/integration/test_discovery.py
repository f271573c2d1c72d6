"""Discovery and unplug on the real machine: pci.sys over the vCPU, XENFILT, XENBUS and its children."""
from __future__ import annotations

import pytest

from stack.drivers.boot import boot_stack
from stack.drivers.revision import XENBUS_REVISIONS, newest_first
from stack.kernel import Registry
from stack.vcpu.cpu import Vcpu

pytestmark = pytest.mark.integration


def _boot(d, registry=None, **kw):
    return boot_stack(d.vcpu, d.machine.guest.memory_mib * 256 if hasattr(d.machine, "guest") else 128 * 256,
                      registry=registry or Registry(), **kw)


@pytest.mark.parametrize("shape,active", [("default", "0001"), ("xenserver-0002", "0002"), ("vendor-c000", "C000")])
def test_active_fdo_and_children_ids(xen_guest_factory, shape: str, active: str) -> None:
    d = xen_guest_factory(shape)
    booted = _boot(d)
    try:
        fdo = booted.xenbus.active_fdo
        assert fdo is not None and f"DEV_{active}" in fdo.device_id
        assert sum(f.active for f in booted.xenbus.fdos) == 1
        children = {n.device_id: n for n in booted.nodes("XENBUS\\")}
        assert r"XENBUS\VEN_XP&DEV_VBD" in children and r"XENBUS\VEN_XP&DEV_IFACE" in children
        node = children[r"XENBUS\VEN_XP&DEV_IFACE"]
        assert node.instance_id == "_"
        assert node.hardware_ids == [f"XENBUS\\VEN_XP{active}&DEV_IFACE&REV_{r:08X}"
                                     for r in newest_first(XENBUS_REVISIONS)] + ["XENCLASS"]
    finally:
        booted.close()


def test_no_platform_boots_without_unplug(guest_factory) -> None:
    m = guest_factory("no-platform")
    booted = boot_stack(Vcpu(m.qtest, m.memory, None), 128 * 256, registry=Registry())
    assert [n.instance_id for n in booted.nodes("IDE\\")] == ["0.0.0"]
    assert booted.xenbus.fdos == []
