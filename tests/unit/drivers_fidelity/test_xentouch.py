"""XenTouch and XENBUS's DriverEntry as xcp-ng/win-xenbus 1087a8d has them: src/xen/driver.c XenTouch (exact
version, then XenVersion on the first touch: STATUS_NOT_IMPLEMENTED off Xen) and src/xenbus/driver.c
DriverEntry (a failed touch loads the driver without AddDevice; only a version mismatch installs XENFILT's
class filters and requests a reboot). Only XENBUS and XENFILT call XenTouch: win-xenvif 14892e7 and
win-xenvbd 583bd7f have no call to it, and neither has the model's XENVIF, XENVBD or XENNET."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from xenpv.stack.drivers.xen import PACKAGE_VERSION, Xen
from xenpv.stack.drivers.xenbus.driver import XenbusDriver
from xenpv.stack.kernel import DriverObject, Registry
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.pnp import CLASS_KEY, HDC_CLASS_GUID, SYSTEM_CLASS_GUID
from xenpv.stack.kernel.status import (STATUS_INCOMPATIBLE_DRIVER_BLOCKED, STATUS_NOT_IMPLEMENTED,
                                       STATUS_SUCCESS)
from xenpv.xenabi import xen as X

DRIVERS = Path(__file__).resolve().parents[3] / "stack" / "drivers"
OLDER = PACKAGE_VERSION[:3] + (PACKAGE_VERSION[3] - 5,)


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


class XenVcpu:
    """A vCPU inside Xen: it has a hypervisor and answers xen_version (counted)."""

    def __init__(self) -> None:
        self.hv = object()
        self.calls: list[int] = []

    def hypercall(self, nr: int, *args: int) -> int:
        self.calls.append(nr)
        assert nr == X.HYPERCALL_NUMBERS["xen_version"]
        return 4 << 16 | 17


def _filters(registry: Registry) -> dict[str, list[str]]:
    found = {}
    for guid in (SYSTEM_CLASS_GUID, HDC_CLASS_GUID):
        try:
            found[guid] = registry.get_multi_sz(f"{CLASS_KEY}\\{guid}", "UpperFilters")
        except Exception:
            found[guid] = []
    return found


def test_off_xen_xentouch_is_not_implemented_and_counts_nothing() -> None:
    xen = Xen(Registry(), DebugLog(), None)
    xen.HypercallInitialize()
    assert xen.XenTouch("XENBUS", *PACKAGE_VERSION) == STATUS_NOT_IMPLEMENTED
    assert xen.touch_references == 0
    # The version check comes first: a mismatch is reported as such off Xen too.
    assert xen.XenTouch("XENBUS", *OLDER) == STATUS_INCOMPATIBLE_DRIVER_BLOCKED


def test_in_xen_the_first_touch_asks_the_version_and_later_ones_only_count() -> None:
    vcpu = XenVcpu()
    xen = Xen(Registry(), DebugLog(), vcpu)  # type: ignore[arg-type]
    xen.HypercallInitialize()
    assert xen.XenTouch("XENFILT", *PACKAGE_VERSION) == STATUS_SUCCESS
    assert xen.XenTouch("XENBUS", *PACKAGE_VERSION) == STATUS_SUCCESS
    assert xen.touch_references == 2 and len(vcpu.calls) == 1


def _entry(xen: Xen) -> tuple[int, DriverObject]:
    driver = DriverObject("XENBUS")
    bus = XenbusDriver(xen, platform_factory=SimpleNamespace())  # type: ignore[arg-type]
    return bus.driver_entry(driver, driver.registry_path), driver


def test_xenbus_driver_entry_on_a_mismatch_succeeds_without_add_device_filters_and_asks_a_reboot() -> None:
    """driver.c: `if (status == STATUS_INCOMPATIBLE_DRIVER_BLOCKED) { FiltersInstall(); ConfigRequestReboot(...); }
    goto done;` ... `return STATUS_SUCCESS;` with DriverExtension->AddDevice never set."""
    xen = Xen(Registry(), DebugLog(), XenVcpu(), version=OLDER)  # type: ignore[arg-type]
    xen.HypercallInitialize()
    status, driver = _entry(xen)
    assert status == STATUS_SUCCESS and driver.add_device is None
    assert _filters(xen.registry) == {SYSTEM_CLASS_GUID: ["XENFILT"], HDC_CLASS_GUID: ["XENFILT"]}
    assert xen.config.reboot_requested("XENBUS")


def test_xenbus_driver_entry_off_xen_succeeds_without_add_device_and_does_nothing_else() -> None:
    xen = Xen(Registry(), DebugLog(), None)
    xen.HypercallInitialize()
    status, driver = _entry(xen)
    assert status == STATUS_SUCCESS and driver.add_device is None
    assert _filters(xen.registry) == {SYSTEM_CLASS_GUID: [], HDC_CLASS_GUID: []}
    assert not xen.config.reboot_requested("XENBUS")


def test_xenbus_driver_entry_in_xen_sets_add_device() -> None:
    xen = Xen(Registry(), DebugLog(), XenVcpu())  # type: ignore[arg-type]
    xen.HypercallInitialize()
    status, driver = _entry(xen)
    assert status == STATUS_SUCCESS and driver.add_device is not None


@pytest.mark.parametrize("module", ["xenvif", "xenvbd", "xennet"])
def test_only_xenbus_and_xenfilt_touch(module: str) -> None:
    sources = "".join(p.read_text() for p in (DRIVERS / module).glob("*.py"))
    assert "XenTouch" not in sources
