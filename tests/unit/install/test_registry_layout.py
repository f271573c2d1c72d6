"""What an install leaves in the registry, key by key, as Windows lays it out (the driver store's
DriverDatabase, the services, the device's Enum key) and the winerror.h codes a co-installer sets: written
out here, not imported, so that a typo in the installer's constants fails (issue 18's mutation run)."""
from __future__ import annotations

from xenpv.stack.install import Era, Installer, PlatformPciDevice
from xenpv.stack.install.installer import filters_install
from xenpv.stack.install import installer as installer_module
from xenpv.stack.kernel.registry import Registry

PACKAGE = "xenbus.inf_amd64_9.1.0.10"


def _installed() -> Registry:
    registry = Registry()
    Installer(registry, platform=[PlatformPciDevice(slot=2, device_id=1)]).install("xenbus", "9.1.0.10")
    return registry


def _values(registry: Registry, key: str) -> dict[str, object]:
    return {v.name: v.data for v in registry.values(key)}


def test_the_driver_store_is_windows_driver_database() -> None:
    registry = _installed()
    db = r"HKLM\SYSTEM\DriverDatabase"
    assert sorted(registry.subkeys(db)) == ["DeviceIds", "DriverInfFiles", "DriverPackages", "Images"]
    assert _values(registry, rf"{db}\DriverInfFiles\xenbus.inf") == {"Active": PACKAGE}
    package = _values(registry, rf"{db}\DriverPackages\{PACKAGE}")
    assert package["Version"] == "9.1.0.10" and package["Services"] == ["XEN", "XENBUS", "XENFILT", "xenbus_monitor"]
    assert package["Era"] == "current"  # which installer rules the package follows (the model's own value)
    assert _values(registry, rf"{db}\Images\xenbus.sys") == {"Version": "9.1.0.10", "Package": PACKAGE}
    # DeviceIds: the INF rank of each ID, a hardware ID's 0x0000 for the models line's first, then
    # 0x1000 and up for the later IDs of the same line (setupapi's compatible-ID ranks).
    ranks = {device: _values(registry, rf"{db}\DeviceIds\PCI\{device}")[PACKAGE]
             for device in registry.subkeys(rf"{db}\DeviceIds\PCI")}
    assert ranks == {"VEN_5853&DEV_C000&SUBSYS_C0005853&REV_01": 0x0000, "VEN_5853&DEV_0002": 0x1001,
                     "VEN_5853&DEV_0001": 0x1002}


def test_the_platform_device_gets_its_driver_description_under_enum() -> None:
    registry = _installed()
    key = r"HKLM\SYSTEM\CurrentControlSet\Enum\PCI\VEN_5853&DEV_0001&SUBSYS_00015853&REV_01\3&0&0&10"
    assert _values(registry, key)["DriverDesc"] == "Xen PV Bus"


def test_win32_error_codes_are_winerror_h() -> None:
    assert {name: getattr(installer_module, name) for name in (
        "ERROR_FILE_NOT_FOUND", "ERROR_ACCESS_DENIED", "ERROR_BAD_FORMAT", "ERROR_INSTALL_FAILURE",
        "ERROR_REVISION_MISMATCH")} == {"ERROR_FILE_NOT_FOUND": 2, "ERROR_ACCESS_DENIED": 5, "ERROR_BAD_FORMAT": 11,
                                        "ERROR_INSTALL_FAILURE": 1603, "ERROR_REVISION_MISMATCH": 1306}
    assert installer_module.WIN32_ERROR_NAMES == {2: "ERROR_FILE_NOT_FOUND", 5: "ERROR_ACCESS_DENIED",
                                                  11: "ERROR_BAD_FORMAT", 1603: "ERROR_INSTALL_FAILURE",
                                                  1306: "ERROR_REVISION_MISMATCH"}


def test_services_are_written_as_the_inf_add_service_directives_say() -> None:
    registry = _installed()
    services = r"HKLM\SYSTEM\CurrentControlSet\Services"
    assert _values(registry, rf"{services}\XENBUS") == {
        "ImagePath": r"\SystemRoot\System32\drivers\xenbus.sys", "Type": 1, "Start": 0, "ErrorControl": 1,
        "DisplayName": "XENBUS", "Group": "Boot Bus Extender"}
    monitor = _values(registry, rf"{services}\xenbus_monitor")
    assert (monitor["Type"], monitor["Start"], monitor["ErrorControl"]) == (16, 2, 1)  # own process, auto
    assert monitor["ImagePath"] == r"%SystemRoot%\System32\xenbus_monitor_9_1_0_10.exe"


def test_a_fresh_install_asks_for_no_reboot_and_an_upgrade_does() -> None:
    registry = Registry()
    installer = Installer(registry, platform=[])
    assert not installer.install("xenbus", "9.1.0.5").reboot_required
    assert installer.upgrade("xenbus", "9.1.0.10").reboot_required
    monitor = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request\XENBUS"
    assert _values(registry, monitor) == {"Reboot": 1}


def test_removing_xenbus_takes_its_services_inf_record_and_filters() -> None:
    """XENBUS's uninstall: the services, DriverInfFiles\\xenbus.inf and XENFILT from the System and HDC
    class UpperFilters (other filters stay; an emptied value goes)."""
    registry = _installed()
    filters_install(registry)  # XENBUS's AddDevice does this at its first boot
    classes = r"HKLM\SYSTEM\CurrentControlSet\Control\Class"
    system, hdc = rf"{classes}\{{4d36e97d-e325-11ce-bfc1-08002be10318}}", rf"{classes}\{{4d36e96a-e325-11ce-bfc1-08002be10318}}"
    assert _values(registry, system)["UpperFilters"] == ["XENFILT"]
    registry.set_multi_sz(hdc, "UpperFilters", ["other", "XENFILT"])
    Installer(registry, platform=[]).remove("xenbus")
    assert not registry.key_exists(r"HKLM\SYSTEM\DriverDatabase\DriverInfFiles\xenbus.inf")
    assert not registry.key_exists(r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS")
    assert "UpperFilters" not in _values(registry, system)
    assert _values(registry, hdc)["UpperFilters"] == ["other"]


def test_a_child_without_its_bus_revision_is_named_with_what_the_bus_offers() -> None:
    registry = Registry()
    installer = Installer(registry, platform=[])
    installer.install("xenbus", "9.1.0.10", era=Era.CURRENT)
    (reason,) = installer.install("xenvif", "9.0.0.3", era=Era.CURRENT).unbound
    assert reason == ("xenvif 9.0.0.3: binds XENBUS REV_09000005, which xenbus 9.1.0.10 does not offer "
                      "(offers 0900000C, 0900000B, 0900000A, 09000009, 09000008); the PnP manager finds no "
                      "driver for its IDs")
    installer.remove("xenbus")
    assert installer.unbound_children() == [
        "xenvif 9.0.0.3: binds XENBUS REV_09000005 but no XENBUS package is installed; its devices stay "
        "without a driver"]


def test_a_coinstaller_era_install_needs_a_reboot_for_an_upgrade_or_a_device_it_drives() -> None:
    """setupapi's DI_NEEDREBOOT in the co-installer era (9.1.0.1): the new images load at the next boot
    when older ones were running or a platform device is bound to them now; a first install on a machine
    without one asks for nothing."""
    installer = Installer(Registry(), platform=[])
    first = installer.install("xenbus", "9.1.0.1")
    assert first.package.era == Era.COINSTALLER and not first.reboot_required
    assert installer.upgrade("xenbus", "9.1.0.1").reboot_required
    assert Installer(Registry(), platform=[PlatformPciDevice(0x0001)]).install("xenbus", "9.1.0.1").reboot_required


def test_an_upgrade_and_a_removal_leave_no_record_of_the_old_package() -> None:
    """The driver store keeps one package per INF: an upgrade drops the old package's DriverPackages key,
    its DeviceIds values (a DeviceIds key left empty goes too) and its Images records; a removal drops them
    all."""
    registry = Registry()
    installer = Installer(registry, platform=[PlatformPciDevice(slot=2, device_id=1)])
    installer.install("xenbus", "9.1.0.5")
    installer.upgrade("xenbus", "9.1.0.10")
    db = r"HKLM\SYSTEM\DriverDatabase"
    assert registry.subkeys(rf"{db}\DriverPackages") == [PACKAGE]
    for device in registry.subkeys(rf"{db}\DeviceIds\PCI"):
        assert list(_values(registry, rf"{db}\DeviceIds\PCI\{device}")) == [PACKAGE]
    assert _values(registry, rf"{db}\Images\xenbus.sys")["Package"] == PACKAGE
    # Another package matching one of the IDs keeps that key (and its own value) through the removal.
    shared = rf"{db}\DeviceIds\PCI\VEN_5853&DEV_0001"
    registry.set_dword(shared, "other.inf_amd64_1.0.0.0", 0)
    installer.remove("xenbus")
    assert registry.subkeys(rf"{db}\DriverPackages") == []
    assert registry.subkeys(rf"{db}\DeviceIds\PCI") == ["VEN_5853&DEV_0001"]
    assert _values(registry, shared) == {"other.inf_amd64_1.0.0.0": 0}
    assert not registry.key_exists(rf"{db}\Images\xenbus.sys")
    assert _values(registry, rf"{db}\DriverPackages") == {}


def test_every_pending_reboot_request_is_found_and_images_are_found_by_any_name() -> None:
    """xenbus_monitor's view: every module key with Reboot = 1 under the request key, past one without
    the value; installed_version finds an image by module name, .sys or .exe file name."""
    from xenpv.stack.install.installer import installed_version, reboot_requests, request_reboot
    from xenpv.stack.install.packages import Version
    registry = _installed()
    requests = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"
    registry.create_key(rf"{requests}\XENVIF")            # a module key without a request in it
    request_reboot(registry, "XENBUS")
    assert reboot_requests(registry) == ["XENBUS"]
    version = Version(9, 1, 0, 10)
    assert installed_version(registry, "XENBUS") == installed_version(registry, "xenbus.sys") == version
    assert installed_version(registry, "xenbus_monitor_9_1_0_10.exe") == version
    assert installed_version(registry, "nosuch") is None


def test_removing_xenfilt_from_the_second_filter_class_when_the_first_lacks_it() -> None:
    registry = _installed()
    classes = r"HKLM\SYSTEM\CurrentControlSet\Control\Class"
    system, hdc = rf"{classes}\{{4d36e97d-e325-11ce-bfc1-08002be10318}}", rf"{classes}\{{4d36e96a-e325-11ce-bfc1-08002be10318}}"
    registry.set_multi_sz(system, "UpperFilters", ["other"])
    registry.set_multi_sz(hdc, "UpperFilters", ["XENFILT", "more"])
    Installer(registry, platform=[]).remove("xenbus")
    assert (_values(registry, system)["UpperFilters"], _values(registry, hdc)["UpperFilters"]) == (["other"], ["more"])
