"""xeniface.sys DriverEntry and AddDevice (XI src/xeniface/driver.c at f12cbdb). The installer's catalog resolves
the image here; the INF binds XENBUS's synthetic IFACE PDO at its exact revision.

Dispatch: PNP and POWER to the FDO's handlers, DEVICE_CONTROL to XenIfaceIoctl, CLEANUP to XenIfaceCleanup
for the closing handle, CREATE and CLOSE complete with STATUS_SUCCESS (FdoDispatch).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.kernel import (IRP_MJ, DeviceKind, DeviceObject, DriverObject, Irp, IoAttachDeviceToDeviceStack,
                                IoCreateDevice, IoDeleteDevice, IoDetachDevice)
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

from .fdo import XenifaceFdo, XenifaceFdoError

log = logging.getLogger("stack.drivers.xeniface")


@dataclass
class XenifaceDriver:
    fdos: list[XenifaceFdo] = field(default_factory=list)

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        """FdoCreate."""
        device = IoCreateDevice(driver, DeviceKind.FDO, name="XENIFACE FDO")
        lower = IoAttachDeviceToDeviceStack(device, pdo)
        try:
            fdo = XenifaceFdo.create(device, lower, pdo)
        except XenifaceFdoError as exc:
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
    def _fdo(device: DeviceObject) -> Any:
        return device.extension

    def dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        fdo = self._fdo(device)
        status = fdo.dispatch_pnp(irp)
        if device.deleted and fdo in self.fdos:  # REMOVE_DEVICE: FdoDestroy
            self.fdos.remove(fdo)
        return status

    def dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        return self._fdo(device).dispatch_power(irp)

    def dispatch_device_control(self, device: DeviceObject, irp: Irp) -> int:
        return self._fdo(device).dispatch_device_control(irp)

    def dispatch_cleanup(self, device: DeviceObject, irp: Irp) -> int:
        return self._fdo(device).dispatch_cleanup(irp)

    def dispatch_complete(self, device: DeviceObject, irp: Irp) -> int:
        return self._fdo(device).dispatch_complete(irp)


def DriverEntry(driver: DriverObject, registry_path: str) -> int:
    xeniface = XenifaceDriver()
    driver.major_function[IRP_MJ.PNP] = xeniface.dispatch_pnp
    driver.major_function[IRP_MJ.POWER] = xeniface.dispatch_power
    driver.major_function[IRP_MJ.DEVICE_CONTROL] = xeniface.dispatch_device_control
    driver.major_function[IRP_MJ.CLEANUP] = xeniface.dispatch_cleanup
    driver.major_function[IRP_MJ.CREATE] = xeniface.dispatch_complete
    driver.major_function[IRP_MJ.CLOSE] = xeniface.dispatch_complete
    driver.add_device = xeniface.add_device
    driver.unload = xeniface.unload
    driver.extension = xeniface
    return STATUS_SUCCESS
