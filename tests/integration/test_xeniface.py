"""XENIFACE on XENBUS's IFACE PDO and xenagent over it, end to end (issue 15): the driver started with its device
interface and drivers/<n>, xenagent's feature keys and control/shutdown watch, and the toolstack's
poweroff, reboot and s4 requests (backends.toolstack.domain.pvcontrol_domain, as libxl__domain_pvcontrol
writes them) carried out by the guest: QEMU powers off, Windows restarts, the guest hibernates. Upstream:
xcp-ng/win-xeniface f12cbdb src/xeniface/fdo.c (FdoCreate, FdoStartDevice, FdoSetDistribution,
FdoSuspendCallbackLate), src/xenagent/xenifacedevice.cpp (OnDeviceAdded, CheckShutdown, CheckSuspend,
StartShutdownWatch, StopShutdownWatch, SetXenTime)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenpv.backends.toolstack import ToolstackError
from xenpv.backends.toolstack.domain import pvcontrol_domain
from xenpv.harness import pvcontrol
from xenpv.harness.agent import Guest
from xenpv.stack.timescale import scaled

pytestmark = pytest.mark.integration

FEATURES = ("feature-poweroff", "feature-reboot", "feature-s3", "feature-s4")


def dom0_read(g: Guest, node: str) -> str | None:
    assert g.toolstack is not None and g.domain is not None
    try:
        return g.toolstack.xs.read(f"/local/domain/{g.domain.domid}/{node}").decode()
    except Exception:  # XsRequestError: ENOENT
        return None


def wait_features(g: Guest, value: str, timeout: float = 20.0) -> None:
    """xenagent runs on a thread of its own: its keys appear shortly after the boot or resume."""
    deadline = time.monotonic() + scaled(timeout)
    while True:
        got = {f: dom0_read(g, f"control/{f}") for f in FEATURES}
        if all(v == value for v in got.values()):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"control/feature-* never all {value!r}: {got}\n{g.console.run('xenagent status')}")
        time.sleep(0.1)


def test_xeniface_starts_on_the_iface_pdo_and_xenagent_advertises_its_power_requests(boot_guest) -> None:
    g = boot_guest("default")
    tree = g.console.run("devices")
    line = next(ln for ln in tree.splitlines() if "XENBUS\\VEN_XP&DEV_IFACE\\_" in ln)
    assert "[started] service=XENIFACE stack=XENBUS(PDO),XENIFACE(FDO)" in line and "problem" not in line, line
    # FdoSetDistribution: the first free drivers/<n>, "<vendor with _> XENIFACE <version> <attributes>"
    assert dom0_read(g, "drivers/0") == "Xen_Project XENIFACE 9.1.0.10 "
    wait_features(g, "1")
    status = g.console.run("xenagent status")
    assert re.search(r"running; device \\\?\?\\XENBUS#VEN_XP&DEV_IFACE#_#\{b2cfb085-aa5e-47e1-8bf7-9793f3154565\}; "
                     r"shutdown watch on", status), status
    refs = g.console.run("interfaces")
    assert "XENBUS.SHARED_INFO" in refs and "XENBUS.GNTTAB" in refs


def test_a_guest_without_the_xeniface_package_never_acknowledges_a_poweroff(boot_guest, tmp_path: Path) -> None:
    """No xenagent: nobody answers control/shutdown=poweroff (XENBUS answers only "suspend"), so the
    toolstack's request times out as libxl's does, and the guest runs on."""
    yaml = Path("guests/default.yaml").read_text()
    spec = tmp_path / "no-xeniface.yaml"
    spec.write_text(yaml.replace("name: default", "name: no-xeniface", 1).replace(", xeniface: 9.1.0.10", ""))
    g = boot_guest(str(spec))
    assert "xenagent: not running" in g.console.run("xenagent status")
    with pytest.raises(ToolstackError, match="guest didn't acknowledge control request within 2s"):
        pvcontrol_domain(g.toolstack.xs, g.toolstack.ctl, g.domain.domid, "poweroff", ack_timeout=2.0)
    assert dom0_read(g, "control/shutdown") == "poweroff"  # libxl leaves the request in place
    assert dom0_read(g, "control/feature-poweroff") in (None, "")
    assert g.console.run("xs read name") == "no-xeniface"  # still running


def test_reboot_request_restarts_windows_and_the_new_boot_advertises_again(boot_guest) -> None:
    g = boot_guest("default")
    wait_features(g, "1")
    timings = pvcontrol.reboot(g)
    assert timings.steps["acknowledged"] > 0 and "reboot" in timings.steps
    assert dom0_read(g, "control/shutdown") == ""  # xenagent wrote "" first (CheckShutdown)
    log = g.console.run("log 2000")
    assert re.search(r"^SETUP\|boot 2$", log, re.M), log[-2000:]
    wait_features(g, "1")
    assert "requests none" in g.console.run("xenagent status")  # the new boot's service


def test_s3_request_sleeps_the_guest_and_the_wake_restores_the_watch(boot_guest) -> None:
    """"s3": SetSuspendState; the power broadcast before the sleep's IRPs stops the shutdown watch (the feature
    keys written ""), the one after the wake (`power S0`) starts it again."""
    g = boot_guest("default")
    wait_features(g, "1")
    pvcontrol_domain(g.toolstack.xs, g.toolstack.ctl, g.domain.domid, "s3", ack_timeout=30.0)
    g.console.wait_for_log(r"^SETUP\|suspend: power S3: done$", timeout=scaled(20))
    wait_features(g, "")
    assert g.console.run("power S0") == "power S0: done"
    wait_features(g, "1")
    assert "requests s3" in g.console.run("xenagent status")


def test_shutdown_request_powers_qemu_off_and_power_on_boots_afresh(boot_guest) -> None:
    g = boot_guest("default")
    wait_features(g, "1")
    machine, domid = g.machine, g.domain.domid
    pvcontrol.shutdown(g)
    assert g.state == "off" and g.domain is None
    assert machine.process.popen.returncode is not None  # QEMU exited: the machine is off
    assert all(d["domid"] != domid for d in g.toolstack.ctl.call("list_domains"))
    assert '"event": "SHUTDOWN"' in (machine.paths.artifacts / "qmp-events.jsonl").read_text()
    out = g.power_on()
    assert out.startswith("fresh boot"), out  # no hiberfile: Windows starts afresh
    wait_features(g, "1")


def test_s4_request_hibernates_and_power_on_resumes_with_the_watch_again(lc, io_guest) -> None:
    g = io_guest("default")
    wait_features(g, "1")
    marker = lc.write_marker(g, "5e")
    machine = g.machine
    pvcontrol.hibernate(g)
    assert g.state == "off" and machine.process.popen.returncode is not None
    assert '"event": "SUSPEND_DISK"' in (machine.paths.artifacts / "qmp-events.jsonl").read_text()
    out = g.power_on()
    assert out.startswith("resumed from hibernation"), out
    # OnDeviceSuspend stopped the shutdown watch, OnDeviceResume (the power broadcast) starts it again
    wait_features(g, "1")
    assert "shutdown watch on" in g.console.run("xenagent status")
    assert re.search(r"sha256 (\w+)", g.console.run(f"vbd read 0 {lc.DATA_LBA} {lc.DATA_SECTORS}")).group(1) == marker
    pvcontrol.reboot(g)  # the watch works in the new domain


def test_a_resume_in_a_new_domain_recreates_the_watch_and_syncs_the_clock(lc, io_guest) -> None:
    """CheckSuspend: SUSPEND's count changed, so the watch is made again; SetXenTime(forced) after the
    suspend event, even with TimeSyncMode = 0 (which only stops the periodic sync)."""
    g = io_guest("default")
    wait_features(g, "1")
    assert g.console.run(r"reg add 'HKLM\SYSTEM\CurrentControlSet\Services\xenagent' /v TimeSyncMode "
                         r"/t REG_DWORD /d 0") == "The operation completed successfully."
    g.console.run("xenagent clock set 2000000000")  # 2033: far from Xen's clock
    assert "2033-05-18" in g.console.run("xenagent clock")
    g.migrate()
    deadline = time.monotonic() + scaled(20)
    while "suspend count 1" not in (status := g.console.run("xenagent status")):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert "shutdown watch on" in status
    clock = g.console.run("xenagent clock")
    assert "2033" not in clock, clock  # set from SHAREDINFO_GET_TIME
    assert "USER: Suspend(" in g.console.run("log 500")
    wait_features(g, "1")
    pvcontrol.reboot(g)  # and the re-created watch answers in the new domain


@pytest.mark.slow  # a console session and three CLI runs, each a process of its own
def test_xenpv_shutdown_reboot_and_hibernate_commands_drive_a_console_session(tmp_path: Path) -> None:
    import pexpect

    def xenpv(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "xenpv.harness.cli", *argv], capture_output=True, text=True,
                              timeout=300)

    name = f"pv{os.getpid()}"
    guest = tmp_path / f"{name}.yaml"
    guest.write_text(Path("guests/default.yaml").read_text().replace("name: default", f"name: {name}", 1))
    session = pexpect.spawn(sys.executable, ["-m", "xenpv.harness.cli", "run", str(guest), "--console", "--artifacts",
                                             str(tmp_path / "art")], encoding="utf-8", timeout=180)
    try:
        session.expect_exact("guest> ")
        rebooted = xenpv("reboot", name)
        assert rebooted.returncode == 0 and re.match(rf"reboot: {name} is running in dom\d+ \(", rebooted.stdout), \
            rebooted.stdout + rebooted.stderr
        off = xenpv("shutdown", name)
        assert off.returncode == 0 and re.match(rf"shutdown: {name} is off \(", off.stdout), off.stdout + off.stderr
        again = xenpv("hibernate", name)
        assert again.returncode == 1 and "cannot hibernate: it is off" in again.stdout, again.stdout
        session.sendline("quit")
        session.expect(pexpect.EOF, timeout=60)
    finally:
        session.close(force=True)


def test_a_fault_grant_ends_with_its_boot_when_xenagent_restarts_windows(boot_guest) -> None:
    """The console's `fault grant` belongs to one boot: after a restart through xenagent (not the console's
    own `reboot`), `fault revoke-in-use` finds nothing to revoke rather than the old boot's GNTTAB."""
    g = boot_guest("default")
    wait_features(g, "1")
    assert g.console.run("fault grant").startswith("granted ref ")
    pvcontrol.reboot(g)
    assert g.console.run("fault revoke-in-use").startswith("no outstanding grant"), "the old boot's grant"
