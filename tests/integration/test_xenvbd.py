"""XENVBD end to end: the driver on XENBUS's VBD PDO in the booted guest agent, the real blkback process, the
emulated disk's image checked from outside, and the emulated twin rule across a reboot."""
from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.blkback.launch import RestartableBlkback
from xenpv.harness.agent import Guest
from xenpv.base.errors import WaitTimeout
from xenpv.backends.host import HostServices
from xenpv.stack.agent.cmd_vbd import sector_pattern

pytestmark = pytest.mark.integration

HDA = 768  # (3 << 8): hda, target 0
SECTOR = 512
VBD_PDO = r"XENBUS\VEN_XP&DEV_VBD\_"
REQUEST_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"


@pytest.fixture
def blkback(host: HostServices, artifacts: Path) -> Iterator[RestartableBlkback]:
    bb = RestartableBlkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, artifacts)
    bb.start()
    yield bb
    bb.stop()


def wait_console(g: Guest, command: str, pattern: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = g.console.run(command)
        if re.search(pattern, out):
            return out
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{command!r}: no {pattern!r} within {timeout}s; last output:\n{out}")
        time.sleep(0.05)


def hda_image(g: Guest) -> Path:
    return g.machine.paths.run_dir / "hda.img"


@pytest.fixture
def rebooted(host: HostServices, blkback: RestartableBlkback, boot_guest) -> tuple[Guest, dict[str, str]]:
    """The default guest after its first boot (emulated twin present, DISKS unplug not yet requested) and
    a `reboot` (same machine, domain and hive): returns the guest and what the first boot showed."""
    g = boot_guest("default")
    seen = {"devices": g.console.run("devices"),
            "vbd": wait_console(g, "vbd list", "refused"),
            "request": g.console.run(f"registry '{REQUEST_KEY}'"),
            "blocks": repr(g.machine.qmp.command("query-block"))}
    assert g.console.run("reboot").startswith("boot 2")
    wait_console(g, "vbd list", r"target 0 vbd 768 connected")
    return g, seen


def _inserted(g: Guest) -> dict[str, bool]:
    return {b["qdev"]: "inserted" in b for b in g.machine.qmp.command("query-block")}


def test_twin_refused_on_first_boot_then_pv_target_after_reboot(rebooted) -> None:
    g, first = rebooted
    assert f"{VBD_PDO} [started] service=XENVBD stack=XENBUS(PDO),XENVBD(FDO)" in first["devices"]
    assert "vbd 768 refused: STATUS_RETRY" in first["vbd"]
    assert "XENVBD" in first["request"] and "Reboot" in first["request"], first["request"]
    assert "'hda'" in first["blocks"]
    # Second boot: the emulated IDE disk is gone, the PV target connected, the backend Connected (4).
    assert _inserted(g)["hda"] is False
    assert "IDE\\DiskQEMU_HARDDISK\\0.0.0" not in g.console.run("devices")
    assert f"{VBD_PDO} [started] service=XENVBD" in g.console.run("devices")
    backend = g.console.run("xs read device/vbd/768/backend")
    assert g.console.run(f"xs read {backend}/state") == "4"
    assert g.console.run("xs read device/vbd/768/state") == "4"
    assert "XENVBD" not in g.console.run(f"registry '{REQUEST_KEY}'")  # the request was volatile


def test_write_read_back_flush_discard_and_image_from_outside(rebooted) -> None:
    g, _ = rebooted
    lba, count = 2048, 24
    data = sector_pattern("seq", lba, count, SECTOR)
    out = g.console.run(f"vbd write 0 {lba} seq {count}")
    assert out == f"wrote {count} sectors at {lba} sha256 {hashlib.sha256(data).hexdigest()}", out
    assert g.console.run(f"vbd read 0 {lba} {count}") == f"sha256 {hashlib.sha256(data).hexdigest()} bytes {len(data)}"
    assert g.console.run(f"vbd read 0 {lba + 1} 1 hex") == data[SECTOR:2 * SECTOR].hex()
    assert g.console.run("vbd flush 0") == "flushed (FLUSH_DISKCACHE)"
    with open(hda_image(g), "rb") as f:
        f.seek(lba * SECTOR)
        assert f.read(len(data)) == data
    assert g.console.run(f"vbd discard 0 {lba} 8") == f"discarded 8 sectors at {lba}"
    assert g.console.run(f"vbd read 0 {lba} 8 hex") == bytes(8 * SECTOR).hex()
    with open(hda_image(g), "rb") as f:
        f.seek(lba * SECTOR)
        assert f.read(8 * SECTOR) == bytes(8 * SECTOR)
        assert f.read(16 * SECTOR) == data[8 * SECTOR:]
    assert "failed" in g.console.run("vbd read 0 999999999 1")  # beyond the disk: refused, guest fine


def test_indirect_segments_multi_page_rings_and_queues(rebooted) -> None:
    g, _ = rebooted
    keys = g.console.run("xs ls device/vbd/768").splitlines()
    assert {"queue-0", "queue-1", "ring-page-order", "multi-queue-num-queues"} <= set(keys), keys
    assert g.console.run("xs read device/vbd/768/ring-page-order") == "1"
    assert {"ring-ref0", "ring-ref1", "event-channel"} <= set(g.console.run("xs ls device/vbd/768/queue-1").split())
    assert g.console.run("xs read device/vbd/768/protocol") == "x86_64-abi"
    listing = g.console.run("vbd list")
    assert "queues 2 ring-pages 2 indirect 256" in listing, listing
    lba, count = 4096, 1024  # 128 pages: 128-segment INDIRECT requests, split over both rings
    data = sector_pattern("a55a0ff0", lba, count, SECTOR)
    assert g.console.run(f"vbd write 0 {lba} a55a0ff0 {count}").endswith(hashlib.sha256(data).hexdigest())
    assert g.console.run(f"vbd read 0 {lba} {count}") == f"sha256 {hashlib.sha256(data).hexdigest()} bytes {len(data)}"
    with open(hda_image(g), "rb") as f:
        f.seek(lba * SECTOR)
        assert f.read(len(data)) == data


def _image_sectors(g: Guest, lba: int, count: int) -> bytes:
    with open(hda_image(g), "rb") as f:
        f.seek(lba * SECTOR)
        return f.read(count * SECTOR)


def test_blkback_killed_requests_fail_by_deadline_and_the_frontend_closes(rebooted, blkback: RestartableBlkback) -> None:
    g, _ = rebooted
    assert g.console.run("vbd write 0 100 seq 8").startswith("wrote 8")
    blkback.kill()
    # Nobody answers: the caller's deadline fails the request (it is not silently dropped)...
    out = g.console.run("vbd write 0 200 seq 8 --timeout 1")
    assert out.startswith("failed:") and "unanswered" in out, out
    # ...and the ring watchdog disconnects the rings and writes Closing; the dead backend never follows, so
    # the frontend waits there (a backend that comes back is met from Closing -> Closed -> Initialising).
    wait_console(g, "vbd list", r"target 0 vbd 768 closing backend Connected")
    assert _image_sectors(g, 100, 8) == sector_pattern("seq", 100, 8, SECTOR)


def test_blkback_restarted_reconnects_and_replays(rebooted, blkback: RestartableBlkback) -> None:
    g, _ = rebooted
    blkback.kill()
    g.console.child.sendline("vbd write 0 300 seq 16")  # in flight while there is no backend
    blkback.start()
    out = g.console._expect_prompt("vbd write across a blkback restart", 10).strip()
    assert out.startswith("wrote 16 sectors at 300"), out
    assert _image_sectors(g, 300, 16) == sector_pattern("seq", 300, 16, SECTOR)
    # The new blkback never takes up the rings the frontend still has (their slots are its predecessor's):
    # the frontend reconnects on new rings and replays.
    listing = g.console.run("vbd list")
    assert "connected backend Connected" in listing and "connections 2" in listing, listing


def test_cdrom_vbd_hidden_unknown_vdev_retried_with_a_reboot_request(rebooted) -> None:
    """VBD adapter.c __AdapterHiddenTarget: a vbd whose device-type is not "disk" is left alone (no target,
    no refusal); target.c TargetCreate: a vdev __ParseVbd maps to no target is STATUS_RETRY, and
    __AdapterEnumerate asks xenbus_monitor for a reboot. Both vbds are written by the toolstack into the
    running guest's xenstore; the CD-ROM first, so the pass that refuses the other has seen it."""
    g, _ = rebooted
    home = f"/local/domain/{g.domain.domid}/device/vbd"
    hdc, unknown = 22 << 8, 7 << 8
    assert "XENVBD" not in g.console.run(f"registry '{REQUEST_KEY}'")
    g.toolstack.xs.write(f"{home}/{hdc}/device-type", "cdrom")
    g.toolstack.xs.write(f"{home}/{unknown}/device-type", "disk")
    listing = wait_console(g, "vbd list", rf"vbd {unknown} refused: STATUS_RETRY")
    assert f"vbd {hdc}" not in listing, listing
    assert "XENVBD" in g.console.run(f"registry '{REQUEST_KEY}'")
    assert re.search(r"^target 0 vbd 768 connected", listing, re.M), listing  # the disk is unaffected
