"""xen.sys unplug: the registry request counters and the emulated-device unplug port protocol
(XB src/xen/unplug.c; reference windows-pv-drivers.md 6).

At load (`UnplugSetRequest`), for NICS and DISKS: a non-zero `Services\\XEN\\ForceUnplug\\<T>` requests
the unplug; else a non-zero `Services\\XEN\\Unplug\\<T>` does, unless no `Enum\\XENBUS` key names a VBD
(disks) or VIF (NICs) child, which vetoes it (a stale counter must not take the boot disk away: the
0x7B of bfcf8f7). The Unplug value is deleted in every case (forced, vetoed or not), so each boot's
children must re-arm it with UNPLUG.Request(T, TRUE).

Children move the counter through xen.sys's exports UnplugIncrementValue (a missing value counts as 0)
and UnplugDecrementValue, which fails and writes nothing when the value is missing or already 0;
XENBUS's UNPLUG.Request ignores the status of either ((VOID) in XB src/xenbus/unplug.c UnplugRequest).

`UnplugDevices` speaks the port protocol through the vCPU, every time it runs (boot, resume, S4): magic
at 0x10, protocol version at 0x12, product 0xFFFF and build registration, blacklist check, then one mask
write per requested type, DISKS before NICS (UNPLUG_TYPE order). A blacklisted magic (0xd249) only sets
BlackListed: the masks are still written, and QEMU, which never blacklists, honours them. A magic that
is neither fails the preamble, which UnplugDevices only ASSERTs: a free build writes the masks anyway
(to a port no device model serves).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.debuglog import DbgLevel, DebugLog
from xenpv.stack.kernel.registry import Registry, RegistryError
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_NOT_SUPPORTED,
                                       STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, status_name)
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


@dataclass
class Unplug:
    registry: Registry
    debug_log: DebugLog
    io: PortIO | None
    version: tuple[int, int, int, int]
    boot_emulated: bool  # the boot option BOOT_EMULATED (xen.sys reads it at DllInitialize)
    requests: dict[int, bool] = field(default_factory=dict)
    unplugged_mask: int = 0
    blacklisted: bool = False

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
        # strstr in UnplugCheckEnumKeyCallback: case-sensitive, anywhere in the key name.
        return any(_CHILD_CLASS[device_type] in key for key in keys)

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

    def _value_name(self, device_type: int) -> str:
        return UNPLUG_TYPES[device_type]

    def UnplugIncrementValue(self, device_type: int) -> int:
        """XB src/xen/unplug.c UnplugIncrementValue: a missing value counts as 0."""
        name = self._value_name(device_type)
        value = self._read(UNPLUG_KEY, name) + 1
        self.registry.set_dword(UNPLUG_KEY, name, value)
        self._print(f"IncrementValue: {name} {value}")
        return STATUS_SUCCESS

    def UnplugDecrementValue(self, device_type: int) -> int:
        """XB src/xen/unplug.c UnplugDecrementValue: a missing value fails the query (fail1), a value of 0
        would go below zero (fail2, STATUS_INVALID_PARAMETER); either way nothing is written."""
        name = self._value_name(device_type)
        try:
            value = self.registry.get_dword(UNPLUG_KEY, name)
        except RegistryError:
            self._print(f"DecrementValue: {name}: fail1 ({status_name(STATUS_OBJECT_NAME_NOT_FOUND)})",
                        DbgLevel.ERROR)
            return STATUS_OBJECT_NAME_NOT_FOUND
        # The real code reads the DWORD into a LONG: 0x80000000 and above are negative already.
        signed = value - (1 << 32) if value & 0x80000000 else value
        if signed - 1 < 0:
            self._print(f"DecrementValue: {name} = {value}: fail2 ({status_name(STATUS_INVALID_PARAMETER)})",
                        DbgLevel.ERROR)
            return STATUS_INVALID_PARAMETER
        self.registry.set_dword(UNPLUG_KEY, name, signed - 1)
        self._print(f"DecrementValue: {name} {signed - 1}")
        return STATUS_SUCCESS

    def UnplugRequest(self, device_type: int, make: bool) -> None:
        """+1 / -1 on the counter for the next boot (children call this at start / remove); the status is
        dropped, as XENBUS's UnplugRequest does."""
        if make:
            self.UnplugIncrementValue(device_type)
        else:
            self.UnplugDecrementValue(device_type)

    # -- the port protocol ---------------------------------------------------------------------

    def UnplugPreamble(self) -> int:
        """Magic, version, product/build registration (XB src/xen/unplug.c UnplugPreamble). Blacklisting
        only sets `blacklisted` and succeeds; a magic that is not the protocol's is STATUS_NOT_SUPPORTED."""
        assert self.io is not None
        magic = self.io.inw(U.UNPLUG_PORT_MAGIC)
        if magic == U.UNPLUG_MAGIC_BLACKLISTED:
            self.blacklisted = True
        elif magic != U.UNPLUG_MAGIC:
            self._print(f"Preamble: magic {magic:#06x}: protocol not supported", DbgLevel.WARNING)
            return STATUS_NOT_SUPPORTED
        elif self.io.inb(U.UNPLUG_PORT_VERSION) != 0:
            major, minor, micro, _ = self.version
            self.io.outw(U.UNPLUG_PORT_PRODUCT, PRODUCT_NUMBER)
            self.io.outl(U.UNPLUG_PORT_BUILD, major << 16 | minor << 8 | micro)
            if self.io.inw(U.UNPLUG_PORT_MAGIC) == U.UNPLUG_MAGIC_BLACKLISTED:
                self.blacklisted = True
        self._print(f"Preamble: PRE-AMBLE (DRIVERS {'BLACKLISTED' if self.blacklisted else 'NOT BLACKLISTED'})",
                    DbgLevel.WARNING)
        return STATUS_SUCCESS

    def disks_mask(self) -> int:
        if self.boot_emulated:
            return U.UNPLUG_AUX_IDE_DISKS
        return U.UNPLUG_ALL_IDE_DISKS | U.UNPLUG_NVME_DISKS

    def UnplugDevices(self) -> int:
        """Unplug what this boot requested; returns the mask written (0 if nothing)."""
        wanted = [t for t in (UNPLUG_DISKS, UNPLUG_NICS) if self.requests.get(t)]
        if self.io is None:
            return 0  # not a Xen guest: DllInitialize set no request (and the model has no port to write)
        status = self.UnplugPreamble()
        ASSERT(NT_SUCCESS(status), "NT_SUCCESS(status)", module="xen.sys")  # the free build goes on
        written = 0
        for device_type in wanted:
            mask = self.disks_mask() if device_type == UNPLUG_DISKS else U.UNPLUG_ALL_NICS
            self.io.outw(U.UNPLUG_PORT_MASK, mask)
            written |= mask
            self._print(f"Devices: {UNPLUG_TYPES[device_type]} (mask {mask:#x})")
        self.unplugged_mask |= written
        return written
