"""xenvbd.sys DriverEntry and AddDevice (VBD src/xenvbd/driver.c; reference windows-pv-drivers.md 6, 8).

The catalog resolves image xenvbd.sys here. The package binds XENBUS's VBD PDO by its exact revision
(stack/install/packages.py), so AddDevice sits on that PDO; the adapter (adapter.py) does the work at
START_DEVICE and REMOVE_DEVICE. The storport layer above the adapter (disk PDOs, XENDISK) is not modelled:
targets are reached through `XenvbdDriver.adapters`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, DeviceKind, DeviceObject, DriverObject, Irp,
                          IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice, IoDeleteDevice,
                          IoDetachDevice, IoSynchronousCallDriver)
from xenpv.stack.kernel.irp import IRP_MN_POWER, POWER_STATE_TYPE, forward
from xenpv.stack.kernel.power import S0
from xenpv.stack.kernel.registry import Registry
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_SUCCESS

from .adapter import XenvbdAdapter

log = logging.getLogger("stack.drivers.xenvbd")


@dataclass
class XenvbdDriver:
    adapters: list[XenvbdAdapter] = field(default_factory=list)

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        device = IoCreateDevice(driver, DeviceKind.FDO, name="XENVBD adapter")
        lower = IoAttachDeviceToDeviceStack(device, pdo)
        # The PnP manager's registry is where IoOpenDeviceRegistryKey/the service key would be opened.
        registry = pdo.device_node.manager.registry if pdo.device_node is not None else Registry()
        device.extension = XenvbdAdapter(device, lower, registry)
        self.adapters.append(device.extension)
        return STATUS_SUCCESS

    def dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        adapter: XenvbdAdapter = device.extension
        if irp.minor == IRP_MN_PNP.START_DEVICE:
            status = IoSynchronousCallDriver(adapter.lower, irp)
            if NT_SUCCESS(status):
                status = adapter.AdapterStart()
            irp.io_status.status = status
            IoCompleteRequest(irp)
            return status
        if irp.minor == IRP_MN_PNP.REMOVE_DEVICE:
            adapter.AdapterStop()
            status = forward(irp, adapter.lower)
            IoDetachDevice(adapter.lower)
            IoDeleteDevice(device)
            self.adapters.remove(adapter)
            return status
        return forward(irp, adapter.lower)

    def dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        """System power: below S0 the adapter closes its frontends and releases its interfaces first;
        back at S0 it takes them again after the bus driver is up."""
        adapter: XenvbdAdapter = device.extension
        params = irp.parameters
        system = (irp.minor == IRP_MN_POWER.SET_POWER and params is not None
                  and params.type == POWER_STATE_TYPE.SystemPowerState)
        if system and params.state != S0:
            adapter.AdapterD0ToD3()
        status = forward(irp, adapter.lower)
        if system and params.state == S0:
            adapter.AdapterD3ToD0()
        return status


def DriverEntry(driver: DriverObject, registry_path: str) -> int:
    xenvbd = XenvbdDriver()
    driver.extension = xenvbd
    driver.add_device = xenvbd.add_device
    driver.major_function[IRP_MJ.PNP] = xenvbd.dispatch_pnp
    driver.major_function[IRP_MJ.POWER] = xenvbd.dispatch_power
    log.info("XENVBD loaded (%s)", registry_path)
    return STATUS_SUCCESS
