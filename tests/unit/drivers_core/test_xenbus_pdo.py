"""A XENBUS child PDO's answers to the PnP manager and to its children's drivers (pdo.c PdoDispatchPnp,
PdoQueryInterface, PdoQueryBusInterface): what the mutation run of issue 18 found no test for."""
from __future__ import annotations

import pytest

from xenpv.stack.kernel import (IRP_MN_PNP, DeviceRelationType, Irp, IoSynchronousCallDriver,
                                QueryDeviceRelationsParameters, QueryInterfaceParameters)
from xenpv.stack.drivers.pci import BUS_INTERFACE_STANDARD_SIZE, GUID_BUS_INTERFACE_STANDARD
from xenpv.stack.kernel.status import STATUS_BUFFER_TOO_SMALL, STATUS_NOT_SUPPORTED, STATUS_SUCCESS


@pytest.fixture
def child(rig, machine):
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    return booted, fdo, fdo.children["VIF"]


def _pnp(booted, device, minor, parameters=None) -> Irp:
    irp = Irp.pnp(minor, parameters)
    with booted.kernel.cpu.lock:
        IoSynchronousCallDriver(device, irp)
    return irp


def _trace(fdo) -> list[str]:
    return [line for line in fdo.driver.xen.debug_log.tail(100) if "PdoQueryInterface" in line]


def test_bus_interface_is_version_1_referenced_once_for_its_caller(child) -> None:
    booted, fdo, pdo = child
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_INTERFACE,
               QueryInterfaceParameters(GUID_BUS_INTERFACE_STANDARD, BUS_INTERFACE_STANDARD_SIZE, 1, None))
    assert (irp.io_status.status, irp.io_status.information) == (STATUS_SUCCESS, 0)
    bus = irp.parameters.interface
    assert (bus.Version, bus.Size, bus.references) == (1, BUS_INTERFACE_STANDARD_SIZE, 1)
    bus.InterfaceReference()
    bus.InterfaceReference()
    assert bus.references == 3
    bus.InterfaceDereference()
    assert bus.references == 2


def test_a_xenbus_interface_answer_sets_information_zero_and_a_failure_is_traced(child) -> None:
    booted, fdo, pdo = child
    store = fdo.interfaces["STORE"]
    version = max(store.TABLES)
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(store.GUID, 4096, version, None))
    assert (irp.io_status.status, irp.io_status.information) == (STATUS_SUCCESS, 0)
    assert _trace(fdo) == []
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(store.GUID, 1, version, None))
    assert irp.io_status.status != STATUS_SUCCESS
    assert any(f"v{version}:" in line for line in _trace(fdo)), _trace(fdo)


def test_an_unknown_interface_is_not_supported_and_traced_as_not_served(child) -> None:
    import uuid
    booted, fdo, pdo = child
    guid = uuid.UUID("01234567-89ab-cdef-0123-456789abcdef")
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(guid, 64, 1, None))
    assert irp.io_status.status == STATUS_NOT_SUPPORTED
    assert any("not served" in line for line in _trace(fdo)), _trace(fdo)


def test_a_bus_interface_refused_keeps_its_status(child) -> None:
    booted, fdo, pdo = child
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_INTERFACE,
               QueryInterfaceParameters(GUID_BUS_INTERFACE_STANDARD, BUS_INTERFACE_STANDARD_SIZE - 1, 1, None))
    assert irp.io_status.status == STATUS_BUFFER_TOO_SMALL and irp.parameters.interface is None


def test_target_relations_are_the_pdo_itself_and_bus_relations_are_not_answered(child) -> None:
    booted, fdo, pdo = child
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_DEVICE_RELATIONS,
               QueryDeviceRelationsParameters(DeviceRelationType.TargetDeviceRelation))
    assert (irp.io_status.status, irp.io_status.information) == (STATUS_SUCCESS, [pdo])
    irp = _pnp(booted, pdo, IRP_MN_PNP.QUERY_DEVICE_RELATIONS,
               QueryDeviceRelationsParameters(DeviceRelationType.BusRelations))
    assert irp.io_status.status == STATUS_NOT_SUPPORTED


@pytest.mark.parametrize("minor", [IRP_MN_PNP.START_DEVICE, IRP_MN_PNP.SURPRISE_REMOVAL, IRP_MN_PNP.STOP_DEVICE,
                                   IRP_MN_PNP.QUERY_REMOVE_DEVICE, IRP_MN_PNP.CANCEL_REMOVE_DEVICE,
                                   IRP_MN_PNP.REMOVE_DEVICE])
def test_state_changes_succeed(child, minor) -> None:
    booted, fdo, pdo = child
    assert _pnp(booted, pdo, minor).io_status.status == STATUS_SUCCESS


def test_remove_deletes_a_missing_pdo_and_keeps_a_present_one(child) -> None:
    """pdo.c PdoRemoveDevice: the PDO is deleted only once it is missing (its class gone from the store);
    a present one stays for the next enumeration."""
    booted, fdo, pdo = child
    assert pdo.extension.missing is None
    _pnp(booted, pdo, IRP_MN_PNP.REMOVE_DEVICE)
    assert not pdo.deleted
    pdo.extension.PdoSetMissing("test")
    _pnp(booted, pdo, IRP_MN_PNP.REMOVE_DEVICE)
    assert pdo.deleted


def test_power_irps_to_a_child_complete_successfully(child) -> None:
    from xenpv.stack.kernel import IRP_MN_POWER, POWER_STATE_TYPE, PowerParameters
    from xenpv.stack.kernel.power import S3
    booted, fdo, pdo = child
    irp = Irp.power(IRP_MN_POWER.SET_POWER, PowerParameters(POWER_STATE_TYPE.SystemPowerState, S3))
    with booted.kernel.cpu.lock:
        assert pdo.extension.dispatch_power(irp) == STATUS_SUCCESS
    assert irp.completed and irp.io_status.status == STATUS_SUCCESS
