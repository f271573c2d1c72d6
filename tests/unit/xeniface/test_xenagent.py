"""xenagent's service logic (XI src/xenagent/xenifacedevice.cpp, service.cpp at f12cbdb) over the XENIFACE rig:
OnDeviceAdded, CheckShutdown, CheckSuspend, SetXenTime, the power broadcasts and OnServiceStop."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from xenpv.stack.agent.xenagent import FEATURES, SERVICE_KEY, XenAgent
from xenpv.stack.kernel import S0, S4
from xenpv.stack.kernel.clock import EPOCH_1601_TO_1970, SystemClock
from xenpv.stack.kernel.registry import REG_DWORD


class Power:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def InitiateSystemShutdownEx(self, reboot: bool) -> bool:
        self.calls.append("reboot" if reboot else "poweroff")
        return True

    def SetSystemPowerState(self) -> bool:
        self.calls.append("hibernate")
        return True

    def SetSuspendState(self) -> bool:
        self.calls.append("s3")
        return True


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def agent(rig, cpu):
    kernel = SimpleNamespace(pnp=rig.pnp, cpu=cpu, power=SimpleNamespace(broadcasts=[]), registry=rig.pnp.registry)
    clock = SystemClock(lambda: rig.pnp.registry, now=lambda: EPOCH_1601_TO_1970 + 10**10)
    a = XenAgent(kernel, clock, Power(), period=3600)  # type: ignore[arg-type]
    a.start()
    wait_until(lambda: a.status().shutdown_watch, "xenagent's shutdown watch")
    yield a
    a.stop()


def store(rig) -> dict:
    return {k: v.decode() for k, v in rig.platform.store.tree.items()}


def fire(rig, path: str) -> None:
    """xenstored's watch event for `path`, through XENBUS's STORE as its watch thread delivers it."""
    context = rig.fdo.interfaces["STORE"].Context
    for watched, token in list(rig.platform.store.watches.items()):
        if path == watched or path.startswith(watched + "/"):
            context._fire(path, token)


def test_on_device_added_registers_watches_features_and_syncs_the_clock(rig, agent) -> None:
    tree = store(rig)
    assert all(tree[f] == "1" for f in FEATURES)
    assert "control/shutdown" in rig.platform.store.watches
    assert len(rig.fdo.state.suspends) == 1 and len(rig.fdo.state.store_watches) == 1
    # SetXenTime(forced = FALSE) at start: the fake shared_info's all-zero clock is 1970
    assert agent.time_syncs == 1 and agent.clock.query_system_time() == EPOCH_1601_TO_1970


@pytest.mark.parametrize("request_, call, ends", [("poweroff", "poweroff", True), ("reboot", "reboot", True),
                                                  ("s4", "hibernate", False), ("s3", "s3", False)])
def test_check_shutdown_writes_empty_then_calls_the_power_api(rig, agent, request_, call, ends) -> None:
    rig.platform.store.write("control/shutdown", request_)
    fire(rig, "control/shutdown")
    wait_until(lambda: agent.power.calls, "the power call")
    assert agent.power.calls == [call] and store(rig)["control/shutdown"] == ""
    if ends:  # the service stops: OnServiceStop clears the features and removes the watch
        wait_until(lambda: not agent.running, "the service's end")
        assert all(store(rig)[f] == "" for f in FEATURES) and rig.platform.store.watches == {}
        assert rig.fdo.state.suspends == []
    else:
        assert agent.running and agent.status().shutdown_watch


def test_suspend_and_other_values_are_left_alone(rig, agent) -> None:
    for value in ("suspend", "halt", ""):
        rig.platform.store.write("control/shutdown", value)
        fire(rig, "control/shutdown")
    time.sleep(0.3)
    assert agent.power.calls == [] and store(rig)["control/shutdown"] == ""
    rig.platform.store.write("control/shutdown", "suspend")
    fire(rig, "control/shutdown")
    time.sleep(0.3)
    assert store(rig)["control/shutdown"] == "suspend"  # XENBUS's to answer, not xenagent's


def test_a_new_suspend_count_recreates_the_watch_and_forces_the_time(rig, agent) -> None:
    rig.pnp.registry.set_value(SERVICE_KEY, "TimeSyncMode", REG_DWORD, 0)
    agent.clock.set_system_time(EPOCH_1601_TO_1970 + 10**12)
    suspend = rig.fdo.interfaces["SUSPEND"].Context
    old_token = rig.platform.store.watches["control/shutdown"]
    suspend.count += 1
    rig.fdo.FdoSuspendCallbackLate(None)  # XENIFACE's LATE callback fires every suspend event
    wait_until(lambda: agent.status().suspend_count == 1, "CheckSuspend")
    assert rig.platform.store.watches["control/shutdown"] != old_token  # stopped and started again
    assert agent.clock.query_system_time() == EPOCH_1601_TO_1970  # forced despite TimeSyncMode = 0
    syncs = agent.time_syncs
    rig.fdo.FdoSuspendCallbackLate(None)  # the same count: no new watch
    time.sleep(0.3)
    assert agent.status().suspend_count == 1 and agent.time_syncs == syncs


def test_time_sync_mode_zero_stops_the_periodic_sync_and_local_rtc_sets_local_time(rig, cpu) -> None:
    registry = rig.pnp.registry
    kernel = SimpleNamespace(pnp=rig.pnp, cpu=cpu, power=SimpleNamespace(broadcasts=[]), registry=registry)
    clock = SystemClock(lambda: registry, now=lambda: EPOCH_1601_TO_1970 + 10**10)
    registry.set_value(SERVICE_KEY, "TimeSyncMode", REG_DWORD, 0)
    off = XenAgent(kernel, clock, Power(), period=3600)  # type: ignore[arg-type]
    off.start()
    wait_until(lambda: off.status().shutdown_watch, "the watch")
    off.stop()
    assert off.time_syncs == 0 and clock.query_system_time() == EPOCH_1601_TO_1970 + 10**10
    registry.set_value(SERVICE_KEY, "TimeSyncMode", REG_DWORD, 1)
    registry.set_value(r"HKLM\SYSTEM\CurrentControlSet\Control\TimeZoneInformation", "ActiveTimeBias", REG_DWORD,
                       (-60) & 0xFFFFFFFF)  # UTC+1
    table = rig.fdo.interfaces["SHARED_INFO"]
    table.methods["SharedInfoGetTime"] = lambda: (EPOCH_1601_TO_1970 + 36_000_000_000, True)  # RTC in local time
    on = XenAgent(kernel, clock, Power(), period=3600)  # type: ignore[arg-type]
    on.start()
    wait_until(lambda: on.time_syncs == 1, "SetXenTime")
    on.stop()
    assert clock.query_local_time() == EPOCH_1601_TO_1970 + 36_000_000_000
    assert clock.query_system_time() == EPOCH_1601_TO_1970 + 36_000_000_000 - 36_000_000_000  # local 01:00 = 00:00Z


def test_power_broadcasts_stop_and_restart_the_shutdown_watch(rig, agent) -> None:
    (receiver,) = agent.kernel.power.broadcasts
    receiver(S4)
    wait_until(lambda: not agent.status().shutdown_watch, "OnDeviceSuspend")
    assert all(store(rig)[f] == "" for f in FEATURES) and rig.platform.store.watches == {}
    receiver(S0)
    wait_until(lambda: agent.status().shutdown_watch, "OnDeviceResume")
    assert all(store(rig)[f] == "1" for f in FEATURES)
    agent.stop()
    assert agent.kernel.power.broadcasts == []  # the service's registration goes with it


def test_the_periodic_sync_runs_each_period_unless_time_sync_mode_is_zero(rig, cpu) -> None:
    """ServiceMainLoop's WAIT_TIMEOUT: CheckXenTime(false) (the period is 30 minutes; shortened here)."""
    registry = rig.pnp.registry
    kernel = SimpleNamespace(pnp=rig.pnp, cpu=cpu, power=SimpleNamespace(broadcasts=[]), registry=registry)
    clock = SystemClock(lambda: registry)
    agent = XenAgent(kernel, clock, Power(), period=0.05)  # type: ignore[arg-type]
    agent.start()
    try:
        wait_until(lambda: agent.time_syncs >= 1, "the first sync")
        clock.set_system_time(EPOCH_1601_TO_1970 + 10**12)
        wait_until(lambda: clock.query_system_time() < EPOCH_1601_TO_1970 + 10**10, "the periodic sync")
        registry.set_value(SERVICE_KEY, "TimeSyncMode", REG_DWORD, 0)
        time.sleep(0.2)  # a sync in flight when the value changed may still land
        clock.set_system_time(EPOCH_1601_TO_1970 + 10**12)
        syncs = agent.time_syncs
        time.sleep(0.5)  # ten periods
        assert agent.time_syncs == syncs and clock.query_system_time() >= EPOCH_1601_TO_1970 + 10**12
    finally:
        agent.stop()


def test_the_device_list_follows_interface_removal_and_arrival(rig, agent) -> None:
    """CDeviceList: a removed XENIFACE interface closes the handle (its contexts go at cleanup); the next
    arrival is opened and OnDeviceAdded runs again."""
    from xenpv.stack.kernel.io import IoSetDeviceInterfaceState
    link = rig.fdo.interface_name
    with agent.kernel.cpu.lock:
        IoSetDeviceInterfaceState(rig.bus, link, False)
    wait_until(lambda: agent.status().device is None, "the removal")
    assert rig.fdo.state.store_watches == [] and rig.fdo.state.suspends == [] and agent.process.handles == []
    with agent.kernel.cpu.lock:
        IoSetDeviceInterfaceState(rig.bus, link, True)
    wait_until(lambda: agent.status().shutdown_watch, "the arrival")
    assert agent.status().device == link and len(rig.fdo.state.suspends) == 1
