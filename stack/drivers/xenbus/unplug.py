"""XENBUS UNPLUG interface v1-3 (XB include/unplug_interface.h, src/xenbus/unplug.c; reference 1, 6).

A thin front to xen.sys: `Request(NICS=1 | DISKS=2, Make)` moves the registry counter for the next boot
by +1 / -1 (children arm it at start and disarm it at remove), `IsRequested(T)` says whether this boot
unplugged that type (v2), `BootEmulated()` reports XEN:BOOT_EMULATED and `Reboot(Module)` raises a
volatile reboot request for xenbus_monitor (v3). UNPLUG holds no hypervisor state, which is why it is
not among the interfaces the S3 -> S4 rule checks.
"""
from __future__ import annotations

import uuid

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xen import UNPLUG_TYPES, Xen
from xenpv.stack.kernel.irql import assert_passive

GUID_XENBUS_UNPLUG_INTERFACE = uuid.UUID("73DB6517-3D06-4937-989F-199B7501E229")
XENBUS_UNPLUG_DEVICE_TYPE_NICS = 1
XENBUS_UNPLUG_DEVICE_TYPE_DISKS = 2


class UnplugInterface(Interface):
    NAME = "UNPLUG"
    GUID = GUID_XENBUS_UNPLUG_INTERFACE
    TABLES = LAYOUTS["UNPLUG"]

    def __init__(self, xen: Xen) -> None:
        super().__init__()
        self.xen = xen

    @staticmethod
    def _check(device_type: int) -> None:
        if device_type not in UNPLUG_TYPES:
            raise ValueError(f"UNPLUG: unknown device type {device_type} (NICS=1, DISKS=2)")

    def UnplugRequest(self, device_type: int, make: bool) -> None:
        self._check(device_type)
        assert_passive("UnplugRequest")  # a registry write
        self.xen.unplug.UnplugRequest(device_type, make)

    def UnplugIsRequested(self, device_type: int) -> bool:
        self._check(device_type)
        return self.xen.unplug.UnplugIsRequested(device_type)

    def UnplugBootEmulated(self) -> bool:
        return self.xen.options.boot_emulated

    def UnplugReboot(self, module: str) -> None:
        self.xen.config.ConfigRequestReboot(module)
