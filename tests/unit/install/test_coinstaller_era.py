"""Installer era (b), 07/2015 - 09/2023 (reference windows-pv-drivers.md 5b): XENBUS's co-installer as
XB src/coinst/coinst.c@5e3c42f^ (DIF_INSTALLDEVICE: DifInstallPreProcess's AllowInstall,
MatchExistingDriver and SupportChildDrivers; DifInstallPostProcess's Unplug clearing), and the build
variants FORCE_ACTIVATE (xenbus.inf) and FORCE_UNPLUG (xenvbd.inf)."""
from __future__ import annotations

import pytest

from xenpv.stack.install import Era, Installer, InstallVetoed, PlatformPciDevice, installed_package
from xenpv.stack.install.installer import (ENUM_KEY, ERROR_ACCESS_DENIED, ERROR_BAD_FORMAT, ERROR_FILE_NOT_FOUND,
                                           ERROR_INSTALL_FAILURE, XENFILT_PARAMETERS)
from xenpv.stack.install.packages import (FORCE_ACTIVATE, FORCE_UNPLUG, FORCE_UNPLUG_KEY, UNPLUG_KEY, Version,
                                          get_package)
from xenpv.stack.kernel.pnp import CLASS_KEY, HDC_CLASS_GUID, SYSTEM_CLASS_GUID
from xenpv.stack.kernel.registry import REG_SZ, Registry, RegistryError

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
DEV_0001 = PlatformPciDevice(0x0001)
DEV_C000 = PlatformPciDevice(0xC000, slot=3)
ENUM_0001 = rf"{ENUM_KEY}\PCI\VEN_5853&DEV_0001&SUBSYS_00015853&REV_01\3&0&0&10"


def _child(registry: Registry, device: str, matching: str, config_flags: int | None = None) -> None:
    """An Enum\\XENBUS child bound to a driver, as the PnP manager records it."""
    path = rf"{ENUM_KEY}\XENBUS\{device}\_"
    registry.set_sz(path, "Service", "XENVIF")
    registry.set_sz(path, "MatchingDeviceId", matching)
    if config_flags is not None:
        registry.set_dword(path, "ConfigFlags", config_flags)


def _value(registry: Registry, key: str, name: str) -> object:
    try:
        return registry.query_value(key, name).data
    except RegistryError:
        return None


def _armed(registry: Registry) -> None:
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    registry.set_dword(UNPLUG_KEY, "NICS", 1)


@pytest.mark.parametrize("service", ["XEN", "XENBUS", "XENFILT"])
def test_allow_update_zero_vetoes_the_install(service) -> None:
    """coinst.c AllowInstall/AllowUpdate: `AllowUpdate = 0` under Services\\XEN, XENBUS or XENFILT makes
    DifInstallPreProcess fail with ERROR_ACCESS_DENIED; nothing is installed."""
    registry = Registry()
    registry.set_dword(rf"{SERVICES}\{service}", "AllowUpdate", 0)
    with pytest.raises(InstallVetoed) as veto:
        Installer(registry, platform=[DEV_0001]).install("xenbus", "9.1.0.1")
    assert veto.value.error == ERROR_ACCESS_DENIED and "AllowUpdate = 0" in veto.value.reason
    assert installed_package(registry, "xenbus") is None
    registry.set_dword(rf"{SERVICES}\{service}", "AllowUpdate", 1)
    Installer(registry, platform=[DEV_0001]).install("xenbus", "9.1.0.1")


def test_allow_update_of_the_wrong_type_fails_and_no_device_means_no_coinstaller() -> None:
    registry = Registry()
    registry.set_value(rf"{SERVICES}\XENBUS", "AllowUpdate", REG_SZ, "0")
    with pytest.raises(InstallVetoed) as veto:
        Installer(registry, platform=[DEV_0001]).install("xenbus", "9.1.0.1")
    assert veto.value.error == ERROR_BAD_FORMAT
    # No platform device: DIF_INSTALLDEVICE never runs, the package is only staged.
    assert Installer(registry).install("xenbus", "9.1.0.1").package.version == Version(9, 1, 0, 1)


@pytest.mark.parametrize("desc,vetoed", [("Citrix PV Bus", True), ("Xen PV Bus", False), (None, False)])
def test_match_existing_driver_checks_the_legacy_device_driver_desc(desc, vetoed) -> None:
    """coinst.c MatchExistingDriver: the driver already on DEV_0001 must be "<PRODUCT_NAME> PV Bus"
    (ERROR_INSTALL_FAILURE otherwise); a bound driver without DriverDesc passes."""
    registry = Registry()
    registry.set_sz(ENUM_0001, "Service", "XENBUS")
    if desc is not None:
        registry.set_sz(ENUM_0001, "DriverDesc", desc)
    installer = Installer(registry, platform=[DEV_0001])
    if vetoed:
        with pytest.raises(InstallVetoed) as veto:
            installer.install("xenbus", "9.1.0.1")
        assert veto.value.error == ERROR_INSTALL_FAILURE and "'Citrix PV Bus'" in veto.value.reason
    else:
        installer.install("xenbus", "9.1.0.1")
        # setupapi gives the device the INF's description.
        assert registry.get_sz(ENUM_0001, "DriverDesc") == "Xen PV Bus"


def test_match_existing_driver_ignores_an_unbound_legacy_device() -> None:
    registry = Registry()
    registry.set_sz(ENUM_0001, "DriverDesc", "Citrix PV Bus")  # no Service: no driver bound
    Installer(registry, platform=[DEV_0001]).install("xenbus", "9.1.0.1")


@pytest.mark.parametrize("matching,outcome", [
    (r"XENBUS\VEN_XP0001&DEV_VIF&REV_0900000A", False),           # the newest row of 9.1.0.1
    (r"XENBUS\VEN_XP0001&DEV_VIF&REV_09000009", True),            # an older row (its own INF's): NewBinding
    (r"XENBUS\VEN_XP0001&DEV_VIF&REV_0900000B", ERROR_FILE_NOT_FOUND),  # not in the table
    (r"XENBUS\VEN_XP0001&DEV_VIF", ERROR_BAD_FORMAT),              # no REV_
])
def test_support_child_drivers(matching, outcome) -> None:
    """coinst.c SupportChildDrivers/SupportDeviceID: each bound Enum\\XENBUS child's MatchingDeviceId must
    end in a REV_%8x of the new DEFINE_REVISION_TABLE; not the newest row means NewBinding."""
    registry = Registry()
    _child(registry, "VEN_XP0001&DEV_VIF", matching)
    installer = Installer(registry, platform=[DEV_0001])
    if isinstance(outcome, bool):
        assert installer.install("xenbus", "9.1.0.1").new_binding is outcome
    else:
        with pytest.raises(InstallVetoed) as veto:
            installer.install("xenbus", "9.1.0.1")
        assert veto.value.error == outcome


def test_support_child_drivers_skips_a_child_marked_for_reinstall() -> None:
    registry = Registry()
    _child(registry, "VEN_XP0001&DEV_VIF", r"XENBUS\VEN_XP0001&DEV_VIF&REV_0900000B", config_flags=0x20)
    assert Installer(registry, platform=[DEV_0001]).install("xenbus", "9.1.0.1").new_binding is False


@pytest.mark.parametrize("active,child_rev,cleared", [
    ((DEV_C000.pnp_device_id, DEV_C000.pnp_instance_id), 0x0900000A, False),  # vendor active, same binding
    ((DEV_C000.pnp_device_id, DEV_C000.pnp_instance_id), 0x09000009, True),   # vendor active, new binding
    ((DEV_0001.pnp_device_id, DEV_0001.pnp_instance_id), 0x0900000A, True),   # the vendor device is not active
    (None, 0x0900000A, True),  # no active device: VendorIsActive is never set (FALSE in the model)
])
def test_post_process_clears_the_unplug_requests(active, child_rev, cleared) -> None:
    """coinst.c DifInstallPostProcess: `if ((Active && NewBinding) || !VendorIsActive)` ClearUnplugRequest
    DISKS and NICS, so the next boot is emulated while the children rebind."""
    registry = Registry()
    _armed(registry)
    if active is not None:
        registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", active[0])
        registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", active[1])
    _child(registry, "VEN_XPC000&DEV_VIF", rf"XENBUS\VEN_XPC000&DEV_VIF&REV_{child_rev:08X}")
    result = Installer(registry, platform=[DEV_C000]).install("xenbus", "9.1.0.1")
    assert result.unplug_cleared is cleared
    expected = None if cleared else 1
    assert (_value(registry, UNPLUG_KEY, "DISKS"), _value(registry, UNPLUG_KEY, "NICS")) == (expected, expected)


def test_coinstaller_era_inf_keeps_unplug_values_and_has_the_monitor() -> None:
    """Era (b) INFs carry no XenBus_Unplug AddReg (that reset came with era (c)); the monitor service and
    RequestKey are there (xenbus.inf@5e3c42f^)."""
    package = get_package("xenbus", "9.1.0.1")
    assert package.era == Era.COINSTALLER and not package.add_reg
    assert {s.name for s in package.services} >= {"XEN", "XENBUS", "XENFILT", "xenbus_monitor"}
    assert len(package.models) == 3  # one models line per device ID until 2023


def test_force_activate_and_force_unplug_variants() -> None:
    """xenbus.inf's `; @FORCE_ACTIVATE@` lines (XENFILT Precedence 1, 2, 0xC000 and the class
    UpperFilters) and xenvbd.inf's `; @FORCE_UNPLUG@` line (ForceUnplug\\DISKS = 1) exist only in those
    builds; a variant is never the default package."""
    assert get_package("xenbus").variant == "" and get_package("xenvbd").variant == ""
    registry = Registry()
    registry.set_multi_sz(rf"{CLASS_KEY}\{SYSTEM_CLASS_GUID}", "UpperFilters", ["OTHER"])
    installer = Installer(registry)
    assert installer.install("xenbus", "9.1.0.11").package.variant == FORCE_ACTIVATE
    precedence = rf"{XENFILT_PARAMETERS}\Precedence"
    assert {v.name: v.data for v in registry.values(precedence)} == {
        r"PCI\VEN_5853&DEV_0001": 1, r"PCI\VEN_5853&DEV_0002": 2, r"PCI\VEN_5853&DEV_C000": 0xC000}
    assert registry.get_multi_sz(rf"{CLASS_KEY}\{SYSTEM_CLASS_GUID}", "UpperFilters") == ["OTHER", "XENFILT"]
    assert registry.get_multi_sz(rf"{CLASS_KEY}\{HDC_CLASS_GUID}", "UpperFilters") == ["XENFILT"]
    assert installer.install("xenvbd", "9.1.0.11").package.variant == FORCE_UNPLUG
    assert registry.get_dword(FORCE_UNPLUG_KEY, "DISKS") == 1
    plain = Registry()
    Installer(plain).install("xenbus", "9.1.0.10")
    Installer(plain).install("xenvbd", "9.1.0.10")
    assert not plain.key_exists(precedence) and _value(plain, FORCE_UNPLUG_KEY, "DISKS") is None


def test_only_the_reinstall_bit_of_config_flags_unbinds_a_child() -> None:
    """CONFIGFLAG_REINSTALL is 0x20 (regstr.h); a child with other ConfigFlags bits (0x01,
    CONFIGFLAG_DISABLED) is still bound, so its revision must be one the new XENBUS offers (SupportChildDrivers
    vetoes with ERROR_FILE_NOT_FOUND, 2, as for a child without ConfigFlags)."""
    registry = Registry()
    _child(registry, "VEN_XP0001&DEV_VIF", r"XENBUS\VEN_XP0001&DEV_VIF&REV_0900000B", config_flags=0x01)
    with pytest.raises(InstallVetoed) as veto:
        Installer(registry, platform=[DEV_0001]).install("xenbus", "9.1.0.1")
    assert veto.value.error == 2
