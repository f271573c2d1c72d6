"""`xenpv run` is a smoke test: it exits 0 only when everything it printed worked, says so when a guest has
no PV devices to check on purpose, and each of its checks fails on the fault it is there for."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.host import HostServices
from xenpv.guests.schema import GUESTS_DIR
from xenpv.harness.agent import Guest
from xenpv.harness.commands import PV_DISK_CHECK_LBA, MainJob
from xenpv.harness.dom0 import Dom0Backends

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]


def _xenpv_run(guest: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xenpv.harness.cli", "run", str(guest)], cwd=TOP,
                          capture_output=True, text=True, timeout=180)


def test_run_exits_1_and_says_which_check_failed(tmp_path: Path) -> None:
    """The default guest booted with BOOT_EMULATED keeps its emulated primary master, so XENVBD refuses
    the PV twin: the PV disk check fails, and the exit status says so."""
    guest = tmp_path / "boot-emulated-unchecked.yaml"
    guest.write_text((GUESTS_DIR / "default.yaml").read_text().replace("name: default", "name: be-unchecked")
                     + "boot:\n  options: [BOOT_EMULATED]\n")
    out = _xenpv_run(guest)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "xenpv run: 1 check(s) failed:" in out.stderr
    # VBD target.c TargetCreate: target 0 under BOOT_EMULATED is STATUS_UNSUCCESSFUL.
    assert "PV disk: vbd 768 is not a XENVBD target (refused: STATUS_UNSUCCESSFUL)" in out.stderr
    assert "3/3 replies" in out.stdout  # the NIC check still ran, and passed


def test_run_of_a_guest_without_pv_devices_on_purpose_says_so_and_exits_0() -> None:
    out = _xenpv_run("guests/no-platform.yaml")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== PV checks skipped on purpose ==" in out.stdout
    assert "not a Xen guest" in out.stdout
    assert "check(s) failed" not in out.stderr
    # Its teardown stopped everything it started, the agent fork server included (no sweep needed).
    assert "left these behind" not in out.stderr, out.stderr[-3000:]


@pytest.fixture
def dom0_guest(host: HostServices, guest_factory, artifacts: Path) -> Iterator[tuple[Guest, Dom0Backends]]:
    """The default guest booted with dom0's blkback and netback, as `xenpv run` boots it."""
    backends = Dom0Backends.start(host, artifacts / "dom0")
    try:
        guest = Guest.boot(host, guest_factory("default"), backends=backends)
        try:
            guest.console.run("reboot", timeout=60)  # the unplug takes effect: the PV devices come up
            yield guest, backends
        finally:
            guest.shutdown()
    finally:
        backends.stop()


def test_a_console_error_fails_its_step(dom0_guest: tuple[Guest, Dom0Backends]) -> None:
    guest, backends = dom0_guest
    job = MainJob(guest, guest.machine, backends)
    job.show("PV disk", "vbd list")
    assert job.failures == []
    job.show("PV disk", "vbd read 99 0 1")
    (failure,) = job.failures
    assert failure.startswith("PV disk: `vbd read 99 0 1`: error: ") and "no target 99" in failure


def test_data_read_back_unlike_what_was_written_fails_the_disk_check(dom0_guest: tuple[Guest, Dom0Backends]) -> None:
    guest, backends = dom0_guest
    image = guest.machine.paths.run_dir / "hda.img"  # the emulated disk's image, which its PV twin serves

    class OverwrittenBehindItsBack(MainJob):
        """Between the job's write and its read, something else writes the same sectors of the image."""

        def show(self, step: str, command: str, timeout: float = 30.0) -> str:
            out = super().show(step, command, timeout)
            if command.startswith("vbd write"):
                with open(image, "r+b") as f:
                    f.seek(PV_DISK_CHECK_LBA * 512)
                    f.write(b"\xa5" * 512)
            return out

    job = OverwrittenBehindItsBack(guest, guest.machine, backends)
    job.check_disks()
    assert job.failures == ["PV disk: target 0 (vbd 768): what was read back is not what was written"]
    job = MainJob(guest, guest.machine, backends)
    job.check_disks()
    assert job.failures == []


def test_a_nic_whose_peer_does_not_answer_fails_the_nic_check(dom0_guest: tuple[Guest, Dom0Backends]) -> None:
    guest, backends = dom0_guest
    job = MainJob(guest, guest.machine, backends)
    job.check_nics()
    assert job.failures == []
    assert guest.domain is not None
    (tap,) = backends.taps[guest.domain.domid]
    subprocess.run(["ip", "-n", backends.netns.name, "link", "set", tap.tap, "down"], check=True)
    job.check_nics()
    (failure,) = job.failures
    assert failure.startswith(f"PV NIC: {tap.tap}: ") and "replies" in failure and "3/3" not in failure
