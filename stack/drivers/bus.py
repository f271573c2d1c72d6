"""What every simple bus driver of the model does the same way (pci.sys, pciide/atapi): PDOs succeed power
IRPs; the FDO reports its children for BusRelations, forwards everything else to the device below, and on
REMOVE forwards, detaches and deletes itself. A subclass supplies `_enumerate(fdo)` and `_pdo_pnp`."""
from __future__ import annotations

from xenpv.stack.kernel import (IRP_MN_PNP, DeviceKind, DeviceObject, DeviceRelationType, Irp, IoCompleteRequest,
                          IoDeleteDevice, IoDetachDevice, forward)
from xenpv.stack.kernel.status import STATUS_SUCCESS


class BusDriver:
    def dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        if device.kind == DeviceKind.PDO:
            irp.io_status.status = STATUS_SUCCESS
            IoCompleteRequest(irp)
            return STATUS_SUCCESS
        return forward(irp, device.extension.lower)

    def dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        if device.kind == DeviceKind.PDO:
            return self._pdo_pnp(device, irp)
        lower = device.extension.lower
        if irp.minor == IRP_MN_PNP.QUERY_DEVICE_RELATIONS and irp.parameters.type == DeviceRelationType.BusRelations:
            irp.io_status.status = STATUS_SUCCESS
            irp.io_status.information = self._enumerate(device)
        elif irp.minor == IRP_MN_PNP.REMOVE_DEVICE:
            status = forward(irp, lower)
            IoDetachDevice(lower)
            IoDeleteDevice(device)
            return status
        elif irp.minor == IRP_MN_PNP.START_DEVICE:
            irp.io_status.status = STATUS_SUCCESS
        return forward(irp, lower)

    def _enumerate(self, fdo: DeviceObject) -> list[DeviceObject]:
        raise NotImplementedError

    def _pdo_pnp(self, device: DeviceObject, irp: Irp) -> int:
        raise NotImplementedError
