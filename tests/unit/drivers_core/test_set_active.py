"""FdoSetActive (reference 4): exactly one XENBUS FDO works; which one follows the registry and XENFILT."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.xen.config import XENFILT_PARAMETERS, Config
from xenpv.stack.drivers.xenfilt.emulated import EmulatedStatus
from xenpv.stack.kernel import Registry, RegistryError
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

DEV_0001 = r"PCI\VEN_5853&DEV_0001&SUBSYS_00015853&REV_01"
DEV_0002 = r"PCI\VEN_5853&DEV_0002&SUBSYS_00015853&REV_01"
DEV_C000 = r"PCI\VEN_5853&DEV_C000&SUBSYS_C0005853&REV_01"
VENDOR_ENUM_KEY = r"HKLM\SYSTEM\CurrentControlSet\Enum\PCI" + "\\" + DEV_C000.removeprefix("PCI\\")
PRECEDENCE = XENFILT_PARAMETERS + r"\Precedence"


def _states(booted) -> dict[str, bool]:
    return {f"{f.pci_device_id:04X}": f.active for f in booted.xenbus.fdos}


def _active_value(registry: Registry, name: str) -> str | None:
    try:
        return registry.get_sz(XENFILT_PARAMETERS, name)
    except RegistryError:
        return None


def test_first_fdo_wins_and_records_the_active_device(rig, machine) -> None:
    registry = Registry()
    booted = rig.boot(machine(0x0001, 0x0002), registry)
    assert _states(booted) == {"0001": True, "0002": False}
    assert _active_value(registry, "ActiveDeviceID") == DEV_0001
    assert _active_value(registry, "ActiveInstanceID") == "3&0&0&10"
    assert _active_value(registry, "ActiveLocationInformation") == "PCI bus 0, device 2, function 0"
    # The inert FDO has no interfaces and no children.
    inactive = next(f for f in booted.xenbus.fdos if not f.active)
    assert inactive.interfaces == {} and inactive.children == {} and inactive.platform is None
    assert len(rig.platforms) == 1


def test_the_stored_active_device_id_wins_and_missing_values_are_filled(rig, machine) -> None:
    registry = Registry()
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_0002.lower())  # stricmp
    registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", "3&0&0&18")
    booted = rig.boot(machine(0x0001, 0x0002), registry)
    assert _states(booted) == {"0001": False, "0002": True}
    assert _active_value(registry, "ActiveDeviceID") == DEV_0002.lower()  # UpdateActive leaves the ID alone
    assert _active_value(registry, "ActiveLocationInformation") == "PCI bus 0, device 3, function 0"


def test_a_stored_active_device_id_without_instance_id_hides_the_device(rig, machine) -> None:
    """XB xenfilt pdo.c PdoSetDeviceInformation: the active (NEUTRAL) PDO takes ActiveInstanceID, and
    when that value is missing PdoCreate fails (fail2): no filter PDO, so the device is never reported
    and XENBUS never sees it; the other platform device, not the stored one, stays inactive."""
    registry = Registry()
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_0002)
    booted = rig.boot(machine(0x0001, 0x0002), registry)
    assert _states(booted) == {"0001": False}
    assert not [n for n in booted.nodes("PCI\\VEN_5853&DEV_0002")]
    assert booted.nodes("XENBUS\\") == []
    assert any("ActiveInstanceID is missing: fail2" in line for line in booted.kernel.log.tail(200))


def test_the_active_pdo_reports_the_stored_instance_id(rig, machine) -> None:
    """XB xenfilt pdo.c: the active NEUTRAL PDO reports ActiveInstanceID (the instance path stays stable
    when the device moves slot), while a FORCE_ACTIVATED one keeps its real InstanceID."""
    registry = Registry()
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_0001)
    registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", "3&0&0&99")
    booted = rig.boot(machine(0x0001), registry)
    assert [n.instance_id for n in booted.nodes("PCI\\VEN_5853")] == ["3&0&0&99"]
    registry = Registry()
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_0001)
    registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", "3&0&0&99")
    registry.set_dword(PRECEDENCE, r"PCI\VEN_5853&DEV_0001", 1)
    booted = rig.boot(machine(0x0001), registry)
    assert [n.instance_id for n in booted.nodes("PCI\\VEN_5853")] == ["3&0&0&10"]


def test_a_stored_active_device_that_is_absent_leaves_every_fdo_inert(rig, machine) -> None:
    registry = Registry()
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_C000)
    booted = rig.boot(machine(0x0001), registry)
    assert _states(booted) == {"0001": False}
    assert booted.nodes("XENBUS\\") == []
    assert booted.xenfilt.unplugged_mask == 0  # no active device present: nothing is unplugged


def test_legacy_device_refused_when_the_vendor_device_enum_key_exists(rig, machine) -> None:
    registry = Registry()
    registry.create_key(VENDOR_ENUM_KEY)  # the vendor device was seen on an earlier boot
    booted = rig.boot(machine(0x0001), registry)
    assert _states(booted) == {"0001": False}
    assert _active_value(registry, "ActiveDeviceID") is None
    assert any("legacy device" in line for line in booted.kernel.log.tail(200))


def test_vendor_device_before_legacy_one_is_active(rig, machine) -> None:
    registry = Registry()
    booted = rig.boot(machine(0xC000, 0x0001), registry)
    assert _states(booted) == {"C000": True, "0001": False}
    assert _active_value(registry, "ActiveDeviceID") == DEV_C000


def test_precedence_force_activates_the_highest_and_deactivates_the_rest(rig, machine) -> None:
    registry = Registry()
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_0001)  # overridden by the forced status
    registry.set_dword(PRECEDENCE, r"PCI\VEN_5853&DEV_0001", 1)
    registry.set_dword(PRECEDENCE, r"PCI\VEN_5853&DEV_0002", 2)
    booted = rig.boot(machine(0x0001, 0x0002), registry)
    assert _states(booted) == {"0001": False, "0002": True}
    statuses = {d.device_id: d.status for d in booted.xenfilt.emulated.devices if "VEN_5853" in d.device_id}
    assert statuses == {DEV_0001: EmulatedStatus.FORCE_DEACTIVATED, DEV_0002: EmulatedStatus.FORCE_ACTIVATED}
    assert _active_value(registry, "ActiveDeviceID") == DEV_0002  # SetActive, not UpdateActive
    # IsDevicePresent(NULL) names the force-activated device.
    assert booted.xenfilt.emulated.EmulatedIsDevicePresent(None, None) == (True, EmulatedStatus.FORCE_ACTIVATED)


def test_without_precedence_every_device_is_neutral(rig, machine) -> None:
    booted = rig.boot(machine(0x0001, 0xC000))
    assert {d.status for d in booted.xenfilt.emulated.devices} == {EmulatedStatus.NEUTRAL}
    assert booted.xenfilt.emulated.EmulatedIsDevicePresent(None, None) == (False, EmulatedStatus.NEUTRAL)


def test_removing_the_active_fdo_clears_the_active_device(rig, machine) -> None:
    registry = Registry()
    booted = rig.boot(machine(0x0001), registry)
    node = booted.xenbus.active_fdo.pdo.device_node
    with booted.kernel.cpu.lock:
        booted.kernel.pnp.remove(node)
    assert booted.xenbus.fdos == []
    assert _active_value(registry, "ActiveDeviceID") is None
    assert _active_value(registry, "ActiveInstanceID") is None
    assert _active_value(registry, "ActiveLocationInformation") is not None  # config.c keeps it
    assert rig.platforms[0].closed


# -- the legacy-device refusal lives in ConfigSetActive and ConfigUpdateActive (XB src/xen/config.c) --

@pytest.mark.parametrize("device_id,vendor_seen,vendor_device_id,refused", [
    (DEV_0001, True, 0xC000, True),
    (DEV_0001, False, 0xC000, False),   # no vendor Enum key: __ConfigIsVendorDevicePresent is FALSE
    (DEV_C000.lower(), True, 0xC000, False),  # _strnicmp: the vendor device is never legacy
    (DEV_0001, True, None, False),      # built without VENDOR_DEVICE_ID: never refused
])
def test_config_set_and_update_active_refuse_a_legacy_device(device_id, vendor_seen, vendor_device_id,
                                                              refused) -> None:
    """config.c ConfigSetActive / ConfigUpdateActive: fail2 (STATUS_UNSUCCESSFUL) before any write when
    __ConfigIsDeviceLegacy(DeviceID) && __ConfigIsVendorDevicePresent()."""
    registry = Registry()
    if vendor_seen:
        registry.create_key(VENDOR_ENUM_KEY)
    config = Config(registry, vendor_device_id=vendor_device_id)
    expected = STATUS_UNSUCCESSFUL if refused else STATUS_SUCCESS
    assert config.ConfigUpdateActive(device_id, "3&0&0&10", "PCI bus 0, device 2, function 0") == expected
    assert (_active_value(registry, "ActiveInstanceID") is None) == refused
    registry = Registry()
    if vendor_seen:
        registry.create_key(VENDOR_ENUM_KEY)
    config = Config(registry, vendor_device_id=vendor_device_id)
    assert config.ConfigSetActive(device_id, "3&0&0&10", "PCI bus 0, device 2, function 0") == expected
    assert _active_value(registry, "ActiveDeviceID") == (None if refused else device_id)


def test_a_stored_legacy_active_device_stays_active_but_update_active_fills_nothing(rig, machine) -> None:
    """fdo.c FdoSetActive: with ActiveDeviceID stored, Active is the stricmp match and ConfigUpdateActive's
    status is dropped, so a refused UpdateActive leaves the FDO active with the values missing."""
    registry = Registry()
    registry.create_key(VENDOR_ENUM_KEY)
    registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", DEV_0001)
    registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", "3&0&0&10")
    booted = rig.boot(machine(0x0001), registry)
    assert _states(booted) == {"0001": True}
    assert _active_value(registry, "ActiveLocationInformation") is None
    assert any("ConfigUpdateActive" in line and "legacy device" in line for line in booted.kernel.log.tail(200))


def test_forced_activation_of_a_legacy_device_is_active_but_not_recorded(rig, machine) -> None:
    """fdo.c FdoSetActive: FORCE_ACTIVATED makes the FDO active and calls (VOID) ConfigSetActive, which
    refuses the legacy device once the vendor device has been seen: nothing is recorded."""
    registry = Registry()
    registry.create_key(VENDOR_ENUM_KEY)
    registry.set_dword(PRECEDENCE, r"PCI\VEN_5853&DEV_0001", 1)
    booted = rig.boot(machine(0x0001), registry)
    assert _states(booted) == {"0001": True}
    assert _active_value(registry, "ActiveDeviceID") is None


def test_without_xenfilts_emulated_interface_the_stored_rules_alone_pick_the_active_fdo(rig, machine,
                                                                                       monkeypatch) -> None:
    """fdo.c FdoSetActive: EMULATED is optional (XENFILT may not be installed); without it every FDO's status is
    NEUTRAL, so the first FDO still wins by ConfigSetActive and records the active device."""
    import xenpv.stack.drivers.xenbus.driver as xenbus_driver

    monkeypatch.setattr(xenbus_driver, "query_emulated", lambda lower, version: None)
    registry = Registry()
    booted = rig.boot(machine(0x0001, 0x0002), registry)
    assert all(f.emulated is None for f in booted.xenbus.fdos)
    assert _states(booted) == {"0001": True, "0002": False}
    assert _active_value(registry, "ActiveDeviceID") == DEV_0001
