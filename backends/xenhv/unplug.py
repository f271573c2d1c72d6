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
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

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
        if mask & (abi.UNPLUG_ALL_IDE_DISKS | abi.UNPLUG_AUX_IDE_DISKS):
            aux = bool(mask & abi.UNPLUG_AUX_IDE_DISKS) and not mask & abi.UNPLUG_ALL_IDE_DISKS
            self._unplug_disks(aux)
        if mask & abi.UNPLUG_ALL_NICS:
            self._unplug_nics()

    def _pci_devices(self) -> list[dict[str, Any]]:
        return [d for bus in self.dm.command("query-pci") for d in bus["devices"]]

    def _unplug_nics(self) -> None:
        for d in self._pci_devices():
            if d["class_info"]["class"] != PCI_CLASS_ETHERNET:
                continue
            qid = d.get("qdev_id")
            if not qid:
                log.warning("dom%d: NIC in slot %d has no id; QMP cannot remove it", self.domid, d["slot"])
                continue
            self.dm.command("device_del", id=qid)
            self.record.nics.append(qid)
            log.info("dom%d: NIC %s (slot %d) unplugged", self.domid, qid, d["slot"])

    def _unplug_disks(self, aux: bool) -> None:
        if not any(d["class_info"]["class"] in (PCI_CLASS_IDE, PCI_CLASS_SATA) for d in self._pci_devices()):
            return
        for blk in self.dm.command("query-block"):
            qdev = blk.get("qdev")
            if not qdev or "inserted" not in blk:
                continue
            path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
            if self.dm.command("qom-get", path=path, property="type") != "ide-hd":
                continue  # CD-ROMs are never unplugged
            if aux:
                unit = self.dm.command("qom-get", path=path, property="unit")
                bus = self.dm.command("qom-get", path=path, property="parent_bus").rsplit("/", 1)[-1]
                if (bus, unit) == ("ide.0", 0):
                    self.record.kept.append(qdev)
                    log.info("dom%d: primary master %s kept (AUX unplug)", self.domid, qdev)
                    continue
            out = self.dm.command("human-monitor-command", command_line=f"drive_del {blk['device']}")
            if out.strip():  # HMP reports failure as text, not as a QMP error
                log.error("dom%d: drive_del %s failed: %s", self.domid, blk["device"], out.strip())
                continue
            self.record.disks.append(qdev)
            log.info("dom%d: IDE disk %s detached", self.domid, qdev)
