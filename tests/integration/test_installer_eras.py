"""Installer era (b) and the build variants on booted guests, through the console (reference
windows-pv-drivers.md 5b; XB src/coinst/coinst.c@5e3c42f^, src/xenbus.inf, src/xenfilt/fdo.c)."""
from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.integration

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
XENFILT_PARAMETERS = rf"{SERVICES}\XENFILT\Parameters"


def _ide_disks(tree: str) -> list[str]:
    return re.findall(r"^\s*(IDE\\Disk\S*)", tree, re.MULTILINE)


def _node(tree: str, prefix: str) -> str:
    lines = [line.strip() for line in tree.splitlines() if line.strip().startswith(prefix)]
    assert len(lines) == 1, f"{prefix!r} in\n{tree}"
    return lines[0]


def test_coinstaller_era_rules_on_a_running_guest(boot_guest) -> None:
    """The 2023-09 xenbus co-installer (DIF_INSTALLDEVICE) on a guest whose children are bound:
    AllowUpdate = 0 vetoes its install but not a co-installer-less era-(c) one; SupportChildDrivers vetoes
    the 2019 bus, whose table lacks the children's REV_09000009; reinstalling finds them on an older row
    than its newest (NewBinding) with the device active, so the post-process deletes XEN\\Unplug: the next
    boot unplugs nothing, and the children's requests make the one after it unplug again."""
    g = boot_guest("coinstaller-era")
    c = g.console
    vif = _node(c.run("devices"), r"XENBUS\VEN_XP&DEV_VIF")
    assert "[started] service=XENVIF" in vif, vif
    c.run(f"reg add '{SERVICES}\\XENFILT' /v AllowUpdate /t REG_DWORD /d 0")
    out = c.run("pkg install xenbus 9.1.0.1")
    assert "VETOED ERROR_ACCESS_DENIED (5)" in out and r"XENFILT\AllowUpdate = 0" in out, out
    c.run(f"reg add '{SERVICES}\\XENFILT' /v AllowUpdate /t REG_DWORD /d 1")

    out = c.run("pkg install xenbus 9.0.0.4")
    assert "VETOED ERROR_FILE_NOT_FOUND (2)" in out and "REV_09000009" in out, out
    assert "xenbus    9.1.0.1" in c.run("pkg list")

    c.run("reboot")  # the children re-armed XEN\Unplug at their start: this boot unplugs
    assert _ide_disks(c.run("devices")) == []
    out = c.run("pkg install xenbus 9.1.0.1")
    assert "co-installer: new binding" in out and r"XEN\Unplug DISKS and NICS cleared" in out, out
    unplug = c.run(rf"registry '{SERVICES}\XEN\Unplug'")
    assert "DISKS" not in unplug and "NICS" not in unplug, unplug
    c.run("reboot")
    # This boot requests no unplug (the console's reboot keeps the QEMU process, whose drives stay
    # detached from boot 2, so the log, not the device list, shows it); the children ask again.
    boot3 = c.run("log 400").rsplit("SETUP|boot 3", 1)[-1]
    assert "UnplugSetRequest: DISKS not requested" in boot3 and "UnplugDevices: DISKS" not in boot3, boot3
    assert "UnplugIncrementValue: DISKS 1" in boot3
    c.run("reboot")
    boot4 = c.run("log 400").rsplit("SETUP|boot 4", 1)[-1]
    assert "UnplugDevices: DISKS (mask 0x9)" in boot4, boot4


def test_force_activate_build_picks_the_vendor_device_over_the_first_one(boot_guest) -> None:
    """force-activate offers 0001 first: FdoSetActive's first-come choice would be 0001, but the FORCE_ACTIVATE
    xenbus.inf's Precedence (C000 = 0xC000) has XENFILT force-activate C000, and the FORCE_UNPLUG xenvbd.inf's
    ForceUnplug\\DISKS = 1 unplugs the disks from the first boot on, before any child asked."""
    g = boot_guest("force-activate")
    c = g.console
    tree = c.run("devices")
    assert "[started] service=XENBUS" in _node(tree, r"PCI\VEN_5853&DEV_C000")
    params = c.run(f"registry '{XENFILT_PARAMETERS}'")
    assert r"ActiveDeviceID = REG_SZ PCI\VEN_5853&DEV_C000" in params, params
    log = c.run("log 400")
    assert "FORCE_ACTIVATED" in log and "requested (ForceUnplug" in log, log
    assert _ide_disks(tree) == []
