"""S4 hibernation end to end (issue 13) on a guest whose PV drivers own its disk and NIC: the power IRPs
down the tree, the FDO's own D3, FdoS3ToS4's reference check, the image through XENVBD's crash path into
the hiberfile area of the system disk, PM1a_CNT's S4 sleep type and the real QEMU powering off; then a new
QEMU and a new domain, the resume loader reading the hiberfile through the emulated IDE disk, and the
guest resuming where it was."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from xenpv.harness.agent import Guest, GuestBugcheck
from xenpv.xenabi.hiberfile import MAGIC, SECTOR, hiberfile_area

pytestmark = pytest.mark.integration


def hiberfile_header(g: Guest) -> bytes:
    image = g.storage / "hda.img"
    start, _ = hiberfile_area(image.stat().st_size // SECTOR)
    with open(image, "rb") as f:
        f.seek(start * SECTOR)
        return f.read(SECTOR)


def test_s4_powers_qemu_off_and_the_guest_resumes_in_a_new_domain(lc, io_guest, dom0) -> None:
    g = io_guest("default")
    first, machine = g.domain.domid, g.machine
    marker = lc.write_marker(g, "4d")
    memory = g.console.run("lifecycle memory-mark 5ac3")  # a page a driver holds: it must come back
    before = lc.references(g)
    g.hibernate()
    assert g.state == "off" and g.domain is None
    assert machine.process.popen.returncode is not None  # QEMU really powered off
    assert all(d["domid"] != first for d in g.toolstack.ctl.call("list_domains"))
    header = hiberfile_header(g)
    assert header[:8] == MAGIC  # the image is on the system disk, written by blkback for xencrsh
    capture = lc.ArpCapture(dom0.netns)
    try:
        out = g.power_on()
        assert out.startswith("resumed from hibernation"), out
        assert g.domain.domid != first
        lc.check_after_resume(g, before, marker, dom0, capture)
    finally:
        capture.close()
    assert g.console.run("lifecycle memory-check") == memory  # guest RAM restored from the hiberfile
    log = g.console.run("log 500")
    assert "FdoS4ToS3: resume from S4" in log and "winresume:" in log
    assert hiberfile_header(g)[:8] != MAGIC  # marked used: a second power-on would boot afresh


def _corrupt(g: Guest, offset: int, data: bytes) -> None:
    image = g.storage / "hda.img"
    start, _ = hiberfile_area(image.stat().st_size // SECTOR)
    with open(image, "r+b") as f:
        f.seek(start * SECTOR + offset)
        f.write(data)


@pytest.mark.parametrize("damage, reason", [
    ((SECTOR + 100, b"\xff\x00\xff"), "the records fail their checksum"),
    ((0, bytes(SECTOR)), "no hibernation image (no HIBR signature)"),
], ids=["corrupt-records", "missing"])
def test_a_hiberfile_that_fails_its_check_means_a_fresh_boot(lc, io_guest, damage, reason) -> None:
    g = io_guest("default")
    marker = lc.write_marker(g, "77")
    memory = g.console.run("lifecycle memory-mark 99")
    g.hibernate()
    _corrupt(g, *damage)
    out = g.power_on()
    assert out.startswith(f"fresh boot (boot 3): no usable hibernation image: {reason}; running in dom"), out
    assert f"winload: no usable hibernation image ({reason}); starting Windows afresh" in g.console.run("log 400")
    assert g.console.run("lifecycle memory-check") != memory  # what the hibernated kernel held is gone
    # A fresh Windows on the new machine: the unplug it requested, the PV disk with what was written.
    lc.wait_for(g, "vbd list", r"^target 0 vbd \d+ connected", timeout=20)
    assert lc.emulated(g.machine)[0].get("hda") is False
    out = g.console.run(f"vbd read 0 {lc.DATA_LBA} {lc.DATA_SECTORS}")
    assert re.search(rf"^sha256 {marker}\b", out, re.M), out


def test_a_leaked_reference_bugchecks_at_s4_after_the_fdo_went_d3(io_guest) -> None:
    g = io_guest("default")
    assert "never released" in g.console.run("fault leak-ref STORE")
    with pytest.raises(GuestBugcheck) as stop:
        g.hibernate()
    dump = stop.value.dump
    assert (dump.code, dump.module) == (0xDEAD, "xenbus.sys")
    # FdoS3ToS4 checks SUSPEND first, and the leaked STORE still holds the SUSPEND it acquired (fdo.c's text).
    assert dump.message == "BUG: SuspendGetReferences(Fdo->SuspendContext) != 0", dump.message
    # Only the leak is left: the children's references and the FDO's own went with their D3.
    refs = dump.interface_references
    assert refs["XENBUS.STORE"] == 1 and refs["XENBUS.SUSPEND"] == 1 and refs["XENBUS.EVTCHN"] == 0, refs


def test_save_restore_then_s4_on_one_guest(lc, io_guest, dom0, tmp_path: Path) -> None:
    g = io_guest("default")
    marker = lc.write_marker(g, "3c")
    before = lc.references(g)
    g.save(tmp_path / "guest.save")
    g.restore(tmp_path / "guest.save")
    memory = g.console.run("lifecycle memory-mark 0f")
    g.hibernate()
    capture = lc.ArpCapture(dom0.netns)
    try:
        assert g.power_on().startswith("resumed from hibernation")
        lc.check_after_resume(g, before, marker, dom0, capture)
    finally:
        capture.close()
    assert g.console.run("lifecycle memory-check") == memory
    assert g.console.run("lifecycle status").endswith("suspend count 1")


def test_two_disks_and_two_nics_hibernate_and_resume(lc, io_guest, dom0) -> None:
    g = io_guest("two-disks-two-nics")
    lc.wait_for(g, "vbd list", r"^target 1 vbd \d+ .*connected", timeout=20)
    markers = {t: re.search(r"sha256 (\w+)", g.console.run(f"vbd write {t} {lc.DATA_LBA} {p} {lc.DATA_SECTORS}")).group(1)
               for t, p in ((0, "e0"), (1, "e1"))}
    before = lc.references(g)
    g.hibernate()
    assert g.power_on().startswith("resumed from hibernation")
    for t, marker in markers.items():
        lc.wait_for(g, "vbd list", rf"^target {t} vbd \d+ .*connected", timeout=20)
        out = g.console.run(f"vbd read {t} {lc.DATA_LBA} {lc.DATA_SECTORS}")
        assert re.search(rf"^sha256 {marker}\b", out, re.M), out
    disks, nics = lc.emulated(g.machine)
    assert disks.get("hda") is False and disks.get("hdb") is False and not nics, (disks, nics)
    for i, tap in enumerate(dom0.taps[g.domain.domid]):
        lc.wait_for(g, f"net -i {i} ping {tap.peer.ip} 3", r"3/3 replies", timeout=20)
    assert lc.references(g) == before
