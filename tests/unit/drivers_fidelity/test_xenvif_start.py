"""XENVIF's NET PDO as the real one (xcp-ng/win-xenvif 14892e7, src/xenvif/pdo.c): PdoStartDevice's NIC
unplug rule, the per-PDO unplug request, the IDs (XENDEVICE, ContainerID) and the PDO's own
BUS_INTERFACE_STANDARD. The PDO runs over a real xen.sys Xen (registry counters, Config) and XENBUS's real
UNPLUG v3 table; only the frontend and the parent FDO are stand-ins (no xenstore, no backend here)."""
from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from xenpv.stack.drivers.pci import BUS_INTERFACE_STANDARD_SIZE, GUID_BUS_INTERFACE_STANDARD
from xenpv.stack.drivers.xen import UNPLUG_NICS, Xen
from xenpv.stack.drivers.xen.unplug import UNPLUG_KEY
from xenpv.stack.drivers.xenbus.unplug import UnplugInterface
from xenpv.stack.drivers.xenvif.driver import DriverEntry
from xenpv.stack.drivers.xenvif.fdo import CONTROL_KEY, XenvifFdo
from xenpv.stack.drivers.xenvif.frontend import FrontendState
from xenpv.stack.drivers.xenvif.pdo import PdoCreate, pdo_container_id
from xenpv.stack.kernel import (IRP_MN_PNP, BusQueryIdType, DriverObject, Irp, IoSynchronousCallDriver,
                                QueryIdParameters, QueryInterfaceParameters, Registry)
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.kernel.status import (STATUS_BUFFER_TOO_SMALL, STATUS_NOT_SUPPORTED, STATUS_PNP_REBOOT_REQUIRED,
                                       STATUS_SUCCESS, STATUS_UNSUCCESSFUL)

MAC = bytes.fromhex("00163e000001")


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


@dataclass
class StubFrontend:
    """The frontend's state only: what PdoStartDevice and REMOVE ask it to do."""

    index: int
    states: list[FrontendState] = field(default_factory=list)

    def FrontendSetState(self, state: int) -> int:
        self.states.append(FrontendState(state))
        return STATUS_SUCCESS


@dataclass
class LowerBus:
    """The parent's BUS_INTERFACE_STANDARD: the platform device's config space (vendor 5853, device 0001)."""

    config: bytes = bytes.fromhex("53580100")
    references: int = 0

    def GetBusData(self, offset: int, length: int) -> bytes:
        return self.config[offset:offset + length]

    def SetBusData(self, offset: int, data: bytes) -> int:
        return len(data)


@dataclass
class Boot:
    xen: Xen
    driver: DriverObject
    fdo: SimpleNamespace

    def pdo(self, index: int = 0, mac: bytes = MAC):
        device = PdoCreate(self.fdo, StubFrontend(index), mac)  # type: ignore[arg-type]
        return device

    def counter(self) -> int | None:
        try:
            return self.xen.registry.get_dword(UNPLUG_KEY, "NICS")
        except RegistryError:
            return None


def _boot(registry: Registry, *, nics_unplugged: bool, safe_mode: bool = False) -> Boot:
    """One boot's xen.sys: `nics_unplugged` is what UnplugSetRequest decided for NICS at load."""
    xen = Xen(registry, DebugLog(), None)
    xen.unplug.requests[UNPLUG_NICS] = nics_unplugged
    status, unplug = UnplugInterface(xen).get_interface(3, 4096)
    assert status == STATUS_SUCCESS
    driver = DriverObject("XENVIF")
    assert DriverEntry(driver, driver.registry_path) == STATUS_SUCCESS
    fdo = SimpleNamespace(device=SimpleNamespace(driver=driver), prefix="XP", vendor_name="XP0001",
                          interfaces={"UNPLUG": unplug}, lower_bus=LowerBus(), children={},
                          PdoDestroyed=lambda pdo: None, DriverSafeMode=lambda: safe_mode)
    return Boot(xen, driver, fdo)


def _pnp(device, minor: int, parameters=None) -> tuple[int, Irp]:
    irp = Irp.pnp(minor, parameters)
    return IoSynchronousCallDriver(device, irp), irp


def test_first_boot_start_fails_reboot_required_arms_the_unplug_and_requests_a_reboot() -> None:
    """pdo.c PdoStartDevice: `if (... || !PdoUnplugRequested(Pdo)) { PdoUnplugRequest(Pdo, TRUE);
    PdoRequestReboot(Pdo); status = STATUS_PNP_REBOOT_REQUIRED; goto fail5; }` - before the frontend
    is touched."""
    boot = _boot(Registry(), nics_unplugged=False)
    device = boot.pdo()
    status, _ = _pnp(device, IRP_MN_PNP.START_DEVICE)
    assert status == STATUS_PNP_REBOOT_REQUIRED
    assert device.extension.frontend.states == []  # never connected next to the emulated NIC
    assert boot.counter() == 1
    assert boot.xen.config.reboot_requested("XENVIF")
    # PdoRemoveDevice: a PDO that never reached D0 leaves the request armed for the next boot.
    assert _pnp(device, IRP_MN_PNP.REMOVE_DEVICE)[0] == STATUS_SUCCESS
    assert boot.counter() == 1


def test_the_request_is_armed_per_net_pdo() -> None:
    """Each NET PDO has its own Pdo->UnplugRequested: two vifs move the counter twice; a PDO started
    again (a restarted driver) does not move it again."""
    boot = _boot(Registry(), nics_unplugged=False)
    first, second = boot.pdo(0), boot.pdo(1, bytes.fromhex("00163e000002"))
    assert _pnp(first, IRP_MN_PNP.START_DEVICE)[0] == STATUS_PNP_REBOOT_REQUIRED
    assert _pnp(first, IRP_MN_PNP.START_DEVICE)[0] == STATUS_PNP_REBOOT_REQUIRED
    assert boot.counter() == 1
    assert _pnp(second, IRP_MN_PNP.START_DEVICE)[0] == STATUS_PNP_REBOOT_REQUIRED
    assert boot.counter() == 2


def test_second_boot_starts_connects_and_rearms_then_remove_disarms() -> None:
    boot = _boot(Registry(), nics_unplugged=True)  # the counter was consumed at load: none left
    device = boot.pdo()
    status, _ = _pnp(device, IRP_MN_PNP.START_DEVICE)
    assert status == STATUS_SUCCESS
    assert device.extension.frontend.states == [FrontendState.FRONTEND_CONNECTED]
    assert boot.counter() == 1  # re-armed: the counter is consumed at every load
    assert not boot.xen.config.reboot_requested("XENVIF")
    assert _pnp(device, IRP_MN_PNP.STOP_DEVICE)[0] == STATUS_SUCCESS
    assert boot.counter() == 0  # PdoStopDevice: PdoUnplugRequest(Pdo, FALSE)
    assert _pnp(device, IRP_MN_PNP.REMOVE_DEVICE)[0] == STATUS_SUCCESS
    assert boot.counter() == 0  # not withdrawn twice
    assert device.extension.frontend.states[-1] == FrontendState.FRONTEND_UNKNOWN


@pytest.mark.parametrize("nics_unplugged", [False, True])
def test_safe_mode_start_is_unsuccessful_and_touches_nothing(nics_unplugged: bool) -> None:
    """pdo.c PdoStartDevice: `status = STATUS_UNSUCCESSFUL; if (DriverSafeMode()) goto fail1;` - first."""
    boot = _boot(Registry(), nics_unplugged=nics_unplugged, safe_mode=True)
    device = boot.pdo()
    assert _pnp(device, IRP_MN_PNP.START_DEVICE)[0] == STATUS_UNSUCCESSFUL
    assert device.extension.frontend.states == [] and boot.counter() is None
    assert not boot.xen.config.reboot_requested("XENVIF")


def test_hardware_and_compatible_ids_end_with_xendevice() -> None:
    """pdo.c PdoQueryId: the REV_ list newest first, then L"XENDEVICE"."""
    device = _boot(Registry(), nics_unplugged=True).pdo()
    for id_type in (BusQueryIdType.BusQueryHardwareIDs, BusQueryIdType.BusQueryCompatibleIDs):
        status, irp = _pnp(device, IRP_MN_PNP.QUERY_ID, QueryIdParameters(id_type))
        assert status == STATUS_SUCCESS
        assert irp.io_status.information[-1] == "XENDEVICE"
        assert irp.io_status.information[0] == "XENVIF\\VEN_XP0001&DEV_NET&REV_09000005"


def _reference_container_id(mac: bytes) -> str:
    """RFC 4122 4.3 as __PdoSetContainerID does it, spelled out on the GUID's C layout."""
    namespace = struct.pack("<IHH8B", 0x2A597D5E, 0x8864, 0x4428, 0xA1, 0x10, 0xF5, 0x68, 0xF3, 0x16, 0xD4, 0xE4)
    data1, data2, data3, *data4 = struct.unpack("<IHH8B", hashlib.sha1(namespace + mac).digest()[:16])
    data3 = (data3 & 0x0FFF) | (5 << 12)
    data4[0] = (data4[0] & 0x3F) | 0x80
    return "{%08X-%04X-%04X-%02X%02X-%s}" % (data1, data2, data3, data4[0], data4[1],
                                             "".join(f"{b:02X}" for b in data4[2:]))


def test_container_id_is_the_name_based_guid_of_the_permanent_address() -> None:
    """pdo.c __PdoSetContainerID, answered for BusQueryContainerID."""
    device = _boot(Registry(), nics_unplugged=True).pdo()
    status, irp = _pnp(device, IRP_MN_PNP.QUERY_ID, QueryIdParameters(BusQueryIdType.BusQueryContainerID))
    assert status == STATUS_SUCCESS
    assert irp.io_status.information == _reference_container_id(MAC) == pdo_container_id(MAC)
    assert uuid.UUID(irp.io_status.information).version == 5
    assert pdo_container_id(bytes.fromhex("00163e000002")) != pdo_container_id(MAC)


def test_bus_interface_standard_is_served_by_the_net_pdo() -> None:
    """pdo.c PdoInterfaceTable's first entry, PdoQueryBusInterface: v1 only; a short buffer
    STATUS_BUFFER_TOO_SMALL; config space through the FDO's LowerBusInterface (bus.c -> FdoGetBusData)."""
    device = _boot(Registry(), nics_unplugged=True).pdo()
    status, irp = _pnp(device, IRP_MN_PNP.QUERY_INTERFACE,
                       QueryInterfaceParameters(GUID_BUS_INTERFACE_STANDARD, BUS_INTERFACE_STANDARD_SIZE, 1, None))
    assert status == STATUS_SUCCESS
    bus = irp.parameters.interface
    assert bus.Version == 1 and bus.references == 1
    assert bus.GetBusData(0, 4) == bytes.fromhex("53580100")
    assert _pnp(device, IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(
        GUID_BUS_INTERFACE_STANDARD, BUS_INTERFACE_STANDARD_SIZE, 2, None))[0] == STATUS_NOT_SUPPORTED
    assert _pnp(device, IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(
        GUID_BUS_INTERFACE_STANDARD, BUS_INTERFACE_STANDARD_SIZE - 1, 1, None))[0] == STATUS_BUFFER_TOO_SMALL


@pytest.mark.parametrize("options,safe", [(None, False), ("/NOEXECUTE=OPTIN", False),
                                          ("/SAFEBOOT:MINIMAL /NOEXECUTE=OPTIN", True)])
def test_driver_safe_mode_reads_the_boot_options(options: str | None, safe: bool) -> None:
    registry = Registry()
    if options is not None:
        registry.set_sz(CONTROL_KEY, "SystemStartOptions", options)
    fdo = SimpleNamespace(pdo=SimpleNamespace(device_node=SimpleNamespace(manager=SimpleNamespace(registry=registry))))
    assert XenvifFdo.DriverSafeMode(fdo) is safe  # type: ignore[arg-type]
