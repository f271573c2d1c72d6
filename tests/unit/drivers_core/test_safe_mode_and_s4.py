"""Driver-model rules that a one-line change would break without the older tests noticing (issue 18):

* XENFILT never unplugs in safe mode (reference windows-pv-drivers.md §6: ENABLED -> PENDING unplugs only
  if the active device is present *and* this is not safe mode), whatever was requested;
* XENBUS's FdoS3ToS4 bugchecks for an outstanding reference on exactly SUSPEND, SHARED_INFO, EVTCHN, STORE,
  CONSOLE and GNTTAB (and BALLOON, which this model does not have), and lets DEBUG, RANGE_SET, CACHE and
  UNPLUG stay referenced (§7, a10d605/28420a4); the check runs on the S4 SET_POWER, not on S3.
"""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.xenbus.fdo import S4_UNREFERENCED
from xenpv.stack.kernel import (IRP_MN_POWER, POWER_STATE_TYPE, Irp, IoCallDriver, IoGetAttachedDevice,
                                PowerParameters, Registry)
from xenpv.stack.kernel.bugcheck import BugCheck, BugCheckCode
from xenpv.stack.kernel.power import S0, S3, S4

from .test_unplug import CONTROL_KEY, _arm_children

MUST_BE_UNREFERENCED = ("SUSPEND", "SHARED_INFO", "EVTCHN", "STORE", "CONSOLE", "GNTTAB")
MAY_STAY_REFERENCED = ("DEBUG", "RANGE_SET", "CACHE", "UNPLUG")


# ---- XENFILT: no unplug in safe mode --------------------------------------------------------------

@pytest.mark.parametrize("options", ["NOEXECUTE=OPTIN  SAFEBOOT:MINIMAL", "SAFEBOOT:NETWORK",
                                     "SAFEBOOT:MINIMAL(ALTERNATESHELL) NOGUIBOOT"])
def test_safe_mode_boot_unplugs_nothing_and_keeps_the_emulated_disk(rig, machine, options: str) -> None:
    registry = Registry()
    m = machine(0x0001)
    _arm_children(rig.boot(m, registry))          # XENVBD and XENVIF asked for unplug at the next boot
    registry.set_sz(CONTROL_KEY, "SystemStartOptions", options)
    safe = rig.boot(m, registry)
    assert m.unplug_writes == [] and safe.xenfilt.unplugged_mask == 0
    assert [n.instance_id for n in safe.nodes("IDE\\")] == ["0.0.0"]
    assert safe.xenfilt.emulated.EmulatedIsDiskPresent(0)
    assert any("nothing unplugged" in line for line in safe.kernel.log.tail(200))


def test_leaving_safe_mode_unplugs_again(rig, machine) -> None:
    registry = Registry()
    m = machine(0x0001)
    _arm_children(rig.boot(m, registry))
    registry.set_sz(CONTROL_KEY, "SystemStartOptions", "SAFEBOOT:MINIMAL")
    _arm_children(rig.boot(m, registry))
    assert m.unplug_writes == []
    registry.set_sz(CONTROL_KEY, "SystemStartOptions", "NOEXECUTE=OPTIN")  # an option, but not safe mode
    normal = rig.boot(m, registry)
    assert m.unplug_writes == [0x9, 0x2] and normal.nodes("IDE\\") == []


# ---- XENBUS: FdoS3ToS4's list -------------------------------------------------------------------------

def test_the_s4_list_is_the_reference_list() -> None:
    assert set(S4_UNREFERENCED) == set(MUST_BE_UNREFERENCED) | {"BALLOON"}


@pytest.fixture
def fdo(rig, machine):
    booted = rig.boot(machine(0x0001), Registry())
    fdo = booted.xenbus.active_fdo
    assert set(MUST_BE_UNREFERENCED + MAY_STAY_REFERENCED) <= fdo.interfaces.keys()
    # In D0 the FDO holds SUSPEND, EVTCHN, STORE and CONSOLE itself (FdoD3ToD0); no child is started here.
    assert fdo.interfaces["STORE"].references == 1 and fdo.interfaces["GNTTAB"].references == 0
    return booted, fdo


def test_s3_takes_the_fdo_to_d3_releasing_its_own_references(fdo) -> None:
    booted, fdo = fdo
    _system_power(booted, fdo, S3)
    assert all(fdo.interfaces[name].references == 0 for name in MUST_BE_UNREFERENCED)
    _system_power(booted, fdo, S0)
    assert fdo.interfaces["STORE"].references == 1


def _system_power(booted, fdo, state) -> None:
    """The system SET_POWER IRP as the power manager sends it, to the top of the XENBUS device's stack."""
    irp = Irp.power(IRP_MN_POWER.SET_POWER, PowerParameters(POWER_STATE_TYPE.SystemPowerState, state))
    with booted.kernel.cpu.lock:
        IoCallDriver(IoGetAttachedDevice(fdo.pdo), irp)
    assert irp.completed


@pytest.mark.parametrize("name", MUST_BE_UNREFERENCED)
def test_an_outstanding_reference_on_entry_to_s4_bugchecks(fdo, name: str) -> None:
    booted, fdo = fdo
    fdo.interfaces[name].references += 1          # a child that never released it
    try:
        _system_power(booted, fdo, S3)            # S3 keeps the domain: references may stay
        with pytest.raises(BugCheck) as info:
            fdo.FdoS3ToS4()
        assert info.value.code == BugCheckCode.ASSERTION_FAILURE
        # FdoS3ToS4 checks in its list's order: a leaked interface still holds the ones it uses (EVTCHN
        # holds SUSPEND...), so the first of those held is the one named, as on Windows.
        held = [n for n in S4_UNREFERENCED if n in fdo.interfaces and fdo.interfaces[n].references]
        assert name in held and fdo.interfaces[name].references == 1
        # fdo.c FdoS3ToS4: BUG_ON(<X>GetReferences(Fdo-><X>Context) != 0), the expression its text
        prefix = fdo.interfaces[held[0]].prefix()
        assert info.value.message == f"BUG: {prefix}GetReferences(Fdo->{prefix}Context) != 0"
    finally:
        fdo.interfaces[name].references -= 1


@pytest.mark.parametrize("name", MAY_STAY_REFERENCED)
def test_references_that_may_stay_across_s4(fdo, name: str) -> None:
    booted, fdo = fdo
    _system_power(booted, fdo, S3)                # the FDO's own references go with its D3
    fdo.interfaces[name].references += 1
    try:
        fdo.FdoS3ToS4()
    finally:
        fdo.interfaces[name].references -= 1


def test_s4_set_power_runs_the_check(fdo) -> None:
    booted, fdo = fdo
    fdo.interfaces["EVTCHN"].references += 1
    try:
        with pytest.raises(BugCheck, match=r"BUG: (Suspend|Evtchn)GetReferences\(Fdo->(Suspend|Evtchn)Context\) != 0"):
            _system_power(booted, fdo, S4)
    finally:
        fdo.interfaces["EVTCHN"].references -= 1


def test_d0_holds_exactly_the_fdos_own_interfaces(fdo) -> None:
    """XB fdo.c FdoD3ToD0 acquires DEBUG, SUSPEND, RANGE_SET, EVTCHN, STORE and CONSOLE for the FDO itself,
    in that order (FdoD0ToD3 releases them in reverse): each is referenced while the FDO is in D0, and the
    others (SHARED_INFO, CACHE, GNTTAB, UNPLUG) are not taken by the FDO."""
    booted, fdo = fdo
    assert fdo._held == ["DEBUG", "SUSPEND", "RANGE_SET", "EVTCHN", "STORE", "CONSOLE"]
    assert all(fdo.interfaces[name].references >= 1 for name in fdo._held)


# ---- FdoSetSystemPower: the order of the S3/S4 transitions ------------------------------------------------

@pytest.fixture
def resumes(fdo, monkeypatch) -> list[str]:
    """What FdoS4ToS3 does to rebuild the FDO's view of a new domain, recorded in order."""
    booted, fdo = fdo
    calls: list[str] = []
    monkeypatch.setattr(fdo.driver.xen.unplug, "UnplugDevices", lambda: calls.append("unplug") or 0)
    monkeypatch.setattr(fdo.platform, "map_shared_info", lambda: calls.append("shared_info"), raising=False)
    monkeypatch.setattr(fdo.platform, "map_grant_frames", lambda: calls.append("grant_frames"), raising=False)
    monkeypatch.setattr(fdo.platform, "reconnect_store", lambda: calls.append("store") or 7, raising=False)
    return calls


def test_each_hibernation_goes_d3_checks_at_s3_and_resumes_in_the_new_domain(fdo, resumes, monkeypatch) -> None:
    """fdo.c: down to S4 the FDO goes D3, then with its system state at S3 runs FdoS3ToS4, then records S4;
    back to S0, FdoS4ToS3 (unplug, shared_info, grant frames, the store's new event channel) before D0.
    Twice in a row: the first resume must leave the FDO in S0 for the second hibernation to run again."""
    from xenpv.stack.drivers.xenbus.fdo import D0, D3
    booted, fdo = fdo
    checked_at: list[int] = []
    real_check = fdo.FdoS3ToS4
    monkeypatch.setattr(fdo, "FdoS3ToS4", lambda: (checked_at.append(fdo.system_power), real_check())[1])
    for _ in range(2):
        _system_power(booted, fdo, S4)
        assert (fdo.device_power, fdo.system_power, checked_at, resumes) == (D3, S4, [S3], [])
        _system_power(booted, fdo, S0)
        assert resumes == ["unplug", "shared_info", "grant_frames", "store"]
        assert (fdo.device_power, fdo.system_power) == (D0, S0)
        assert fdo._held == ["DEBUG", "SUSPEND", "RANGE_SET", "EVTCHN", "STORE", "CONSOLE"]
        assert any("FdoS4ToS3: platform mapped in the new domain, store port 7" in line
                   for line in fdo.driver.xen.debug_log.tail(50))
        checked_at.clear()
        resumes.clear()


def test_a_resume_from_s3_keeps_the_domain(fdo, resumes) -> None:
    from xenpv.stack.drivers.xenbus.fdo import D0, D3
    booted, fdo = fdo
    _system_power(booted, fdo, S3)
    assert (fdo.device_power, fdo.system_power) == (D3, S3)
    _system_power(booted, fdo, S0)
    assert (fdo.device_power, fdo.system_power, resumes) == (D0, S0, [])


def test_an_s0_set_power_in_s0_changes_nothing(fdo, resumes, monkeypatch) -> None:
    from xenpv.stack.drivers.xenbus.fdo import D0
    booted, fdo = fdo
    d3: list[int] = []
    monkeypatch.setattr(fdo, "FdoD0ToD3", lambda *a, **k: d3.append(1))
    _system_power(booted, fdo, S0)
    assert (fdo.device_power, fdo.system_power, d3, resumes) == (D0, S0, [], [])


def test_a_deeper_sleep_state_from_s3_is_recorded_without_a_resume(fdo, resumes) -> None:
    from xenpv.stack.drivers.xenbus.fdo import D3
    booted, fdo = fdo
    _system_power(booted, fdo, S3)
    _system_power(booted, fdo, S4)
    assert (fdo.device_power, fdo.system_power, resumes) == (D3, S4, [])


def test_s5_is_recorded_so_that_fdo_stop_keeps_the_store_keys(fdo, rig) -> None:
    """S5 passes down with the FDO left in D0 (Windows sends it no D-IRP); FdoStop then keeps
    control/feature-suspend, which the guest could not write again."""
    from xenpv.stack.drivers.xenbus.fdo import D0
    from xenpv.stack.kernel.power import S5
    booted, fdo = fdo
    _system_power(booted, fdo, S5)
    assert (fdo.device_power, fdo.system_power) == (D0, S5)
    store = rig.platforms[-1].store
    fdo.FdoStop()
    assert store.values.get("control/feature-suspend") == b"1"


@pytest.mark.parametrize("minor, kind", [(IRP_MN_POWER.QUERY_POWER, POWER_STATE_TYPE.SystemPowerState),
                                         (IRP_MN_POWER.SET_POWER, POWER_STATE_TYPE.DevicePowerState)],
                         ids=["query-system", "set-device"])
def test_only_a_system_set_power_moves_the_fdo(fdo, resumes, minor, kind) -> None:
    """FdoDispatchPower acts on IRP_MN_SET_POWER of the system state only; a query, or a device state IRP,
    goes down the stack and leaves the FDO where it was."""
    from xenpv.stack.drivers.xenbus.fdo import D0
    booted, fdo = fdo
    irp = Irp.power(minor, PowerParameters(kind, S4))
    with booted.kernel.cpu.lock:
        IoCallDriver(IoGetAttachedDevice(fdo.pdo), irp)
    assert (fdo.device_power, fdo.system_power, resumes) == (D0, S0, [])
