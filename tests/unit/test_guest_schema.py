"""Guest definitions: every shipped shape loads; every bad file names the file, the field and the reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.base.errors import GuestDefinitionError

SHAPES = sorted(GUESTS_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SHAPES, ids=lambda p: p.stem)
def test_shipped_shapes_load(path: Path) -> None:
    g = load_guest(path)
    assert g.name == path.stem
    assert g.memory_mib >= 16


def test_default_guest_contents() -> None:
    g = load_guest(GUESTS_DIR / "default.yaml")
    assert [(p.device_id, p.revision) for p in g.platform] == [(0x0001, 1)]
    assert [(d.id, d.bus, d.unit, d.media) for d in g.emulated_disks] == [("hda", 0, 0, "disk"), ("cd0", 1, 0, "cdrom")]
    assert g.pv_disks[0].vdev == 768  # hda: major 3, minor 0
    assert g.emulated_nics[0].mac == g.pv_nics[0].mac


def test_vdev_names_encode_as_xen_does(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("pv:\n  disks:\n    - {vdev: xvdb}\n    - {vdev: hdc}\n    - {vdev: sda}\n    - {vdev: 51760}\n")
    assert [d.vdev for d in load_guest(f).pv_disks] == [(202 << 8) | 16, 22 << 8, 8 << 8, 51760]


BAD = [
    ("platform: [{device-id: 0x1234}]", "platform[0].device-id", "must be one of 0x0001, 0x0002, 0xc000"),
    ("platform: [{revision: 1}]", "platform[0].device-id", "is required"),
    ("platform: [{device-id: 1, revision: 300}]", "platform[0].revision", "between"),
    ("platform: [{device-id: 1}, {device-id: 1}]", "platform", "same device-id twice"),
    ("platform: [{device-id: 1, bar-size: 12288}]", "platform[0].bar-size", "power of two"),
    ("memory: lots", "memory", "must be a size"),
    ("memory: 8G", "memory", "between"),
    ("colour: blue", "colour", "unknown field"),
    ("emulated: {nics: [{id: n0, model: virtio, mac: '00:16:3e:00:00:01'}]}", "emulated.nics[0].model", "rtl8139, e1000"),
    ("emulated: {nics: [{id: n0, mac: 'zz'}]}", "emulated.nics[0].mac", "MAC address"),
    ("emulated: {disks: [{id: a}, {id: b}]}", "emulated.disks", "share one IDE bus and unit"),
    ("emulated: {disks: [{id: a, bus: 2}]}", "emulated.disks[0].bus", "between"),
    ("pv: {disks: [{vdev: floppy}]}", "pv.disks[0].vdev", "vdev"),
    ("pv: {disks: [{vdev: xvda, format: vmdk}]}", "pv.disks[0].format", "raw, qcow2"),
    ("pv: {nics: [{mac: '00:16:3e:00:00:01', queues: 0}]}", "pv.nics[0].queues", "between"),
    ("drivers: {era: future}", "drivers.era", "subscriber, current"),
    ("drivers: {packages: {xenbus: latest}}", "drivers.packages.xenbus", "a version"),
    ("drivers: {packages: {xenfoo: 9.1.0}}", "drivers.packages.xenfoo", "unknown field"),
    ('registry: {"HKCU\\\\Soft": {a: 1}}', "registry[HKCU\\Soft]", "HKLM"),
    ('registry: {"HKLM\\\\S": {a: 4294967296}}', "registry[HKLM\\S].a", "32 bits"),
    ("boot: {options: [SAFE_MODE]}", "boot.options[0]", "BOOT_EMULATED"),
    ("seed: -1", "seed", "between"),
    ("- just\n- a list", "(top level)", "must be a mapping"),
    ("platform: [\n  {device-id: 1\n", "line", "not valid YAML"),
]


@pytest.mark.parametrize("text,field,reason", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_definitions_name_file_field_and_reason(tmp_path: Path, text: str, field: str, reason: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(text + "\n")
    with pytest.raises(GuestDefinitionError) as ei:
        load_guest(f)
    msg = str(ei.value)
    assert msg.startswith(f"{f}: "), msg
    assert field in msg, msg
    assert reason in msg, msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(GuestDefinitionError, match=r"nope\.yaml: \(file\): cannot be read"):
        load_guest(tmp_path / "nope.yaml")
