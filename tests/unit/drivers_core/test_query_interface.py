"""IRP_MN_QUERY_INTERFACE at a XENBUS child PDO (reference 2)."""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest

from xenpv.stack.drivers.pci import BUS_INTERFACE_STANDARD_SIZE, GUID_BUS_INTERFACE_STANDARD
from xenpv.stack.drivers.xenbus.pdo import XENBUS_PDO_INTERFACES
from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE
from xenpv.stack.drivers.xenfilt import GUID_XENFILT_EMULATED_INTERFACE
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, BugCheck, BugCheckCode, DeviceObject, Irp, IoSynchronousCallDriver,
                          KeInitializeDpc, KeInsertQueueDpc, QueryInterfaceParameters)
from xenpv.stack.kernel.status import (STATUS_BUFFER_OVERFLOW, STATUS_BUFFER_TOO_SMALL, STATUS_NOT_SUPPORTED,
                                 STATUS_SUCCESS)

GUID_UNKNOWN = uuid.UUID("12345678-9ABC-DEF0-1234-56789ABCDEF0")
GUID_OLD_XENFILT_UNPLUG = uuid.UUID("201A139A-AD4D-4ECE-BA0B-7F7AAEA46029")


def _query(pdo: DeviceObject, guid: uuid.UUID, version: int, size: int = 4096,
           preset: int = STATUS_NOT_SUPPORTED, interface: object = None) -> tuple[int, object]:
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(guid, size, version, interface))
    irp.io_status.status = preset
    return IoSynchronousCallDriver(pdo, irp), irp.parameters.interface


@dataclass
class Spy:
    """Every QUERY_INTERFACE that reaches a driver, as (driver name, device kind, GUID)."""

    seen: list[tuple[str, str, uuid.UUID]] = field(default_factory=list)

    def wrap(self, device: DeviceObject) -> None:
        driver = device.driver
        inner = driver.major_function[IRP_MJ.PNP]

        def dispatch(dev: DeviceObject, irp: Irp) -> int:
            if irp.minor == IRP_MN_PNP.QUERY_INTERFACE:
                self.seen.append((driver.name, dev.kind.name, irp.parameters.interface_type))
            return inner(dev, irp)
        driver.major_function[IRP_MJ.PNP] = dispatch


@pytest.fixture
def child(rig, machine):
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    spy = Spy()
    for device in fdo.pdo.device_node.stack():  # PCI PDO, XENFILT filter PDO (XENBUS FDO is not spied)
        if device is not fdo.device:
            spy.wrap(device)
    with booted.kernel.cpu.lock:
        yield booted, fdo, fdo.children["VBD"], spy


def test_every_xenbus_interface_at_every_version_size_and_beyond(child) -> None:
    _, fdo, pdo, spy = child
    assert sorted(fdo.interfaces) == sorted(XENBUS_PDO_INTERFACES)
    for name, context in fdo.interfaces.items():
        for version in range(1, context.max_version() + 2):
            status, table = _query(pdo, context.GUID, version)
            if version not in context.TABLES:
                assert (status, table) == (STATUS_NOT_SUPPORTED, None), (name, version)
                continue
            assert status == STATUS_SUCCESS and table.Version == version and table.Context is context
            size = context.TABLES[version].size
            assert _query(pdo, context.GUID, version, size)[0] == STATUS_SUCCESS
            assert _query(pdo, context.GUID, version, size - 1) == (STATUS_BUFFER_OVERFLOW, None), (name, version)
    assert spy.seen == []  # all answered at the PDO


def test_a_status_already_set_is_completed_unchanged(child) -> None:
    _, _, pdo, _ = child
    theirs = object()
    status, interface = _query(pdo, GUID_XENBUS_UNPLUG_INTERFACE, 3, preset=STATUS_SUCCESS, interface=theirs)
    assert (status, interface) == (STATUS_SUCCESS, theirs)
    status, interface = _query(pdo, GUID_XENBUS_UNPLUG_INTERFACE, 3, preset=STATUS_BUFFER_OVERFLOW)
    assert (status, interface) == (STATUS_BUFFER_OVERFLOW, None)


@pytest.mark.parametrize("guid", [GUID_UNKNOWN, GUID_OLD_XENFILT_UNPLUG])
def test_an_unknown_guid_is_not_supported_and_not_forwarded(child, guid: uuid.UUID) -> None:
    _, _, pdo, spy = child
    assert _query(pdo, guid, 1) == (STATUS_NOT_SUPPORTED, None)
    assert spy.seen == []


def test_emulated_is_delegated_down_the_fdo_stack_to_xenfilt(child) -> None:
    booted, fdo, pdo, spy = child
    status, table = _query(pdo, GUID_XENFILT_EMULATED_INTERFACE, 3)
    assert status == STATUS_SUCCESS and table.Version == 3 and table.Context is booted.xenfilt.emulated
    # Answered by the XENFILT filter PDO, which always passes it on to the PCI PDO.
    assert spy.seen == [("XENFILT", "FILTER", GUID_XENFILT_EMULATED_INTERFACE),
                        ("PCI", "PDO", GUID_XENFILT_EMULATED_INTERFACE)]
    assert table.EmulatedIsDevicePresent(fdo.device_id, None) == (True, 0)
    assert _query(pdo, GUID_XENFILT_EMULATED_INTERFACE, 4)[0] == STATUS_NOT_SUPPORTED
    assert _query(pdo, GUID_XENFILT_EMULATED_INTERFACE, 3, table.Size - 1)[0] == STATUS_BUFFER_OVERFLOW


def test_bus_interface_standard_is_a_per_pdo_proxy(child) -> None:
    _, fdo, pdo, _ = child
    status, proxy = _query(pdo, GUID_BUS_INTERFACE_STANDARD, 1, BUS_INTERFACE_STANDARD_SIZE)
    assert status == STATUS_SUCCESS and proxy.Context is pdo and proxy.references == 1
    assert proxy.GetBusData(0, 4) == (0x5853 | 0x0001 << 16).to_bytes(4, "little")
    assert _query(pdo, GUID_BUS_INTERFACE_STANDARD, 2)[0] == STATUS_NOT_SUPPORTED
    assert _query(pdo, GUID_BUS_INTERFACE_STANDARD, 1, BUS_INTERFACE_STANDARD_SIZE - 1)[0] == STATUS_BUFFER_TOO_SMALL


def test_query_interface_at_dispatch_bugchecks_naming_the_module(child) -> None:
    booted, _, pdo, _ = child
    dpc = KeInitializeDpc(lambda *a: _query(pdo, GUID_XENBUS_UNPLUG_INTERFACE, 3), module="xenvif.sys")
    with pytest.raises(BugCheck) as stop:
        KeInsertQueueDpc(dpc)
    assert stop.value.code == BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL
    dump = booted.kernel.crash_dump(stop.value)
    assert dump.module == "xenvif.sys"
