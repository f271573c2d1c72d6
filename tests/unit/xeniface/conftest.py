"""XENIFACE over the XENBUS interface fakes of tests/unit/xenbus_interfaces: a bus PDO that answers
IRP_MN_QUERY_INTERFACE from the interface contexts (as XENBUS's PdoQueryInterface does), a PnP manager for
the device interface and the registry, the kernel's memory manager over the fake guest pages; the XENIFACE
FDO on top through its real DriverEntry and AddDevice, started with a real START_DEVICE."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from xenpv.stack.drivers.xeniface.driver import DriverEntry
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, DeviceKind, DriverObject, Irp, IoCompleteRequest, IoCreateDevice,
                                IoSynchronousCallDriver, Registry)
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.io import UserProcess
from xenpv.stack.kernel.pnp import InMemoryCatalog, PnpManager
from xenpv.stack.kernel.mm import MemoryManager, set_current_mm
from xenpv.stack.kernel.status import STATUS_NOT_SUPPORTED, STATUS_SUCCESS
from tests.unit.xenbus_interfaces.conftest import cpu, platform  # noqa: F401  (fixtures)
from tests.unit.xenbus_interfaces.stack_of import interfaces

IFACE_INSTANCE = r"XENBUS\VEN_XP&DEV_IFACE\_"
IFACE_ID = r"XENBUS\VEN_XP&DEV_IFACE&REV_0900000B"


@dataclass
class Rig:
    platform: Any
    contexts: Any
    bus: Any  # the PDO
    fdo: Any
    pnp: Any
    process: UserProcess

    def open(self) -> Any:
        from xenpv.stack.drivers.xeniface.abi import GUID_INTERFACE_XENIFACE
        from xenpv.stack.kernel.io import SetupDiGetClassDevs
        (link,) = SetupDiGetClassDevs(self.pnp, GUID_INTERFACE_XENIFACE)
        return self.process.CreateFile(link)


def _bus_driver(contexts: Any) -> DriverObject:
    by_guid = {type(c).GUID: c for c in (contexts.store, contexts.evtchn, contexts.gnttab, contexts.suspend,
                                         contexts.shared_info)}

    def dispatch_pnp(device: Any, irp: Irp) -> int:
        if irp.minor == IRP_MN_PNP.QUERY_INTERFACE:
            p = irp.parameters
            context = by_guid.get(p.interface_type)
            status, p.interface = (STATUS_NOT_SUPPORTED, None) if context is None else \
                context.get_interface(p.version, p.size)
            irp.io_status.status = status
        elif irp.minor in (IRP_MN_PNP.START_DEVICE, IRP_MN_PNP.REMOVE_DEVICE, IRP_MN_PNP.SURPRISE_REMOVAL):
            irp.io_status.status = STATUS_SUCCESS
        status = irp.io_status.status
        IoCompleteRequest(irp)
        return status

    driver = DriverObject("XENBUS")
    driver.major_function[IRP_MJ.PNP] = dispatch_pnp
    driver.major_function[IRP_MJ.POWER] = lambda device, irp: (setattr(irp.io_status, "status", STATUS_SUCCESS),
                                                               IoCompleteRequest(irp), STATUS_SUCCESS)[2]
    return driver


class PagedVcpu:
    """The fake vCPU's memory, read and written across page boundaries (multi-page grant regions)."""

    def __init__(self, vcpu: Any) -> None:
        self.vcpu = vcpu

    def read_phys(self, gpa: int, length: int) -> bytes:
        out = b""
        while length:
            n = min(length, 4096 - (gpa & 0xFFF))
            out += self.vcpu.read_phys(gpa, n)
            gpa, length = gpa + n, length - n
        return out

    def write_phys(self, gpa: int, data: bytes) -> None:
        while data:
            n = min(len(data), 4096 - (gpa & 0xFFF))
            self.vcpu.write_phys(gpa, data[:n])
            gpa, data = gpa + n, data[n:]


@pytest.fixture
def rig(platform) -> Iterator[Rig]:  # noqa: F811
    set_current_mm(MemoryManager(platform.pages, PagedVcpu(platform.vcpu)))  # type: ignore[arg-type]
    contexts = interfaces(platform)
    pnp = PnpManager(Registry(), InMemoryCatalog(), DebugLog())
    pdo = IoCreateDevice(_bus_driver(contexts), DeviceKind.PDO, name=IFACE_INSTANCE)
    pdo.device_node = SimpleNamespace(instance_path=IFACE_INSTANCE, manager=pnp, matching_id=IFACE_ID)
    driver = DriverObject("XENIFACE")
    assert DriverEntry(driver, driver.registry_path) == STATUS_SUCCESS
    assert driver.add_device(driver, pdo) == STATUS_SUCCESS
    fdo = driver.extension.fdos[0]
    assert IoSynchronousCallDriver(fdo.device, Irp.pnp(IRP_MN_PNP.START_DEVICE)) == STATUS_SUCCESS
    rig = Rig(platform, contexts, pdo, fdo, pnp, UserProcess(pnp, "xenagent.exe"))
    yield rig
    set_current_mm(None)


__all__ = ["IFACE_ID", "IFACE_INSTANCE", "Rig", "cpu", "platform", "rig"]
