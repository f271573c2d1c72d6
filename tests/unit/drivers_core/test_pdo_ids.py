"""XENBUS child PDO IDs (reference 3): DeviceID, InstanceID, HardwareIDs = CompatibleIDs, the 1024 limit."""
from __future__ import annotations

import pytest

import xenpv.stack.drivers.xenbus.pdo as pdo_module
from xenpv.stack.drivers.revision import XENBUS_REVISIONS
from xenpv.stack.drivers.xenbus.pdo import (REGSTR_VAL_MAX_HCID_LEN, multi_sz_bytes_before_final_terminator,
                                           pdo_hardware_ids)
from xenpv.stack.kernel import IRP_MN_PNP, BugCheck, BusQueryIdType, Irp, IoSynchronousCallDriver, QueryIdParameters
from xenpv.stack.kernel.assertion import STATUS_ASSERTION_FAILURE, set_build
from xenpv.stack.kernel.bugcheck import BugCheckCode
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
            assert multi_sz_bytes_before_final_terminator(expected) < REGSTR_VAL_MAX_HCID_LEN
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
    """XB fdo.c FdoScan: `strncmp(Class->Buffer, SupportedClasses[Entry].Buffer, Class->Length) == 0`:
    the supported entry must start with the (upper-cased) class name, not the other way round."""
    rig.xenstore_classes = ["vbd", "vif", "console", "con", "vb", "9pfs", "vusb"]
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    # CON and VB are prefixes of CONS and VBD: supported; CONSOLE is longer than CONS: not supported.
    assert sorted(fdo.children) == sorted(["VBD", "VIF", "CON", "VB", "IFACE", "CONS"])


@pytest.fixture
def checked_build():
    set_build("checked")
    yield
    set_build("free")


def _revisions(count: int) -> dict[int, object]:
    return {0x09000000 + i: XENBUS_REVISIONS[0x0900000C] for i in range(count)}


@pytest.mark.parametrize("device_class", ["VBD", "IFACE"])
def test_hardware_ids_limit_is_a_checked_build_assert_counted_in_bytes(monkeypatch, checked_build, device_class) -> None:
    """pdo.c PdoQueryId: ASSERT3U(bytes up to XENCLASS's terminator, <, REGSTR_VAL_MAX_HCID_LEN = 1024): 12
    revisions fit (954 / 1002 bytes), 13 do not (1032 / 1084), though 13 are only about 540 characters."""
    monkeypatch.setattr(pdo_module, "XENBUS_REVISIONS", _revisions(12))
    assert len(pdo_hardware_ids("XPC000", device_class)) == 13
    monkeypatch.setattr(pdo_module, "XENBUS_REVISIONS", _revisions(13))
    with pytest.raises(BugCheck) as stop:
        pdo_hardware_ids("XPC000", device_class)
    assert stop.value.code == BugCheckCode.SYSTEM_THREAD_EXCEPTION_NOT_HANDLED
    assert stop.value.params[0] == STATUS_ASSERTION_FAILURE and stop.value.module == "xenbus.sys"
    assert stop.value.message == "ASSERTION FAILED: (ULONG_PTR)Buffer - (ULONG_PTR)Id.Buffer < REGSTR_VAL_MAX_HCID_LEN"


def test_xenvif_hardware_ids_limit_is_the_same_assert(monkeypatch, checked_build) -> None:
    """XV pdo.c PdoQueryId has the same ASSERT3U: 12 XENVIF revisions and XENDEVICE fit (956 bytes), 13 not."""
    import xenpv.stack.drivers.xenvif.pdo as vif_pdo

    monkeypatch.setattr(vif_pdo, "XENVIF_REVISIONS", {0x09000000 + i: {} for i in range(12)})
    assert len(vif_pdo.pdo_hardware_ids("XP0001")) == 13
    monkeypatch.setattr(vif_pdo, "XENVIF_REVISIONS", {0x09000000 + i: {} for i in range(13)})
    with pytest.raises(BugCheck) as stop:
        vif_pdo.pdo_hardware_ids("XP0001")
    assert stop.value.params[0] == STATUS_ASSERTION_FAILURE and stop.value.module == "xenvif.sys"


def test_a_free_build_returns_hardware_ids_over_the_limit(monkeypatch) -> None:
    """The free build compiles the ASSERT out; the buffer (MAX_DEVICE_ID_LEN WCHARs per revision) holds them."""
    monkeypatch.setattr(pdo_module, "XENBUS_REVISIONS", _revisions(40))
    ids = pdo_hardware_ids("XPC000", "IFACE")
    assert len(ids) == 41 and ids[-1] == "XENCLASS"


def test_a_vanished_class_loses_its_pdo(rig, machine) -> None:
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    vif = fdo.children["VIF"]
    rig.platforms[0].store.remove("vif")  # dom0 removed device/vif: the `device` watch fires
    booted.poll()
    assert "VIF" not in fdo.children and vif.extension.missing == "device vanished"
    assert vif.deleted and not booted.nodes(r"XENBUS\VEN_XP&DEV_VIF")
    assert booted.nodes(r"XENBUS\VEN_XP&DEV_VBD")  # the others stay


def test_hardware_ids_of_exactly_1024_bytes_are_over_the_limit(monkeypatch, checked_build) -> None:
    """The ASSERT is strict: 1022 bytes fit, 1024 (the #define itself) do not. One revision's ID is
    29 characters plus the vendor and the class; with XENCLASS (18 bytes), a vendor of 473 - len(class)
    characters gives 2 * (502 + 1) + 18 = 1024 bytes."""
    monkeypatch.setattr(pdo_module, "XENBUS_REVISIONS", _revisions(1))
    fits = pdo_hardware_ids("X" * (472 - 3), "VBD")
    assert multi_sz_bytes_before_final_terminator(fits) == 1022
    with pytest.raises(BugCheck) as stop:
        pdo_hardware_ids("X" * (473 - 3), "VBD")
    assert stop.value.params[0] == STATUS_ASSERTION_FAILURE
