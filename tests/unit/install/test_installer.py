"""Installer, catalog and guest set-up: era rules, bindings, persistence (reference windows-pv-drivers.md 5)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from xenpv.guests.schema import load_guest, parse_guest
from xenpv.stack.drivers.revision import CHILD_BINDS_XENBUS_REVISION, XENBUS_REVISIONS, XENVIF_REVISIONS
from xenpv.stack.install import (PACKAGES, Era, Installer, InstallVetoed, PlatformPciDevice, RegistryCatalog,
                           install_from_guest, installed_version, reboot_requests)
from xenpv.stack.install.installer import InstallError
from xenpv.stack.install.packages import Version, child_ids, get_package
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.device import DriverObject
from xenpv.stack.kernel.pnp import CLASS_KEY, HDC_CLASS_GUID, SYSTEM_CLASS_GUID, InMemoryCatalog, PnpManager
from xenpv.stack.kernel.registry import Registry

# The contract, written out rather than imported from the code under test: winerror.h, and the keys the
# real co-installers and xen.sys use (a typo in the model's constants must fail here).
ERROR_REVISION_MISMATCH = 1306
MONITOR_REQUEST_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"
UNPLUG_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Unplug"

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
VIF_C000 = r"XENBUS\VEN_XPC000&DEV_VIF&REV_{:08X}"
PCI_0001 = r"PCI\VEN_5853&DEV_0001"


def fresh(era: Era, version: str, names: tuple[str, ...] = ("xenbus", "xenvif", "xennet", "xenvbd", "xeniface"),
          registry: Registry | None = None) -> tuple[Registry, Installer]:
    registry = registry if registry is not None else Registry()
    installer = Installer(registry, platform=[PlatformPciDevice(0x0001)])
    for name in names:
        installer.install(name, version, era=era)
    return registry, installer


def dummy_entry(driver: DriverObject, registry_path: str) -> int:
    return 0


# -- manifests ------------------------------------------------------------------------------------

def test_current_packages_agree_with_revision_tables() -> None:
    bus = get_package("xenbus", "9.1.0.10")
    assert dict(bus.offers) == {r: dict(v) for r, v in XENBUS_REVISIONS.items()}
    assert get_package("xenvif", "9.1.0.10").binds == ("XENBUS", CHILD_BINDS_XENBUS_REVISION)
    assert dict(get_package("xenvif", "9.1.0.10").offers) == {r: dict(v) for r, v in XENVIF_REVISIONS.items()}
    assert child_ids("XENBUS", "VIF", 0x0900000B) == (
        r"XENBUS\VEN_XPC000&DEV_VIF&REV_0900000B", r"XENBUS\VEN_XP0001&DEV_VIF&REV_0900000B",
        r"XENBUS\VEN_XP0002&DEV_VIF&REV_0900000B")
    # A revision keeps its versions across packages (columns added later, e.g. UNPLUG, aside); the
    # invented 8.0.1.1 row 0x08000009 is documented as unlike the real one (packages.py).
    rows: dict[tuple[str, int], dict[str, int]] = {}
    for package in PACKAGES.values():
        if package.version == Version(8, 0, 1, 1):
            continue
        for rev, row in package.offers.items():
            seen = rows.setdefault((package.name, rev), dict(row))
            assert all(seen[i] == v for i, v in row.items() if i in seen), (package, hex(rev))


def test_every_driver_has_two_versions_per_era() -> None:
    for name in ("xenbus", "xenvif", "xennet", "xenvbd", "xeniface"):
        for era in Era:
            assert len([p for p in PACKAGES.values() if p.name == name and p.era == era]) >= 2, (name, era)


def test_version_parse_and_order() -> None:
    assert Version.parse("9.1.0.10") > Version.parse("9.1.0.5") > Version.parse("9.0.0")
    with pytest.raises(ValueError):
        Version.parse("nine")


# -- install, services, database ------------------------------------------------------------------

def test_install_writes_services_and_database() -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10")
    assert registry.get_dword(rf"{SERVICES}\XENBUS", "Start") == 0
    assert registry.get_dword(rf"{SERVICES}\XENVIF", "Start") == 3
    assert registry.get_dword(rf"{SERVICES}\XENVIF", "BootFlags") == 0x81
    assert str(registry.query_value(rf"{SERVICES}\XENFILT", "ImagePath").data).endswith(r"drivers\xenfilt.sys")
    assert registry.get_multi_sz(rf"{SERVICES}\XENBUS\Parameters", "SupportedClasses") == \
        ["VIF", "VBD", "VKBD", "IFACE", "CONS"]
    assert registry.get_sz(rf"{SERVICES}\XENFILT\Parameters", "*PNP0A03") == "PCI"
    assert installed_version(registry, "XENBUS") == Version(9, 1, 0, 10)
    assert installed_version(registry, "xen.sys") == Version(9, 1, 0, 10)
    assert installed_version(registry, "XENCONS") is None


def test_current_install_resets_unplug() -> None:
    registry = Registry()
    registry.set_dword(UNPLUG_KEY, "NICS", 3)
    registry.set_dword(UNPLUG_KEY, "DISKS", 2)
    fresh(Era.CURRENT, "9.1.0.10", ("xenvif",), registry)
    assert registry.get_dword(UNPLUG_KEY, "NICS") == 0
    assert registry.get_dword(UNPLUG_KEY, "DISKS") == 2  # xenvif.inf only resets NICS
    fresh(Era.CURRENT, "9.1.0.10", ("xenbus",), registry)
    assert registry.get_dword(UNPLUG_KEY, "DISKS") == 0


def test_subscriber_install_keeps_unplug() -> None:
    registry = Registry()
    registry.set_dword(UNPLUG_KEY, "DISKS", 1)
    fresh(Era.SUBSCRIBER, "8.0.0.1", registry=registry)
    assert registry.get_dword(UNPLUG_KEY, "DISKS") == 1


# -- catalog ---------------------------------------------------------------------------------------

def test_catalog_binds_bus_and_children() -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10")
    catalog = RegistryCatalog(registry)
    (match,) = catalog.find(VIF_C000.format(0x0900000B))
    assert (match.service, match.package) == ("XENVIF", "xenvif.inf_amd64_9.1.0.10")
    assert catalog.find(r"xenvif\ven_xp0001&dev_net&rev_09000005")[0].service == "XENNET"
    assert catalog.find(PCI_0001)[0].service == "XENBUS"
    assert catalog.find(VIF_C000.format(0x0900000A)) == []  # exact revision only


def test_catalog_ranks_inf_hardware_id_before_compatible_ids() -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10", ("xenbus",))
    catalog = RegistryCatalog(registry)
    vendor = catalog.find(r"PCI\VEN_5853&DEV_C000&SUBSYS_C0005853&REV_01")
    legacy = catalog.find(PCI_0001)
    assert vendor[0].rank == 0 < legacy[0].rank  # 0001 is a later ID on xenbus.inf's models line
    # An index entry whose package does not list the ID (a damaged database) binds nothing.
    fresh(Era.CURRENT, "9.1.0.10", ("xenvif",), registry)
    vif_id = VIF_C000.format(CHILD_BINDS_XENBUS_REVISION)
    registry.set_dword(rf"HKLM\SYSTEM\DriverDatabase\DeviceIds\{vif_id}", "xenbus.inf_amd64_9.1.0.10", 0)
    assert [(m.service, m.rank) for m in catalog.find(vif_id)] == [("XENVIF", 0)]


def test_pnp_prefers_a_device_hardware_id_over_its_compatible_id() -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10", ("xenbus", "xenvif"))
    catalog = RegistryCatalog(registry, images={"XENBUS": dummy_entry, "XENVIF": dummy_entry})
    pnp = PnpManager(registry, catalog, DebugLog())
    pnp.add_root_device("ROOT\\TEST", [VIF_C000.format(0x0900000A), PCI_0001],
                        [VIF_C000.format(CHILD_BINDS_XENBUS_REVISION)])
    pnp.add_root_device("ROOT\\TEST2", [VIF_C000.format(0x0900000A)], [VIF_C000.format(CHILD_BINDS_XENBUS_REVISION)])
    pnp.start()
    services = {node.device_id: (node.service, node.matching_id) for node in pnp.root.walk() if node.parent}
    assert services["ROOT\\TEST"] == ("XENBUS", PCI_0001)
    assert services["ROOT\\TEST2"] == ("XENVIF", VIF_C000.format(CHILD_BINDS_XENBUS_REVISION))


def test_inbox_drivers_come_after_packages() -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10", ("xenbus",))
    inbox = InMemoryCatalog()
    inbox.bind("*PNP0A03", "PCI")
    inbox.bind(PCI_0001, "INBOX")
    inbox.add_driver("PCI", dummy_entry)
    catalog = RegistryCatalog(registry, inbox=inbox)
    assert [m.service for m in catalog.find("*PNP0A03")] == ["PCI"]
    assert [m.service for m in catalog.find(PCI_0001)] == ["XENBUS", "INBOX"]
    assert catalog.entry_point("PCI") is dummy_entry


def test_entry_point_missing_image_is_none() -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10", ("xenbus",))
    catalog = RegistryCatalog(registry, images={"XENFILT": "xenpv.stack.drivers.no_such_driver.driver:DriverEntry"})
    assert catalog.entry_point("XENFILT") is None
    assert catalog.entry_point("NOSUCHSERVICE") is None
    catalog = RegistryCatalog(registry, images={"XENBUS": "xenpv.stack.kernel.status:status_name"})
    assert catalog.entry_point("XENBUS") is not None


def test_entry_point_follows_image_naming(monkeypatch: pytest.MonkeyPatch) -> None:
    registry, _ = fresh(Era.CURRENT, "9.1.0.10", ("xenbus",))
    module = types.ModuleType("xenpv.stack.drivers.xenfilt.driver")
    module.DriverEntry = dummy_entry  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xenpv.stack.drivers.xenfilt.driver", module)
    assert RegistryCatalog(registry).entry_point("xenfilt") is dummy_entry


# -- current era: exact revisions ------------------------------------------------------------------

def test_children_whose_revision_the_bus_lacks_stay_unbound(caplog: pytest.LogCaptureFixture) -> None:
    registry, installer = fresh(Era.CURRENT, "9.1.0.10", ("xenbus",))
    with caplog.at_level("WARNING", logger="stack.install.installer"):
        result = installer.install("xenvif", "9.0.0.3", era=Era.CURRENT)
    (reason,) = result.unbound
    assert "REV_09000005" in reason and "xenbus 9.1.0.10 does not offer" in reason
    assert "REV_09000005" in caplog.text
    catalog = RegistryCatalog(registry)
    # The PDO reports the bus's revisions; none of them is the one XENVIF 9.0.0.3 binds.
    for rev in XENBUS_REVISIONS:
        assert catalog.find(VIF_C000.format(rev)) == []
    assert installer.install("xenvif", "9.1.0.10").unbound == []
    assert catalog.find(VIF_C000.format(CHILD_BINDS_XENBUS_REVISION))[0].service == "XENVIF"


def test_xennet_ahead_of_xenvif_is_unbound() -> None:
    registry, installer = fresh(Era.CURRENT, "9.1.0.5", ("xenbus", "xenvif"))
    result = installer.install("xennet", "9.1.0.10")
    assert any("XENVIF REV_09000005" in r for r in result.unbound)


# -- upgrades, reboot requests -----------------------------------------------------------------------

def test_current_upgrade_requests_reboot_volatile(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "hive.json")
    _, installer = fresh(Era.CURRENT, "9.1.0.5", registry=registry)
    assert reboot_requests(registry) == []
    result = installer.upgrade("xenbus", "9.1.0.10")
    assert result.reboot_required and result.previous == Version(9, 1, 0, 5)
    assert reboot_requests(registry) == ["XENBUS"]
    assert registry.is_volatile(rf"{MONITOR_REQUEST_KEY}\XENBUS")
    assert installed_version(registry, "xenbus") == Version(9, 1, 0, 10)
    assert reboot_requests(Registry.load(tmp_path / "hive.json")) == []  # gone after the reboot


def test_upgrade_of_missing_package_fails() -> None:
    with pytest.raises(InstallError, match="not installed"):
        Installer(Registry()).upgrade("xenvbd", "9.1.0.10")


# -- subscriber era ----------------------------------------------------------------------------------

def test_subscriber_registry_written() -> None:
    registry, _ = fresh(Era.SUBSCRIBER, "8.0.0.1")
    assert registry.get_dword(rf"{SERVICES}\XENBUS\Interfaces\XENVIF", "EVTCHN") == 4
    assert registry.get_dword(rf"{SERVICES}\XENFILT\Interfaces\XENBUS", "UNPLUG") == 1
    assert registry.get_dword(rf"{SERVICES}\XENVIF\Interfaces\XENNET", "VIF") == 2
    # Active-device post-install (coinst.c@d55a644^ SetActiveDeviceInstanceID): filters, ActiveDeviceID
    # and ActiveInstanceID (without it today's XENFILT hides the device), reboot.
    for guid in (SYSTEM_CLASS_GUID, HDC_CLASS_GUID):
        assert registry.get_multi_sz(rf"{CLASS_KEY}\{guid}", "UpperFilters") == ["XENFILT"]
    assert registry.get_sz(rf"{SERVICES}\XENFILT\Parameters", "ActiveDeviceID") == \
        r"PCI\VEN_5853&DEV_0001&SUBSYS_00015853&REV_01"
    assert registry.get_sz(rf"{SERVICES}\XENFILT\Parameters", "ActiveInstanceID") == "3&0&0&10"


def test_provider_before_subscriber_is_vetoed_then_subscriber_first_succeeds() -> None:
    registry, installer = fresh(Era.SUBSCRIBER, "8.0.0.1")
    with pytest.raises(InstallVetoed) as info:
        installer.upgrade("xenbus", "8.0.1.1")
    veto = info.value
    assert veto.error == ERROR_REVISION_MISMATCH and veto.error_name == "ERROR_REVISION_MISMATCH"
    assert "XENVIF" in veto.reason and "EVTCHN" in veto.reason and "version 4" in veto.reason
    assert "5..5" in veto.reason
    # Nothing changed: the old bus is still installed.
    assert installed_version(registry, "xenbus") == Version(8, 0, 0, 1)
    for name in ("xenvif", "xenvbd", "xeniface"):
        installer.upgrade(name, "8.0.1.1")
    result = installer.upgrade("xenbus", "8.0.1.1")
    assert result.reboot_required and result.unbound == []
    assert registry.get_dword(rf"{SERVICES}\XENBUS\Interfaces\XENVIF", "EVTCHN") == 5


def test_subscriber_upgraded_before_provider_is_unbound_until_the_bus_follows() -> None:
    _, installer = fresh(Era.SUBSCRIBER, "8.0.0.1", ("xenbus", "xenvif"))
    result = installer.upgrade("xenvif", "8.0.1.1")
    assert any("REV_08000009" in r for r in result.unbound)
    assert installer.upgrade("xenbus", "8.0.1.1").unbound == []


# -- remove and persistence -------------------------------------------------------------------------

def test_remove_package() -> None:
    registry, installer = fresh(Era.SUBSCRIBER, "8.0.0.1")
    installer.remove("xenvif")
    catalog = RegistryCatalog(registry)
    assert catalog.find(VIF_C000.format(0x08000008)) == []
    assert not registry.key_exists(rf"{SERVICES}\XENVIF")
    assert not registry.key_exists(rf"{SERVICES}\XENBUS\Interfaces\XENVIF")
    assert any("no XENVIF package" in r for r in installer.unbound_children())  # XENNET lost its bus
    installer.remove("xenbus")
    assert catalog.find(PCI_0001) == []
    assert registry.values(rf"{CLASS_KEY}\{SYSTEM_CLASS_GUID}") == []
    with pytest.raises(InstallError):
        installer.remove("xenbus")


def test_install_survives_reload(tmp_path: Path) -> None:
    hive = tmp_path / "hive.json"
    fresh(Era.CURRENT, "9.1.0.10", registry=Registry(hive))
    catalog = RegistryCatalog(Registry.load(hive))
    assert catalog.find(VIF_C000.format(CHILD_BINDS_XENBUS_REVISION))[0].service == "XENVIF"
    assert catalog.find(PCI_0001)[0].service == "XENBUS"
    assert installed_version(catalog.registry, "XENVBD") == Version(9, 1, 0, 10)


# -- guests --------------------------------------------------------------------------------------------

def test_install_from_default_guest() -> None:
    guest = load_guest(Path(__file__).parents[3] / "guests" / "default.yaml")
    registry = Registry()
    results = install_from_guest(registry, guest)
    assert [r.package.name for r in results] == ["xenbus", "xenvif", "xennet", "xenvbd", "xeniface"]
    assert all(r.unbound == [] for r in results)
    assert registry.get_multi_sz(rf"{CLASS_KEY}\{SYSTEM_CLASS_GUID}", "UpperFilters") == ["XENFILT"]


def test_install_from_guest_with_presets_and_era(tmp_path: Path) -> None:
    doc = {"name": "old", "platform": [{"device-id": 0xC000}], "boot": {"options": ["BOOT_EMULATED"]},
           "drivers": {"era": "subscriber", "packages": {"xenbus": "8.0.0.1", "xenvif": "8.0.0.1"}},
           "registry": {r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\ForceUnplug": {"DISKS": 1},
                        r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters": {"SupportedClasses": ["VIF"]}}}
    registry = Registry()
    install_from_guest(registry, parse_guest(doc, tmp_path / "old.yaml"))
    assert registry.get_dword(rf"{SERVICES}\XEN\ForceUnplug", "DISKS") == 1
    assert registry.get_multi_sz(rf"{SERVICES}\XENBUS\Parameters", "SupportedClasses") == ["VIF"]
    assert registry.get_sz(rf"{SERVICES}\XENFILT\Parameters", "ActiveDeviceID").startswith(r"PCI\VEN_5853&DEV_C000")
    assert "XEN:BOOT_EMULATED=TRUE" in registry.get_sz(r"HKLM\SYSTEM\CurrentControlSet\Control", "SystemStartOptions")
    doc["drivers"] = {"era": "current", "packages": {"xenbus": "8.0.0.1"}}
    with pytest.raises(InstallError, match="current era"):
        install_from_guest(Registry(), parse_guest(doc, tmp_path / "old.yaml"))
