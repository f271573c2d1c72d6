"""Xen save/restore, checkpoint and local migration end to end (issue 13): a guest with real blkback and
netback (a network namespace of dom0's own), rebooted once so its PV drivers own the disk and the NIC, is
saved by the toolstack's suspend request, its QEMU stopped and its device state saved by QMP migrate, then
restored into a new QEMU and a NEW domain. After every resume: the emulated devices unplugged before stay
unplugged on the new QEMU (QMP), the interface references are what they were, data written before the
save is on the image (read from outside) and the PV disk reads and writes, the PV NIC answers pings and
sent its three gratuitous ARPs into the namespace, xenstore watches fire."""
from __future__ import annotations

import hashlib
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenpv.backends.host import HostServices
from xenpv.harness.agent import Guest
from xenpv.harness.dom0 import Dom0Backends
from xenpv.harness.lifecycle import BadSaveImage, LifecycleError, SaveFailed, read_manifest
from xenpv.harness.netns import NetNamespace
from xenpv.harness.machine import Machine

pytestmark = pytest.mark.integration

ETH_P_ARP = 0x0806
DATA_LBA = 4096
DATA_SECTORS = 8


@pytest.fixture
def dom0(host: HostServices, artifacts: Path) -> Iterator[Dom0Backends]:
    backends = Dom0Backends.start(host, artifacts / "dom0")
    yield backends
    backends.stop()


@pytest.fixture
def io_guest(host: HostServices, guest_factory: Callable[..., Machine], dom0: Dom0Backends) -> Iterator[Callable[..., Guest]]:
    """A guest whose PV drivers own its disks and NICs: booted with dom0's back-ends, then rebooted so the
    unplug its drivers asked for takes effect."""
    guests: list[Guest] = []

    def boot(spec: str = "default") -> Guest:
        g = Guest.boot(host, guest_factory(spec), backends=dom0)
        guests.append(g)
        assert re.match(r"boot 2", g.console.run("reboot", timeout=60))
        wait_for(g, "vbd list", r"^target \d+ vbd \d+ .*connected", timeout=20)
        wait_for(g, "net list", r"\bonline\b|\bup\b|\bconnected\b", timeout=20)
        return g

    yield boot
    for g in reversed(guests):
        g.shutdown()
    host.check_alive("after the test")


def wait_for(g: Guest, command: str, pattern: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = g.console.run(command, timeout=30)
        if re.search(pattern, out, re.M):
            return out
        if time.monotonic() >= deadline:
            raise AssertionError(f"{command!r} never matched {pattern!r}; last output:\n{out}")
        time.sleep(0.1)


def references(g: Guest) -> dict[str, int]:
    return {name: int(count) for name, count in (line.split() for line in g.console.run("interfaces").splitlines())}


def emulated(machine: Machine) -> tuple[dict[str, bool], set[int]]:
    """What QMP says is left of the emulated devices: disks with their medium, NIC device IDs."""
    assert machine.qmp is not None
    disks = {b["qdev"]: "inserted" in b for b in machine.qmp.command("query-block") if b.get("qdev")}
    nics = {d["id"]["device"] for bus in machine.qmp.command("query-pci") for d in bus["devices"]
            if d["class_info"]["class"] == 0x0200}
    return disks, nics


def write_marker(g: Guest, pattern: str) -> str:
    out = g.console.run(f"vbd write 0 {DATA_LBA} {pattern} {DATA_SECTORS}")
    m = re.search(r"sha256 (\w+)", out)
    assert m, out
    return m.group(1)


def image_sha(g: Guest) -> str:
    """The marker's sectors read from the image file itself, outside the guest."""
    assert g.storage is not None or g.machine.paths.image_dir.exists()
    image = (g.storage or g.machine.paths.image_dir) / "hda.img"
    with open(image, "rb") as f:
        f.seek(DATA_LBA * 512)
        return hashlib.sha256(f.read(DATA_SECTORS * 512)).hexdigest()


class ArpCapture:
    """Every ARP frame any interface of the namespace sees (including TAPs made after it opened)."""

    def __init__(self, ns: NetNamespace) -> None:
        with ns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.settimeout(0.1)

    def gratuitous(self, address: str, timeout: float = 5.0, want: int = 3) -> int:
        """How many gratuitous ARPs (sender and target both `address`) arrive within `timeout`."""
        ip = socket.inet_aton(address)
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < want and time.monotonic() < deadline:
            try:
                frame = self.sock.recv(2048)
            except socket.timeout:
                continue
            arp = frame[14:42]
            if len(arp) == 28 and struct.unpack("!H", arp[6:8])[0] in (1, 2) and arp[14:18] == ip and arp[24:28] == ip:
                seen += 1
        return seen

    def close(self) -> None:
        self.sock.close()


def check_after_resume(g: Guest, before: dict, marker: str, dom0: Dom0Backends, capture: ArpCapture) -> None:
    """The post-resume checks of issue 13."""
    disks, nics = emulated(g.machine)
    assert disks.get("hda") is False and 0x8139 not in nics, (disks, nics)  # unplugged again (08def99)
    assert g.console.run("lifecycle status").startswith("running in dom")
    wait_for(g, "vbd list", r"^target 0 vbd \d+ .*connected", timeout=20)
    assert image_sha(g) == marker  # data written before the save, on the image
    out = g.console.run(f"vbd read 0 {DATA_LBA} {DATA_SECTORS}")
    assert re.search(rf"^sha256 {marker}\b", out, re.M), out
    again = write_marker(g, "c3")
    assert image_sha(g) == again
    taps = dom0.taps[g.domain.domid]
    assert capture.gratuitous(str(taps[0].guest)) == 3
    out = wait_for(g, f"net ping {taps[0].peer.ip} 3", r"3/3 replies", timeout=20)
    assert references(g) == before, (references(g), before)
    assert g.console.run("xs write data/probe resumed") == "OK"
    assert g.console.run("xs read data/probe") == "resumed"


def test_save_then_restore_into_a_new_domain(io_guest, dom0: Dom0Backends, tmp_path: Path) -> None:
    g = io_guest("default")
    first = g.domain.domid
    marker = write_marker(g, "a5")
    before = references(g)
    timings = g.save(tmp_path / "guest.save")
    assert g.state == "saved" and g.domain is None
    assert g.console.run("lifecycle status").startswith("suspended")
    assert set(timings.steps) >= {"suspend", "device_state", "write_image", "teardown"}
    manifest = read_manifest(tmp_path / "guest.save")
    assert manifest.source_domid == first and not manifest.checkpoint
    capture = ArpCapture(dom0.netns)
    try:
        g.restore(tmp_path / "guest.save")
        assert g.domain.domid != first
        check_after_resume(g, before, marker, dom0, capture)
    finally:
        capture.close()
    assert "SUSPEND: EARLY (0)" in g.console.run("log 400")


def test_checkpoint_resumes_the_same_domain_and_runs_no_resume_callback(io_guest, tmp_path: Path) -> None:
    """SCHEDOP_shutdown returns 1 (cancelled): SchedShutdown's STATUS_CANCELLED, so neither SuspendEarly nor
    the LATE list runs (suspend.c); the guest runs on in the same domain, devices connected as they were."""
    g = io_guest("default")
    domid, machine = g.domain.domid, g.machine
    marker = write_marker(g, "5a")
    before = references(g)
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
    assert references(g) == before
    with pytest.raises(LifecycleError, match="needs a saved guest"):
        g.restore(tmp_path / "checkpoint.save")


def test_local_migration_to_a_new_qemu_and_domid_tears_the_source_down(io_guest, dom0: Dom0Backends) -> None:
    g = io_guest("default")
    source_domid, source = g.domain.domid, g.machine
    marker = write_marker(g, "e7")
    before = references(g)
    capture = ArpCapture(dom0.netns)
    try:
        g.migrate()
        assert g.domain.domid != source_domid and g.machine is not source
        assert source.process.popen.poll() is not None  # the source QEMU is gone
        assert all(d["domid"] != source_domid for d in g.toolstack.ctl.call("list_domains"))
        assert source_domid not in dom0.taps
        check_after_resume(g, before, marker, dom0, capture)
    finally:
        capture.close()
    assert g.console.run("lifecycle status").endswith("suspend count 1")


def test_a_guest_that_ignores_the_suspend_request_is_not_saved_and_runs_on(io_guest, tmp_path: Path) -> None:
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
    marker = write_marker(g, "11")
    assert image_sha(g) == marker
    # Answered again, the same guest saves and restores.
    assert g.console.run("lifecycle ignore-suspend off") == "control/shutdown=suspend is answered"
    g.save(tmp_path / "now.save")
    g.restore(tmp_path / "now.save")
    assert image_sha(g) == marker


def test_a_backend_missing_at_restore_is_waited_for_and_connected_when_it_appears(io_guest, dom0: Dom0Backends,
                                                                                  tmp_path: Path) -> None:
    g = io_guest("default")
    marker = write_marker(g, "b4")
    g.save(tmp_path / "guest.save")
    dom0.kill("blkback")
    g.restore(tmp_path / "guest.save")
    time.sleep(1.0)
    assert "connected" not in g.console.run("vbd list").split("backend")[0]  # waiting for a back-end
    dom0.start_backend("blkback")
    wait_for(g, "vbd list", r"^target 0 vbd \d+ connected", timeout=20)
    out = g.console.run(f"vbd read 0 {DATA_LBA} {DATA_SECTORS}")
    assert re.search(rf"^sha256 {marker}\b", out, re.M), out


def test_a_write_in_flight_at_the_save_completes_exactly_once_after_the_restore(io_guest, dom0: Dom0Backends,
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
        assert g.console.run(f"lifecycle background-write 0 {DATA_LBA} 9d {DATA_SECTORS}").startswith("started")
        time.sleep(0.2)
        assert g.console.run("lifecycle background-result").startswith("in flight")
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
    assert image_sha(g) == m.group(1)
    assert re.search(r"\d+ requests outstanding: replayed on reconnect", g.console.run("log 400"))


def test_two_disks_and_two_nics_survive_a_migration(io_guest, dom0: Dom0Backends) -> None:
    g = io_guest("two-disks-two-nics")
    wait_for(g, "vbd list", r"^target 1 vbd \d+ .*connected", timeout=20)
    markers = {t: re.search(r"sha256 (\w+)", g.console.run(f"vbd write {t} {DATA_LBA} {p} {DATA_SECTORS}")).group(1)
               for t, p in ((0, "d0"), (1, "d1"))}
    before = references(g)
    g.migrate()
    for t, marker in markers.items():
        wait_for(g, "vbd list", rf"^target {t} vbd \d+ .*connected", timeout=20)
        out = g.console.run(f"vbd read {t} {DATA_LBA} {DATA_SECTORS}")
        assert re.search(rf"^sha256 {marker}\b", out, re.M), out
    disks, nics = emulated(g.machine)
    assert disks.get("hda") is False and disks.get("hdb") is False and not nics, (disks, nics)
    for i, tap in enumerate(dom0.taps[g.domain.domid]):
        wait_for(g, f"net -i {i} ping {tap.peer.ip} 3", r"3/3 replies", timeout=20)
    assert references(g) == before


def test_xenpv_save_restore_and_migrate_commands_drive_a_console_session(tmp_path: Path) -> None:
    """The CLI as a user runs it: `xenpv run --console` in one shell, `xenpv save|restore|migrate` in
    another; the session's guest moves to a new domain each time and its console still answers."""
    import subprocess
    import sys

    import pexpect

    def xenpv(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xenpv.harness.cli", *argv], capture_output=True, text=True,
                              timeout=120)

    session = pexpect.spawn(sys.executable, ["-m", "xenpv.harness.cli", "run", "guests/default.yaml", "--console", "--artifacts", str(tmp_path / "art")],
                            encoding="utf-8", timeout=180)
    try:
        session.expect_exact("guest> ")
        assert re.search(r"domain (\d+)", session.before)
        missing = xenpv("save", "nosuchguest", str(tmp_path / "x.save"))
        assert missing.returncode == 2 and "no running `xenpv run --console` session has domain 'nosuchguest'" in missing.stderr
        saved = xenpv("save", "default", str(tmp_path / "guest.save"))
        assert saved.returncode == 0 and re.match(r"save: default is saved \(", saved.stdout), saved.stdout + saved.stderr
        restored = xenpv("restore", str(tmp_path / "guest.save"))
        m = re.match(r"restore: default is running in dom(\d+) ", restored.stdout)
        assert restored.returncode == 0 and m, restored.stdout + restored.stderr
        migrated = xenpv("migrate", m.group(1))
        m2 = re.match(r"migrate: default is running in dom(\d+) ", migrated.stdout)
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
