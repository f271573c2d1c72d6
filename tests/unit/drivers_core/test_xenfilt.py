"""XENFILT's rules (XB src/xenfilt/driver.c, fdo.c, pdo.c at 1087a8d) on toy buses under the kernel model's
PnP manager: which devices it filters, the gate (ENABLED -> PENDING -> DISABLED), Precedence and the
PDOs' activation status."""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenpv.stack.drivers.xen import Xen
from xenpv.stack.drivers.xenfilt import EmulatedStatus, FilterState, XenfiltDriver
from xenpv.stack.kernel import InMemoryCatalog, IoInvalidateDeviceRelations, Kernel, Registry
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.pnp import CLASS_KEY, SYSTEM_CLASS_GUID


def _toydrivers():
    """tests/unit/kernel/toydrivers.py (that directory is not a package, so it is loaded by path)."""
    name = "xenfilt_tests_toydrivers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "kernel" / "toydrivers.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before exec: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules[name]


ChildSpec, World = _toydrivers().ChildSpec, _toydrivers().World

PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENFILT\Parameters"
PRECEDENCE = PARAMETERS + r"\Precedence"
BUS_A, BUS_B = r"ROOT\BUSA", r"ROOT\BUSB"


def _child(name: str, *compatible: str) -> ChildSpec:
    return ChildSpec(f"TOY\\{name}", [f"TOY\\{name}&REV_01"], list(compatible), instance_id=f"3&0&0&{name}")


@dataclass
class Toy:
    kernel: Kernel
    world: World
    xenfilt: XenfiltDriver
    registry: Registry

    def bus(self, device_id: str):
        node = self.kernel.pnp.find(device_id + r"\0")
        assert node is not None
        return node

    def reported(self, bus_id: str) -> list[str]:
        return sorted(c.device_id for c in self.bus(bus_id).children)

    def rescan(self, bus_id: str) -> None:
        with self.kernel.cpu.lock:
            IoInvalidateDeviceRelations(self.bus(bus_id).pdo)
            self.kernel.pnp.process_pending()

    def status(self, device_id: str) -> EmulatedStatus:
        return next(d.status for d in self.xenfilt.emulated.devices if d.device_id == device_id)


@pytest.fixture
def toy(machine):
    """Two root buses that XENFILT filters as "PCI" (their hardware IDs are in Parameters); BUS_B starts
    without children. XENFILT is a System class UpperFilter, as FiltersInstall makes it."""
    def build(layout: dict[str, list[ChildSpec]], *, parameters: bool = True,
              precedence: dict[str, int] | None = None, compatible_type: bool = False,
              active: dict[str, str] | None = None) -> Toy:
        world = World(layout=layout)
        registry = Registry()
        if parameters:
            for bus in layout:
                # By a hardware ID, or (compatible_type) by the compatible ID "TOY\BUS" only.
                registry.set_sz(PARAMETERS, r"TOY\BUS" if compatible_type else bus, "PCI")
        for name, value in (precedence or {}).items():
            registry.set_dword(PRECEDENCE, name, value)
        for name, text in (active or {}).items():
            registry.set_sz(PARAMETERS, name, text)
        registry.set_multi_sz(f"{CLASS_KEY}\\{SYSTEM_CLASS_GUID}", "UpperFilters", ["XENFILT"])
        xen = Xen.load(registry, DebugLog(), machine(0x0001))
        xenfilt = XenfiltDriver(xen)
        catalog = InMemoryCatalog()
        catalog.add_driver("TOYBUS", world.bus_entry)
        catalog.add_driver("XENFILT", xenfilt.driver_entry)
        for bus in layout:
            catalog.bind(bus, "TOYBUS", class_guid=SYSTEM_CLASS_GUID)
        kernel = Kernel(registry=registry, catalog=catalog, seed=7).activate()
        for bus in layout:
            # *PNP0A03 too: the ID the INF maps to PCI, which must not count without a Parameters key.
            kernel.pnp.add_root_device(bus, [bus, "*PNP0A03"], [r"TOY\BUS"])
        kernel.boot()
        return Toy(kernel, world, xenfilt, registry)
    return build


def test_a_bus_with_no_children_never_counts_as_enumerated(toy) -> None:
    """fdo.c FdoQueryDeviceRelations: `if (Relations->Count != 0) FdoEnumerate(...)`, and only
    FdoEnumerate sets Enumerated; DriverSetFilterState leaves ENABLED while any FDO has not."""
    t = toy({BUS_B: [], BUS_A: [_child("A1")]})  # BUS_B's FDO exists (and is empty) when BUS_A enumerates
    assert len(t.xenfilt.fdos) == 2
    assert t.xenfilt.state == FilterState.ENABLED
    assert t.reported(BUS_A) == [] and t.reported(BUS_B) == []  # the gate is closed on both
    t.world.layout[BUS_B] = [_child("B1")]
    t.rescan(BUS_B)
    assert t.xenfilt.state == FilterState.DISABLED
    assert t.reported(BUS_A) == [r"TOY\A1"] and t.reported(BUS_B) == [r"TOY\B1"]


def test_pending_becomes_disabled_on_the_next_pass(toy, monkeypatch) -> None:
    """driver.c DriverSetFilterState: the pass in which every FDO has enumerated goes ENABLED -> PENDING
    (and unplugs) and still reports nothing; the next FdoEnumerate goes PENDING -> DISABLED."""
    seen: list[tuple[FilterState, int]] = []
    real = XenfiltDriver.FdoEnumerate

    def counting(self, fdo, relations) -> None:
        real(self, fdo, relations)
        seen.append((self.state, len(relations)))
    monkeypatch.setattr(XenfiltDriver, "FdoEnumerate", counting)
    t = toy({BUS_A: [_child("A1")]})
    assert [state for state, _ in seen][:2] == [FilterState.PENDING, FilterState.DISABLED]
    assert t.reported(BUS_A) == [r"TOY\A1"]
    log = "\n".join(t.xenfilt.xen.debug_log.tail(200))
    assert log.index("DriverSetFilterState: PENDING") < log.index("DriverSetFilterState: DISABLED")


def test_without_the_parameters_key_no_filter_attaches(toy) -> None:
    """driver.c DriverGetEmulatedType: RegistryOpenParametersKey fails (fail1): UNKNOWN, no FdoCreate."""
    t = toy({BUS_A: [_child("A1")]}, parameters=False)
    assert t.xenfilt.fdos == [] and t.reported(BUS_A) == [r"TOY\A1"]


def test_the_type_is_also_looked_up_by_compatible_id(toy) -> None:
    """driver.c DriverAddDevice: hardware IDs first, then compatible IDs."""
    t = toy({BUS_A: [_child("A1")]}, compatible_type=True)
    assert len(t.xenfilt.fdos) == 1 and t.reported(BUS_A) == [r"TOY\A1"]


@pytest.mark.parametrize("data,kind", [("PCI", "PCI"), ("ide", "IDE"), ("P", "PCI"), ("PCIX", None), ("DISK", None)])
def test_the_type_value_is_compared_over_its_own_length(machine, data, kind) -> None:
    """driver.c DriverGetEmulatedType: `_strnicmp(Ansi->Buffer, "PCI", Ansi->Length) == 0`."""
    registry = Registry()
    registry.set_sz(PARAMETERS, r"TOY\BUS", data)
    xenfilt = XenfiltDriver(Xen.load(registry, DebugLog(), machine(0x0001)))
    assert xenfilt.DriverGetEmulatedType([r"TOY\OTHER", r"toy\bus"]) == kind


@pytest.mark.parametrize("a,b,n,equal", [
    ("pci", "PCI", 3, True), ("pci", "PCI", 8, True),  # both ends (NULs) compare equal, whatever n is past them
    ("PCI", "PCIE", 8, False), ("PCIE", "PCI", 8, False),  # one string ends first: its NUL differs
    ("PCIE", "PCI", 3, True), ("P", "PCI", 1, True),  # at most n characters
    ("PX", "PCI", 2, False), ("", "", 4, True),
])
def test_strnicmp_compares_at_most_n_characters_and_a_string_end(a: str, b: str, n: int, equal: bool) -> None:
    """The CRT's _strnicmp(a, b, n) == 0, which DriverGetEmulatedType relies on: case-insensitive, at most n
    characters, stopping equal where both strings end within n. DriverGetEmulatedType itself passes the
    value's own length, so only this direct test reaches the string ends."""
    from xenpv.stack.drivers.xenfilt.driver import _strnicmp_equal

    assert _strnicmp_equal(a, b, n) is equal


def test_precedence_is_named_by_an_exact_compatible_id_and_the_first_one_found_wins(toy) -> None:
    """driver.c DriverGetPrecedence: per PDO, the value named by the first of its CompatibleIDs that has
    one (a value name is the whole ID, no prefix); fdo.c FdoEnumerate: the highest wins."""
    t = toy({BUS_A: [_child("X", r"TOY\X", r"TOY\GENERIC"), _child("Y", r"TOY\Y")]},
            precedence={r"TOY\X": 1, r"TOY\GENERIC": 9, r"TOY\Y": 3, "TOY": 100})
    assert t.status(r"TOY\X") == EmulatedStatus.FORCE_DEACTIVATED  # 1: its first ID with a value
    assert t.status(r"TOY\Y") == EmulatedStatus.FORCE_ACTIVATED


def test_precedence_ties_go_to_the_first_pdo(toy) -> None:
    t = toy({BUS_A: [_child("X", r"TOY\X"), _child("Y", r"TOY\Y")]}, precedence={r"TOY\X": 2, r"TOY\Y": 2})
    assert (t.status(r"TOY\X"), t.status(r"TOY\Y")) == (EmulatedStatus.FORCE_ACTIVATED,
                                                       EmulatedStatus.FORCE_DEACTIVATED)


def test_precedence_applies_only_to_pdos_new_in_that_pass(toy) -> None:
    """fdo.c FdoEnumerate: PDOs already filtered are taken out of the array before the precedence loop,
    so a device that appears later is ranked against the other newcomers only: two devices can end up
    FORCE_ACTIVATED, and the one found first is what IsDevicePresent(NULL) names."""
    t = toy({BUS_A: [_child("X", r"TOY\X")]}, precedence={r"TOY\X": 1, r"TOY\Z": 0xC000})
    assert t.status(r"TOY\X") == EmulatedStatus.FORCE_ACTIVATED
    t.world.layout[BUS_A].append(_child("Z", r"TOY\Z"))
    t.rescan(BUS_A)
    assert t.status(r"TOY\Z") == EmulatedStatus.FORCE_ACTIVATED
    assert t.status(r"TOY\X") == EmulatedStatus.FORCE_ACTIVATED  # not re-ranked
    t.world.layout[BUS_A].append(_child("W", r"TOY\W"))
    t.rescan(BUS_A)
    assert t.status(r"TOY\W") == EmulatedStatus.NEUTRAL  # alone in its pass, with no precedence
    assert t.xenfilt.emulated.EmulatedIsDevicePresent(None, None) == (True, EmulatedStatus.FORCE_ACTIVATED)
    assert t.xenfilt.emulated.devices[0].device_id == r"TOY\X"


def test_a_force_activated_pdo_keeps_its_real_instance_id(toy) -> None:
    """pdo.c PdoSetDeviceInformation: ActiveInstanceID replaces the InstanceID only for a NEUTRAL PDO; a
    FORCE_ACTIVATED one whose DeviceID is ActiveDeviceID keeps the bus's."""
    t = toy({BUS_A: [_child("X", r"TOY\X")]}, precedence={r"TOY\X": 1},
            active={"ActiveDeviceID": r"TOY\X", "ActiveInstanceID": "STORED"})
    assert [c.instance_id for c in t.bus(BUS_A).children] == ["3&0&0&X"]
    t = toy({BUS_A: [_child("X", r"TOY\X")]}, active={"ActiveDeviceID": r"TOY\X", "ActiveInstanceID": "STORED"})
    assert [c.instance_id for c in t.bus(BUS_A).children] == ["STORED"]


def test_a_neutral_active_pdo_reports_active_instance_id_and_fails_without_it(toy) -> None:
    """pdo.c PdoSetDeviceInformation: the active NEUTRAL PDO reports ActiveInstanceID; without the value
    PdoCreate fails (fail2) and the device is not reported; a later pass tries again."""
    t = toy({BUS_A: [_child("X", r"TOY\X")]})
    t.registry.set_sz(PARAMETERS, "ActiveDeviceID", r"toy\y")  # stricmp
    t.world.layout[BUS_A].append(_child("Y", r"TOY\Y"))
    t.rescan(BUS_A)
    assert t.reported(BUS_A) == [r"TOY\X"]
    assert [d.device_id for d in t.xenfilt.emulated.devices] == [r"TOY\X"]
    t.registry.set_sz(PARAMETERS, "ActiveInstanceID", "STORED")
    t.rescan(BUS_A)
    assert sorted(c.instance_id for c in t.bus(BUS_A).children) == ["3&0&0&X", "STORED"]
    assert t.xenfilt.emulated.EmulatedIsDevicePresent(r"TOY\Y", "STORED") == (True, EmulatedStatus.NEUTRAL)



def test_a_child_whose_bus_answers_no_device_id_gets_no_filter_pdo(toy) -> None:
    """pdo.c PdoSetDeviceInformation: a failed DriverQueryId(BusQueryDeviceID) is fail1, so PdoCreate fails:
    no filter PDO and no emulated object for that child, which is not reported; a later pass, once the bus
    answers, creates it."""
    from xenpv.stack.kernel import BusQueryIdType

    silent = _child("N")
    silent.unanswered.add(BusQueryIdType.BusQueryDeviceID)
    t = toy({BUS_A: [_child("A1"), silent]})
    assert t.reported(BUS_A) == [r"TOY\A1"]
    assert [d.device_id for d in t.xenfilt.emulated.devices] == [r"TOY\A1"]
    assert any("no DeviceID: fail1" in r.text for r in t.xenfilt.xen.debug_log.records("XENFILT"))
    silent.unanswered.clear()
    t.rescan(BUS_A)
    assert t.reported(BUS_A) == [r"TOY\A1", r"TOY\N"]
    assert sorted(d.device_id for d in t.xenfilt.emulated.devices) == [r"TOY\A1", r"TOY\N"]

def test_remove_device_detaches_and_deletes_the_filter_fdo(toy) -> None:
    """fdo.c FdoRemoveDevice: the IRP goes down first, then IoDetachDevice and IoDeleteDevice, and the FDO
    leaves the driver's list (so the gate no longer waits for it to enumerate)."""
    t = toy({BUS_A: [_child("A1")], BUS_B: [_child("B1")]})
    node = t.bus(BUS_A)
    fdo = next(f for f in t.xenfilt.fdos if f.extension.pdo is node.pdo)
    with t.kernel.cpu.lock:
        t.kernel.pnp.remove(node)
    assert fdo not in t.xenfilt.fdos and len(t.xenfilt.fdos) == 1
    assert fdo.deleted and fdo not in fdo.driver.devices
    assert node.pdo.upper is None  # detached: nothing is left attached to the bus's PDO


def test_the_active_pdo_reports_the_stored_active_location_information(toy) -> None:
    """pdo.c PdoSetDeviceInformation: the active NEUTRAL PDO takes ActiveLocationInformation as its
    LocationInformation (the bus's own text only when none is stored), fixed at creation; PdoQueryDeviceText
    answers it."""
    from xenpv.stack.drivers.pci import DEVICE_TEXT_DESCRIPTION, QueryDeviceTextParameters
    from xenpv.stack.drivers.xenfilt.driver import _device_text
    from xenpv.stack.kernel import IRP_MN_PNP, Irp, IoSynchronousCallDriver
    from xenpv.stack.kernel.status import STATUS_NOT_SUPPORTED

    t = toy({BUS_A: [_child("X", r"TOY\X")]},
            active={"ActiveDeviceID": r"TOY\X", "ActiveInstanceID": "STORED", "ActiveLocationInformation": "Slot 4"})
    (child,) = t.bus(BUS_A).children
    with t.kernel.cpu.lock:
        assert _device_text(child.top) == "Slot 4"
        # Only LocationInformation is replaced: a description query goes to the bus (the toy bus has none).
        irp = Irp.pnp(IRP_MN_PNP.QUERY_DEVICE_TEXT, QueryDeviceTextParameters(DEVICE_TEXT_DESCRIPTION))
        assert IoSynchronousCallDriver(child.top, irp) == STATUS_NOT_SUPPORTED and irp.io_status.information != "Slot 4"



def test_a_location_the_bus_failed_to_give_is_not_taken(toy) -> None:
    """pdo.c PdoSetDeviceInformation takes a child's LocationInformation from driver.c DriverQueryDeviceText,
    which reads IoStatus.Information only when the bus succeeded (`if (!NT_SUCCESS(status)) goto fail2`);
    on failure the location is NULL and PdoQueryDeviceText passes the bus's failure up. A bus that fails
    the query with Information left set must not lend the filter PDO that text."""
    from xenpv.stack.drivers.pci import DEVICE_TEXT_LOCATION_INFORMATION, QueryDeviceTextParameters
    from xenpv.stack.drivers.xenfilt.driver import _device_text
    from xenpv.stack.kernel import IRP_MN_PNP, Irp, IoSynchronousCallDriver
    from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

    good, careless = _child("L1"), _child("L2")
    good.location, careless.location = (STATUS_SUCCESS, "Slot 7"), (STATUS_UNSUCCESSFUL, "stale text")
    t = toy({BUS_A: [good, careless]})
    children = {c.device_id: c for c in t.bus(BUS_A).children}
    fdo_ext = next(f.extension for f in t.xenfilt.fdos if f.extension.pdo is t.bus(BUS_A).pdo)
    locations = {pdo.extension.device_id: pdo.extension.location for pdo in fdo_ext.children.values()}
    assert locations == {r"TOY\L1": "Slot 7", r"TOY\L2": None}
    with t.kernel.cpu.lock:
        assert _device_text(children[r"TOY\L1"].top) == "Slot 7"
        assert _device_text(children[r"TOY\L2"].top) is None
        irp = Irp.pnp(IRP_MN_PNP.QUERY_DEVICE_TEXT, QueryDeviceTextParameters(DEVICE_TEXT_LOCATION_INFORMATION))
        assert IoSynchronousCallDriver(children[r"TOY\L2"].top, irp) == STATUS_UNSUCCESSFUL


def test_a_child_that_vanishes_while_gated_is_detached_and_deleted(toy) -> None:
    """fdo.c FdoEnumerate / pdo.c PdoDestroy: a filter PDO whose child went before the PnP manager ever saw
    it (the gate was closed) gets no REMOVE_DEVICE, so XENFILT detaches and deletes it itself."""
    t = toy({BUS_B: [], BUS_A: [_child("A1"), _child("A2")]})  # BUS_B keeps the gate closed
    fdo_ext = next(f.extension for f in t.xenfilt.fdos if f.extension.pdo is t.bus(BUS_A).pdo)
    gone = next(c for c in fdo_ext.children if c.extension.spec.device_id == r"TOY\A1")
    filter_pdo = fdo_ext.children[gone]
    t.world.layout[BUS_A] = [_child("A2")]
    t.rescan(BUS_A)
    assert gone not in fdo_ext.children and filter_pdo.deleted and gone.upper is None


def test_a_child_whose_bus_answers_no_instance_id_is_emulated_with_an_empty_one(toy) -> None:
    """pdo.c PdoSetDeviceInformation: a failed DriverQueryId(BusQueryInstanceID) leaves the PDO without an
    InstanceID, which is no failure: the filter PDO is created and its emulated object gets an empty
    InstanceID, so EMULATED's IsDevicePresent finds the device for the empty InstanceID (and for none), but
    not for another one."""
    from xenpv.stack.kernel import BusQueryIdType

    nameless = _child("I")
    nameless.unanswered.add(BusQueryIdType.BusQueryInstanceID)
    t = toy({BUS_A: [_child("A1"), nameless]})
    assert t.reported(BUS_A) == [r"TOY\A1", r"TOY\I"]
    emulated = t.xenfilt.emulated
    assert [d.instance_id for d in emulated.devices if d.device_id == r"TOY\I"] == [""]
    assert emulated.EmulatedIsDevicePresent(r"TOY\I", "") == (True, EmulatedStatus.NEUTRAL)
    assert emulated.EmulatedIsDevicePresent(r"TOY\I", None) == (True, EmulatedStatus.NEUTRAL)
    assert emulated.EmulatedIsDevicePresent(r"TOY\I", "3&0&0&I") == (False, EmulatedStatus.NEUTRAL)
