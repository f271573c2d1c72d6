"""XENBUS child PDO IDs (reference 3): DeviceID, InstanceID, HardwareIDs = CompatibleIDs, the 1024 limit."""
from __future__ import annotations

import pytest

import xenpv.stack.drivers.xenbus.pdo as pdo_module
from xenpv.stack.drivers.revision import MAX_HARDWARE_IDS_CHARS, XENBUS_REVISIONS
from xenpv.stack.drivers.xenbus.pdo import multi_sz_chars, pdo_hardware_ids
from xenpv.stack.kernel import IRP_MN_PNP, BugCheck, BusQueryIdType, Irp, IoSynchronousCallDriver, QueryIdParameters
from xenpv.stack.kernel.status import STATUS_SUCCESS

CLASSES = ["VBD", "VIF", "VKBD", "IFACE", "CONS"]
REVISIONS_NEWEST_FIRST = ["0900000C", "0900000B", "0900000A", "09000009", "09000008"]


def _query_id(pdo, id_type: BusQueryIdType):
    irp = Irp.pnp(IRP_MN_PNP.QUERY_ID, QueryIdParameters(id_type))
    assert IoSynchronousCallDriver(pdo, irp) == STATUS_SUCCESS
    return irp.io_status.information


@pytest.mark.parametrize("platform_id", [0x0001, 0x0002, 0xC000])
def test_ids_of_every_class_on_every_platform_device(rig, machine, platform_id: int) -> None:
    rig.xenstore_classes = ["vbd", "vif", "vkbd"]
    booted = rig.boot(machine(platform_id))
    fdo = booted.xenbus.active_fdo
    assert fdo is not None and fdo.pci_device_id == platform_id
    assert sorted(fdo.children) == sorted(CLASSES)  # xenstore's vbd/vif/vkbd plus synthetic IFACE, CONS
    vendor = f"XP{platform_id:04X}"
    with booted.kernel.cpu.lock:
        for device_class in CLASSES:
            pdo = fdo.children[device_class]
            expected = [f"XENBUS\\VEN_{vendor}&DEV_{device_class}&REV_{rev}" for rev in REVISIONS_NEWEST_FIRST]
            expected.append("XENCLASS")
            assert _query_id(pdo, BusQueryIdType.BusQueryDeviceID) == f"XENBUS\\VEN_XP&DEV_{device_class}"
            assert _query_id(pdo, BusQueryIdType.BusQueryInstanceID) == "_"
            assert _query_id(pdo, BusQueryIdType.BusQueryHardwareIDs) == expected
            assert _query_id(pdo, BusQueryIdType.BusQueryCompatibleIDs) == expected
            assert multi_sz_chars(expected) < MAX_HARDWARE_IDS_CHARS
            node = pdo.device_node
            assert node.instance_path == f"XENBUS\\VEN_XP&DEV_{device_class}\\_"
            assert node.hardware_ids == node.compatible_ids == expected


def test_device_id_does_not_depend_on_the_platform_device(rig, machine) -> None:
    """The instance path stays put when the active platform device changes (df761e9)."""
    paths = []
    for platform_id in (0x0001, 0xC000):
        fdo = rig.boot(machine(platform_id)).xenbus.active_fdo
        paths.append(sorted(c.device_node.instance_path for c in fdo.children.values()))
    assert paths[0] == paths[1]


def test_classes_are_filtered_by_supported_classes_prefix(rig, machine) -> None:
    rig.xenstore_classes = ["vbd", "vif", "console", "9pfs", "vusb"]
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    # CONSOLE passes by its CONS prefix (FdoScan's prefix match); 9pfs and vusb are not supported.
    assert sorted(fdo.children) == sorted(["VBD", "VIF", "CONSOLE", "IFACE", "CONS"])


def test_hardware_ids_over_the_registry_limit_bugcheck(monkeypatch) -> None:
    many = {0x09000000 + i: XENBUS_REVISIONS[0x0900000C] for i in range(40)}
    monkeypatch.setattr(pdo_module, "XENBUS_REVISIONS", many)
    with pytest.raises(BugCheck, match="REGSTR_VAL_MAX_HCID_LEN"):
        pdo_hardware_ids("XPC000", "IFACE")


def test_a_vanished_class_loses_its_pdo(rig, machine) -> None:
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    vif = fdo.children["VIF"]
    rig.platforms[0].store.remove("vif")  # dom0 removed device/vif: the `device` watch fires
    booted.poll()
    assert "VIF" not in fdo.children and vif.extension.missing == "device vanished"
    assert vif.deleted and not booted.nodes(r"XENBUS\VEN_XP&DEV_VIF")
    assert booted.nodes(r"XENBUS\VEN_XP&DEV_VBD")  # the others stay
