"""The toolstack's xenstore layout, without any process: vdev names, the store page, device directories."""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.backends.toolstack import layout as L
from xenpv.guests.schema import GUESTS_DIR, _Reader, _vdev, load_guest

NAMES = ["xvda", "xvdb", "xvdp", "hda", "hdb", "hdc", "hdd", "sda", "sdc"]


@pytest.mark.parametrize("name", NAMES)
def test_vdev_name_inverts_the_schema_encoding(name: str) -> None:
    assert L.vdev_name(_vdev(_Reader("t"), name, "vdev")) == name


def test_vdev_name_partitions_and_extended_xvd() -> None:
    assert L.vdev_name((202 << 8) | (1 << 4) | 2) == "xvdb2"
    assert L.vdev_name((1 << 28) | (26 << 8)) == "xvdaa"  # disks 16 and up use the extended form
    assert L.vdev_name((3 << 8) | (1 << 6) | 1) == "hdb1"
    with pytest.raises(ValueError):
        L.vdev_name(7 << 8)


def test_store_page_is_the_last_ram_page() -> None:
    assert L.store_gfn(128 << 20) == 0x7FFF


def test_pv_twin_of_an_ide_disk_shares_its_image_others_get_scratch(tmp_path: Path) -> None:
    g = load_guest(GUESTS_DIR / "two-disks-two-nics.yaml")
    devs = L.guest_devices(g, 3, tmp_path)
    assert devs.scratch_images == []
    assert [d.backend["params"] for d in devs.devices if d.kind == "vbd"] == [
        f"raw:{tmp_path / 'hda.img'}", f"raw:{tmp_path / 'hdb.img'}"]
    xvda = L.PvDisk(vdev=202 << 8, size=1 << 20, format="qcow2")
    assert L.disk_image(xvda, g, tmp_path) == (tmp_path / "pv-xvda.qcow2", True)


def test_device_directories_carry_the_xen_abi_permissions() -> None:
    g = load_guest(GUESTS_DIR / "default.yaml")
    vif = next(d for d in L.guest_devices(g, 5, Path("/r")).devices if d.kind == "vif")
    nodes = L.device_nodes(vif, 5, 0)
    perms = {n.path: n.perms for n in nodes if n.perms is not None}
    assert perms == {"/local/domain/5/device/vif/0": ("n5", "b0"),
                     "/local/domain/0/backend/vif/5/0": ("n0", "r5")}
    values = {n.path.rsplit("/", 1)[1]: n.value for n in nodes if n.path.startswith("/local/domain/5/")}
    assert values["backend"] == "/local/domain/0/backend/vif/5/0" and values["state"] == "1"


def test_domain_skeleton_follows_libxl_permissions() -> None:
    g = load_guest(GUESTS_DIR / "default.yaml")
    nodes = {n.path: n for n in L.domain_nodes(g, 7, "default")}
    assert nodes["/local/domain/7"].perms == ("n0", "r7")
    assert nodes["/local/domain/7/control/shutdown"].perms == ("n7",)
    assert nodes["/local/domain/7/data"].perms == ("n7",)
    assert nodes["/local/domain/7/vm"].value == f"/vm/{L.vm_uuid(g, 7)}"
    assert L.vm_uuid(g, 7) != L.vm_uuid(g, 8)
