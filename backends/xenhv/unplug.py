"""The platform unplug model: I/O ports 0x10-0x1f of xen-abi.md section 9, with QEMU's effect.

QEMU's own `xen-platform` device will not realize without the Xen accelerator, so xenhv serves the
fixed ports (as Xen forwards port I/O to an ioreq server) and carries out what QEMU's xen_platform.c
would do, on the real QEMU, over the device model's QMP socket:
- NICs (mask bit 1): `device_del` of every PCI function of class 0x0200. Removal completes when the
  guest's OSPM ejects the slot (PIIX4 ACPI hotplug), which the vCPU does for the guest.
- IDE disks (mask bits 0 and 2): the drive of every `ide-hd` is detached (`drive_del`); CD-ROMs are
  untouched; with only the AUX bit the primary master (bus ide.0, unit 0) stays.
What QMP cannot do is left undone and logged: QEMU unparents the ide-hd device and resets the
controller; here the device stays without a medium (query-block shows it empty).

Every write is the guest's and may come any number of times, in any order. As in xen_platform.c, an
unplug of what is already unplugged (or on its way out) is a no-op: a NIC whose `device_del` was issued
is not asked for again while QEMU still lists it (QEMU would refuse: "already in the process of
unplug"). Whatever QEMU still refuses, or a device model that is gone, is logged with the domain id
and the write completes, as a port write on real hardware does: a guest's port I/O never fails dom0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from qemu.qmp import QMPError as QmpSessionError

from xenpv.base.qmp import QmpError
from xenpv.xenabi import unplug as abi

log = logging.getLogger("xenhv.unplug")

PCI_CLASS_IDE = 0x0101
PCI_CLASS_SATA = 0x0106
PCI_CLASS_ETHERNET = 0x0200


class DeviceModel(Protocol):
    """What the unplug model needs of QEMU: a QMP command."""

    def command(self, cmd: str, timeout: float = 10.0, **arguments: Any) -> Any: ...


@dataclass
class UnplugRecord:
    nics: list[str] = field(default_factory=list)
    disks: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@dataclass
class PlatformPorts:
    """The state behind ports 0x10-0x1f of one domain."""

    dm: DeviceModel | None
    domid: int
    present: bool = False  # the ports exist only with a Xen platform PCI device, as in QEMU
    flags: int = 0
    product: int | None = None
    build: int | None = None
    unplugged_mask: int = 0
    log_lines: list[str] = field(default_factory=list)
    record: UnplugRecord = field(default_factory=UnplugRecord)
    _log_buf: bytearray = field(default_factory=bytearray)
    # NICs whose device_del was issued and that QEMU still lists (the guest has not ejected them yet).
    _nics_leaving: set[str] = field(default_factory=set)

    def claims(self, port: int) -> bool:
        return self.present and abi.UNPLUG_PORT_BASE <= port < abi.UNPLUG_PORT_BASE + abi.UNPLUG_PORT_COUNT

    def read(self, port: int, size: int) -> int:
        off = port - abi.UNPLUG_PORT_BASE
        if size == 2:
            # This model never blacklists, as current QEMU does not.
            return abi.UNPLUG_MAGIC if off == 0 else abi.UNPLUG_READ16_OTHER
        if size == 1:
            if off == 0:
                return self.flags
            if off == 2:
                return abi.UNPLUG_PROTOCOL_VERSION
            return abi.UNPLUG_READ8_OTHER
        return 0xFFFFFFFF

    def write(self, port: int, size: int, value: int) -> None:
        off = port - abi.UNPLUG_PORT_BASE
        if off == 0 and size == 2:
            self.unplug(value)
        elif off == 0 and size == 4:
            self.build = value
            log.info("dom%d: driver build %#x registered", self.domid, value)
        elif off == 0 and size == 1:
            self.flags = value & abi.PFFLAG_ROM_LOCK
        elif off == 2 and size == 2:
            self.product = value
            log.info("dom%d: product %#06x registered", self.domid, value)
        elif off == 2 and size == 1:
            self._log_byte(value)
        else:
            log.debug("dom%d: ignored %d-byte write of %#x to port %#x", self.domid, size, value, port)

    def _log_byte(self, value: int) -> None:
        if value == ord("\n") or len(self._log_buf) >= abi.UNPLUG_LOG_LINE_MAX:
            line = self._log_buf.decode("latin-1")
            self.log_lines.append(line)
            log.info("dom%d guest: %s", self.domid, line)
            self._log_buf.clear()
            if value == ord("\n"):
                return
        self._log_buf.append(value)

    def unplug(self, mask: int) -> None:
        log.info("dom%d: unplug mask %#x", self.domid, mask)
        self.unplugged_mask |= mask
        if self.dm is None:
            log.warning("dom%d: no device model connected; unplug of %#x has no effect", self.domid, mask)
            return
        try:
            if mask & (abi.UNPLUG_ALL_IDE_DISKS | abi.UNPLUG_AUX_IDE_DISKS):
                aux = bool(mask & abi.UNPLUG_AUX_IDE_DISKS) and not mask & abi.UNPLUG_ALL_IDE_DISKS
                self._unplug_disks(aux)
            if mask & abi.UNPLUG_ALL_NICS:
                self._unplug_nics()
        except QmpError as exc:
            # A query QEMU refused (a per-device refusal is handled where it happens): nothing more can
            # be unplugged this time; the guest's write still completes.
            log.error("dom%d: unplug of %#x stopped: %s", self.domid, mask, exc)
        except (QmpSessionError, OSError, EOFError, TimeoutError) as exc:
            # The device model is gone or hung (the QMP session raises its StateError once disconnected,
            # or times out): that domain's QEMU is dead or dying, which is that domain's problem only.
            log.error("dom%d: device model unreachable; unplug of %#x not carried out: %s: %s",
                      self.domid, mask, type(exc).__name__, exc)

    def _pci_devices(self) -> list[dict[str, Any]]:
        return [d for bus in self.dm.command("query-pci") for d in bus["devices"]]

    def _unplug_nics(self) -> None:
        nics = [d for d in self._pci_devices() if d["class_info"]["class"] == PCI_CLASS_ETHERNET]
        # A NIC QEMU no longer lists has been ejected: forget it, so that a NIC added later under the
        # same id is unplugged by a later write, as QEMU would (one removed and re-added between two
        # writes is not seen: QMP says nothing of it without the DEVICE_DELETED event).
        self._nics_leaving &= {d.get("qdev_id") for d in nics}
        for d in nics:
            qid = d.get("qdev_id")
            if not qid:
                log.warning("dom%d: NIC in slot %d has no id; QMP cannot remove it", self.domid, d["slot"])
                continue
            if qid in self._nics_leaving:
                log.info("dom%d: NIC %s (slot %d) is already being unplugged", self.domid, qid, d["slot"])
                continue
            try:
                self.dm.command("device_del", id=qid)
            except QmpError as exc:
                log.error("dom%d: QEMU refused to unplug NIC %s (slot %d): %s", self.domid, qid, d["slot"], exc)
                continue
            self._nics_leaving.add(qid)
            self.record.nics.append(qid)
            log.info("dom%d: NIC %s (slot %d) unplugged", self.domid, qid, d["slot"])

    def _unplug_disks(self, aux: bool) -> None:
        if not any(d["class_info"]["class"] in (PCI_CLASS_IDE, PCI_CLASS_SATA) for d in self._pci_devices()):
            return
        for blk in self.dm.command("query-block"):
            qdev = blk.get("qdev")
            if not qdev or "inserted" not in blk:
                continue  # no medium: an unplugged disk (or an empty drive) stays as it is
            try:
                self._unplug_disk(blk, qdev, aux)
            except QmpError as exc:
                log.error("dom%d: unplugging disk %s: %s", self.domid, qdev, exc)

    def _unplug_disk(self, blk: dict[str, Any], qdev: str, aux: bool) -> None:
        path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
        if self.dm.command("qom-get", path=path, property="type") != "ide-hd":
            return  # CD-ROMs are never unplugged
        if aux:
            unit = self.dm.command("qom-get", path=path, property="unit")
            bus = self.dm.command("qom-get", path=path, property="parent_bus").rsplit("/", 1)[-1]
            if (bus, unit) == ("ide.0", 0):
                if qdev not in self.record.kept:
                    self.record.kept.append(qdev)
                    log.info("dom%d: primary master %s kept (AUX unplug)", self.domid, qdev)
                return
        out = self.dm.command("human-monitor-command", command_line=f"drive_del {blk['device']}")
        if out.strip():  # HMP reports failure as text, not as a QMP error
            log.error("dom%d: drive_del %s failed: %s", self.domid, blk["device"], out.strip())
            return
        self.record.disks.append(qdev)
        log.info("dom%d: IDE disk %s detached", self.domid, qdev)
