"""xen.sys unplug: the registry request counters and the emulated-device unplug port protocol
(XB src/xen/unplug.c; reference windows-pv-drivers.md 6).

At load (`UnplugSetRequest`), for NICS and DISKS: a non-zero `Services\\XEN\\ForceUnplug\\<T>` requests
the unplug; else a non-zero `Services\\XEN\\Unplug\\<T>` does, unless no `Enum\\XENBUS` key names a VBD
(disks) or VIF (NICs) child, which vetoes it (a stale counter must not take the boot disk away: the
0x7B of bfcf8f7). The Unplug value is deleted in every case (forced, vetoed or not), so each boot's
children must re-arm it with UNPLUG.Request(T, TRUE).

`UnplugDevices` speaks the port protocol through the vCPU: magic at 0x10, protocol version at 0x12,
product 0xFFFF and build registration, blacklist check, then one mask write per requested type.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from xenpv.stack.kernel.debuglog import DbgLevel, DebugLog
from xenpv.stack.kernel.registry import Registry, RegistryError
from xenpv.xenabi import unplug as U

log = logging.getLogger("stack.drivers.xen.unplug")

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
UNPLUG_KEY = SERVICES + r"\XEN\Unplug"
FORCE_UNPLUG_KEY = SERVICES + r"\XEN\ForceUnplug"
ENUM_XENBUS = r"HKLM\SYSTEM\CurrentControlSet\Enum\XENBUS"

# XENBUS_UNPLUG_DEVICE_TYPE_*: also the value names under the Unplug keys.
UNPLUG_NICS = 1
UNPLUG_DISKS = 2
UNPLUG_TYPES = {UNPLUG_NICS: "NICS", UNPLUG_DISKS: "DISKS"}
# The child class whose presence under Enum\XENBUS makes a request credible.
_CHILD_CLASS = {UNPLUG_NICS: "VIF", UNPLUG_DISKS: "VBD"}

PRODUCT_NUMBER = U.PvdriversProduct.EXPERIMENTAL  # unplug.c: "FIXME: product number"


class PortIO(Protocol):
    def inb(self, port: int) -> int: ...
    def inw(self, port: int) -> int: ...
    def outw(self, port: int, value: int) -> None: ...
    def outl(self, port: int, value: int) -> None: ...


class UnplugPortError(Exception):
    """The platform refused the driver (blacklisted) or does not speak the protocol."""


@dataclass
class Unplug:
    registry: Registry
    debug_log: DebugLog
    io: PortIO | None
    version: tuple[int, int, int, int]
    boot_emulated: bool = False
    requests: dict[int, bool] = field(default_factory=dict)
    unplugged_mask: int = 0
    _preamble: bool | None = None

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.debug_log.print("XEN", f"Unplug{text}", level)

    # -- registry ------------------------------------------------------------------------------

    def _read(self, key: str, name: str) -> int:
        try:
            return self.registry.get_dword(key, name)
        except RegistryError:
            return 0

    def _child_present(self, device_type: int) -> bool:
        try:
            keys = self.registry.subkeys(ENUM_XENBUS)
        except RegistryError:
            return False
        return any(_CHILD_CLASS[device_type] in key.upper() for key in keys)

    def UnplugSetRequest(self, device_type: int) -> None:
        name = UNPLUG_TYPES[device_type]
        # The counter is consumed whatever decides this boot: children re-arm it at start, and a value
        # left behind under ForceUnplug would only keep growing.
        value = self._read(UNPLUG_KEY, name)
        try:
            self.registry.delete_value(UNPLUG_KEY, name)
        except RegistryError:
            pass
        if self._read(FORCE_UNPLUG_KEY, name):
            self.requests[device_type] = True
            self._print(f"SetRequest: {name} requested (ForceUnplug; Unplug = {value})")
            return
        if value and not self._child_present(device_type):
            self._print(f"SetRequest: {name} = {value} VETOED: no {_CHILD_CLASS[device_type]} device under "
                        f"Enum\\XENBUS", DbgLevel.WARNING)
            value = 0
        self.requests[device_type] = bool(value)
        self._print(f"SetRequest: {name} {'requested' if value else 'not requested'}")

    def UnplugIsRequested(self, device_type: int) -> bool:
        return self.requests.get(device_type, False)

    def UnplugRequest(self, device_type: int, make: bool) -> None:
        """+1 / -1 on the counter for the next boot (children call this at start / remove)."""
        name = UNPLUG_TYPES[device_type]
        value = self._read(UNPLUG_KEY, name)
        if make:
            value += 1
        elif value:
            value -= 1
        self.registry.set_dword(UNPLUG_KEY, name, value)
        self._print(f"Request: {name} {'MAKE' if make else 'REVOKE'} -> {value}")

    # -- the port protocol ---------------------------------------------------------------------

    def UnplugPreamble(self) -> bool:
        """Magic, version, product/build registration; True if the platform will unplug for us."""
        if self._preamble is not None:
            return self._preamble
        self._preamble = False
        if self.io is None:
            self._print("Preamble: no platform I/O (not a Xen guest)")
            return False
        magic = self.io.inw(U.UNPLUG_PORT_MAGIC)
        if magic == U.UNPLUG_MAGIC_BLACKLISTED:
            self._print("Preamble: BLACKLISTED", DbgLevel.ERROR)
            return False
        if magic != U.UNPLUG_MAGIC:
            self._print(f"Preamble: magic {magic:#06x}: protocol not supported", DbgLevel.WARNING)
            return False
        if self.io.inb(U.UNPLUG_PORT_VERSION) != 0:
            major, minor, micro, _ = self.version
            self.io.outw(U.UNPLUG_PORT_PRODUCT, PRODUCT_NUMBER)
            self.io.outl(U.UNPLUG_PORT_BUILD, major << 16 | minor << 8 | micro)
            if self.io.inw(U.UNPLUG_PORT_MAGIC) == U.UNPLUG_MAGIC_BLACKLISTED:
                self._print("Preamble: BLACKLISTED after registration", DbgLevel.ERROR)
                return False
        self._preamble = True
        return True

    def disks_mask(self) -> int:
        if self.boot_emulated:
            return U.UNPLUG_AUX_IDE_DISKS
        return U.UNPLUG_ALL_IDE_DISKS | U.UNPLUG_NVME_DISKS

    def UnplugDevices(self) -> int:
        """Unplug what this boot requested; returns the mask written (0 if nothing)."""
        wanted = [t for t in (UNPLUG_DISKS, UNPLUG_NICS) if self.requests.get(t)]
        if not wanted or not self.UnplugPreamble():
            return 0
        assert self.io is not None
        written = 0
        for device_type in wanted:
            mask = self.disks_mask() if device_type == UNPLUG_DISKS else U.UNPLUG_ALL_NICS
            self.io.outw(U.UNPLUG_PORT_MASK, mask)
            written |= mask
            self._print(f"Devices: {UNPLUG_TYPES[device_type]} (mask {mask:#x})")
        self.unplugged_mask |= written
        return written
