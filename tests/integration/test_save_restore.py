"""Xen save/restore, checkpoint and local migration end to end (issue 13): a guest with real blkback and
netback (a network namespace of dom0's own), rebooted once so its PV drivers own the disk and the NIC, is
saved by the toolstack's suspend request, its QEMU stopped and its device state saved by QMP migrate, then
restored into a new QEMU and a NEW domain. After every resume: the emulated devices unplugged before stay
unplugged on the new QEMU (QMP), the interface references are what they were, data written before the
save is on the image (read from outside) and the PV disk reads and writes, the PV NIC answers pings and
sent its three gratuitous ARPs into the namespace, xenstore watches fire (fixtures and checks: conftest.py)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from xenpv.harness.dom0 import Dom0Backends
from xenpv.harness.lifecycle import LifecycleError, SaveFailed, read_manifest

pytestmark = pytest.mark.integration

DATA_LBA = 4096
DATA_SECTORS = 8


def test_save_then_restore_into_a_new_domain(lc, io_guest, dom0: Dom0Backends, tmp_path: Path) -> None:
    g = io_guest("default")
    first = g.domain.domid
    marker = lc.write_marker(g, "a5")
    before = lc.references(g)
    timings = g.save(tmp_path / "guest.save")
    assert g.state == "saved" and g.domain is None
    assert g.console.run("lifecycle status").startswith("suspended")
    assert set(timings.steps) >= {"suspend", "device_state", "write_image", "teardown"}
    manifest = read_manifest(tmp_path / "guest.save")
    assert manifest.source_domid == first and not manifest.checkpoint
    capture = lc.ArpCapture(dom0.netns)
    try:
        g.restore(tmp_path / "guest.save")
        assert g.domain.domid != first
        lc.check_after_resume(g, before, marker, dom0, capture)
    finally:
        capture.close()
    assert "SUSPEND: EARLY (0)" in g.console.run("log 400")


def test_checkpoint_resumes_the_same_domain_and_runs_no_resume_callback(lc, io_guest, tmp_path: Path) -> None:
    """SCHEDOP_shutdown returns 1 (cancelled): SchedShutdown's STATUS_CANCELLED, so neither SuspendEarly nor
    the LATE list runs (suspend.c); the guest runs on in the same domain, devices connected as they were."""
    g = io_guest("default")
    domid, machine = g.domain.domid, g.machine
    marker = lc.write_marker(g, "5a")
    before = lc.references(g)
    g.save(tmp_path / "checkpoint.save", checkpoint=True)
    assert g.state == "running" and g.domain.domid == domid and g.machine is machine
    assert read_manifest(tmp_path / "checkpoint.save").checkpoint
    assert g.console.run("lifecycle status") == f"running in dom{domid}; suspend count 0"
    log = g.console.run("log 200")
    assert "SCHEDOP_shutdown:SHUTDOWN_suspend <==== (c0000120 STATUS_CANCELLED)" in log
    assert "SUSPEND: EARLY" not in log and "SUSPEND: LATE" not in log
    assert machine.qmp.command("query-status")["status"] == "running"
    out = g.console.run(f"vbd read 0 {DATA_LBA} {DATA_SECTORS}")
    assert re.search(rf"^sha256 {marker}\b", out, re.M), out
    assert "connections 1" in g.console.run("vbd list")  # the connection the save found, never rebuilt
    assert lc.references(g) == before
    with pytest.raises(LifecycleError, match="needs a saved guest"):
        g.restore(tmp_path / "checkpoint.save")


def test_local_migration_to_a_new_qemu_and_domid_tears_the_source_down(lc, io_guest, dom0: Dom0Backends) -> None:
    g = io_guest("default")
    source_domid, source = g.domain.domid, g.machine
    marker = lc.write_marker(g, "e7")
    before = lc.references(g)
    capture = lc.ArpCapture(dom0.netns)
    try:
        g.migrate()
        assert g.domain.domid != source_domid and g.machine is not source
        assert source.process.popen.poll() is not None  # the source QEMU is gone
        assert all(d["domid"] != source_domid for d in g.toolstack.ctl.call("list_domains"))
        assert source_domid not in dom0.taps
        lc.check_after_resume(g, before, marker, dom0, capture)
    finally:
        capture.close()
    assert g.console.run("lifecycle status").endswith("suspend count 1")


def test_a_guest_that_ignores_the_suspend_request_is_not_saved_and_runs_on(lc, io_guest, tmp_path: Path) -> None:
    g = io_guest("default")
    domid = g.domain.domid
    assert g.console.run("lifecycle ignore-suspend on") == "control/shutdown=suspend is ignored"
    with pytest.raises(SaveFailed, match=r"did not acknowledge control/shutdown=suspend within 1s.*request "
                                         r"withdrawn.*runs on"):
        g.save(tmp_path / "never.save", ack_timeout=1.0)
    assert not (tmp_path / "never.save").exists()
    assert g.state == "running" and g.domain.domid == domid
    assert g.toolstack.xs.read(f"/local/domain/{domid}/control/shutdown") == b""
    info = next(d for d in g.toolstack.ctl.call("list_domains") if d["domid"] == domid)
    assert info["state"] == "running" and not info["vcpu_parked"]
    assert g.machine.qmp.command("query-status")["status"] == "running"
    marker = lc.write_marker(g, "11")
    assert lc.image_sha(g) == marker
    # Answered again, the same guest saves and restores.
    assert g.console.run("lifecycle ignore-suspend off") == "control/shutdown=suspend is answered"
    g.save(tmp_path / "now.save")
    g.restore(tmp_path / "now.save")
    assert lc.image_sha(g) == marker


def test_a_backend_missing_at_restore_is_waited_for_and_connected_when_it_appears(lc, io_guest, dom0: Dom0Backends,
                                                                                  tmp_path: Path) -> None:
    g = io_guest("default")
    marker = lc.write_marker(g, "b4")
    g.save(tmp_path / "guest.save")
    dom0.kill("blkback")
    g.restore(tmp_path / "guest.save")
    time.sleep(1.0)
    assert "connected" not in g.console.run("vbd list").split("backend")[0]  # waiting for a back-end
    dom0.start_backend("blkback")
    lc.wait_for(g, "vbd list", r"^target 0 vbd \d+ connected", timeout=20)
    out = g.console.run(f"vbd read 0 {DATA_LBA} {DATA_SECTORS}")
    assert re.search(rf"^sha256 {marker}\b", out, re.M), out


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1][0]


def test_a_write_in_flight_at_the_save_completes_exactly_once_after_the_restore(lc, io_guest, dom0: Dom0Backends,
                                                                                tmp_path: Path) -> None:
    """blkback stopped (SIGSTOP) with the write on the ring: the guest suspends with it unanswered (blkback
    runs again once the vCPU is parked, so the toolstack can tear the source down); the restored frontend
    issues it again on its new ring, and the write completes once, with its data."""
    import signal
    import threading

    g = io_guest("default")
    domid = g.domain.domid
    blkback = dom0.blkback
    parked, stop = threading.Event(), threading.Event()

    def continue_blkback_once_parked() -> None:
        ctl = g.host.xenhv_control()
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not (parked.is_set() or stop.is_set()):
                if any(d["domid"] == domid and d["vcpu_parked"] for d in ctl.call("list_domains")):
                    parked.set()
                time.sleep(0.005)
        finally:
            ctl.close()
            blkback.signal_group(signal.SIGCONT)

    blkback.signal_group(signal.SIGSTOP)
    waker = threading.Thread(target=continue_blkback_once_parked)
    try:
        # Stopped before the write is issued: a blkback still running would answer it at once.
        states: list[str] = []
        wait_until_stopped = time.monotonic() + 10
        while (state := _proc_state(blkback.pid)) != "T":
            states.append(state)
            assert time.monotonic() < wait_until_stopped, f"blkback {blkback.pid} never stopped: {states[-5:]}"
            time.sleep(0.01)
        assert g.console.run(f"lifecycle background-write 0 {DATA_LBA} 9d {DATA_SECTORS}").startswith("started")
        time.sleep(0.2)
        result = g.console.run("lifecycle background-result")
        assert result.startswith("in flight"), (result, _proc_state(blkback.pid), blkback.pid)
        waker.start()
        g.save(tmp_path / "guest.save")
    finally:
        stop.set()
        if waker.ident:
            waker.join()
        blkback.signal_group(signal.SIGCONT)
    assert parked.is_set()  # the vCPU parked with the write unanswered
    g.restore(tmp_path / "guest.save")
    deadline = time.monotonic() + 20
    while (result := g.console.run("lifecycle background-result")).startswith("in flight"):
        assert time.monotonic() < deadline, result
        time.sleep(0.1)
    m = re.fullmatch(r"completed 1 time\(s\): ok sha256 (\w+)", result)
    assert m, result
    assert lc.image_sha(g) == m.group(1)
    assert re.search(r"\d+ requests outstanding: replayed on reconnect", g.console.run("log 400"))


def test_two_disks_and_two_nics_survive_a_migration(lc, io_guest, dom0: Dom0Backends) -> None:
    g = io_guest("two-disks-two-nics")
    lc.wait_for(g, "vbd list", r"^target 1 vbd \d+ .*connected", timeout=20)
    markers = {t: re.search(r"sha256 (\w+)", g.console.run(f"vbd write {t} {DATA_LBA} {p} {DATA_SECTORS}")).group(1)
               for t, p in ((0, "d0"), (1, "d1"))}
    before = lc.references(g)
    g.migrate()
    for t, marker in markers.items():
        lc.wait_for(g, "vbd list", rf"^target {t} vbd \d+ .*connected", timeout=20)
        out = g.console.run(f"vbd read {t} {DATA_LBA} {DATA_SECTORS}")
        assert re.search(rf"^sha256 {marker}\b", out, re.M), out
    disks, nics = lc.emulated(g.machine)
    assert disks.get("hda") is False and disks.get("hdb") is False and not nics, (disks, nics)
    for i, tap in enumerate(dom0.taps[g.domain.domid]):
        lc.wait_for(g, f"net -i {i} ping {tap.peer.ip} 3", r"3/3 replies", timeout=20)
    assert lc.references(g) == before


@pytest.mark.slow  # a console session and three CLI runs, each a process of its own
def test_xenpv_save_restore_and_migrate_commands_drive_a_console_session(lc, tmp_path: Path) -> None:
    """The CLI as a user runs it: `xenpv run --console` in one shell, `xenpv save|restore|migrate` in
    another; the session's guest moves to a new domain each time and its console still answers."""
    import subprocess
    import sys

    import pexpect

    def xenpv(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xenpv.harness.cli", *argv], capture_output=True, text=True,
                              timeout=120)

    # A guest name of its own: the commands find a session by name among every `xenpv run --console` on the
    # machine, and another run's "default" (a parallel test session) would make the name ambiguous.
    name = f"sr{os.getpid()}"
    guest = tmp_path / f"{name}.yaml"
    guest.write_text(Path("guests/default.yaml").read_text().replace("name: default", f"name: {name}", 1))
    session = pexpect.spawn(sys.executable, ["-m", "xenpv.harness.cli", "run", str(guest), "--console", "--artifacts", str(tmp_path / "art")],
                            encoding="utf-8", timeout=180)
    try:
        session.expect_exact("guest> ")
        assert re.search(r"domain (\d+)", session.before)
        missing = xenpv("save", "nosuchguest", str(tmp_path / "x.save"))
        assert missing.returncode == 2 and "no running `xenpv run --console` session has domain 'nosuchguest'" in missing.stderr
        saved = xenpv("save", name, str(tmp_path / "guest.save"))
        assert saved.returncode == 0 and re.match(rf"save: {name} is saved \(", saved.stdout), saved.stdout + saved.stderr
        restored = xenpv("restore", str(tmp_path / "guest.save"))
        m = re.match(rf"restore: {name} is running in dom(\d+) ", restored.stdout)
        assert restored.returncode == 0 and m, restored.stdout + restored.stderr
        migrated = xenpv("migrate", name)
        m2 = re.match(rf"migrate: {name} is running in dom(\d+) ", migrated.stdout)
        assert migrated.returncode == 0 and m2 and m2.group(1) != m.group(1), migrated.stdout + migrated.stderr
        again = xenpv("restore", str(tmp_path / "guest.save"))
        assert again.returncode == 1 and "needs a saved guest" in again.stdout
        session.sendline("lifecycle status")
        session.expect(r"running in dom(\d+); suspend count 2")
        assert session.match.group(1) == m2.group(1)
        session.expect_exact("guest> ")
        session.sendline("quit")
        session.expect(pexpect.EOF, timeout=60)
    finally:
        session.close(force=True)
    assert session.exitstatus == 0, session.before
