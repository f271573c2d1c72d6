"""xenbus.sys DriverEntry and AddDevice (XB src/xenbus/driver.c; reference windows-pv-drivers.md 4, 5(d)).

DriverEntry calls XenTouch; when it fails the driver still loads (STATUS_SUCCESS) but without AddDevice,
so PnP leaves the platform device without a function driver. On a version mismatch
(STATUS_INCOMPATIBLE_DRIVER_BLOCKED) it first installs the XENFILT class filter, since AddDevice will not
run to do it (saving a second reboot in upgrades), and requests a reboot; off Xen (STATUS_NOT_IMPLEMENTED)
it does neither. AddDevice is FdoCreate: the device must be a
Xen platform device (PCI vendor 0x5853, read through BUS_INTERFACE_STANDARD); FdoSetActive decides
whether it is the one that works. FiltersInstall runs with the first FDO, FiltersUninstall with the last.

driver.py, fdo.py and pdo.py import each other on purpose: they mirror XB's driver.c, fdo.c and pdo.c,
where the driver creates FDOs, an FDO creates its PDOs and each keeps a pointer to its parent (fdo.c
calls DriverXxx, pdo.c FdoXxx). tests/unit/test_layering.py allows this one circle.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from xenpv.stack.drivers.revision import VENDOR_PREFIX
from xenpv.stack.drivers.xen import PACKAGE_VERSION, Xen
from xenpv.stack.kernel import (IRP_MJ, BusQueryIdType, DeviceKind, DeviceObject, DriverObject, Irp,
                          IoAttachDeviceToDeviceStack, IoCreateDevice, IoDeleteDevice, IoDetachDevice)
from xenpv.stack.kernel.debuglog import DbgLevel
from xenpv.stack.kernel.pnp import CLASS_KEY, HDC_CLASS_GUID, SYSTEM_CLASS_GUID
from xenpv.stack.kernel.registry import Registry, RegistryError
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INCOMPATIBLE_DRIVER_BLOCKED, STATUS_NO_SUCH_DEVICE,
                                       STATUS_SUCCESS, status_name)

from .fdo import (XEN_PLATFORM_VENDOR_ID, PlatformFactory, XenbusFdo, query_bus_interface, query_emulated,
                  query_id, query_location)

if TYPE_CHECKING:
    from xenpv.stack.kernel import Kernel

log = logging.getLogger("stack.drivers.xenbus")

EMULATED_VERSION_MAX = 3
VENDOR_DEVICE_ID = 0xC000  # build variable VENDOR_DEVICE_ID (XenServer's vendor PV device)


def FiltersInstall(registry: Registry) -> None:
    """Put XENFILT in the System and HDC classes' UpperFilters (once)."""
    for guid in (SYSTEM_CLASS_GUID, HDC_CLASS_GUID):
        path = f"{CLASS_KEY}\\{guid}"
        try:
            filters = registry.get_multi_sz(path, "UpperFilters")
        except RegistryError:
            filters = []
        if not any(f.upper() == "XENFILT" for f in filters):
            registry.set_multi_sz(path, "UpperFilters", filters + ["XENFILT"])


def FiltersUninstall(registry: Registry) -> None:
    for guid in (SYSTEM_CLASS_GUID, HDC_CLASS_GUID):
        path = f"{CLASS_KEY}\\{guid}"
        try:
            filters = registry.get_multi_sz(path, "UpperFilters")
        except RegistryError:
            continue
        remaining = [f for f in filters if f.upper() != "XENFILT"]
        if remaining:
            registry.set_multi_sz(path, "UpperFilters", remaining)
        else:
            registry.delete_value(path, "UpperFilters")


@dataclass
class XenbusDriver:
    xen: Xen
    platform_factory: PlatformFactory
    kernel: Kernel | None = None
    version: tuple[int, int, int, int] = PACKAGE_VERSION
    prefix: str = VENDOR_PREFIX
    vendor_device_id: int = VENDOR_DEVICE_ID
    fdos: list[XenbusFdo] = field(default_factory=list)

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.xen.debug_log.print("XENBUS", text, level)

    def driver_entry(self, driver: DriverObject, registry_path: str) -> int:
        status = self.xen.XenTouch("XENBUS", *self.version)
        if not NT_SUCCESS(status):
            if status == STATUS_INCOMPATIBLE_DRIVER_BLOCKED:
                FiltersInstall(self.xen.registry)
                self.xen.config.ConfigRequestReboot("XENBUS")
            self._print(f"DriverEntry: XenTouch: {status_name(status)}: no AddDevice", DbgLevel.WARNING)
            return STATUS_SUCCESS
        driver.major_function[IRP_MJ.PNP] = self.dispatch_pnp
        driver.major_function[IRP_MJ.POWER] = self.dispatch_power
        driver.add_device = self.add_device
        driver.extension = self
        return STATUS_SUCCESS

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        """FdoCreate."""
        device = IoCreateDevice(driver, DeviceKind.FDO, name="XENBUS FDO")
        lower = IoAttachDeviceToDeviceStack(device, pdo)
        bus = query_bus_interface(lower)
        ids = bus.GetBusData(0, 4) if bus is not None else b"\xff\xff\xff\xff"
        vendor, device_id = int.from_bytes(ids[:2], "little"), int.from_bytes(ids[2:], "little")
        if vendor != XEN_PLATFORM_VENDOR_ID or bus is None:
            self._print(f"FdoCreate: vendor {vendor:#06x} is not a Xen platform device", DbgLevel.ERROR)
            IoDetachDevice(lower)
            IoDeleteDevice(device)
            return STATUS_NO_SUCH_DEVICE
        fdo = XenbusFdo(self, device, lower, pdo, query_id(lower, BusQueryIdType.BusQueryDeviceID),
                        query_id(lower, BusQueryIdType.BusQueryInstanceID), query_location(lower), device_id, bus,
                        query_emulated(lower, EMULATED_VERSION_MAX))
        device.extension = fdo
        if not self.fdos:
            FiltersInstall(self.xen.registry)
        self.fdos.append(fdo)
        fdo.FdoSetActive()
        return STATUS_SUCCESS

    def FdoDestroyed(self, fdo: XenbusFdo) -> None:
        self.fdos.remove(fdo)
        if not self.fdos:
            FiltersUninstall(self.xen.registry)

    @property
    def active_fdo(self) -> XenbusFdo | None:
        return next((f for f in self.fdos if f.active), None)

    def dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        ext: Any = device.extension
        return ext.dispatch_pnp(irp)

    def dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        ext: Any = device.extension
        return ext.dispatch_power(irp)
