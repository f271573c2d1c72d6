"""XENBUS FDO start and stop (fdo.c FdoStartDevice, __FdoD3ToD0, FdoD0ToD3, FdoSetActive): what the
mutation run of issue 18 found no test for. Each test names the one-line change it catches."""
from __future__ import annotations

import threading
import time

import pytest

from xenpv.base.process import wait_for
from xenpv.stack.drivers.xenbus.fdo import D3, XenbusFdo
from xenpv.stack.drivers.xenfilt.emulated import EmulatedStatus
from xenpv.stack.kernel.bugcheck import BugCheck
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

# A deadline for the suspend thread to do what a test waits for; it only matters when the test fails.
THREAD_DEADLINE = 10.0


def _rounds_of(fdo: XenbusFdo) -> list[int]:
    """FdoSuspend replaced by a recorder: the device power state at each round of the suspend thread."""
    rounds: list[int] = []
    fdo.FdoSuspend = lambda: rounds.append(fdo.device_power)  # type: ignore[method-assign]
    return rounds


def _with_trigger_recorder(rig, machine, monkeypatch):  # type: ignore[no-untyped-def]
    """A booted active FDO whose SUSPEND.Trigger only records that it ran: (booted, fdo, the record)."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    triggered: list[int] = []
    monkeypatch.setattr(fdo.interfaces["SUSPEND"], "SuspendTrigger", lambda: triggered.append(1))
    return booted, fdo, triggered


def _wait(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    wait_for(condition, timeout=THREAD_DEADLINE, what=what)


def test_d0_watches_device_for_the_scan_and_control_shutdown_for_the_suspend_thread(rig, machine) -> None:
    """__FdoD3ToD0: XenbusWatchAdd(NULL, "device", ScanEvent) and ("control", "shutdown", SuspendEvent);
    a watch on any other path leaves hotplug or the toolstack's suspend request unseen."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    store = rig.platforms[-1].store
    tokens = {path: token for path, token in store.watches}
    assert {"device", "control/shutdown"} <= set(tokens), store.watches
    fdo._scan_event.clear()
    store.events.append(("device/vif/1", tokens["device"]))
    store.pump()
    assert fdo._scan_event.read_state()
    rounds = _rounds_of(fdo)
    store.events.append(("control/shutdown", tokens["control/shutdown"]))
    store.pump()
    _wait(lambda: rounds, "the control/shutdown watch to wake the suspend thread")


def test_a_watch_or_key_d0_cannot_set_up_is_a_warning_and_one_it_can_is_not(rig, machine, monkeypatch) -> None:
    """__FdoD3ToD0 logs each of its three store calls that fails, by status, and goes on to D0."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    log = fdo.driver.xen.debug_log

    def warnings() -> list[str]:
        return [line for line in log.tail(200) if "watch:" in line or "control/feature-suspend:" in line]

    assert warnings() == []
    store = fdo.interfaces["STORE"]
    with booted.kernel.cpu.lock:
        fdo._d0_to_d3()
        monkeypatch.setattr(store, "StoreWatchAdd", lambda *args: (STATUS_UNSUCCESSFUL, None))
        monkeypatch.setattr(store, "StorePrintf", lambda *args: STATUS_UNSUCCESSFUL)
        fdo._d3_to_d0()
    found = warnings()
    assert any("device watch: STATUS_UNSUCCESSFUL" in line for line in found), found
    assert any("control/shutdown watch: STATUS_UNSUCCESSFUL" in line for line in found), found
    assert any("control/feature-suspend: STATUS_UNSUCCESSFUL" in line for line in found), found
    assert fdo._scan_watch is None and fdo._suspend_watch is None


def test_start_scans_once_d0_is_reached_and_returns_a_failed_d0(rig, machine, monkeypatch) -> None:
    """FdoStartDevice: D3 -> D0, then the first scan, so the children exist when START_DEVICE completes;
    a D0 that fails is START_DEVICE's status and nothing is scanned."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    fdo.FdoStop()
    scans: list[int] = []
    monkeypatch.setattr(fdo, "FdoScan", lambda: scans.append(fdo.device_power) or False)
    with booted.kernel.cpu.lock:
        assert fdo.FdoStart() == STATUS_SUCCESS
    assert len(scans) == 1 and scans[0] != D3
    fdo.FdoStop()
    monkeypatch.setattr(fdo, "FdoD3ToD0", lambda: STATUS_UNSUCCESSFUL)
    with booted.kernel.cpu.lock:
        assert fdo.FdoStart() == STATUS_UNSUCCESSFUL
    assert len(scans) == 1
    fdo.FdoStop()


def test_d3_waits_for_the_suspend_thread_to_finish_its_round(rig, machine) -> None:
    """FdoD0ToD3 sets the suspend event and waits for the thread's round to end before the interfaces go:
    a thread still inside FdoSuspend would use interfaces D3 has released."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    rounds = _rounds_of(fdo)
    with booted.kernel.cpu.lock:
        # The thread runs its rounds holding the processor's lock: none starts between here and the wait.
        # The boot's first control/shutdown watch event may still be on its way (under load it came while
        # D3 waited, and the thread ran a second round before this thread had the CPU back): a round more
        # is fine, a return before any is the bug.
        rounds.clear()
        fdo.FdoD0ToD3()
        assert rounds and set(rounds) == {D3}, f"FdoD0ToD3 returned before the suspend thread's round: {rounds}"


def test_d3_after_the_suspend_thread_stopped_does_not_wait_for_it(rig, machine) -> None:
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    fdo._stop_suspend_thread()
    assert fdo._suspend_thread is None
    with booted.kernel.cpu.lock:
        fdo.FdoD0ToD3()
    assert fdo.device_power == D3


def test_an_fdo_whose_start_failed_before_its_suspend_thread_stops_cleanly(rig, machine, monkeypatch) -> None:
    """A new FDO has no suspend thread; FdoStop of one whose start broke off after the platform came up
    (an interface's provider failing to import) gives the platform back without waiting for a thread."""
    booted = rig.boot(machine(0x0001))
    old = booted.xenbus.active_fdo
    fdo = XenbusFdo(old.driver, old.device, old.lower, old.pdo, old.device_id, old.instance_id, old.location,
                    old.pci_device_id, old.bus_interface, old.emulated)

    def broken() -> None:
        raise ImportError("a provider that does not import")

    monkeypatch.setattr(fdo, "_create_interfaces", broken)
    with booted.kernel.cpu.lock, pytest.raises(ImportError):
        fdo.FdoStart()
    assert fdo.platform is not None
    before = set(threading.enumerate())
    fdo.FdoStop()
    assert fdo.platform is None and fdo._suspend_thread is None
    assert set(threading.enumerate()) <= before


def test_an_active_device_the_emulated_interface_says_is_absent_is_bug_present(rig, machine, monkeypatch) -> None:
    """fdo.c FdoSetActive: BUG_ON(!Present) when XENFILT's EMULATED says the FDO's own device is not there;
    the bugcheck's text is the expression, as the crash dump shows it."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    assert fdo.emulated is not None
    answer = (False, EmulatedStatus.NEUTRAL) if fdo.emulated.Version >= 3 else False
    monkeypatch.setattr(fdo.emulated, "EmulatedIsDevicePresent", lambda *args: answer)
    with pytest.raises(BugCheck) as stop:
        fdo.FdoSetActive()
    assert stop.value.message == "BUG: !Present"


# ---- the suspend thread (fdo.c FdoSuspend's loop) --------------------------------------------------------


def test_the_suspend_thread_runs_a_round_per_event_and_none_while_idle(rig, machine) -> None:
    """The thread's periodic wake-ups (SUSPEND_THREAD_PERIOD, to see a stop) are timeouts, not events: a
    round of FdoSuspend runs only when the control/shutdown watch set the event."""
    from xenpv.stack.drivers.xenbus.fdo import SUSPEND_THREAD_PERIOD
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    rounds = _rounds_of(fdo)
    rig.platforms[-1].store.pump()  # xenstored fires a new watch once: that first round goes by here
    fdo._suspend_event.set()
    _wait(lambda: rounds, "FdoSuspend to run on the event")
    _wait(lambda: not fdo._suspend_event.read_state(), "the suspend thread to take the event")
    time.sleep(SUSPEND_THREAD_PERIOD)
    rounds.clear()
    time.sleep(3 * SUSPEND_THREAD_PERIOD)
    assert rounds == [], "FdoSuspend ran without a control/shutdown event"
    fdo._suspend_event.set()
    _wait(lambda: rounds, "FdoSuspend to run on the event")
    time.sleep(3 * SUSPEND_THREAD_PERIOD)
    assert len(rounds) == 1


def test_fdo_stop_returns_once_the_suspend_thread_has_ended(rig, machine) -> None:
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    thread = fdo._suspend_thread
    assert thread is not None and thread.is_alive()
    fdo.FdoStop()
    assert not thread.is_alive()


def test_a_stop_inside_a_suspend_is_reported_to_whoever_waits_for_the_resume(rig, machine) -> None:
    """A STOP in SUSPEND.Trigger's callbacks ends the thread; the parked vCPU's relocation line hears
    "the guest stopped: ..." instead of waiting for a resume that will not come."""
    from xenpv.stack.kernel.bugcheck import BUG
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    reports: list[str | None] = []
    fdo.platform.vcpu.relocation.report = reports.append

    def stopping() -> None:
        BUG("SuspendTrigger callback")

    fdo.FdoSuspend = stopping  # type: ignore[method-assign]
    fdo._suspend_event.set()
    _wait(lambda: reports, "the relocation line to hear of the STOP")
    assert len(reports) == 1 and reports[0] is not None
    assert reports[0].startswith("the guest stopped: ") and "BUG: SuspendTrigger callback" in reports[0]


def test_an_unhandled_exception_in_the_suspend_thread_is_a_stop_naming_xenbus(rig, machine) -> None:
    """A system thread's unhandled exception stops Windows; the model's suspend thread stops the guest with
    a BUG naming xenbus.sys and the exception, rather than silently no longer answering suspends."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo

    def broken() -> None:
        raise RuntimeError("boom")

    fdo.FdoSuspend = broken  # type: ignore[method-assign]
    fdo._suspend_event.set()
    cpu = booted.kernel.cpu
    _wait(lambda: cpu.halted is not None, "the unhandled exception to stop the processor")
    stop = cpu.halted
    assert isinstance(stop, BugCheck)
    assert stop.message == "BUG: unhandled RuntimeError in the suspend thread: boom"
    assert stop.module == "xenbus.sys"


def test_a_suspend_request_in_d3_is_left_for_d0(rig, machine, monkeypatch) -> None:
    """FdoSuspend: "it is not safe to use interfaces before this point": in D3 the request stays."""
    booted, fdo, triggered = _with_trigger_recorder(rig, machine, monkeypatch)
    store = fdo.platform.store
    with booted.kernel.cpu.lock:
        fdo.FdoD0ToD3()
        store.write("control/shutdown", "suspend")
        fdo.FdoSuspend()
    assert (triggered, fdo.suspends, store.read("control/shutdown")) == ([], 0, b"suspend")


def test_a_control_shutdown_that_is_not_text_is_no_suspend_request(rig, machine, monkeypatch) -> None:
    booted, fdo, triggered = _with_trigger_recorder(rig, machine, monkeypatch)
    store = fdo.platform.store
    store.write("control/shutdown", b"sus\xffpend")
    with booted.kernel.cpu.lock:
        fdo.FdoSuspend()
    assert (triggered, store.read("control/shutdown")) == ([], b"sus\xffpend")


def test_a_lower_device_that_fails_a_query_gives_empty_ids_and_no_interfaces(monkeypatch) -> None:
    """FdoCreate's queries of the PCI PDO below: a failed QUERY_ID or QUERY_DEVICE_TEXT is an empty string
    (FdoSetActive then compares with nothing), and a failed QUERY_INTERFACE no interface, even when the
    lower driver left one in the parameters (the EMULATED query accepts any failure: no XENFILT below)."""
    from xenpv.stack.drivers.xenbus import fdo as fdo_module
    from xenpv.stack.kernel import BusQueryIdType

    def failing(lower, irp):  # type: ignore[no-untyped-def]
        irp.io_status.status = STATUS_UNSUCCESSFUL
        irp.io_status.information = "left over"
        if hasattr(irp.parameters, "interface"):
            irp.parameters.interface = object()
        return STATUS_UNSUCCESSFUL

    monkeypatch.setattr(fdo_module, "IoSynchronousCallDriver", failing)
    assert fdo_module.query_id(None, BusQueryIdType.BusQueryDeviceID) == ""
    assert fdo_module.query_location(None) == ""
    assert fdo_module.query_bus_interface(None) is None
    assert fdo_module.query_emulated(None, 3) is None
