from __future__ import annotations

import pytest

from xenpv.stack.kernel import S0, S4, BugCheck, BugCheckCode, InMemoryCatalog, Kernel
from xenpv.stack.kernel.power import D0, D3
from xenpv.stack.kernel.status import STATUS_UNSUCCESSFUL

from .toydrivers import ChildSpec, World

BUS, MID, LEAF = r"ROOT\TOYBUS", r"TOYBUS\DEV_MID", r"TOYBUS\DEV_LEAF"


def three_levels(world: World, timeout: float = 5.0) -> Kernel:
    world.layout.update({BUS: [ChildSpec(MID, [MID])], MID: [ChildSpec(LEAF, [LEAF])]})
    catalog = InMemoryCatalog()
    catalog.add_driver("TOYBUS", world.bus_entry)
    catalog.add_driver("TOYFUNC", world.function_entry)
    catalog.bind(BUS, "TOYBUS")
    catalog.bind(MID, "TOYBUS")
    catalog.bind(LEAF, "TOYFUNC")
    kernel = Kernel(catalog=catalog, power_irp_timeout=timeout).activate()
    kernel.pnp.add_root_device(BUS, [BUS])
    kernel.boot()
    world.trace.clear()
    return kernel


def fdo_power(world: World) -> list[tuple[str, str]]:
    """Power IRPs as the power policy owners (the FDOs) receive them."""
    return [(d, e) for w, d, e in world.trace if w == "fdo" and "POWER" in e]


def test_s0_s4_s0_order_children_first_down_parents_first_up() -> None:
    world = World()
    kernel = three_levels(world)
    assert kernel.power.set_system_state(S4)
    assert fdo_power(world) == [
        (LEAF, "IRP_MN_QUERY_POWER:PowerSystemHibernate"), (MID, "IRP_MN_QUERY_POWER:PowerSystemHibernate"),
        (BUS, "IRP_MN_QUERY_POWER:PowerSystemHibernate"),
        (LEAF, "IRP_MN_SET_POWER:PowerSystemHibernate"), (LEAF, "IRP_MN_SET_POWER:PowerDeviceD3"),
        (MID, "IRP_MN_SET_POWER:PowerSystemHibernate"), (MID, "IRP_MN_SET_POWER:PowerDeviceD3"),
        (BUS, "IRP_MN_SET_POWER:PowerSystemHibernate"), (BUS, "IRP_MN_SET_POWER:PowerDeviceD3"),
    ]
    assert all(kernel.pnp.find(p + "\\" + i).device_power == D3  # type: ignore[union-attr]
               for p, i in ((BUS, "0"), (MID, "_"), (LEAF, "_")))
    world.trace.clear()
    assert kernel.power.set_system_state(S0)
    assert [d for d, e in fdo_power(world) if e.endswith("PowerSystemWorking")] == [BUS, MID, LEAF]
    assert [d for d, e in fdo_power(world) if e.endswith("PowerDeviceD0")] == [BUS, MID, LEAF]
    assert kernel.pnp.find(LEAF + r"\_").device_power == D0  # type: ignore[union-attr]


def test_failed_query_power_vetoes_and_cancels_with_s0() -> None:
    world = World(veto_query_power={MID})
    kernel = three_levels(world)
    assert not kernel.power.set_system_state(S4)
    assert kernel.power.system_state == S0
    veto = kernel.power.last_veto
    assert veto is not None and veto.instance_path == MID + r"\_" and veto.status == STATUS_UNSUCCESSFUL
    assert fdo_power(world) == [(LEAF, "IRP_MN_QUERY_POWER:PowerSystemHibernate"),
                                (MID, "IRP_MN_QUERY_POWER:PowerSystemHibernate"),
                                (LEAF, "IRP_MN_SET_POWER:PowerSystemWorking"),
                                (LEAF, "IRP_MN_SET_POWER:PowerDeviceD0")]


def test_set_power_that_never_completes_is_driver_power_state_failure() -> None:
    world = World(hold_set_power={MID})
    kernel = three_levels(world, timeout=0.05)
    with pytest.raises(BugCheck) as stop:
        kernel.power.set_system_state(S4)
    assert stop.value.code == BugCheckCode.DRIVER_POWER_STATE_FAILURE == 0x9F
    assert stop.value.params[0] == 3 and stop.value.module == "toybus.sys"
    assert "PowerDevice" in stop.value.message or "PowerSystem" in stop.value.message
