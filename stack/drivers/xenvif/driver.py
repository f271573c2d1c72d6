"""xenvif.sys DriverEntry and AddDevice (XV src/xenvif/driver.c). The installer's catalog resolves the
image here; the INF binds XENBUS's VIF PDO at the exact revision CHILD_BINDS_XENBUS_REVISION.

driver.py, fdo.py and pdo.py import each other on purpose: they mirror XV's driver.c, fdo.c and pdo.c,
where the driver creates FDOs, an FDO creates its PDOs and each keeps a pointer to its parent (fdo.c
calls DriverXxx, pdo.c FdoXxx). tests/unit/test_layering.py allows this one circle.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.kernel import (IRP_MJ, DeviceKind, DeviceObject, DriverObject, Irp, IoAttachDeviceToDeviceStack,
                          IoCreateDevice, IoDeleteDevice, IoDetachDevice)
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

from .fdo import XenvifFdo, XenvifFdoError

log = logging.getLogger("stack.drivers.xenvif")


@dataclass
class XenvifDriver:
    fdos: list[XenvifFdo] = field(default_factory=list)

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        """FdoCreate."""
        device = IoCreateDevice(driver, DeviceKind.FDO, name="XENVIF FDO")
        lower = IoAttachDeviceToDeviceStack(device, pdo)
        try:
            fdo = XenvifFdo.create(self, device, lower, pdo)
        except XenvifFdoError as exc:
            log.error("FdoCreate: %s", exc)
            IoDetachDevice(lower)
            IoDeleteDevice(device)
            return STATUS_UNSUCCESSFUL
        device.extension = fdo
        self.fdos.append(fdo)
        return STATUS_SUCCESS

    def unload(self, driver: DriverObject) -> None:
        self.fdos.clear()

    @staticmethod
    def dispatch_pnp(device: DeviceObject, irp: Irp) -> int:
        ext: Any = device.extension
        return ext.dispatch_pnp(irp)

    @staticmethod
    def dispatch_power(device: DeviceObject, irp: Irp) -> int:
        ext: Any = device.extension
        return ext.dispatch_power(irp)


def DriverEntry(driver: DriverObject, registry_path: str) -> int:
    xenvif = XenvifDriver()
    driver.major_function[IRP_MJ.PNP] = xenvif.dispatch_pnp
    driver.major_function[IRP_MJ.POWER] = xenvif.dispatch_power
    driver.add_device = xenvif.add_device
    driver.unload = xenvif.unload
    driver.extension = xenvif
    return STATUS_SUCCESS
