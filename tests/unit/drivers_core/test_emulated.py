"""XENFILT's EMULATED interface (reference 1): IsDiskPresent by (ctrl << 1) | target, IsDevicePresent,
and what the IDE path reports for a disk whose medium is gone."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.atapi import ata_has_medium, ata_identify
from xenpv.stack.drivers.xenfilt import GUID_XENFILT_EMULATED_INTERFACE, EmulatedStatus
from xenpv.stack.kernel import IRP_MN_PNP, Irp, IoSynchronousCallDriver, QueryInterfaceParameters
from xenpv.stack.kernel.status import STATUS_SUCCESS

from .conftest import FakeChannel, FakeDrive, qemu_nvme

RTL8139 = r"PCI\VEN_10EC&DEV_8139&SUBSYS_11001AF4&REV_20"


def _emulated(booted, version: int):
    pdo = booted.xenbus.active_fdo.children["VBD"]
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(GUID_XENFILT_EMULATED_INTERFACE, 4096, version, None))
    with booted.kernel.cpu.lock:
        assert IoSynchronousCallDriver(pdo, irp) == STATUS_SUCCESS
    return irp.parameters.interface


@pytest.fixture
def four_positions(rig, machine):
    """Disks at 0.0 and 0.1 and 1.1; the CD-ROM at 1.0 is not a disk."""
    m = machine(0x0001)
    m.channels = (FakeChannel({0: FakeDrive("QEMU HARDDISK"), 1: FakeDrive("QEMU HARDDISK")}),
                  FakeChannel({0: FakeDrive("QEMU DVD-ROM", cdrom=True), 1: FakeDrive("QEMU HARDDISK")}))
    return rig.boot(m)


def test_is_disk_present_by_controller_and_target(four_positions) -> None:
    assert sorted(n.instance_id for n in four_positions.nodes("IDE\\")) == ["0.0.0", "0.1.0", "1.1.0"]
    v3 = _emulated(four_positions, 3)
    assert [v3.EmulatedIsDiskPresent(i) for i in range(5)] == [True, True, False, True, False]
    v2 = _emulated(four_positions, 2)
    assert [v2.EmulatedIsDiskPresent(i) for i in range(4)] == [True, True, False, True]


def test_v1_is_disk_present_takes_c_t_l_and_uses_t_as_the_index(four_positions) -> None:
    v1 = _emulated(four_positions, 1)
    assert v1.EmulatedIsDiskPresent(1, 0, 0) is True  # index 0: disk 0.0, whatever C says
    assert v1.EmulatedIsDiskPresent(0, 3, 0) is True  # index 3: disk 1.1
    assert v1.EmulatedIsDiskPresent(0, 2, 0) is False


def test_is_device_present(rig, machine) -> None:
    booted = rig.boot(machine(0x0001))
    v3 = _emulated(booted, 3)
    assert v3.EmulatedIsDevicePresent(RTL8139, None) == (True, EmulatedStatus.NEUTRAL)
    assert v3.EmulatedIsDevicePresent(RTL8139.lower(), "3&0&0&18") == (True, EmulatedStatus.NEUTRAL)
    assert v3.EmulatedIsDevicePresent(RTL8139, "3&0&0&20") == (False, EmulatedStatus.NEUTRAL)
    assert v3.EmulatedIsDevicePresent(r"PCI\VEN_8086&DEV_100E", None) == (False, EmulatedStatus.NEUTRAL)
    v2 = _emulated(booted, 2)
    assert v2.EmulatedIsDevicePresent(RTL8139, None) is True  # v1/v2: no status


def test_unplugged_nic_is_no_longer_present(rig, machine) -> None:
    booted = rig.boot(machine(0x0001))
    booted.vcpu.outw(0x10, 0x2)  # as UnplugDevices would
    with booted.kernel.cpu.lock:
        booted.kernel.pnp.invalidate(booted.nodes(r"ACPI\PNP0A03")[0])
        booted.kernel.pnp.process_pending()
    assert _emulated(booted, 3).EmulatedIsDevicePresent(RTL8139, None)[0] is False
    assert not [n for n in booted.nodes("PCI\\") if "DEV_8139" in n.device_id]


def test_any_emulated_nvme_counts_as_every_disk(rig, machine) -> None:
    m = machine(0x0001)
    m.functions.append(qemu_nvme(6))
    m.channels = (FakeChannel({}), FakeChannel({}))
    booted = rig.boot(m)
    assert booted.nodes("IDE\\") == []
    v3 = _emulated(booted, 3)
    assert all(v3.EmulatedIsDiskPresent(i) for i in range(4))


def test_a_drive_without_medium_answers_identify_but_is_not_a_disk(machine) -> None:
    m = machine(0x0001)
    assert ata_identify(m, 0, 0) == "QEMU HARDDISK" and ata_has_medium(m, 0, 0)
    m.outw(0x10, 0x1)  # the harness's unplug: drive_del leaves the drive, takes the medium
    assert ata_identify(m, 0, 0) == "QEMU HARDDISK"
    assert not ata_has_medium(m, 0, 0)
    assert ata_identify(m, 1, 0) is None  # ATAPI aborts IDENTIFY DEVICE
    assert ata_identify(m, 0, 1) is None  # nothing there


def _rescan_channel(booted, number: str) -> None:
    channel = next(n for n in booted.nodes(r"PCIIDE\IDEChannel") if n.instance_id == number)
    with booted.kernel.cpu.lock:
        booted.kernel.pnp.invalidate(channel)
        booted.kernel.pnp.process_pending()


def test_ide_rescan_after_unplug_drops_the_disk_and_its_emulated_entry(rig, machine) -> None:
    """XB xenfilt fdo.c FdoEnumerate: a PDO the bus no longer reports is set missing and its EMULATED
    object removed. AUX unplug (0x4) leaves the primary master, so channel 0 still has a child."""
    m = machine(0x0001)
    m.channels = (FakeChannel({0: FakeDrive("QEMU HARDDISK"), 1: FakeDrive("QEMU HARDDISK")}),
                  FakeChannel({0: FakeDrive("QEMU DVD-ROM", cdrom=True)}))
    booted = rig.boot(m)
    assert _emulated(booted, 3).EmulatedIsDiskPresent(1) is True
    booted.vcpu.outw(0x10, 0x4)
    _rescan_channel(booted, "0")
    assert [n.instance_id for n in booted.nodes("IDE\\")] == ["0.0.0"]
    assert _emulated(booted, 3).EmulatedIsDiskPresent(1) is False


def test_a_channel_whose_last_disk_went_keeps_reporting_it(rig, machine) -> None:
    """XB xenfilt fdo.c FdoQueryDeviceRelations: `if (Relations->Count != 0) FdoEnumerate(...)`. When the
    bus reports no child at all the list is not updated, so the filter (DISABLED) still reports the disk
    it had, and EMULATED still says it is present."""
    booted = rig.boot(machine(0x0001))
    booted.vcpu.outw(0x10, 0x1)
    _rescan_channel(booted, "0")
    assert [n.instance_id for n in booted.nodes("IDE\\")] == ["0.0.0"]
    assert _emulated(booted, 3).EmulatedIsDiskPresent(0) is True
