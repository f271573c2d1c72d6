"""The machine on the real QEMU: PCI identity per guest shape, RAM coherence, crashes, replay."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.base.errors import MachineCrashed
from xenpv.harness.machine import Machine
from xenpv.stack.vcpu.pci import PciBus
from xenpv.stack.vcpu.qtest import expected_replies

pytestmark = pytest.mark.integration

CHIPSET = [(0x8086, 0x1237), (0x8086, 0x7000), (0x8086, 0x7010), (0x8086, 0x7113)]
NIC_IDS = {"rtl8139": (0x10EC, 0x8139), "e1000": (0x8086, 0x100E)}
SHAPES = sorted(p.stem for p in GUESTS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("shape", SHAPES)
def test_pci_enumeration_finds_exactly_the_configured_devices(guest_factory, shape: str) -> None:
    m = guest_factory(shape)
    g = m.guest
    found = PciBus(m.qtest).assign_resources()
    # What the firmware step returns is what the devices now decode: enumerating again sizes every BAR anew.
    assert PciBus(m.qtest).enumerate() == found
    expected = CHIPSET + [(0x5853, p.device_id) for p in g.platform] + [NIC_IDS[n.model] for n in g.emulated_nics]
    assert Counter((f.vendor_id, f.device_id) for f in found) == Counter(expected)

    platform = [f for f in found if f.vendor_id == 0x5853]
    assert [(f.device_id, f.revision) for f in platform] == [(p.device_id, p.revision) for p in g.platform]
    for f, p in zip(platform, g.platform):
        (bar,) = f.bars
        assert (bar.kind, bar.size) == ("mem", p.bar_size)
        assert bar.address != 0  # placed by the firmware step
        assert (f.subsystem_vendor_id, f.subsystem_id) == (0x5853, p.device_id)
    (ide,) = [f for f in found if f.base_class == 0x0101]
    assert (ide.vendor_id, ide.device_id) == (0x8086, 0x7010)


def test_ram_written_through_qtest_is_seen_in_the_mapping_and_back(machine: Machine) -> None:
    q, mem = machine.qtest, machine.memory
    q.write(0x200000, b"written by the vCPU")
    assert mem.read(0x200000, 19) == b"written by the vCPU"
    mem.write(0x300ffe, b"\x11\x22\x33\x44")  # across a page boundary
    assert q.readl(0x300ffe) == 0x44332211
    q.writeq(0x400000, 0x0123456789ABCDEF)
    assert mem.read(0x400000, 8) == bytes.fromhex("efcdab8967452301")
    pattern = os.urandom(64 << 10)
    mem.write(0x500000, pattern)
    assert q.read(0x500000, len(pattern)) == pattern


def test_guest_memory_refuses_the_legacy_window_and_beyond_ram(machine: Machine) -> None:
    from xenpv.stack.vcpu.guestmem import GuestMemoryError

    with pytest.raises(GuestMemoryError, match="legacy window"):
        machine.memory.read(0xC0000, 16)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        machine.memory.read(machine.memory.size - 4, 8)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_killed_qemu_is_reported_as_a_crash_within_a_second(machine: Machine) -> None:
    pid = machine.process.pid
    machine.qtest.inb(0x80)
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(MachineCrashed) as ei:
        for _ in range(1000):
            machine.qtest.inb(0x80)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"crash took {elapsed:.2f}s to report"
    err = ei.value
    assert err.returncode == -signal.SIGKILL
    assert "killed by SIGKILL" in str(err)
    machine.shutdown()
    assert not Path(f"/proc/{pid}").exists()
    assert not _group_alive(pid)
    assert not machine.paths.run_dir.exists()


def test_qemu_dying_before_it_connects_is_reported_with_status_and_stderr(tmp_path: Path, artifacts: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("emulated:\n  disks:\n    - {id: hda, image: /nonexistent/disk.img}\n")
    m = Machine(load_guest(f), artifacts / "m")
    with pytest.raises(MachineCrashed) as ei:
        m.launch()
    assert ei.value.returncode == 1
    assert "/nonexistent/disk.img" in ei.value.log_tail
    assert not m.process.alive()
    assert not m.paths.run_dir.exists()


def test_qemu_binary_that_does_not_exist(tmp_path: Path, artifacts: Path) -> None:
    from xenpv.base.errors import LaunchFailure

    m = Machine(load_guest(GUESTS_DIR / "no-platform.yaml"), artifacts / "m", binary=str(tmp_path / "qemu"))
    with pytest.raises(LaunchFailure, match="cannot start"):
        m.launch()
    assert not m.paths.run_dir.exists()


def test_transcript_replays_with_qtest_stdio(guest_factory) -> None:
    m = guest_factory("two-disks-two-nics")
    PciBus(m.qtest).assign_resources()
    m.qtest.write(0x100000, b"replay me")
    assert m.qtest.read(0x100000, 9) == b"replay me"
    m.qtest.readl(0xE0000000)  # MMIO in the platform BAR
    m.shutdown()
    transcript = m.paths.transcript
    out = subprocess.run(["sh", str(m.write_replay_script())], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if not line.startswith("IRQ ")]
    # The replay adds one request, the write to the exit device, whose reply QEMU never sends.
    assert replies == expected_replies(transcript)
    assert len(replies) > 100


def test_qmp_events_are_logged(machine: Machine) -> None:
    machine.qmp.command("stop")
    ev = machine.qmp.wait_event("STOP", timeout=5, alive=[machine.process])
    assert ev["event"] == "STOP"
    machine.qmp.command("cont")
    machine.qmp.wait_event("RESUME", timeout=5, alive=[machine.process])
    log = machine.paths.qmp_events.read_text()
    assert '"STOP"' in log and '"RESUME"' in log


def test_dm_qmp_socket_is_served(machine: Machine) -> None:
    from xenpv.base.qmp import QmpSession

    dm = QmpSession("dm")
    try:
        dm.connect(str(machine.paths.dm_qmp_socket))
        assert any(d["qdev_id"] == "nic0" for d in dm.command("query-pci")[0]["devices"])
    finally:
        dm.close()
