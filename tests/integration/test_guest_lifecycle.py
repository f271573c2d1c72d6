"""The guest's life cycle through its console: reboot and the registry, unplug on the boot after the
counters were armed, BOOT_EMULATED, S4 and the FdoS3ToS4 reference rule, a machine without Xen, and
injected faults (QUERY_INTERFACE at DISPATCH, a grant revoked while the back-end maps it)."""
from __future__ import annotations

import re

import pytest

from xenpv.base.errors import NotModelledPath
from xenpv.harness.agent import GuestBugcheck
from xenpv.stack.agent.console import NOT_MODELLED_MARKER, STOP_MARKER

pytestmark = pytest.mark.integration

XEN_UNPLUG = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Unplug"
MONITOR_REQUEST = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"


def _arm_unplug(console) -> None:
    """What XENVBD and XENVIF do at start (UNPLUG.Request(DISKS/NICS, TRUE), +1 on the counter). Those
    drivers are not in the tree yet, so their children stay without a driver and the counters are set
    through the registry, as the drivers' requests would leave them."""
    for name in ("DISKS", "NICS"):
        assert "successfully" in console.run(f"reg add '{XEN_UNPLUG}' /v {name} /t REG_DWORD /d 1")


def _inserted(machine) -> dict[str, bool]:
    return {b["qdev"]: "inserted" in b for b in machine.qmp.command("query-block") if b.get("qdev")}


def _references(console) -> dict[str, int]:
    return {name: int(count) for name, count in (line.split() for line in console.run("interfaces").splitlines())}


def _pci_device_ids(machine) -> set[int]:
    return {d["id"]["device"] for bus in machine.qmp.command("query-pci") for d in bus["devices"]}


def test_reboot_keeps_persistent_keys_and_drops_volatile_ones(boot_guest) -> None:
    c = boot_guest("default").console
    assert "successfully" in c.run(r"reg add 'HKLM\SOFTWARE\Harness' /v Persist /t REG_DWORD /d 7")
    assert "reboot required" in c.run("pkg install xenbus 9.1.0.10")  # a reinstall asks for a reboot
    assert re.search(r"XENBUS \(volatile\)\n\s+Reboot = REG_DWORD 0x1", c.run(f"registry '{MONITOR_REQUEST}'"))
    assert re.fullmatch(r"boot 2 \(reboot requested by (\w+, )*XENBUS(, \w+)*\)", c.run("reboot"))
    assert "Persist = REG_DWORD 0x7" in c.run(r"registry 'HKLM\SOFTWARE\Harness'")
    assert "XENBUS" not in c.run(f"registry '{MONITOR_REQUEST}'")
    assert "[started] service=XENBUS" in c.run("devices")


def test_unplug_counters_of_boot_one_unplug_on_boot_two(boot_guest) -> None:
    """Boot 1 unplugs nothing (no counters yet); the counters armed during boot 1 make xen.sys request the
    unplug at boot 2 (and delete them), so QEMU's emulated disk and NIC are gone before the PV children
    start. XENVBD/XENVIF do not exist yet: the counters are set through the registry (see _arm_unplug)."""
    g = boot_guest("default")
    c = g.console
    assert _inserted(g.machine)["hda"] and 0x8139 in _pci_device_ids(g.machine)
    _arm_unplug(c)
    c.run("reboot")
    assert _inserted(g.machine)["hda"] is False
    assert 0x8139 not in _pci_device_ids(g.machine)
    tree = c.run("devices")
    assert "DEV_8139" not in tree and r"IDE\Disk" not in tree
    assert r"XENBUS\VEN_XP&DEV_VBD\_" in tree  # the PV disk is what boots now: no 0x7B
    log = c.run("log 400")
    assert "UnplugSetRequest: DISKS requested" in log and "UnplugSetRequest: NICS requested" in log


def test_boot_emulated_keeps_the_primary_master(boot_guest) -> None:
    g = boot_guest("boot-emulated")
    c = g.console
    _arm_unplug(c)
    c.run("reboot")
    inserted = _inserted(g.machine)
    assert inserted["hda"] is True and inserted["hdc"] is False, inserted
    assert 0x8139 not in _pci_device_ids(g.machine)
    tree = c.run("devices")
    assert r"IDE\DiskQEMU_HARDDISK\0.0.0" in tree
    assert "(BOOT_EMULATED)" in c.run("log 400")


def test_s4_without_a_backend_for_the_system_disk_goes_back_to_s0(boot_guest) -> None:
    """No blkback here: xencrsh cannot connect the system disk, so no image is written, the machine stays
    on and the guest is back in S0 with its interfaces (the real round trip: tests/integration/
    test_hibernate.py)."""
    g = boot_guest("default")
    c = g.console
    before = _references(c)
    out = c.run("power S4", timeout=60)
    assert out.startswith("error: hibernation failed, the guest is back in S0: vbd 768: backend "), out
    assert g.machine.qmp.command("query-status")["status"] == "running"
    assert "FdoS4ToS3: resume from S4" in c.run("log 100")
    assert _references(c) == before
    assert c.run("xs read name") == "default"  # the store works after resume


def test_s4_with_a_leaked_store_reference_bugchecks(boot_guest) -> None:
    c = boot_guest("default").console
    held = _references(c)["XENBUS.STORE"]  # the children's own, which they must drop on the way to D3
    assert f"never released ({held + 1} now)" in c.run("fault leak-ref STORE")
    with pytest.raises(GuestBugcheck) as stop:
        c.run("power S4")
    dump = stop.value.dump
    assert (dump.code, dump.module) == (0xDEAD, "xenbus.sys"), dump.module
    # fdo.c FdoS3ToS4: BUG_ON(<Interface>GetReferences(Fdo-><Interface>Context) != 0), the expression as text
    assert re.fullmatch(r"BUG: [A-Za-z]+GetReferences\(Fdo->[A-Za-z]+Context\) != 0", dump.message), dump.message
    assert dump.interface_references["XENBUS.STORE"] >= 1  # ours, whatever the children dropped on the way


def test_no_platform_guest_boots_and_unplugs_nothing(boot_guest) -> None:
    """Not a Xen guest: even stale unplug counters (the bfcf8f7 0x7B) must not take the boot disk away."""
    g = boot_guest("no-platform")
    c = g.console
    _arm_unplug(c)
    c.run("reboot")
    assert _inserted(g.machine)["hda"] is True
    assert 0x8139 in _pci_device_ids(g.machine)
    tree = c.run("devices")
    assert r"IDE\DiskQEMU_HARDDISK\0.0.0" in tree and "XENBUS" not in tree
    assert "not running on Xen" in c.run("log 400")


def test_query_interface_at_dispatch_bugchecks_naming_the_child(boot_guest) -> None:
    c = boot_guest("default").console
    with pytest.raises(GuestBugcheck) as stop:
        c.run("fault irql-query-interface VBD")
    assert stop.value.dump.name == "DRIVER_IRQL_NOT_LESS_OR_EQUAL"
    assert stop.value.dump.module == "xenvbd.sys"


def test_revoke_of_a_grant_the_backend_maps_fails_and_succeeds_after_unmap(boot_guest) -> None:
    g = boot_guest("default")
    c = g.console
    held = _references(c)["XENBUS.GNTTAB"]
    m = re.match(r"granted ref (\d+) pfn (0x[0-9a-f]+) to dom0", c.run("fault grant 0"))
    assert m, "no grant"
    ref, pfn = int(m.group(1)), int(m.group(2), 16)
    assert g.toolstack is not None and g.domain is not None
    mapping = g.toolstack.ctl.call("gnttab_map", domid=g.domain.domid, ref=ref, readonly=False)  # the back-end
    assert mapping["gfn"] == pfn
    assert "STATUS_UNSUCCESSFUL: the back-end still maps it" in c.run("fault revoke-in-use")
    assert _references(c)["XENBUS.GNTTAB"] == held + 1
    g.toolstack.ctl.call("gnttab_unmap", handle=mapping["handle"])
    assert c.run("fault revoke-in-use") == f"revoke ref {ref}: STATUS_SUCCESS"
    assert _references(c)["XENBUS.GNTTAB"] == held


def test_removing_xenvbd_with_its_unplug_request_armed_is_a_real_0x7b(boot_guest) -> None:
    """XENVBD left UNPLUG.Request(DISKS) armed when its package went: the next boot's xen.sys unplugs the
    emulated disk and nothing drives the VBD PDO, so Windows has no boot disk (a VBD PDO without its driver
    is no disk)."""
    c = boot_guest("default").console
    c.run("reboot")  # boot 2: the PV disk boots
    assert "removed xenvbd" in c.run("pkg remove xenvbd")
    with pytest.raises(GuestBugcheck) as stop:
        c.run("reboot")
    assert stop.value.bucket == "0x7B_ntoskrnl!check_boot_device"


def test_a_boot_that_needs_a_disk_an_earlier_boot_unplugged_ends_as_not_modelled(boot_guest) -> None:
    """Without XENBUS nothing unplugs at the next boot, so on Xen (a restart is a new domain with a new QEMU)
    Windows boots from the emulated disk. Here the restart keeps the QEMU whose disk boot 2 unplugged: the
    guest ends saying so, with no STOP and no dump (stack.notmodelled), instead of a false 0x7B."""
    g = boot_guest("default")
    c = g.console
    c.run("reboot")
    assert _inserted(g.machine)["hda"] is False
    assert "removed xenbus" in c.run("pkg remove xenbus")
    with pytest.raises(NotModelledPath, match="an earlier boot of the same QEMU unplugged"):
        c.run("reboot")
    log = c.log_path.read_text()
    assert NOT_MODELLED_MARKER in log and STOP_MARKER not in log
    assert not list(g.machine.artifacts.glob("**/crash-*.json"))
