"""The IDE probe against a channel that behaves as QEMU's does on a loaded host: READ SECTORS is
asynchronous (BSY until the host I/O completes, which may take hundreds of status reads), and a write to
the task file or the command register while BSY or DRQ is ignored. Slowness must never look like a
missing disk (which ends the boot in INACCESSIBLE_BOOT_DEVICE); past the (scaled) deadline it is the
harness's HarnessTooSlow."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers import atapi
from xenpv.stack.drivers.atapi import ata_has_medium, ata_identify
from xenpv.stack.kernel import BugCheck
from xenpv.stack.timescale import TIME_SCALE_ENV, HarnessTooSlow

from .conftest import ATA_IDENTIFY_DEVICE, ATA_READ_SECTORS, ST_ABORTED, ST_DRDY_DSC, ST_DRQ, FakeDrive

ST_BUSY = 0x80 | ST_DRDY_DSC
FOREVER = 1 << 62


class QemuLikeChannel:
    """A FakeChannel (conftest) with QEMU's timing rules. `read_busy`: status reads a READ SECTORS stays
    BSY for; `busy_now`: status reads the selected drive is still BSY for (an earlier command)."""

    def __init__(self, drives: dict[int, FakeDrive], read_busy: int = 0, busy_now: int = 0) -> None:
        self.drives = drives
        self.read_busy = read_busy
        self._selected = 0
        self._status: dict[int, int] = {}
        self._busy_left = busy_now
        self._data: list[int] = []
        self.error = 0
        self.ignored: list[str] = []

    def _blocked(self, what: str) -> bool:
        if self._current() & (0x80 | ST_DRQ):
            self.ignored.append(what)
            return True
        return False

    def _current(self) -> int:
        if self.selected not in self.drives:
            return 0
        if self._busy_left:
            return ST_BUSY
        return self._status.get(self.selected, ST_DRDY_DSC)

    @property
    def selected(self) -> int:
        return self._selected

    @selected.setter
    def selected(self, value: int) -> None:
        if not self._blocked("select"):
            self._selected = value

    def command(self, cmd: int) -> None:
        drive = self.drives.get(self.selected)
        if drive is None or self._blocked(f"command {cmd:#x}"):
            return
        if cmd == ATA_IDENTIFY_DEVICE and not drive.cdrom:
            model = drive.model.ljust(40).encode()
            words = [0] * 27 + [int.from_bytes(model[i:i + 2], "big") for i in range(0, 40, 2)]
            self._data, self._status[self.selected] = words + [0] * (256 - len(words)), ST_DRDY_DSC | ST_DRQ
        elif cmd == ATA_READ_SECTORS and drive.medium and not drive.cdrom:
            self._data, self._status[self.selected] = [0] * 256, ST_DRDY_DSC | ST_DRQ
            self._busy_left = self.read_busy  # the AIO runs; the drive is BSY until it completes
        else:
            self._status[self.selected], self.error = ST_ABORTED, 0x04

    def read_status(self) -> int:
        status = self._current()
        if self._busy_left and self.selected in self.drives:
            self._busy_left -= 1
        return status

    def read_data(self) -> int:
        if self._current() & 0x80:
            return 0xFFFF
        word = self._data.pop(0) if self._data else 0xFFFF
        if not self._data:
            self._status[self.selected] = ST_DRDY_DSC
        return word


def test_a_read_busy_for_hundreds_of_status_reads_finds_the_disk(machine) -> None:
    """Measured on QEMU under load: 6 of 200 READs needed more than 100 status reads, one 677."""
    m = machine(0x0001)
    m.channels = (QemuLikeChannel({0: FakeDrive("QEMU HARDDISK")}, read_busy=700), m.channels[1])
    assert ata_identify(m, 0, 0) == "QEMU HARDDISK"
    assert ata_has_medium(m, 0, 0)


def test_a_channel_still_busy_from_an_earlier_command_is_waited_for(machine) -> None:
    """QEMU ignores the device select and the command while BSY: the probe must wait, not conclude."""
    m = machine(0x0001)
    channel = QemuLikeChannel({0: FakeDrive("QEMU HARDDISK"), 1: FakeDrive("QEMU HARDDISK")}, busy_now=300)
    m.channels = (channel, m.channels[1])
    assert ata_identify(m, 0, 1) == "QEMU HARDDISK"
    assert channel.ignored == []


def test_slow_reads_of_the_boot_disk_do_not_stop_the_boot_with_0x7b(rig, machine) -> None:
    rig.xenstore_classes = []  # no PV disk: the emulated primary master is the boot disk
    m = machine(0x0001)
    m.channels = (QemuLikeChannel({0: FakeDrive("QEMU HARDDISK"), 1: FakeDrive("QEMU HARDDISK")}, read_busy=700),
                  m.channels[1])
    booted = rig.boot(m)  # raised INACCESSIBLE_BOOT_DEVICE when the READ outlasted a fixed number of polls
    assert sorted(n.instance_id for n in booted.nodes("IDE\\")) == ["0.0.0", "0.1.0"]


def test_a_drive_busy_past_the_deadline_is_the_harness_too_slow_not_a_missing_disk(machine, monkeypatch) -> None:
    monkeypatch.setattr(atapi, "BUSY_WAIT_SECONDS", 0.05)
    m = machine(0x0001)
    m.channels = (QemuLikeChannel({0: FakeDrive("QEMU HARDDISK")}, read_busy=FOREVER), m.channels[1])
    with pytest.raises(HarnessTooSlow, match=r"IDE 0\.0 still busy \(status 0xd0\) after READ SECTORS within 0\.05s"):
        ata_has_medium(m, 0, 0)


def test_the_busy_deadline_is_scaled(rig, machine, monkeypatch) -> None:
    monkeypatch.setattr(atapi, "BUSY_WAIT_SECONDS", 0.01)
    monkeypatch.setenv(TIME_SCALE_ENV, "5000")  # 50 s: far more than 300 polls with their sleeps take
    m = machine(0x0001)
    m.channels = (QemuLikeChannel({0: FakeDrive("QEMU HARDDISK")}, read_busy=300), m.channels[1])
    try:
        booted = rig.boot(m)
    except (BugCheck, HarnessTooSlow) as exc:
        pytest.fail(f"the boot did not wait the scaled deadline: {exc}")
    assert [n.instance_id for n in booted.nodes("IDE\\")] == ["0.0.0"]
