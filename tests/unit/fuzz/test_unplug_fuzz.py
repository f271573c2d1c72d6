"""Hypothesis fuzz of the platform unplug ports (0x10-0x1f, backends/xenhv/unplug.py) against a device model
that answers QMP as QEMU does, in the ways that matter to the model:
- `device_del` of a device already being unplugged is refused ("Device X is already in the process of
  unplug"), as is one of a device that does not exist;
- a removed NIC stays in `query-pci` until the guest's OSPM ejects its slot;
- `drive_del` of a drive without a medium answers with error text (HMP), not a QMP error;
- a device model that died answers nothing (the QMP session raises its StateError).
Random port accesses of every width, ejects and a dying device model in any order must never raise out of
the port handlers, never issue `device_del` twice for a NIC on its way out, and keep the record exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import given, settings, strategies as st
from qemu.qmp.protocol import Runstate, StateError

from xenpv.backends.xenhv.unplug import PCI_CLASS_ETHERNET, PCI_CLASS_IDE, PlatformPorts
from xenpv.base.qmp import QmpError
from xenpv.xenabi import unplug as U


@dataclass
class Blk:
    device: str
    qdev: str
    type: str
    bus: str
    unit: int
    inserted: bool = True


@dataclass
class FakeQemu:
    nics: dict[str, int] = field(default_factory=lambda: {"nic0": 3, "nic1": 4})  # qdev id -> slot
    leaving: set[str] = field(default_factory=set)  # device_del accepted, slot not yet ejected
    blks: list[Blk] = field(default_factory=lambda: [Blk("ide0-hd0", "hda", "ide-hd", "ide.0", 0),
                                                     Blk("ide0-hd1", "hdb", "ide-hd", "ide.0", 1),
                                                     Blk("ide1-cd0", "cd0", "ide-cd", "ide.1", 0)])
    dead: bool = False
    refused: list[str] = field(default_factory=list)  # every command QEMU refused: the model should not ask

    def command(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        if self.dead:
            raise StateError("QMP is not connected", Runstate.IDLE, Runstate.RUNNING)
        if cmd == "query-pci":
            devices = [{"slot": 1, "class_info": {"class": PCI_CLASS_IDE}, "qdev_id": ""}]
            devices += [{"slot": slot, "class_info": {"class": PCI_CLASS_ETHERNET}, "qdev_id": qid}
                        for qid, slot in self.nics.items()]
            devices.append({"slot": 7, "class_info": {"class": PCI_CLASS_ETHERNET}})  # a NIC without an id
            return [{"bus": 0, "devices": devices}]
        if cmd == "device_del":
            qid = args["id"]
            if qid in self.leaving:
                self.refused.append(f"device_del {qid}")
                raise QmpError(cmd, args, "GenericError", f"Device {qid} is already in the process of unplug")
            if qid not in self.nics:
                self.refused.append(f"device_del {qid}")
                raise QmpError(cmd, args, "DeviceNotFound", f"Device '{qid}' not found")
            self.leaving.add(qid)
            return {}
        if cmd == "query-block":
            return [{"device": b.device, "qdev": b.qdev, **({"inserted": {}} if b.inserted else {})}
                    for b in self.blks]
        if cmd == "qom-get":
            b = next(b for b in self.blks if args["path"].endswith("/" + b.qdev))
            return {"type": b.type, "unit": b.unit, "parent_bus": f"/machine/ide/{b.bus}"}[args["property"]]
        if cmd == "human-monitor-command":
            name = args["command_line"].split()[1]
            b = next((b for b in self.blks if b.device == name and b.inserted), None)
            if b is None:
                return f"Device '{name}' not found\r\n"
            b.inserted = False
            return ""
        raise AssertionError(f"unexpected QMP command {cmd}")

    def eject(self) -> None:
        """The guest's OSPM ejects every slot marked for removal."""
        for qid in self.leaving:
            del self.nics[qid]
        self.leaving.clear()


PORTS = st.integers(U.UNPLUG_PORT_BASE, U.UNPLUG_PORT_BASE + U.UNPLUG_PORT_COUNT - 1)
MASKS = st.one_of(st.sampled_from([U.UNPLUG_ALL_NICS, U.UNPLUG_ALL_IDE_DISKS, U.UNPLUG_AUX_IDE_DISKS, U.UNPLUG_ALL,
                                   U.UNPLUG_NVME_DISKS, 0, 0xFFFF]), st.integers(0, 0xFFFF))
ACCESS = st.one_of(
    st.tuples(st.just("write"), st.just(U.UNPLUG_PORT_MASK), st.just(2), MASKS),  # the unplug mask, often
    st.tuples(st.just("write"), st.just(U.UNPLUG_PORT_MASK), st.just(2), MASKS),
    st.tuples(st.just("write"), PORTS, st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    st.tuples(st.just("read"), PORTS, st.sampled_from([1, 2, 4]), st.just(0)),
    st.tuples(st.just("eject"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("die"), st.just(0), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(accesses=st.lists(ACCESS, max_size=20))
def test_any_port_accesses_keep_the_unplug_model_exact(accesses: list[tuple[str, int, int, int]]) -> None:
    qemu = FakeQemu()
    ports = PlatformPorts(qemu, domid=7, present=True)
    mask = 0
    for what, port, size, value in accesses:
        if what == "eject":
            qemu.eject()
        elif what == "die":
            qemu.dead = True
        elif what == "read":
            got = ports.read(port, size)
            assert 0 <= got < 1 << (8 * size)
            if (port, size) == (U.UNPLUG_PORT_MAGIC, 2):
                assert got == U.UNPLUG_MAGIC
            if (port, size) == (U.UNPLUG_PORT_VERSION, 1):
                assert got == U.UNPLUG_PROTOCOL_VERSION
        else:
            value &= (1 << (8 * size)) - 1  # xenhv refuses a value wider than the access before this
            ports.write(port, size, value)
            if (port, size) == (U.UNPLUG_PORT_MASK, 2):
                mask |= value
        assert qemu.refused == [], f"the model asked QEMU for what it had to refuse: {qemu.refused}"
        assert ports.unplugged_mask == mask
        # Each NIC is asked for once per life: the record names it once, and only NICs that exist(ed).
        assert sorted(ports.record.nics) == sorted(set(ports.record.nics) & {"nic0", "nic1"})
        assert len(ports.record.kept) == len(set(ports.record.kept))
        # A disk is recorded once, when its drive went; the CD-ROM never goes.
        assert sorted(ports.record.disks) == sorted(b.qdev for b in qemu.blks if not b.inserted)
        assert "cd0" not in ports.record.disks


def test_a_second_mask_write_before_the_eject_is_a_no_op() -> None:
    """The reproduced crash: two writes for the same NIC before the guest ejects it."""
    qemu = FakeQemu()
    ports = PlatformPorts(qemu, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert qemu.refused == [] and qemu.leaving == {"nic0", "nic1"}
    qemu.eject()
    qemu.nics["nic2"] = 5  # a NIC hot-added after the eject is unplugged by a later write
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert qemu.refused == [] and qemu.leaving == {"nic2"} and ports.record.nics == ["nic0", "nic1", "nic2"]


def test_a_dead_device_model_does_not_fail_the_write() -> None:
    qemu = FakeQemu(dead=True)
    ports = PlatformPorts(qemu, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL)
    assert ports.unplugged_mask == U.UNPLUG_ALL and ports.record.nics == []


@dataclass
class _PciClasses(FakeQemu):
    """FakeQemu whose PCI functions carry the class codes given here, as numbers (not the model's names)."""
    pci: list[dict[str, Any]] = field(default_factory=list)

    def command(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        if cmd == "query-pci":
            return [{"bus": 0, "devices": self.pci}]
        return super().command(cmd, timeout, **args)


def test_devices_are_told_apart_by_qemu_pci_class_codes() -> None:
    """QEMU hw/i386/xen/xen_platform.c: pci_unplug_nics unplugs functions of class PCI_CLASS_NETWORK_ETHERNET
    (0x0200, include/hw/pci/pci_ids.h) and nothing else; disks are unplugged when an IDE (0x0101) or SATA
    (0x0106) controller is there, not for another storage class (SCSI, 0x0100)."""
    for storage_class, unplugged in ((0x0101, ["hda", "hdb"]), (0x0106, ["hda", "hdb"]),
                                     (0x0100, [])):
        qemu = _PciClasses(pci=[{"slot": 1, "class_info": {"class": storage_class}, "qdev_id": ""}])
        ports = PlatformPorts(qemu, domid=7, present=True)
        ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_IDE_DISKS)
        assert ports.record.disks == unplugged, hex(storage_class)
    qemu = _PciClasses(pci=[{"slot": 3, "class_info": {"class": 0x0200}, "qdev_id": "nic0"},
                            {"slot": 4, "class_info": {"class": 0x0280}, "qdev_id": "nic1"}])  # "other network"
    ports = PlatformPorts(qemu, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert ports.record.nics == ["nic0"] and qemu.leaving == {"nic0"}


def test_the_ports_start_absent_with_no_flags_set() -> None:
    """The unplug ports exist only with a Xen platform PCI device (QEMU registers them in xen_platform.c), so
    a PlatformPorts claims none until told the device is present; and the flags byte starts at 0 (QEMU
    platform_fixed_ioport_reset: no ROM lock)."""
    assert not PlatformPorts(None, domid=7).claims(U.UNPLUG_PORT_BASE)
    ports = PlatformPorts(None, domid=7, present=True)
    assert ports.claims(U.UNPLUG_PORT_BASE) and ports.read(U.UNPLUG_PORT_BASE, 1) == 0


def test_the_ports_are_0x10_to_0x1f_and_the_guest_log_is_cut_into_lines() -> None:
    """QEMU xen_platform.c: the fixed I/O ports are 0x10..0x1f (16 of them); a byte written to port 0x12 goes
    to the guest's log, which QEMU prints a line at a time ('\\n' ends one, and a full buffer ends one too);
    before any driver registers, product and build are unknown (None)."""
    ports = PlatformPorts(None, domid=7, present=True)
    assert [ports.claims(p) for p in (0x0F, 0x10, 0x1F, 0x20)] == [False, True, True, False]
    assert (ports.product, ports.build) == (None, None)
    for byte in b"XENBUS hello\nsecond":
        ports.write(U.UNPLUG_PORT_LOG, 1, byte)
    assert ports.log_lines == ["XENBUS hello"]
    for byte in b"\n" + b"y" * (U.UNPLUG_LOG_LINE_MAX + 1):
        ports.write(U.UNPLUG_PORT_LOG, 1, byte)
    assert ports.log_lines == ["XENBUS hello", "second", "y" * U.UNPLUG_LOG_LINE_MAX]


# ---- the port map, register by register (QEMU hw/i386/xen/xen_platform.c platform_fixed_ioport_*) ------

def test_each_port_and_width_reads_what_qemu_serves() -> None:
    """QEMU's fixed ioport reads: a 2-byte read of 0x10 is the magic 0x49d2 and of any other port 0xffff
    (readw: `addr == 0 ? magic : 0xffff`); a byte read of 0x10 is the platform flags, of 0x12 the protocol
    version 1 and of any other port 0xff (readb); a 4-byte read has no register (all ones). A driver probes
    the magic and the version before it unplugs anything, so each must answer at its own port only."""
    ports = PlatformPorts(None, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_PLATFORM_FLAGS, 1, U.PFFLAG_ROM_LOCK)
    for port in range(U.UNPLUG_PORT_BASE, U.UNPLUG_PORT_BASE + U.UNPLUG_PORT_COUNT):
        assert ports.read(port, 2) == (U.UNPLUG_MAGIC if port == U.UNPLUG_PORT_MAGIC else 0xFFFF), hex(port)
        byte = {U.UNPLUG_PORT_PLATFORM_FLAGS: U.PFFLAG_ROM_LOCK, U.UNPLUG_PORT_VERSION: U.UNPLUG_PROTOCOL_VERSION}
        assert ports.read(port, 1) == byte.get(port, 0xFF), hex(port)
        assert ports.read(port, 4) == 0xFFFFFFFF, hex(port)


def _registers(ports: PlatformPorts) -> tuple[object, ...]:
    return ports.flags, ports.product, ports.build, ports.unplugged_mask, list(ports.log_lines)


def test_each_write_lands_in_its_own_register_and_no_other() -> None:
    """QEMU's fixed ioport writes: 0x10 takes the unplug mask (2 bytes), the driver's build number (4 bytes)
    and the platform flags (1 byte, only the ROM lock bit is kept); 0x12 takes the product number (2 bytes)
    and a log byte (1 byte); every other port and width is ignored. A write that landed in the wrong
    register would unplug devices for a product number or take a build number for the flags."""
    ports = PlatformPorts(None, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_BUILD, 4, 0x12345678)
    assert _registers(ports) == (0, None, 0x12345678, 0, [])
    ports.write(U.UNPLUG_PORT_PLATFORM_FLAGS, 1, 0xFE)          # every bit but the ROM lock
    assert _registers(ports) == (0, None, 0x12345678, 0, [])
    ports.write(U.UNPLUG_PORT_PLATFORM_FLAGS, 1, 0xFF)
    assert _registers(ports) == (U.PFFLAG_ROM_LOCK, None, 0x12345678, 0, [])
    ports.write(U.UNPLUG_PORT_PRODUCT, 2, U.PvdriversProduct.XENSERVER_WINDOWS_V7_2)
    assert _registers(ports) == (U.PFFLAG_ROM_LOCK, 5, 0x12345678, 0, [])
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert _registers(ports) == (U.PFFLAG_ROM_LOCK, 5, 0x12345678, U.UNPLUG_ALL_NICS, [])
    before = _registers(ports)
    for port in range(U.UNPLUG_PORT_BASE, U.UNPLUG_PORT_BASE + U.UNPLUG_PORT_COUNT):
        for size in (1, 2, 4):
            if (port, size) in ((0x10, 1), (0x10, 2), (0x10, 4), (0x12, 1), (0x12, 2)):
                continue
            ports.write(port, size, 0x41 if size == 1 else 0x4141 if size == 2 else 0x41414141)
            assert _registers(ports) == before, f"{size}-byte write to port {port:#x}"
    ports.write(U.UNPLUG_PORT_LOG, 1, ord("\n"))  # a byte an ignored write had logged would show up here
    assert ports.log_lines == [""]
    assert _registers(ports)[:4] == before[:4]


def _fresh_disks_and_nics(mask: int) -> tuple[PlatformPorts, FakeQemu]:
    qemu = FakeQemu()
    ports = PlatformPorts(qemu, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, mask)
    return ports, qemu


def test_each_mask_bit_unplugs_its_own_devices_only() -> None:
    """xen-abi.md section 9 / QEMU platform_fixed_ioport_writew: bit 0 unplugs every IDE disk, bit 1 every
    NIC, bit 2 (AUX) the IDE disks but the primary master; the NVMe bit and unknown bits touch neither, and
    CD-ROMs always stay."""
    for mask, disks, kept, nics in (
            (U.UNPLUG_ALL_IDE_DISKS, ["hda", "hdb"], [], []),
            (U.UNPLUG_AUX_IDE_DISKS, ["hdb"], ["hda"], []),
            (U.UNPLUG_ALL_IDE_DISKS | U.UNPLUG_AUX_IDE_DISKS, ["hda", "hdb"], [], []),  # ALL wins over AUX
            (U.UNPLUG_ALL_NICS, [], [], ["nic0", "nic1"]),
            (U.UNPLUG_ALL_NICS | U.UNPLUG_AUX_IDE_DISKS, ["hdb"], ["hda"], ["nic0", "nic1"]),
            (U.UNPLUG_NVME_DISKS, [], [], []),
            (0xFFF0, [], [], []),
            (0, [], [], [])):
        ports, qemu = _fresh_disks_and_nics(mask)
        assert (ports.record.disks, ports.record.kept, ports.record.nics) == (disks, kept, nics), hex(mask)
        assert sorted(b.qdev for b in qemu.blks if not b.inserted) == disks, hex(mask)
        assert qemu.leaving == set(nics), hex(mask)


@dataclass
class _RefusingQemu(FakeQemu):
    """FakeQemu that refuses device_del of the NICs named here, as QEMU does for a device on a bus without
    hotplug ("Bus 'pci.0' does not support hotplugging")."""
    no_hotplug: set[str] = field(default_factory=set)

    def command(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        if cmd == "device_del" and args["id"] in self.no_hotplug:
            raise QmpError(cmd, args, "GenericError", "Bus 'pci.0' does not support hotplugging")
        return super().command(cmd, timeout, **args)


def test_a_nic_that_cannot_be_unplugged_does_not_stop_the_others() -> None:
    """QEMU pci_unplug_nics walks every function of the bus: one NIC it cannot remove (no qdev id for QMP to
    name, already on its way out, or refused) is passed over and the NICs after it are still unplugged."""
    nameless = _PciClasses(pci=[{"slot": 2, "class_info": {"class": PCI_CLASS_ETHERNET}},
                                {"slot": 3, "class_info": {"class": PCI_CLASS_ETHERNET}, "qdev_id": "nic0"}])
    ports = PlatformPorts(nameless, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert ports.record.nics == ["nic0"] and nameless.leaving == {"nic0"}

    qemu = FakeQemu()
    ports = PlatformPorts(qemu, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    qemu.nics["nic2"] = 5  # hot-added while nic0 and nic1 are still leaving (listed first)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert qemu.refused == [] and ports.record.nics == ["nic0", "nic1", "nic2"]
    assert qemu.leaving == {"nic0", "nic1", "nic2"}

    refusing = _RefusingQemu(no_hotplug={"nic0"})
    ports = PlatformPorts(refusing, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_NICS)
    assert ports.record.nics == ["nic1"] and refusing.leaving == {"nic1"}


@dataclass
class _ExactQemu(FakeQemu):
    """FakeQemu that resolves QOM paths exactly as QEMU does (a device with an id is
    /machine/peripheral/ID, one without is known only by its full QOM path, which query-block's "qdev" then
    holds), lists a block backend attached to no device (no "qdev", e.g. -drive if=none) and keeps every
    command it was sent."""
    extra_blocks: list[dict[str, Any]] = field(default_factory=list)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def command(self, cmd: str, timeout: float = 10.0, **args: Any) -> Any:
        self.sent.append((cmd, args))
        if cmd == "query-block":
            return super().command(cmd, timeout, **args) + self.extra_blocks
        if cmd == "qom-get":
            b = next((b for b in self.blks
                      if args["path"] == (b.qdev if b.qdev.startswith("/") else f"/machine/peripheral/{b.qdev}")), None)
            if b is None:
                raise QmpError(cmd, args, "DeviceNotFound", f"Device '{args['path']}' not found")
            return {"type": b.type, "unit": b.unit, "parent_bus": f"/machine/ide/{b.bus}"}[args["property"]]
        return super().command(cmd, timeout, **args)


def test_disks_are_found_by_id_or_qom_path_and_drives_without_medium_or_device_are_left_alone() -> None:
    """QEMU's query-block names a drive's device by its id, or by its QOM path when it has none; a drive
    without a medium (an unplugged disk, an empty CD-ROM drive) or without a device (-drive if=none) is not a
    disk to unplug: the model asks QEMU nothing about it and goes on to the next drive."""
    qemu = _ExactQemu(blks=[Blk("ide1-cd0", "cd0", "ide-cd", "ide.1", 0, inserted=False),
                            Blk("ide0-hd0", "/machine/unattached/device[23]", "ide-hd", "ide.0", 0),
                            Blk("ide0-hd1", "hdb", "ide-hd", "ide.0", 1, inserted=False),
                            Blk("ide1-hd1", "hdd", "ide-hd", "ide.1", 1)],
                      extra_blocks=[{"device": "scratch", "inserted": {}}])
    ports = PlatformPorts(qemu, domid=7, present=True)
    ports.write(U.UNPLUG_PORT_MASK, 2, U.UNPLUG_ALL_IDE_DISKS)
    assert ports.record.disks == ["/machine/unattached/device[23]", "hdd"]
    assert [b.inserted for b in qemu.blks] == [False, False, False, False]
    asked = [args.get("path") or args.get("command_line") for cmd, args in qemu.sent
             if cmd in ("qom-get", "human-monitor-command")]
    assert asked == ["/machine/unattached/device[23]", "drive_del ide0-hd0",
                     "/machine/peripheral/hdd", "drive_del ide1-hd1"]
