"""The "new device ID" problem of the Standard drivers: a guest whose platform device moves from 0001 to
the vendor device C000 sees new hardware. What the active-device rules (XB src/xenbus/fdo.c
FdoSetActive, src/xen/config.c) and XENFILT's Precedence (src/xenfilt/fdo.c FdoEnumerate, installed by
the FORCE_ACTIVATE build of xenbus.inf) make of it, booting the same registry on the changed machine."""
from __future__ import annotations

from xenpv.stack.drivers.xen.config import XENFILT_PARAMETERS
from xenpv.stack.install import Installer
from xenpv.stack.kernel import Registry

from .test_unplug import _arm_children

DEV_0001 = r"PCI\VEN_5853&DEV_0001&SUBSYS_00015853&REV_01"
DEV_C000 = r"PCI\VEN_5853&DEV_C000&SUBSYS_C0005853&REV_01"


def _active(registry: Registry) -> str:
    return registry.get_sz(XENFILT_PARAMETERS, "ActiveDeviceID")


def test_moved_to_c000_the_stored_active_device_leaves_the_guest_emulated(rig, machine) -> None:
    """FdoSetActive's fallback: ActiveDeviceID (0001) is stored, so the new C000 FDO is not active
    (stricmp), XENFILT finds no active device present and unplugs nothing: no PV device, the emulated
    disk stays in use - on every boot, since nothing rewrites ActiveDeviceID."""
    registry = Registry()
    first = rig.boot(machine(0x0001), registry)
    assert _active(registry) == DEV_0001 and first.nodes("XENBUS\\VEN_XP&DEV_VBD")
    _arm_children(first)
    m = machine(0xC000)
    moved = rig.boot(m, registry)
    assert [f.active for f in moved.xenbus.fdos] == [False]
    assert moved.nodes("XENBUS\\") == [] and m.unplug_writes == []
    assert [n.instance_id for n in moved.nodes("IDE\\")] == ["0.0.0"]
    assert _active(registry) == DEV_0001


def test_with_both_devices_the_old_one_stays_active_and_c000_blocks_a_fresh_choice_of_it(rig, machine) -> None:
    """C000 added next to 0001: the stored 0001 stays active; once C000 has an Enum key, 0001 can no
    longer be chosen afresh (ConfigSetActive refuses a legacy device), so a cleared active device leaves
    C000 as the only candidate."""
    registry = Registry()
    rig.boot(machine(0x0001), registry)
    both = rig.boot(machine(0x0001, 0xC000), registry)
    assert {f"{f.pci_device_id:04X}": f.active for f in both.xenbus.fdos} == {"0001": True, "C000": False}
    registry.delete_value(XENFILT_PARAMETERS, "ActiveDeviceID")
    registry.delete_value(XENFILT_PARAMETERS, "ActiveInstanceID")
    again = rig.boot(machine(0x0001, 0xC000), registry)
    assert {f"{f.pci_device_id:04X}": f.active for f in again.xenbus.fdos} == {"0001": False, "C000": True}
    assert _active(registry) == DEV_C000


def test_force_activate_moves_the_guest_to_c000_and_its_children_keep_their_instance_paths(rig, machine) -> None:
    """With the FORCE_ACTIVATE build (Precedence 0001=1, C000=0xC000) XENFILT force-activates C000, whose
    FDO records itself (ConfigSetActive: C000 is not legacy) and unplugs. The children's hardware IDs
    now name C000 (XENBUS\\VEN_XPC000&DEV_VBD&REV_...), but their DeviceID carries only the vendor prefix
    since df761e9 (pdo.c PdoQueryId, 2025-08: "the device instance path [changed] if the active device
    changes"), so they keep their instance paths and Enum keys."""
    registry = Registry()
    Installer(registry).install("xenbus", "9.1.0.11")
    first = rig.boot(machine(0x0001), registry)
    assert first.xenbus.active_fdo is not None and _active(registry) == DEV_0001
    _arm_children(first)
    m = machine(0xC000)
    moved = rig.boot(m, registry)
    assert moved.xenbus.active_fdo is not None and moved.xenbus.active_fdo.pci_device_id == 0xC000
    assert _active(registry) == DEV_C000
    before = [n.instance_path for n in first.nodes("XENBUS\\")]
    assert sorted(n.instance_path for n in moved.nodes("XENBUS\\")) == sorted(before)
    vbd = moved.nodes("XENBUS\\VEN_XP&DEV_VBD")[0]
    assert vbd.hardware_ids[0].startswith("XENBUS\\VEN_XPC000&DEV_VBD&REV_")
    assert m.unplug_writes == [0x9, 0x2] and moved.nodes("IDE\\") == []
