"""Compatibility acceptance (reference windows-pv-drivers.md 5), driven through the booted guest's console:
the subscriber-era veto, children bound to a revision the bus lacks, and the XenTouch exact-version check."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration

MONITOR_REQUEST = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"
SYSTEM_CLASS = r"HKLM\SYSTEM\CurrentControlSet\Control\Class\{4d36e97d-e325-11ce-bfc1-08002be10318}"


def _node(tree: str, prefix: str) -> str:
    lines = [line.strip() for line in tree.splitlines() if line.strip().startswith(prefix)]
    assert len(lines) == 1, f"{prefix!r} in\n{tree}"
    return lines[0]


def test_subscriber_era_provider_before_subscriber_is_vetoed(boot_guest) -> None:
    g = boot_guest("subscriber-era")
    c = g.console
    out = c.run("pkg upgrade xenbus 8.0.1.1")
    assert "VETOED ERROR_REVISION_MISMATCH (1306)" in out, out
    assert "subscriber XENVIF uses XENBUS EVTCHN interface version 4" in out and "upgrade XENVIF first" in out
    assert "xenbus    8.0.0.1" in c.run("pkg list")  # nothing of the vetoed package landed
    assert "VETOED" in c.run("log 20")  # setupapi's log has it too

    assert "upgraded xenvif 8.0.1.1" in c.run("pkg upgrade xenvif 8.0.1.1")
    out = c.run("pkg upgrade xenbus 8.0.1.1")
    assert "upgraded xenbus 8.0.1.1 (subscriber era), replacing 8.0.0.1" in out and "reboot required" in out
    assert "boot 2" in c.run("reboot")
    packages = c.run("pkg list")
    assert "xenbus    8.0.1.1" in packages and "xenvif    8.0.1.1" in packages
    assert "MODULE 'XENBUS' 8.0.1.1" in c.run("log 200")
    assert "[started] service=XENBUS" in c.run("devices")


def test_current_era_children_on_a_revision_the_bus_lacks_stay_unbound(boot_guest) -> None:
    g = boot_guest("default")
    c = g.console
    out = c.run("pkg install xenvif 9.0.0.3")
    # xenvif 9.0.0.3 binds XENBUS REV_09000005, retired from xenbus 9.1.0.10.
    assert "binds XENBUS REV_09000005, which xenbus 9.1.0.10 does not offer" in out, out
    c.run("reboot")
    vif = _node(c.run("devices"), r"XENBUS\VEN_XP&DEV_VIF\_")
    assert "service=" not in vif and "problem=28:CM_PROB_FAILED_INSTALL" in vif, vif
    log = c.run("log 400")
    assert re.search(r"XENBUS\\VEN_XP&DEV_VIF\\_: problem 28 .*no driver package matches", log), log
    # The PDO really offers no REV_09000005: the reason the install gave is what PnP found.
    hardware_ids = c.run(r"registry 'HKLM\SYSTEM\CurrentControlSet\Enum\XENBUS\VEN_XP&DEV_VIF\_'")
    assert "REV_0900000B" in hardware_ids and "REV_09000005" not in hardware_ids


def test_xentouch_mismatch_blocks_xenbus_and_requests_a_reboot(boot_guest) -> None:
    """xentouch-mismatch has a 9.1.0.5 xenbus.sys beside a 9.1.0.10 xen.sys: every boot XENBUS's XenTouch
    fails, and its DriverEntry (XB src/xenbus/driver.c) installs the XENFILT class filters, asks for the
    reboot and returns STATUS_SUCCESS without setting AddDevice, so the platform device gets no function
    driver; reinstalling the package whole and rebooting clears it."""
    g = boot_guest("xentouch-mismatch")
    c = g.console
    assert "boot 2 (reboot requested by XENBUS)" in c.run("reboot")
    log = c.run("log 400")
    assert "MODULE 'XENBUS' NOT COMPATIBLE (REBOOT REQUIRED): built for 9.1.0.5, xen.sys is 9.1.0.10" in log
    assert "MODULE 'XENFILT' 9.1.0.10" in log  # the images that agree load
    assert "XENBUS: DriverEntry failed" not in log and "XENBUS: loaded" in log
    bus = _node(c.run("devices"), r"PCI\VEN_5853&DEV_0001")
    assert "problem=31:CM_PROB_FAILED_ADD (STATUS_NOT_SUPPORTED)" in bus, bus
    system_class = c.run(f"registry '{SYSTEM_CLASS}'")
    assert re.search(r"UpperFilters = REG_MULTI_SZ .*XENFILT", system_class), system_class
    request = c.run(f"registry '{MONITOR_REQUEST}'")
    assert re.search(r"XENBUS \(volatile\)\n\s+Reboot = REG_DWORD 0x1", request), request

    assert "reboot required" in c.run("pkg install xenbus 9.1.0.10")
    c.run("reboot")
    assert "[started] service=XENBUS" in _node(c.run("devices"), r"PCI\VEN_5853&DEV_0001")
    assert "XENBUS (volatile)" not in c.run(f"registry '{MONITOR_REQUEST}'")  # gone with the reboot, not re-made
    assert "NOT COMPATIBLE" not in c.run("log 400")
