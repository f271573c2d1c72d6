"""The libvirt launcher (issue 17) against a real libvirtd: the session's `libvirt_target` is the daemon of
--xenpv-libvirt, else a system one that answers at qemu:///system, else a private libvirtd the session
starts in a namespace of its own (harness.libvirtd) and stops at its end.

The no-platform shape booted as a libvirt domain of stock qemu-system-x86_64 must report what it reports
on the QEMU launcher's machine (tests/integration/test_guest_lifecycle.py
test_no_platform_guest_boots_and_unplugs_nothing): without the Xen platform device xen.sys stays
quiescent (upstream win-xenbus src/xen/driver.c DllInitialize: no Xen CPUID leaf, no hypercall page, "not
running on Xen") and XENFILT filters nothing (src/xenfilt/driver.c DriverEntry), so even stale unplug
counters do not take the emulated disk or NIC away and no XENBUS device appears.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import libvirt
import pytest

from xenpv.base.errors import LaunchFailure, MachineCrashed
from xenpv.base.owner import child_env
from xenpv.base.rundir import base_dir, owned_prefix, run_dirs
from xenpv.harness.cleanup import reap
from xenpv.guests.schema import GUESTS_DIR
from xenpv.guests.schema import load_guest
from xenpv.harness.libvirt_launcher import (DEVICE_REMOVED_EVENT, LIFECYCLE_EVENT, LibvirtMachine, LibvirtTarget,
                                           open_connection)
from xenpv.harness.libvirtd import PrivateLibvirtd
from xenpv.harness.machine import DEFAULT_QEMU, Machine

pytest_plugins = ["pytester"]

pytestmark = pytest.mark.integration

XEN_UNPLUG = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Unplug"
STOCK_QEMU = "/usr/bin/qemu-system-x86_64"
# The chipset of the pc machine (i440FX host bridge, PIIX3 ISA, IDE, PIIX4 ACPI) and the guest's RTL8139.
PCI_IDS = {0x1237, 0x7000, 0x7010, 0x7113, 0x8139}
# QEMU's ACPI PCI hotplug registers on the PIIX4 (hw/acpi/pcihp.c, at ACPI_PCIHP_ADDR 0xae00): the slots
# with a removal request (PCI_DOWN_BASE) and the eject register (PCI_EJ_BASE) that the guest's ACPI _EJ0
# method writes; PCI_SEL_BASE selects the bus (0: the root bus).
PCIHP_DOWN, PCIHP_EJECT, PCIHP_SEL = 0xAE04, 0xAE08, 0xAE10
# A device libvirt itself adds (and so reports the removal of), in a slot QEMU gave none of the guest's.
RNG_XML = ("<rng model='virtio'><backend model='random'>/dev/urandom</backend><alias name='ua-rng0'/>"
           "<address type='pci' domain='0' bus='0' slot='0x1f' function='0'/></rng>")
RNG_SLOT = 0x1F


# The PV drivers installed, on a machine without the platform device (a Xen guest's disk moved to KVM).
WITH_DRIVERS = """drivers:
  era: current
  packages: {xenbus: 9.1.0.10, xenvif: 9.1.0.10, xennet: 9.1.0.10, xenvbd: 9.1.0.10, xeniface: 9.1.0.10}
"""


def _libvirt_guest(tmp_path: Path, shape: str = "no-platform", drivers: str | None = None) -> Path:
    """The shape's YAML with `launcher: libvirt` (the agent and the run record read the file itself);
    `drivers`: a `drivers:` block instead of the shape's (its last one)."""
    text = (GUESTS_DIR / f"{shape}.yaml").read_text()
    if drivers is not None:
        text = text[:text.index("\ndrivers:") + 1] + drivers
    path = tmp_path / f"{shape}-libvirt.yaml"
    path.write_text(text + "launcher: libvirt\n")
    return path


def _inserted(machine) -> dict[str, bool]:
    return {b["qdev"]: "inserted" in b for b in machine.qmp.command("query-block") if b.get("qdev")}


def _pci_device_ids(machine) -> set[int]:
    return {d["id"]["device"] for bus in machine.qmp.command("query-pci") for d in bus["devices"]}


@pytest.mark.parametrize("drivers", [None, WITH_DRIVERS], ids=["no-drivers", "pv-drivers-installed"])
def test_no_platform_shape_boots_through_libvirt_and_unplugs_nothing(boot_guest, libvirt_target, tmp_path,
                                                                     drivers: str | None) -> None:
    g = boot_guest(_libvirt_guest(tmp_path, drivers=drivers))
    m = g.machine
    assert isinstance(m, LibvirtMachine) and m.binary == STOCK_QEMU
    # libvirt's QEMU, paused as started and never resumed: the agent alone drives the machine, over qtest.
    conn = open_connection(libvirt_target.uri)
    try:
        dom = conn.lookupByName(m.domain_name)
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        assert f"<emulator>{STOCK_QEMU}</emulator>" in dom.XMLDesc()
    finally:
        conn.close()
    assert m.qmp.command("query-status")["running"] is False
    assert _pci_device_ids(m) == PCI_IDS  # the machine the QEMU launcher makes: no USB, no balloon
    c = g.console
    for name in ("DISKS", "NICS"):  # what XENVBD and XENVIF leave behind on a machine they once ran on
        assert "successfully" in c.run(f"reg add '{XEN_UNPLUG}' /v {name} /t REG_DWORD /d 1")
    c.run("reboot")
    assert _inserted(m)["hda"] is True
    assert 0x8139 in _pci_device_ids(m)
    tree = c.run("devices")
    assert r"IDE\DiskQEMU_HARDDISK\0.0.0" in tree and "XENBUS" not in tree
    log = c.run("log 400")
    assert "not running on Xen" in log
    if drivers is not None:  # installed, and still nothing of them binds: no XENBUS without its PCI device
        assert "xenbus    9.1.0.10" in c.run("pkg list")


def test_libvirt_lifecycle_events_reach_the_machines_event_history(guest_factory, tmp_path) -> None:
    m = guest_factory(_libvirt_guest(tmp_path))
    other = guest_factory(_libvirt_guest(tmp_path), name="other")
    assert isinstance(m, LibvirtMachine) and isinstance(other, LibvirtMachine)
    started = m.qmp.wait_event(LIFECYCLE_EVENT, timeout=5, match={"event": "started"})
    assert started["data"] == {"domain": m.domain_name, "event": "started", "detail": "booted"}
    m.qmp.wait_event(LIFECYCLE_EVENT, timeout=5, match={"event": "suspended", "detail": "paused"})
    # libvirt calls every connection's callback for every domain: each machine keeps its own domain's.
    other.qmp.wait_event(LIFECYCLE_EVENT, timeout=5, match={"event": "started", "domain": other.domain_name})
    assert {e["data"]["domain"] for e in m.qmp.events if e["event"] == LIFECYCLE_EVENT} == {m.domain_name}
    # A suspend through libvirt's API: its event and QEMU's own STOP land in the same history.
    conn = open_connection(m.target.uri)
    try:
        conn.lookupByName(m.domain_name).resume()
        m.qmp.wait_event(LIFECYCLE_EVENT, timeout=5, match={"event": "resumed"})
        after = len(m.qmp.events)
        conn.lookupByName(m.domain_name).suspend()
    finally:
        conn.close()
    m.qmp.wait_event(LIFECYCLE_EVENT, timeout=5, match={"event": "suspended", "detail": "paused"}, after=after)
    m.qmp.wait_event("STOP", timeout=5, after=after)
    logged = (m.artifacts / "qmp-events.jsonl").read_text()
    assert '"event": "LIBVIRT_LIFECYCLE"' in logged and '"event": "STOP"' in logged


def test_a_domain_destroyed_behind_the_harness_is_reported_as_gone(guest_factory, tmp_path) -> None:
    m = guest_factory(_libvirt_guest(tmp_path))
    conn = open_connection(m.target.uri)
    try:
        conn.lookupByName(m.domain_name).destroy()
    finally:
        conn.close()
    with pytest.raises(MachineCrashed) as gone:
        m.check_alive("the test")
    assert "libvirt reported it stopped (destroyed)" in str(gone.value)
    m.qmp.wait_event(LIFECYCLE_EVENT, timeout=5, match={"event": "stopped", "detail": "destroyed"})


def test_a_device_libvirt_detaches_is_removed_when_the_guest_ejects_it(guest_factory, tmp_path) -> None:
    """virDomainDetachDevice asks QEMU for the unplug (device_del: an ACPI hotplug request); the guest sees
    its slot in the PCI "down" register and ejects it, as its ACPI GPE handler and _EJ0 method would; QEMU's
    DEVICE_DELETED and libvirt's DEVICE_REMOVED then reach the machine's event history."""
    m = guest_factory(_libvirt_guest(tmp_path))
    conn = open_connection(m.target.uri)
    detach: list[BaseException | int] = []
    try:
        dom = conn.lookupByName(m.domain_name)
        dom.attachDeviceFlags(RNG_XML, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        assert 0x1005 in _pci_device_ids(m)  # virtio-rng (transitional)

        def request() -> None:  # libvirt waits for the removal: in a thread, while the guest acts
            try:
                detach.append(dom.detachDeviceFlags(RNG_XML, libvirt.VIR_DOMAIN_AFFECT_LIVE))
            except BaseException as exc:
                detach.append(exc)

        t = threading.Thread(target=request, name="detach")
        t.start()
        m.qtest.outl(PCIHP_SEL, 0)
        deadline = time.monotonic() + 5
        while not m.qtest.inl(PCIHP_DOWN) & (1 << RNG_SLOT):
            assert time.monotonic() < deadline, "no ACPI removal request for the RNG's slot within 5 s"
            time.sleep(0.01)
        m.qtest.outl(PCIHP_EJECT, 1 << RNG_SLOT)
        removed = m.qmp.wait_event(DEVICE_REMOVED_EVENT, timeout=5)
        t.join(10)
        assert not t.is_alive() and detach == [0], detach
    finally:
        conn.close()
    assert removed["data"] == {"domain": m.domain_name, "device": "ua-rng0"}
    m.qmp.wait_event("DEVICE_DELETED", timeout=1, match={"device": "ua-rng0"})
    assert 0x1005 not in _pci_device_ids(m)


def test_debians_xen_qemu_cannot_be_probed_by_libvirt(libvirt_target) -> None:
    """Why the libvirt launcher runs stock QEMU: libvirt probes an emulator with -accel kvm and -accel tcg
    (qemu_capabilities.c virQEMUCapsInitQMPCommandRun); Debian's Xen build has the xen and qtest ones only."""
    conn = open_connection(libvirt_target.uri)
    try:
        with pytest.raises(libvirt.libvirtError, match="invalid accelerator tcg"):
            conn.getDomainCapabilities(DEFAULT_QEMU, "i686", "pc", "qemu")
    finally:
        conn.close()


INNER = """
from xenpv.harness.libvirt_launcher import LibvirtMachine
from xenpv.harness.machine import Machine


def test_inner(guest_factory, libvirt_target):
    assert libvirt_target.uri == {uri!r}
    assert type(guest_factory("no-platform")) is LibvirtMachine  # no `launcher` field: the option decides
    assert type(guest_factory("default")) is Machine  # the Xen platform device: only the Xen build has it
"""


def test_the_option_sends_every_guest_libvirt_can_run_to_its_daemon(pytester, libvirt_target, tmp_path) -> None:
    pytester.makepyfile(test_inner=INNER.format(uri=libvirt_target.uri))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--xenpv-libvirt={libvirt_target.uri}",
                                           f"--xenpv-artifacts={tmp_path / 'art'}")
    result.assert_outcomes(passed=1)


def test_a_remote_uri_stops_the_session_before_any_test(pytester) -> None:
    pytester.makepyfile(test_inner="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--xenpv-libvirt=qemu+ssh://root@host9/system")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--xenpv-libvirt 'qemu+ssh://root@host9/system': the guest agent maps*not on host9"])


def _fake_libvirtd(tmp_path: Path, body: str) -> Path:
    fake = tmp_path / "fake-libvirtd"
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    return fake


def _processes_running(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found


def test_a_private_libvirtd_that_exits_is_reported_with_its_output(tmp_path) -> None:
    fake = _fake_libvirtd(tmp_path, "echo 'fake libvirtd: no QEMU driver here' >&2\nexit 3\n")
    before = set(base_dir().glob(owned_prefix("libvirtd") + "*"))  # the session's own daemon's, if it runs
    with pytest.raises(LaunchFailure, match=r"(?s)did not start.*exit status 3.*fake libvirtd: no QEMU driver here"):
        PrivateLibvirtd.start(tmp_path / "libvirtd.log", libvirtd=str(fake))
    assert set(base_dir().glob(owned_prefix("libvirtd") + "*")) == before  # its run directory went


def test_a_private_libvirtd_deaf_to_sigterm_is_ended_with_its_namespace(tmp_path) -> None:
    """init gives the daemon `grace` seconds after SIGTERM, then exits: the kernel kills the PID namespace."""
    # Unique on the machine, not only in this session: tmp_path's last part is the same in every pytest run,
    # and a concurrent run's deaf daemon would be counted as this one's survivor.
    marker = f"deaf-{uuid.uuid4().hex}"
    fake = _fake_libvirtd(tmp_path, f"""dir=$(sed -n 's/^unix_sock_dir = "\\(.*\\)"/\\1/p' "$2")
exec {sys.executable} -c '
import signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1] + "/libvirt-sock")
s.listen()
while True:
    time.sleep(1)
' "$dir" {marker}
""")
    daemon = PrivateLibvirtd.start(tmp_path / "libvirtd.log", libvirtd=str(fake), grace=0.5)
    assert _processes_running(marker)
    t0 = time.monotonic()
    status = daemon.stop()
    assert status == 1 and 0.5 <= time.monotonic() - t0 < 3, status  # init's own end, not the SIGKILL after
    assert _processes_running(marker) == []


# A daemon configured as Debian's libvirt-daemon-system ships it: QEMU as libvirt-qemu, DAC labelling.
DEBIAN_QEMU_CONF = 'user = "libvirt-qemu"\ngroup = "libvirt-qemu"\ncgroup_controllers = [ ]\nnamespaces = [ ]\nstdio_handler = "file"\n'


@pytest.mark.slow
def test_a_daemon_running_qemu_as_libvirt_qemu_runs_the_harness_machine_as_root(tmp_path) -> None:
    """Without the DAC seclabel QEMU, as libvirt-qemu, cannot make its sockets in the harness's run directory
    ("Failed to unlink socket .../qmp.sock: Permission denied") and the domain fails to start. (Slow: such
    a daemon takes about 9 s before its first domain starts here, where the root-run one takes 1.)"""
    daemon = PrivateLibvirtd.start(tmp_path / "libvirtd.log", qemu_conf=DEBIAN_QEMU_CONF)
    try:
        m = LibvirtMachine(load_guest(GUESTS_DIR / "no-platform.yaml"), tmp_path / "m",
                           target=LibvirtTarget(daemon.uri, daemon.domain_logs))
        with m:
            assert m.qtest.endianness() == "little"
            assert "<label>+0:+0</label>" in (tmp_path / "m" / "domain.xml").read_text()
    finally:
        daemon.stop()


ORPHAN = """
import sys, time
from pathlib import Path
from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.harness.libvirt_launcher import LibvirtMachine, LibvirtTarget
m = LibvirtMachine(load_guest(GUESTS_DIR / "no-platform.yaml"), Path(sys.argv[2]), target=LibvirtTarget(sys.argv[1]))
m.launch()
print(m.domain_name, flush=True)
time.sleep(60)
"""


def test_the_qemu_of_a_run_that_died_is_reaped_and_its_domain_goes(libvirt_target, tmp_path) -> None:
    """A run SIGKILLed with a domain up (no teardown): libvirt gave its QEMU the run's owner mark, so the
    next run's reaper (harness.cleanup.reap, as at every session's start and in `xenpv clean`) kills that
    QEMU, and the transient domain is gone from the daemon."""
    errors = tmp_path / "orphan.err"
    with open(errors, "w") as err:
        run = subprocess.Popen([sys.executable, "-c", ORPHAN, libvirt_target.uri, str(tmp_path / "orphan")],
                               stdout=subprocess.PIPE, stderr=err, text=True, env=child_env())
    try:
        name = run.stdout.readline().strip()  # the launch's own deadline bounds this
        assert name.startswith("xenpv-"), errors.read_text()[-3000:]
    finally:
        run.kill()
        run.wait()
    conn = open_connection(libvirt_target.uri)
    try:
        assert conn.lookupByName(name).isActive()  # nothing of the dead run stopped it
        reaped = reap()
        assert run.pid in {p.owner.pid for p in reaped.processes}, reaped.lines()  # its QEMU, by its mark
        # Its run directory is gone: removed by this reap, or by another test's reaper running beside this one
        # (seen under pytest -n 4), which is just as good.
        assert not [d for d in run_dirs() if d.owner.pid == run.pid], reaped.lines()
        deadline = time.monotonic() + 5
        while name in [d.name() for d in conn.listAllDomains()]:
            assert time.monotonic() < deadline, f"{name} still defined 5 s after its QEMU was killed"
            time.sleep(0.05)
    finally:
        conn.close()


KILLED_RUN = """
import sys, time
from pathlib import Path
from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.harness.libvirt_launcher import LibvirtMachine, LibvirtTarget
from xenpv.harness.libvirtd import PrivateLibvirtd
out = Path(sys.argv[1])
daemon = PrivateLibvirtd.start(out / "libvirtd.log")
m = LibvirtMachine(load_guest(GUESTS_DIR / "no-platform.yaml"), out / "m",
                   target=LibvirtTarget(daemon.uri, daemon.domain_logs))
m.launch()
print(daemon.run_dir, m.domain_name, flush=True)
time.sleep(60)
"""


def test_a_run_killed_with_its_private_libvirtd_leaves_no_process(tmp_path) -> None:
    """SIGKILL, no teardown: the daemon's unshare dies with its parent (PR_SET_PDEATHSIG), its init with
    unshare (--kill-child), and with init every process of the PID namespace, the domain's QEMU too."""
    errors = tmp_path / "run.err"
    with open(errors, "w") as err:
        run = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=err, text=True, env=child_env())
    try:
        line = run.stdout.readline().split()
        assert len(line) == 2, errors.read_text()[-3000:]
        run_dir, domain = line
        assert _processes_running(run_dir) and _processes_running(domain)  # libvirtd's -f, QEMU's -name
    finally:
        run.kill()
        run.wait()
    deadline = time.monotonic() + 5
    while left := _processes_running(run_dir) + _processes_running(domain):
        assert time.monotonic() < deadline, f"still running 5 s after the run was killed: {left}"
        time.sleep(0.05)
    reap()  # what the next session's start does: the dead run's directories go
    assert not Path(run_dir).exists()


def test_xenpv_run_honours_launcher_libvirt(tmp_path: Path) -> None:
    """`xenpv run` of a `launcher: libvirt` guest boots it as a libvirt domain (its own private daemon when
    none answers), says what the drivers found, and leaves nothing behind."""
    import subprocess
    import sys

    guest = _libvirt_guest(tmp_path)
    out = subprocess.run([sys.executable, "-m", "xenpv.harness.cli", "run", str(guest), "--artifacts",
                          str(tmp_path / "art")], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "not a Xen guest" in out.stdout
    assert "left these behind" not in out.stderr, out.stderr[-2000:]
    # The domain's QEMU was libvirt's: its log is libvirt's domain log, copied into the run's artifacts.
    logs = list((tmp_path / "art").rglob("qemu.log"))
    assert logs and any("qemu-system-x86_64" in log.read_text() for log in logs), [str(p) for p in logs]
