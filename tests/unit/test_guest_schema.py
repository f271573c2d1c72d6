"""Guest definitions: every shipped shape loads; every bad file names the file, the field and the reason."""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.base.errors import GuestDefinitionError

SHAPES = sorted(GUESTS_DIR.glob("*.yaml"))
MAC = "00:16:3e:00:00:01"
XEN = "platform: [{device-id: 1}]\n"


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
    ("drivers: {era: future}", "drivers.era", "subscriber, coinstaller, current"),
    ("drivers: {packages: {xenbus: latest}}", "drivers.packages.xenbus", "a version"),
    ("drivers: {packages: {xenfoo: 9.1.0}}", "drivers.packages.xenfoo", "unknown field"),
    ('registry: {"HKCU\\\\Soft": {a: 1}}', "registry[HKCU\\Soft]", "HKLM"),
    ('registry: {"HKLM\\\\S": {a: 4294967296}}', "registry[HKLM\\S].a", "32 bits"),
    ("boot: {options: [SAFE_MODE]}", "boot.options[0]", "BOOT_EMULATED"),
    ("seed: -1", "seed", "between"),
    ("- just\n- a list", "(top level)", "must be a mapping"),
    ("platform: [\n  {device-id: 1\n", "line", "not valid YAML"),
    # A NIC's addresses: IPv4 with an optional prefix, one network with room for both ends.
    (f"pv: {{nics: [{{mac: '{MAC}', address: not-an-ip}}]}}", "pv.nics[0].address", "must be an IPv4 address"),
    (f"pv: {{nics: [{{mac: '{MAC}', peer: 10.1.2.300}}]}}", "pv.nics[0].peer", "must be an IPv4 address"),
    (f"pv: {{nics: [{{mac: '{MAC}', peer: 42}}]}}", "pv.nics[0].peer", "must be a string"),
    (f"pv: {{nics: [{{mac: '{MAC}', address: '10.9.0.2'}}]}}", "pv.nics[0]", "outside the namespace network 10.200.0.0/24"),
    (f"pv: {{nics: [{{mac: '{MAC}'}}, {{mac: '{MAC}', address: 10.200.0.9}}]}}", "pv.nics[1]", "outside the namespace network 10.200.1.0/24"),
    (f"pv: {{nics: [{{mac: '{MAC}', peer: 10.0.0.1/24, address: 10.0.0.1}}]}}", "pv.nics[0]", "both be 10.0.0.1"),
    (f"pv: {{nics: [{{mac: '{MAC}', peer: 10.0.0.254/24}}]}}", "pv.nics[0]", "address 10.0.0.255/24 is not a host address"),
    (f"pv: {{nics: [{{mac: '{MAC}', peer: 10.0.0.1/31}}]}}", "pv.nics[0]", "peer 10.0.0.1/31 is not a host address"),
    # A Xen guest with PV devices installs what drives them, or says why not.
    (f"{XEN}pv: {{disks: [{{vdev: xvda}}]}}", "drivers", "pv.disks need the packages xenbus, xenvbd"),
    (f"{XEN}pv: {{nics: [{{mac: '{MAC}'}}]}}\ndrivers: {{packages: {{xenbus: 9.1.0.10, xenvif: 9.1.0.10}}}}",
     "drivers.packages", "pv.nics need the package xennet"),
    (f"{XEN}drivers: {{none: 'on purpose', packages: {{xenbus: 9.1.0.10}}}}", "drivers.none", "must go"),
    (f"{XEN}drivers: {{none: '  '}}", "drivers.none", "empty reason"),
    (f"{XEN}drivers: {{none: [a, b]}}", "drivers.none", "must be a string"),
    (f"{XEN}not-expected: {{pv-disks: no disks here}}", "not-expected.pv-disks", "no pv.disks"),
    (f"{XEN}not-expected: {{pv-floppies: why}}", "not-expected.pv-floppies", "unknown field"),
    (f"{XEN}pv: {{disks: [{{vdev: xvda}}]}}\ndrivers: {{none: bare}}\nnot-expected: {{pv-disks: twice}}",
     "not-expected.pv-disks", "drivers.none already says"),
    # A PV disk's own image must be there: nothing creates it, and blkback would close the device silently.
    ("pv: {disks: [{vdev: xvda, image: missing.img}]}", "pv.disks[0].image", "missing.img does not exist"),
    ("pv: {disks: [{vdev: xvda, image: /}]}", "pv.disks[0].image", "/ is neither a regular file nor a block device"),
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
    assert "\n" not in msg, msg  # one line: `xenpv run` prints it as it is


def test_a_file_that_is_not_utf8_is_named_with_the_line(tmp_path: Path) -> None:
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: ok\n# caf\u00e9\n".encode("latin-1"))
    with pytest.raises(GuestDefinitionError) as ei:
        load_guest(f)
    assert str(ei.value) == f"{f}: line 2: is not UTF-8 (byte 0xe9 at offset 14)"


def test_nic_addresses_resolve_as_the_namespace_and_the_agent_use_them(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text(f"pv: {{nics: [{{mac: '{MAC}'}}, {{mac: '{MAC}', peer: 192.168.7.1/28}},"
                 f" {{mac: '{MAC}', peer: 10.0.0.1, address: 10.0.0.77}}, {{mac: '{MAC}', address: 10.200.3.9/16}}]}}\n")
    nics = load_guest(f).pv_nics
    assert [tuple(map(str, n.addressing(i))) for i, n in enumerate(nics)] == [
        ("10.200.0.1/24", "10.200.0.2/24"), ("192.168.7.1/28", "192.168.7.2/28"),
        ("10.0.0.1/24", "10.0.0.77/24"), ("10.200.3.1/24", "10.200.3.9/16")]


def test_an_existing_pv_image_loads_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "disk.img").write_bytes(bytes(4096))
    f = tmp_path / "g.yaml"
    f.write_text("pv: {disks: [{vdev: xvda, image: disk.img}]}\n")
    assert load_guest(f).pv_disks[0].image == tmp_path / "disk.img"


@pytest.mark.parametrize("path", SHAPES, ids=lambda p: p.stem)
def test_every_shipped_shape_expects_its_pv_devices_to_work_or_says_why_not(path: Path) -> None:
    """The main job checks what a shape expects; a class it does not is skipped with the file's reason."""
    g = load_guest(path)
    for kind in ("disks", "nics"):
        e = g.pv_expectation(kind)
        if e.expected:
            continue
        listed = g.pv_disks if kind == "disks" else g.pv_nics
        if listed and g.platform:
            # The reason is the file's own words (drivers.none or not-expected), not one derived.
            assert e.reason in (f"no PV drivers on purpose: {g.drivers.none_reason}", g.not_expected.get(kind)), e


def test_pv_expectations_of_the_shipped_shapes() -> None:
    def expected(name: str) -> tuple[bool, bool]:
        g = load_guest(GUESTS_DIR / f"{name}.yaml")
        return g.pv_expectation("disks").expected, g.pv_expectation("nics").expected

    # The README's example and the other platform-device shapes install the drivers and expect them to work.
    for name in ("default", "vendor-c000", "two-disks-two-nics", "two-nics", "two-queues"):
        assert expected(name) == (True, True), name
    assert expected("xenserver-0002") == (True, False)  # it has no NIC
    assert expected("boot-emulated") == (False, True)  # the primary master stays emulated
    assert expected("xentouch-mismatch") == expected("subscriber-era") == (False, False)
    no_platform = load_guest(GUESTS_DIR / "no-platform.yaml")
    assert not no_platform.expects_pv_drivers
    assert no_platform.pv_expectation("disks").reason.startswith("no PV drivers on purpose: not a Xen guest")
    assert "STATUS_UNSUCCESSFUL" in load_guest(GUESTS_DIR / "boot-emulated.yaml").pv_expectation("disks").reason


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(GuestDefinitionError, match=r"nope\.yaml: \(file\): cannot be read"):
        load_guest(tmp_path / "nope.yaml")
