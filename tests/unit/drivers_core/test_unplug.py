"""xen.sys unplug (reference 6) and XenTouch (reference 5(d)): the registry counters read and deleted at
load, the veto, ForceUnplug, the port protocol and masks (BOOT_EMULATED), and the blocked driver."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.xen import PACKAGE_VERSION, UNPLUG_DISKS, UNPLUG_NICS, Xen
from xenpv.stack.drivers.xen.unplug import ENUM_XENBUS, FORCE_UNPLUG_KEY, UNPLUG_KEY
from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE
from xenpv.stack.kernel import IRP_MN_PNP, Irp, IoSynchronousCallDriver, QueryInterfaceParameters, Registry, RegistryError
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.pnp import CmProblem
from xenpv.stack.kernel.status import STATUS_INCOMPATIBLE_DRIVER_BLOCKED, STATUS_SUCCESS
from xenpv.xenabi import unplug as U

CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"
XEN_PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Parameters"


def _value(registry: Registry, key: str, name: str) -> int | None:
    try:
        return registry.get_dword(key, name)
    except RegistryError:
        return None


def _with_children(*classes: str) -> Registry:
    registry = Registry()
    for device_class in classes:
        registry.create_key(f"{ENUM_XENBUS}\\VEN_XP&DEV_{device_class}\\_")
    return registry


@pytest.mark.parametrize("children,unplug,force,requested", [
    (("VBD", "VIF"), {"DISKS": 1, "NICS": 2}, {}, {UNPLUG_DISKS: True, UNPLUG_NICS: True}),
    (("VBD",), {"DISKS": 1, "NICS": 1}, {}, {UNPLUG_DISKS: True, UNPLUG_NICS: False}),  # no VIF: NICS vetoed
    ((), {"DISKS": 1, "NICS": 1}, {}, {UNPLUG_DISKS: False, UNPLUG_NICS: False}),  # the 0x7B guard
    ((), {}, {"DISKS": 1}, {UNPLUG_DISKS: True, UNPLUG_NICS: False}),  # ForceUnplug needs no child
    ((), {"NICS": 3}, {"NICS": 1}, {UNPLUG_DISKS: False, UNPLUG_NICS: True}),  # ForceUnplug overrides the veto
    (("VBD", "VIF"), {"DISKS": 0}, {"DISKS": 0}, {UNPLUG_DISKS: False, UNPLUG_NICS: False}),
])
def test_counters_read_and_deleted_at_load(machine, children, unplug, force, requested) -> None:
    registry = _with_children(*children)
    for name, value in unplug.items():
        registry.set_dword(UNPLUG_KEY, name, value)
    for name, value in force.items():
        registry.set_dword(FORCE_UNPLUG_KEY, name, value)
    xen = Xen.load(registry, DebugLog(), machine(0x0001))
    assert {t: xen.unplug.UnplugIsRequested(t) for t in (UNPLUG_DISKS, UNPLUG_NICS)} == requested
    assert {n: _value(registry, UNPLUG_KEY, n) for n in ("DISKS", "NICS")} == {"DISKS": None, "NICS": None}
    assert {n: _value(registry, FORCE_UNPLUG_KEY, n) for n in force} == force  # installer policy: kept


def test_vetoed_request_is_logged(machine) -> None:
    registry = Registry()
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    debug_log = DebugLog()
    Xen.load(registry, debug_log, machine(0x0001))
    assert any("DISKS = 1 VETOED: no VBD device" in line for line in debug_log.tail(50))


def test_request_counts_up_and_down_for_the_next_boot(machine) -> None:
    registry = Registry()
    xen = Xen.load(registry, DebugLog(), machine(0x0001))
    unplug = xen.unplug
    unplug.UnplugRequest(UNPLUG_DISKS, True)
    unplug.UnplugRequest(UNPLUG_DISKS, True)
    unplug.UnplugRequest(UNPLUG_DISKS, False)
    unplug.UnplugRequest(UNPLUG_NICS, False)  # never below zero
    assert (_value(registry, UNPLUG_KEY, "DISKS"), _value(registry, UNPLUG_KEY, "NICS")) == (1, 0)
    assert not unplug.UnplugIsRequested(UNPLUG_DISKS)  # this boot was decided at load


@pytest.mark.parametrize("options,masks", [("", [0x9, 0x2]), ("XEN:BOOT_EMULATED=TRUE", [0x4, 0x2])])
def test_port_protocol_and_masks(machine, options: str, masks: list[int]) -> None:
    registry = _with_children("VBD", "VIF")
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    registry.set_dword(UNPLUG_KEY, "NICS", 1)
    if options:
        registry.set_sz(CONTROL_KEY, "SystemStartOptions", f"/NOEXECUTE=OPTIN {options}")
    m = machine(0x0001)
    xen = Xen.load(registry, DebugLog(), m)
    assert xen.options.boot_emulated == bool(options)
    assert xen.unplug.UnplugDevices() == masks[0] | masks[1]
    major, minor, micro, _ = PACKAGE_VERSION
    assert m.product == U.PvdriversProduct.EXPERIMENTAL and m.build == major << 16 | minor << 8 | micro
    assert m.unplug_writes == masks


def test_nothing_requested_writes_no_mask(machine) -> None:
    m = machine(0x0001)
    xen = Xen.load(Registry(), DebugLog(), m)
    assert xen.unplug.UnplugDevices() == 0
    assert m.unplug_writes == [] and m.build is None


def test_without_the_platform_ports_the_preamble_says_unsupported(machine) -> None:
    registry = _with_children("VBD")
    registry.set_dword(FORCE_UNPLUG_KEY, "DISKS", 1)
    m = machine()  # a Xen guest with no platform PCI device: the ports read 0xFFFF
    debug_log = DebugLog()
    xen = Xen.load(registry, debug_log, m)
    assert xen.unplug.UnplugDevices() == 0 and m.unplug_writes == []
    assert any("protocol not supported" in line for line in debug_log.tail(50))


def test_outside_xen_the_modules_quiesce(machine) -> None:
    registry = Registry()
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    xen = Xen.load(registry, DebugLog(), machine(0x0001, xen=False))
    assert not xen.is_xen and xen.unplug.requests == {}
    assert _value(registry, UNPLUG_KEY, "DISKS") == 1  # nothing read: not a Xen boot


def test_boot_emulated_keeps_the_primary_master_across_the_second_boot(rig, machine) -> None:
    registry = Registry()
    m = machine(0x0001)
    first = rig.boot(m, registry, boot_options=("BOOT_EMULATED",))
    _arm_children(first)
    second = rig.boot(m, registry, boot_options=("BOOT_EMULATED",))
    assert m.unplug_writes == [0x4, 0x2]
    assert [n.instance_id for n in second.nodes("IDE\\")] == ["0.0.0"]
    assert not [n for n in second.nodes("PCI\\") if "DEV_8139" in n.device_id]


def test_full_unplug_on_the_second_boot_removes_the_ide_disk(rig, machine) -> None:
    registry = Registry()
    m = machine(0x0001)
    first = rig.boot(m, registry)
    assert m.unplug_writes == [] and [n.instance_id for n in first.nodes("IDE\\")] == ["0.0.0"]
    _arm_children(first)
    second = rig.boot(m, registry)
    assert m.unplug_writes == [0x9, 0x2] and second.xenfilt.unplugged_mask == 0xB
    assert second.nodes("IDE\\") == []
    assert not second.xenfilt.emulated.EmulatedIsDiskPresent(0)


def _arm_children(booted) -> None:
    """What XENVBD and XENVIF do at start: UNPLUG.Request(T, TRUE) through their PDO's UNPLUG v3."""
    fdo = booted.xenbus.active_fdo
    with booted.kernel.cpu.lock:
        for device_class, device_type in (("VBD", UNPLUG_DISKS), ("VIF", UNPLUG_NICS)):
            irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(GUID_XENBUS_UNPLUG_INTERFACE, 4096, 3, None))
            assert IoSynchronousCallDriver(fdo.children[device_class], irp) == STATUS_SUCCESS
            unplug = irp.parameters.interface
            assert unplug.UnplugAcquire() == STATUS_SUCCESS
            unplug.UnplugRequest(device_type, True)
            unplug.UnplugRelease()


def test_xentouch_mismatch_blocks_xenbus_and_requests_a_reboot(rig, machine) -> None:
    registry = Registry()
    m = machine(0x0001)
    built_for = PACKAGE_VERSION[:3] + (PACKAGE_VERSION[3] + 1,)
    booted = rig.boot(m, registry, module_versions={"XENFILT": built_for, "XENBUS": built_for})
    assert booted.xen.XenTouch("XENBUS", *built_for) == STATUS_INCOMPATIBLE_DRIVER_BLOCKED
    node = next(n for n in booted.nodes("PCI\\VEN_5853"))
    assert node.problem != CmProblem.NONE and node.problem_status == STATUS_INCOMPATIBLE_DRIVER_BLOCKED
    assert booted.xen.config.reboot_requested("XENBUS")
    assert booted.xenbus.fdos == [] and booted.nodes("XENBUS\\") == []
    # XENFILT loaded but inert: nothing gated, nothing unplugged, the emulated boot disk is there.
    assert booted.xenfilt.fdos == [] and m.unplug_writes == []
    assert [n.instance_id for n in booted.nodes("IDE\\")] == ["0.0.0"]
    log = "\n".join(booted.kernel.log.tail(100))
    assert "MODULE 'XENBUS' NOT COMPATIBLE (REBOOT REQUIRED)" in log
    assert "MODULE 'XENFILT' NOT COMPATIBLE (REBOOT REQUIRED)" in log


def test_debug_log_levels_reach_the_xen_and_qemu_ports(machine) -> None:
    registry = Registry()
    registry.set_dword(XEN_PARAMETERS, "XenLogLevel", 1 << 0 | 1 << 1)  # ERROR, WARNING
    registry.set_dword(XEN_PARAMETERS, "QemuLogLevel", 1 << 3)  # INFO
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)  # vetoed: a WARNING
    m = machine(0x0001)
    Xen.load(registry, DebugLog(), m)
    assert any("VETOED" in line for line in m.xen_console)
    assert not any("loaded" in line for line in m.xen_console)
    assert any("loaded" in line for line in m.qemu_log)
    assert not any("VETOED" in line for line in m.qemu_log)
