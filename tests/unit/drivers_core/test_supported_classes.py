"""XENBUS FdoScan's class lists (XB src/xenbus/fdo.c FdoScan at 1087a8d): the store's `device/` classes
(upper-cased) plus SyntheticClasses (as stored), each kept only if a SupportedClasses entry starts with
it (strncmp over the class's length, case-sensitive). XENBUS has no built-in default for either value."""
from __future__ import annotations

from xenpv.stack.drivers.xenbus.fdo import PARAMETERS
from xenpv.stack.kernel import Registry


def _rescan(booted) -> list[str]:
    fdo = booted.xenbus.active_fdo
    with booted.kernel.cpu.lock:
        fdo.FdoScan()
    return sorted(fdo.children)


def test_without_supported_classes_xenbus_creates_no_pdo(rig, machine) -> None:
    """`SupportedClasses = NULL` when the value is missing: no class is supported."""
    booted = rig.boot(machine(0x0001))
    assert sorted(booted.xenbus.active_fdo.children) == ["CONS", "IFACE", "VBD", "VIF"]
    booted.kernel.registry.delete_value(PARAMETERS, "SupportedClasses")
    assert _rescan(booted) == []


def test_without_synthetic_classes_only_the_store_classes_count(rig, machine) -> None:
    booted = rig.boot(machine(0x0001))
    booted.kernel.registry.delete_value(PARAMETERS, "SyntheticClasses")
    assert _rescan(booted) == ["VBD", "VIF"]


def test_the_supported_match_is_case_sensitive_and_synthetic_classes_are_not_upcased(rig, machine) -> None:
    """Store classes are upper-cased (FdoMultiSzToUpcaseAnsi), SupportedClasses and SyntheticClasses are
    compared as the registry holds them."""
    registry = Registry()
    registry.set_multi_sz(PARAMETERS, "SupportedClasses", ["vbd", "VIF", "iface"])
    registry.set_multi_sz(PARAMETERS, "SyntheticClasses", ["iface", "CONS"])
    booted = rig.boot(machine(0x0001), registry)
    assert sorted(booted.xenbus.active_fdo.children) == ["VIF", "iface"]
