from __future__ import annotations

import pytest

from xenpv.stack.kernel import (BugCheck, BugCheckCode, CmProblem, DeviceNodeState, InMemoryCatalog, Kernel,
                          IoInvalidateDeviceRelations, Registry)
from xenpv.stack.kernel.pnp import CLASS_KEY, ENUM_KEY, SYSTEM_CLASS_GUID
from xenpv.stack.kernel.status import STATUS_INCOMPATIBLE_DRIVER_BLOCKED, STATUS_PNP_REBOOT_REQUIRED

from .toydrivers import ChildSpec, World

BUS_ID = r"ROOT\TOYBUS"


def make(world: World, catalog: InMemoryCatalog | None = None, registry: Registry | None = None) -> Kernel:
    catalog = catalog or InMemoryCatalog()
    catalog.add_driver("TOYBUS", world.bus_entry)
    catalog.add_driver("TOYFUNC", world.function_entry)
    catalog.bind(BUS_ID, "TOYBUS")
    kernel = Kernel(registry=registry, catalog=catalog, seed=7).activate()
    kernel.pnp.add_root_device(BUS_ID, [BUS_ID])
    return kernel


def test_enumeration_from_the_root_creates_and_starts_child_pdos() -> None:
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_A", [r"TOYBUS\DEV_A&REV_2"]),
                                   ChildSpec(r"TOYBUS\DEV_B", [r"TOYBUS\DEV_B&REV_1"])]})
    kernel = make(world)
    kernel.catalog.bind(r"TOYBUS\DEV_A&REV_2", "TOYFUNC")
    kernel.catalog.bind(r"TOYBUS\DEV_B&REV_1", "TOYFUNC")
    kernel.boot()
    bus = kernel.pnp.find(r"ROOT\TOYBUS\0")
    assert bus is not None and bus.state == DeviceNodeState.STARTED
    assert [c.instance_path for c in bus.children] == [r"TOYBUS\DEV_A\_", r"TOYBUS\DEV_B\_"]
    assert all(c.state == DeviceNodeState.STARTED and c.service == "TOYFUNC" for c in bus.children)
    assert kernel.registry.get_sz(ENUM_KEY + r"\TOYBUS\DEV_A\_", "Service") == "TOYFUNC"
    assert kernel.registry.get_multi_sz(ENUM_KEY + r"\TOYBUS\DEV_A\_", "HardwareID") == [r"TOYBUS\DEV_A&REV_2"]
    tree = kernel.pnp.dump_tree()
    assert "HTREE\\ROOT\\0 [started]" in tree and "  ROOT\\TOYBUS\\0 [started] service=TOYBUS" in tree
    assert "    TOYBUS\\DEV_A\\_ [started] service=TOYFUNC stack=TOYBUS(PDO),TOYFUNC(FDO)" in tree


def test_matching_prefers_hardware_ids_then_compatible_ids_then_earlier_ids() -> None:
    world = World(layout={BUS_ID: [
        ChildSpec(r"TOYBUS\DEV_A", [r"TOYBUS\DEV_A&REV_3", r"TOYBUS\DEV_A&REV_2"], [r"TOYCLASS"]),
        ChildSpec(r"TOYBUS\DEV_C", [r"TOYBUS\DEV_C&REV_9"], [r"TOYCLASS"])]})
    catalog = InMemoryCatalog()
    catalog.add_driver("NEWER", world.function_entry)
    catalog.add_driver("OLDER", world.function_entry)
    catalog.add_driver("GENERIC", world.function_entry)
    catalog.bind(r"TOYBUS\DEV_A&REV_2", "OLDER")
    catalog.bind(r"TOYBUS\DEV_A&REV_3", "NEWER")
    catalog.bind("TOYCLASS", "GENERIC")
    kernel = make(world, catalog)
    kernel.boot()
    a = kernel.pnp.find(r"TOYBUS\DEV_A\_")
    c = kernel.pnp.find(r"TOYBUS\DEV_C\_")
    assert a is not None and (a.service, a.matching_id) == ("NEWER", r"TOYBUS\DEV_A&REV_3")
    assert c is not None and (c.service, c.matching_id) == ("GENERIC", "TOYCLASS")


def test_unmatched_device_has_problem_failed_install() -> None:
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_X", [r"TOYBUS\DEV_X&REV_1"])]})
    kernel = make(world)
    kernel.boot()
    node = kernel.pnp.find(r"TOYBUS\DEV_X\_")
    assert node is not None and node.problem == CmProblem.FAILED_INSTALL == 28
    assert node.state == DeviceNodeState.INITIALIZED


def test_filters_attach_in_windows_order_and_start_completes_at_the_pdo_first() -> None:
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_A", [r"TOYBUS\DEV_A&REV_1"])]})
    catalog = InMemoryCatalog()
    for name in ("DEVLOWER", "CLASSLOWER", "DEVUPPER", "CLASSUPPER"):
        catalog.add_driver(name, world.filter_entry(name))
    catalog.add_driver("TOYFUNC", world.function_entry)
    catalog.bind(r"TOYBUS\DEV_A&REV_1", "TOYFUNC", class_guid=SYSTEM_CLASS_GUID)
    registry = Registry()
    enum = ENUM_KEY + r"\TOYBUS\DEV_A\_"
    registry.set_multi_sz(enum, "LowerFilters", ["DEVLOWER"])
    registry.set_multi_sz(enum, "UpperFilters", ["DEVUPPER"])
    registry.set_multi_sz(f"{CLASS_KEY}\\{SYSTEM_CLASS_GUID}", "LowerFilters", ["CLASSLOWER"])
    registry.set_multi_sz(f"{CLASS_KEY}\\{SYSTEM_CLASS_GUID}", "UpperFilters", ["CLASSUPPER"])
    kernel = make(world, catalog, registry)
    kernel.boot()
    node = kernel.pnp.find(r"TOYBUS\DEV_A\_")
    assert node is not None
    assert [d.driver.name for d in node.stack()] == ["TOYBUS", "DEVLOWER", "CLASSLOWER", "TOYFUNC",
                                                      "DEVUPPER", "CLASSUPPER"]
    # The root bus also has the System class filters.
    adds = [e for w, d, e in world.trace if w == "add" and d == r"TOYBUS\DEV_A"]
    assert adds == ["AddDevice DEVLOWER", "AddDevice CLASSLOWER", "AddDevice TOYFUNC",
                    "AddDevice DEVUPPER", "AddDevice CLASSUPPER"]
    start = [(w, e) for w, d, e in world.trace if d == r"TOYBUS\DEV_A" and
             (e.startswith("IRP_MN_START") or e in ("started",))]
    assert start == [("CLASSUPPER", "IRP_MN_START_DEVICE"), ("DEVUPPER", "IRP_MN_START_DEVICE"),
                     ("fdo", "IRP_MN_START_DEVICE"), ("CLASSLOWER", "IRP_MN_START_DEVICE"),
                     ("DEVLOWER", "IRP_MN_START_DEVICE"), ("pdo", "IRP_MN_START_DEVICE"), ("fdo", "started")]


def test_reenumeration_adds_new_children_and_removes_missing_ones_children_first() -> None:
    mid, leaf = ChildSpec(r"TOYBUS\DEV_MID", [r"TOYBUS\DEV_MID"]), ChildSpec(r"TOYBUS\DEV_LEAF", [r"TOYBUS\DEV_LEAF"])
    world = World(layout={BUS_ID: [mid], mid.device_id: [leaf]})
    kernel = make(world)
    kernel.catalog.bind(mid.device_id, "TOYBUS")  # the middle device is itself a bus
    kernel.catalog.bind(leaf.device_id, "TOYFUNC")
    kernel.catalog.bind(r"TOYBUS\DEV_NEW", "TOYFUNC")
    kernel.boot()
    assert kernel.pnp.find(r"TOYBUS\DEV_LEAF\_") is not None
    bus = kernel.pnp.find(r"ROOT\TOYBUS\0")
    assert bus is not None

    world.layout[BUS_ID] = [ChildSpec(r"TOYBUS\DEV_NEW", [r"TOYBUS\DEV_NEW"])]
    world.trace.clear()
    IoInvalidateDeviceRelations(bus.pdo)
    assert [c.instance_path for c in bus.children] == [r"TOYBUS\DEV_NEW\_"]
    assert kernel.pnp.find(r"TOYBUS\DEV_NEW\_").state == DeviceNodeState.STARTED  # type: ignore[union-attr]
    removal = [(d, e) for w, d, e in world.trace if w == "pdo" and e in ("IRP_MN_SURPRISE_REMOVAL",
                                                                         "IRP_MN_REMOVE_DEVICE")]
    assert removal == [(r"TOYBUS\DEV_LEAF", "IRP_MN_SURPRISE_REMOVAL"), (r"TOYBUS\DEV_MID", "IRP_MN_SURPRISE_REMOVAL"),
                       (r"TOYBUS\DEV_LEAF", "IRP_MN_REMOVE_DEVICE"), (r"TOYBUS\DEV_MID", "IRP_MN_REMOVE_DEVICE")]
    assert kernel.pnp.find(r"TOYBUS\DEV_MID\_") is None and "TOYFUNC" in kernel.pnp.drivers


def test_driver_entry_failure_leaves_the_device_with_failed_driver_entry() -> None:
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_A", ["A"]), ChildSpec(r"TOYBUS\DEV_B", ["B"])]})
    calls: list[str] = []

    def blocked_entry(driver: object, registry_path: str) -> int:
        calls.append(registry_path)
        return STATUS_INCOMPATIBLE_DRIVER_BLOCKED

    kernel = make(world)
    kernel.catalog.add_driver("BLOCKED", blocked_entry)  # type: ignore[arg-type]
    kernel.catalog.bind("A", "BLOCKED")
    kernel.catalog.bind("B", "BLOCKED")
    kernel.boot()
    for path in (r"TOYBUS\DEV_A\_", r"TOYBUS\DEV_B\_"):
        node = kernel.pnp.find(path)
        assert node is not None and node.problem == CmProblem.FAILED_DRIVER_ENTRY == 37
        assert node.problem_status == STATUS_INCOMPATIBLE_DRIVER_BLOCKED
    assert len(calls) == 1 and "BLOCKED" not in kernel.pnp.drivers
    assert "problem=37:CM_PROB_FAILED_DRIVER_ENTRY (STATUS_INCOMPATIBLE_DRIVER_BLOCKED)" in kernel.pnp.dump_tree()


def test_start_failure_is_failed_start_and_the_stack_is_removed() -> None:
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_A", ["A"])]}, fail_start={r"TOYBUS\DEV_A"})
    kernel = make(world)
    kernel.catalog.bind("A", "TOYFUNC")
    kernel.boot()
    node = kernel.pnp.find(r"TOYBUS\DEV_A\_")
    assert node is not None and node.problem == CmProblem.FAILED_START
    assert [d.driver.name for d in node.stack()] == ["TOYBUS"]
    assert "TOYFUNC" not in kernel.pnp.drivers  # its last device went away, so it was unloaded


def test_start_failing_reboot_required_is_need_restart() -> None:
    """STATUS_PNP_REBOOT_REQUIRED from START (XENVIF's NET PDO before the NIC unplug): code 14, "restart
    needed", not a failed start; the stack still goes."""
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_A", ["A"])]},
                  start_status={r"TOYBUS\DEV_A": STATUS_PNP_REBOOT_REQUIRED})
    kernel = make(world)
    kernel.catalog.bind("A", "TOYFUNC")
    kernel.boot()
    node = kernel.pnp.find(r"TOYBUS\DEV_A\_")
    assert node is not None and node.problem == CmProblem.NEED_RESTART == 14
    assert node.problem_status == STATUS_PNP_REBOOT_REQUIRED
    assert [d.driver.name for d in node.stack()] == ["TOYBUS"]
    assert "problem=14:CM_PROB_NEED_RESTART (STATUS_PNP_REBOOT_REQUIRED)" in kernel.pnp.dump_tree()


def test_duplicate_child_pdo_is_pnp_detected_fatal_error() -> None:
    world = World(layout={BUS_ID: [ChildSpec(r"TOYBUS\DEV_A", ["A"])]})
    kernel = make(world)
    # The toy bus keys children by device ID, so add a second PDO with the same IDs by hand.
    original = world._report_children

    def twice(fdo, irp):  # type: ignore[no-untyped-def]
        original(fdo, irp)
        from xenpv.stack.kernel import DeviceKind, IoCreateDevice
        from .toydrivers import PdoExt
        irp.io_status.information.append(IoCreateDevice(fdo.driver, DeviceKind.PDO,
                                                        PdoExt(ChildSpec(r"TOYBUS\DEV_A", ["A"]))))

    world._report_children = twice  # type: ignore[method-assign]
    with pytest.raises(BugCheck) as stop:
        kernel.boot()
    assert stop.value.code == BugCheckCode.PNP_DETECTED_FATAL_ERROR and stop.value.params[0] == 1
    assert stop.value.module == "toybus.sys"
