"""What an install leaves in the registry, key by key, as Windows lays it out (the driver store's
DriverDatabase, the services, the device's Enum key) and the winerror.h codes a co-installer sets: written
out here, not imported, so that a typo in the installer's constants fails (issue 18's mutation run)."""
from __future__ import annotations

from xenpv.stack.install import Installer, PlatformPciDevice
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
