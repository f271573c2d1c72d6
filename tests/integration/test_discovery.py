"""Discovery and unplug on the real machine: pci.sys over the vCPU, XENFILT, XENBUS and its children."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.boot import boot_stack
from xenpv.stack.drivers.revision import XENBUS_REVISIONS, newest_first
from xenpv.stack.kernel import Registry
from xenpv.stack.vcpu.cpu import Vcpu

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _fresh_processor():
    """A bugchecked boot leaves its processor at HIGH_LEVEL; the next boot must not start on it."""
    from xenpv.stack.kernel.irql import Processor, set_current_processor
    previous = set_current_processor(Processor())
    yield
    set_current_processor(previous)


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


def _query(pdo, guid, version, size):
    """IRP_MN_QUERY_INTERFACE as a driver sends it: on the CPU (its kernel lock held), so the booted stack's
    own threads (the interrupt thread's DPCs, XENBUS's suspend thread) are not running kernel code at the same
    time, at whatever IRQL they are at (the lock is re-entrant: a DPC calling this already holds it)."""
    from xenpv.stack.kernel import (IRP_MN_PNP, Irp, IoSynchronousCallDriver, QueryInterfaceParameters,
                                    current_processor)
    with current_processor().lock:
        irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(guid, size, version, None))
        return IoSynchronousCallDriver(pdo, irp), irp.parameters.interface


def test_child_queries_every_interface_at_every_version(xen_guest_factory) -> None:
    from xenpv.stack.drivers.revision import CHILD_BINDS_XENBUS_REVISION
    from xenpv.stack.kernel.status import STATUS_BUFFER_OVERFLOW, STATUS_NOT_SUPPORTED, STATUS_SUCCESS
    d = xen_guest_factory("default")
    booted = _boot(d)
    try:
        fdo = booted.xenbus.active_fdo
        pdo = fdo.children["VIF"]
        for name, context in fdo.interfaces.items():
            wanted = XENBUS_REVISIONS[CHILD_BINDS_XENBUS_REVISION][name]
            for version in range(1, wanted + 1):
                if version in context.TABLES:
                    status, table = _query(pdo, context.GUID, version, 4096)
                    assert status == STATUS_SUCCESS and table.Version == version, (name, version)
                    assert _query(pdo, context.GUID, version, table.Size - 1)[0] == STATUS_BUFFER_OVERFLOW
            assert _query(pdo, context.GUID, context.max_version() + 1, 4096)[0] == STATUS_NOT_SUPPORTED
    finally:
        booted.close()


def test_unplug_on_the_second_boot_before_children_start(xen_guest_factory) -> None:
    from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE
    from xenpv.stack.drivers.xenfilt import GUID_XENFILT_EMULATED_INTERFACE
    from xenpv.stack.kernel.status import STATUS_SUCCESS as OK
    d = xen_guest_factory("default")
    registry = Registry()
    first = _boot(d, registry)
    try:
        fdo = first.xenbus.active_fdo
        for cls, kind in (("VBD", 2), ("VIF", 1)):
            status, unplug = _query(fdo.children[cls], GUID_XENBUS_UNPLUG_INTERFACE, 3, 4096)
            assert status == OK
            unplug.UnplugAcquire()
            unplug.UnplugRequest(kind, True)  # what XENVBD / XENVIF do at start
            unplug.UnplugRelease()
        assert [n.instance_id for n in first.nodes("IDE\\")] == ["0.0.0"]  # first boot: nothing unplugged
    finally:
        first.close()
    qmp = d.machine.qmp
    assert {b["qdev"]: "inserted" in b for b in qmp.command("query-block")}["hda"]
    second = _boot(d, registry)  # reboot: same hive, same machine
    try:
        assert second.xenfilt.unplugged_mask == 0xB
        assert {b["qdev"]: "inserted" in b for b in qmp.command("query-block")}["hda"] is False
        assert not [n for n in second.nodes("PCI\\") if "DEV_8139" in n.device_id]
        assert second.nodes(r"XENBUS\VEN_XP&DEV_VBD")
        # The drive is gone, so is its disk: no IDE disk node, and EMULATED (asked the way XENVBD asks,
        # from its PDO, delegated to XENFILT) no longer reports the primary master.
        assert not second.nodes("IDE\\")
        status, emulated = _query(second.xenbus.active_fdo.children["VBD"], GUID_XENFILT_EMULATED_INTERFACE, 3, 4096)
        assert status == OK and emulated.EmulatedIsDiskPresent(0) is False
    finally:
        second.close()


def test_query_interface_at_dispatch_bugchecks_naming_the_module(xen_guest_factory) -> None:
    from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE
    from xenpv.stack.kernel import PASSIVE_LEVEL, BugCheck, BugCheckCode, KeInitializeDpc, KeInsertQueueDpc
    d = xen_guest_factory("default")
    booted = _boot(d)
    try:
        pdo = booted.xenbus.active_fdo.children["VBD"]
        dpc = KeInitializeDpc(lambda *a: _query(pdo, GUID_XENBUS_UNPLUG_INTERFACE, 3, 4096), module="xenvbd.sys")
        # On the CPU, as a driver queues a DPC: without the lock, a thread of the booted stack that holds it
        # (at PASSIVE_LEVEL, about to wait) would find the IRQL this DPC raised and stop in its own module.
        with pytest.raises(BugCheck) as stop, booted.kernel.cpu.lock:
            KeInsertQueueDpc(dpc)
        assert stop.value.code == BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL
        assert booted.kernel.crash_dump(stop.value).module == "xenvbd.sys"
    finally:
        # The STOP was the harness's own doing in this process: un-stop the CPU so the drivers tear down and
        # let go of guest RAM (a real guest's machine would be gone with it).
        cpu = booted.kernel.cpu
        cpu.crashed, cpu.lock.stopped, cpu.irql = None, None, PASSIVE_LEVEL
        booted.close()


def _arm_unplug(booted) -> None:
    """What XENVBD and XENVIF do at start: UNPLUG.Request(T, TRUE) from their PDOs."""
    from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE
    fdo = booted.xenbus.active_fdo
    for cls, kind in (("VBD", 2), ("VIF", 1)):
        _, unplug = _query(fdo.children[cls], GUID_XENBUS_UNPLUG_INTERFACE, 3, 4096)
        unplug.UnplugAcquire()
        unplug.UnplugRequest(kind, True)
        unplug.UnplugRelease()


def test_boot_emulated_keeps_the_primary_master(xen_guest_factory) -> None:
    d = xen_guest_factory("default")
    registry = Registry()
    first = _boot(d, registry, boot_options=("BOOT_EMULATED",))
    try:
        _arm_unplug(first)
    finally:
        first.close()
    second = _boot(d, registry, boot_options=("BOOT_EMULATED",))
    try:
        assert second.xenfilt.unplugged_mask == 0x6  # AUX disks instead of 0x9, and NICs
        assert d.control("platform")["kept"] == ["hda"]
        assert [n.instance_id for n in second.nodes("IDE\\")] == ["0.0.0"]
        assert {b["qdev"]: "inserted" in b for b in d.machine.qmp.command("query-block")}["hda"]
    finally:
        second.close()


def test_a_vanished_class_loses_its_pdo(xen_guest_factory) -> None:
    import time

    from xenpv.backends.xenstored.client import XsClient
    d = xen_guest_factory("default")
    booted = _boot(d)
    try:
        assert booted.nodes(r"XENBUS\VEN_XP&DEV_VIF")
        with XsClient(d.host.xenstored_socket) as dom0:
            dom0.rm(f"/local/domain/{d.domid}/device/vif")
        deadline = time.monotonic() + 5.0
        while booted.nodes(r"XENBUS\VEN_XP&DEV_VIF"):
            assert time.monotonic() < deadline, "the VIF PDO is still there 5 s after device/vif went away"
            booted.poll()
            time.sleep(0.01)
        assert "VIF" not in booted.xenbus.active_fdo.children
        assert booted.nodes(r"XENBUS\VEN_XP&DEV_VBD")
    finally:
        booted.close()


def test_log_levels_reach_xen_and_qemu_debug_ports(xen_guest_factory) -> None:
    xen_parameters = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Parameters"
    d = xen_guest_factory("default")
    registry = Registry()
    registry.set_dword(xen_parameters, "QemuLogLevel", 1 << 0 | 1 << 1 | 1 << 3)  # ERROR, WARNING, INFO
    booted = _boot(d, registry)
    try:
        lines = d.control("platform")["log"]
        assert any(line.startswith("XEN|") and "loaded" in line for line in lines), lines[:10]
        assert any("FdoSetActive" in line and "ACTIVE" in line for line in lines)
    finally:
        booted.close()
