"""xen.sys unplug (reference 6) and XenTouch (reference 5(d)): the registry counters read and deleted at
load, the veto, ForceUnplug, the port protocol and masks (BOOT_EMULATED), and the blocked driver."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.xen import PACKAGE_VERSION, Xen
from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE
from xenpv.stack.kernel import IRP_MN_PNP, Irp, IoSynchronousCallDriver, QueryInterfaceParameters, Registry, RegistryError
from xenpv.stack.kernel.assertion import STATUS_ASSERTION_FAILURE, set_build
from xenpv.stack.kernel.bugcheck import BugCheck, BugCheckCode
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.pnp import CmProblem
from xenpv.stack.kernel.status import (STATUS_INCOMPATIBLE_DRIVER_BLOCKED, STATUS_INVALID_PARAMETER,
                                       STATUS_NOT_SUPPORTED, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS)
from xenpv.xenabi import unplug as U

# The contract, written out rather than imported from the code under test: XENBUS's unplug_interface.h
# device types and the registry keys xen.sys and the co-installers share.
UNPLUG_NICS, UNPLUG_DISKS = 1, 2
UNPLUG_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Unplug"
FORCE_UNPLUG_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\ForceUnplug"
ENUM_XENBUS = r"HKLM\SYSTEM\CurrentControlSet\Enum\XENBUS"

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
    unplug.UnplugRequest(UNPLUG_DISKS, True)  # a missing value counts as 0
    unplug.UnplugRequest(UNPLUG_DISKS, True)
    unplug.UnplugRequest(UNPLUG_DISKS, False)
    unplug.UnplugRequest(UNPLUG_NICS, False)  # missing: fails, writes nothing (see the next test)
    assert (_value(registry, UNPLUG_KEY, "DISKS"), _value(registry, UNPLUG_KEY, "NICS")) == (1, None)
    assert not unplug.UnplugIsRequested(UNPLUG_DISKS)  # this boot was decided at load


@pytest.mark.parametrize("stored,status", [(None, STATUS_OBJECT_NAME_NOT_FOUND), (0, STATUS_INVALID_PARAMETER),
                                           (0x80000000, STATUS_INVALID_PARAMETER),
                                           (0xFFFFFFFF, STATUS_INVALID_PARAMETER)])
def test_decrementing_a_missing_or_zero_counter_fails_and_writes_nothing(machine, stored, status) -> None:
    """XB src/xen/unplug.c UnplugDecrementValue: the query fails (fail1) or --Value < 0 on the LONG
    (fail2, STATUS_INVALID_PARAMETER); RegistryUpdateDwordValue is never reached."""
    registry = Registry()
    xen = Xen.load(registry, DebugLog(), machine(0x0001))
    if stored is not None:
        registry.set_dword(UNPLUG_KEY, "NICS", stored)
    assert xen.unplug.UnplugDecrementValue(UNPLUG_NICS) == status
    assert _value(registry, UNPLUG_KEY, "NICS") == stored
    registry.set_dword(UNPLUG_KEY, "NICS", 2)
    assert xen.unplug.UnplugDecrementValue(UNPLUG_NICS) == STATUS_SUCCESS
    assert _value(registry, UNPLUG_KEY, "NICS") == 1


def test_the_enum_check_matches_the_class_case_sensitively(machine) -> None:
    """XB src/xen/unplug.c UnplugCheckEnumKeyCallback: strstr(Name, "VBD"), so only an upper-case class
    name in an Enum\\XENBUS key keeps the request."""
    registry = _with_children("vbd")
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    xen = Xen.load(registry, DebugLog(), machine(0x0001))
    assert not xen.unplug.UnplugIsRequested(UNPLUG_DISKS)


@pytest.mark.parametrize("blacklisted_at", ["first read", "after registration"])
def test_blacklisted_magic_sets_blacklisted_and_the_masks_are_still_written(machine, blacklisted_at) -> None:
    """XB src/xen/unplug.c UnplugPreamble: 0xd249 sets Context->BlackListed and returns STATUS_SUCCESS;
    UnplugDevices then writes each requested mask regardless."""
    registry = _with_children("VBD", "VIF")
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    registry.set_dword(UNPLUG_KEY, "NICS", 1)
    m = machine(0x0001)
    debug_log = DebugLog()
    xen = Xen.load(registry, debug_log, m)
    if blacklisted_at == "first read":
        m.magic = U.UNPLUG_MAGIC_BLACKLISTED
    else:
        real_out = m._out

        def blacklist_on_build(port: int, size: int, value: int) -> None:
            real_out(port, size, value)
            if port == U.UNPLUG_PORT_BUILD:
                m.magic = U.UNPLUG_MAGIC_BLACKLISTED
        m._out = blacklist_on_build  # type: ignore[method-assign]
    assert xen.unplug.UnplugDevices() == 0xB
    assert m.unplug_writes == [0x9, 0x2] and xen.unplug.blacklisted
    # Blacklisted on the first read: no product/build registration happens.
    assert (m.build is None) == (blacklisted_at == "first read")
    assert any("PRE-AMBLE (DRIVERS BLACKLISTED)" in line for line in debug_log.tail(50))


def test_the_preamble_runs_at_every_unplug(machine) -> None:
    """UnplugDevices calls UnplugPreamble each time (boot, then each resume in a new domain)."""
    registry = _with_children("VBD")
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    m = machine(0x0001)
    xen = Xen.load(registry, DebugLog(), m)
    xen.unplug.UnplugDevices()
    m.build = None
    xen.unplug.UnplugDevices()
    assert m.build is not None and m.unplug_writes == [0x9, 0x9]


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
    # UnplugDevices runs the preamble whatever was requested: the build registers, no mask is written.
    assert m.unplug_writes == [] and m.build is not None


def test_without_the_platform_ports_the_preamble_says_unsupported(machine) -> None:
    """XB src/xen/unplug.c UnplugDevices: the preamble's STATUS_NOT_SUPPORTED is only ASSERTed, so the
    free build still writes the masks, here to a port nothing serves."""
    registry = _with_children("VBD")
    registry.set_dword(FORCE_UNPLUG_KEY, "DISKS", 1)
    m = machine()  # a Xen guest with no platform PCI device: the ports read 0xFFFF
    debug_log = DebugLog()
    xen = Xen.load(registry, debug_log, m)
    assert xen.unplug.UnplugPreamble() == STATUS_NOT_SUPPORTED
    assert xen.unplug.UnplugDevices() == 0x9 and m.unplug_writes == []  # nobody listens on port 0x10
    assert any("protocol not supported" in line for line in debug_log.tail(50))


def test_an_unsupported_preamble_stops_a_checked_build(machine) -> None:
    """The same ASSERT(NT_SUCCESS(status)) in a checked build (src/common/assert.h): STATUS_ASSERTION_FAILURE
    unhandled in the calling thread, before any mask is written."""
    registry = _with_children("VBD")
    registry.set_dword(FORCE_UNPLUG_KEY, "DISKS", 1)
    xen = Xen.load(registry, DebugLog(), machine())
    set_build("checked")
    try:
        with pytest.raises(BugCheck) as stop:
            xen.unplug.UnplugDevices()
    finally:
        set_build("free")
    assert stop.value.code == BugCheckCode.SYSTEM_THREAD_EXCEPTION_NOT_HANDLED
    assert stop.value.params[0] == STATUS_ASSERTION_FAILURE and xen.unplug.unplugged_mask == 0
    assert stop.value.module == "xen.sys" and stop.value.message == "ASSERTION FAILED: NT_SUCCESS(status)"


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
    # XB driver.c DriverEntry: FiltersInstall, ConfigRequestReboot, then STATUS_SUCCESS with no AddDevice.
    node = next(n for n in booted.nodes("PCI\\VEN_5853"))
    assert node.problem == CmProblem.FAILED_ADD and node.problem_status == STATUS_NOT_SUPPORTED
    assert "XENBUS" not in booted.kernel.pnp.failed_drivers
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


@pytest.mark.parametrize("stored", [1, 3, 0x7FFFFFFF])
def test_decrementing_a_positive_counter_writes_one_less(machine, stored: int) -> None:
    """The LONG is positive below 0x80000000, odd or even: --Value is written back."""
    registry = Registry()
    xen = Xen.load(registry, DebugLog(), machine(0x0001))
    registry.set_dword(UNPLUG_KEY, "DISKS", stored)
    assert xen.unplug.UnplugDecrementValue(UNPLUG_DISKS) == STATUS_SUCCESS
    assert _value(registry, UNPLUG_KEY, "DISKS") == stored - 1


def test_a_type_nobody_requested_is_not_requested_and_a_fresh_context_is_neither_blacklisted_nor_emulated(
        machine) -> None:
    xen = Xen.load(Registry(), DebugLog(), machine(0x0001))
    unplug = xen.unplug
    unplug.requests.clear()  # as before DllInitialize's UnplugSetRequest calls
    assert not unplug.UnplugIsRequested(UNPLUG_DISKS) and not unplug.UnplugIsRequested(UNPLUG_NICS)
    assert (unplug.blacklisted, unplug.boot_emulated) == (False, False)  # no BOOT_EMULATED option here
    assert unplug.disks_mask() == U.UNPLUG_ALL_IDE_DISKS | U.UNPLUG_NVME_DISKS


def test_outside_xen_unplug_devices_writes_nothing(machine) -> None:
    xen = Xen.load(Registry(), DebugLog(), machine(0x0001, xen=False))
    xen.unplug.requests[UNPLUG_DISKS] = True
    assert xen.unplug.UnplugDevices() == 0 and xen.unplug.unplugged_mask == 0


def test_the_unplugged_mask_keeps_what_every_unplug_wrote(machine) -> None:
    """UnplugDevices runs at boot and again on resume from S4; what it wrote accumulates."""
    registry = _with_children("VBD", "VIF")
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    xen = Xen.load(registry, DebugLog(), machine(0x0001))
    disks = xen.unplug.UnplugDevices()
    assert disks and xen.unplug.unplugged_mask == disks
    xen.unplug.requests = {UNPLUG_NICS: True}
    nics = xen.unplug.UnplugDevices()
    assert nics == U.UNPLUG_ALL_NICS and xen.unplug.unplugged_mask == disks | nics
