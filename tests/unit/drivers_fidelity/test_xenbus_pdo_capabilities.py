"""XENBUS child PDO capabilities (xcp-ng/win-xenbus 1087a8d, src/xenbus/pdo.c PdoQueryCapabilities):
`Removable` from `XENBUS\\Parameters\\<class>\\AllowPdoRemove` (default 1, __PdoSetRemovable), and
`SurpriseRemovalOK = Removable`."""
from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from xenpv.stack.drivers.xenbus.pdo import XenbusPdo
from xenpv.stack.kernel import (IRP_MN_PNP, DeviceKind, DriverObject, Irp, IoCreateDevice,
                                QueryCapabilitiesParameters, Registry)
from xenpv.stack.kernel.irp import DeviceCapabilities
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.status import STATUS_SUCCESS


# The key the real driver reads, written out: the module's own constant would follow a typo in it.
PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters"


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


def _capabilities(registry: Registry, device_class: str) -> DeviceCapabilities:
    fdo = SimpleNamespace(driver=SimpleNamespace(xen=SimpleNamespace(registry=registry)))
    device = IoCreateDevice(DriverObject("XENBUS"), DeviceKind.PDO, name=device_class)
    pdo = XenbusPdo(fdo, device, device_class)  # type: ignore[arg-type]
    irp = Irp.pnp(IRP_MN_PNP.QUERY_CAPABILITIES, QueryCapabilitiesParameters(DeviceCapabilities()))
    assert pdo.dispatch_pnp(irp) == STATUS_SUCCESS
    return irp.parameters.capabilities


@pytest.mark.parametrize("allow,removable", [(None, True), (1, True), (0, False)])
def test_surprise_removal_ok_follows_removable(allow: int | None, removable: bool) -> None:
    registry = Registry()
    if allow is not None:
        registry.set_dword(f"{PARAMETERS}\\VBD", "AllowPdoRemove", allow)
    caps = _capabilities(registry, "VBD")
    assert (caps.removable, caps.surprise_removal_ok) == (removable, removable)
    assert caps.unique_id and caps.silent_install
