"""XENBUS's suspend hypercall and what its result means (issue 18: the FDO's suspend path had no unit test).

xen/include/public/sched.h, SCHEDOP_shutdown with SHUTDOWN_suspend: the hypercall returns when the domain
runs again; 1 means the suspend was cancelled and the domain resumed in place (a checkpoint, a failed save),
0 that it resumed as a restored domain; a negative value is an error. XENBUS's suspend.c takes 1 as
"cancelled" (no re-plumbing of the interfaces' event channels and grants) and an error as a failed suspend.
"""
from __future__ import annotations

import ctypes
import sys
import time
import types
from types import SimpleNamespace

import pytest

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.xenbus import fdo as fdo_module
from xenpv.stack.kernel.power import S0, S5
from xenpv.stack.kernel.status import STATUS_CANCELLED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import xen as X

SCRATCH = 0x5000


@pytest.mark.parametrize("rc, status", [(0, STATUS_SUCCESS), (1, STATUS_CANCELLED), (-22, STATUS_UNSUCCESSFUL),
                                        (-1, STATUS_UNSUCCESSFUL), (2, STATUS_SUCCESS)],
                         ids=["resumed", "cancelled", "einval", "eperm", "other-positive"])
def test_suspend_domain_maps_schedop_shutdowns_result(rig, machine, monkeypatch: pytest.MonkeyPatch,
                                                      rc: int, status: int) -> None:
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    vcpu = fdo.platform.vcpu
    fdo.platform.hypercalls = SimpleNamespace(vcpu=vcpu, scratch=SCRATCH)
    calls: list[tuple[int, tuple[int, ...]]] = []

    def hypercall(v, nr: int, args: tuple[int, ...]) -> int:
        assert v is vcpu
        calls.append((nr, args))
        return rc

    monkeypatch.setattr(fdo_module, "parked_hypercall", hypercall)
    assert fdo._suspend_domain() == status
    assert calls == [(X.HYPERCALL_NUMBERS["sched_op"], (X.SCHEDOP_shutdown, SCRATCH))]
    op = X.SchedShutdown.from_buffer_copy(vcpu.read_phys(SCRATCH, ctypes.sizeof(X.SchedShutdown)))
    assert op.reason == X.SHUTDOWN_suspend


# ---- FdoCreateInterfaces: each interface's provider module and what its context is built from -----------

PACKAGE = fdo_module.__package__


def _provider(monkeypatch: pytest.MonkeyPatch, module_name: str, cls: type) -> None:
    """A provider module `xenpv.stack.drivers.xenbus.<module_name>` holding `cls`."""
    module = types.ModuleType(f"{PACKAGE}.{module_name}")
    setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_an_interface_is_built_from_the_pool_and_its_own_defaults(rig, machine, monkeypatch) -> None:
    """Each parameter of the context's class comes from the FDO's pool by name; a parameter the pool lacks
    keeps its default; *args/**kwargs are skipped and the parameters after them still filled."""
    class Probe(Interface):
        NAME = "PROBE"

        def __init__(self, platform, *rest, kernel, depth=7, **more) -> None:  # type: ignore[no-untyped-def]
            super().__init__()
            self.platform, self.kernel, self.depth, self.rest, self.more = platform, kernel, depth, rest, more

    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    _provider(monkeypatch, "probe_iface", Probe)
    context = fdo._create_interface("PROBE", "probe_iface", {"platform": "P", "kernel": "K", "other": "O"})
    assert isinstance(context, Probe)
    assert (context.platform, context.kernel, context.depth, context.rest, context.more) == ("P", "K", 7, (), {})


def test_an_interface_whose_class_needs_what_the_fdo_lacks_is_absent(rig, machine, monkeypatch) -> None:
    class Needy(Interface):
        NAME = "NEEDY"

        def __init__(self, platform, balloon_target) -> None:  # type: ignore[no-untyped-def]
            super().__init__()

    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    _provider(monkeypatch, "needy_iface", Needy)
    assert fdo._create_interface("NEEDY", "needy_iface", {"platform": "P"}) is None
    assert any("needs 'balloon_target'" in line for line in fdo.driver.kernel.log.tail(50))


def test_a_missing_provider_is_absent_but_a_provider_that_fails_to_import_is_an_error(
        rig, machine, monkeypatch, tmp_path) -> None:
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    assert fdo._create_interface("BALLOON", "no_such_provider", {}) is None  # upstream: BALLOON not built
    assert any("no provider module" in line for line in fdo.driver.kernel.log.tail(50))
    # A provider that exists but whose own import fails is a bug in it, not an absent interface.
    monkeypatch.syspath_prepend(str(tmp_path))
    package = tmp_path / "xenpv_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "half_built.py").write_text("import xenpv_no_such_dependency\n")
    monkeypatch.setattr(fdo_module, "__package__", "xenpv_probe_pkg")
    with pytest.raises(ModuleNotFoundError, match="xenpv_no_such_dependency"):
        fdo._create_interface("HALF", "half_built", {})
    for name in [n for n in sys.modules if n.startswith("xenpv_probe_pkg")]:
        monkeypatch.delitem(sys.modules, name)


# ---- FdoStop: what a boot's end leaves in xenstore ------------------------------------------------------

@pytest.mark.parametrize("restart", [True, False], ids=["after-S5", "device-removed"])
def test_a_restart_keeps_control_feature_suspend_and_a_removal_takes_it(rig, machine, restart: bool) -> None:
    """After S5 Windows sends the FDO no D-IRP, so what __FdoD3ToD0 wrote stays in the store (the guest could
    not create control/feature-suspend again); an FDO stopped otherwise (removed, D0 -> D3) removes it."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    store = rig.platforms[-1].store
    assert store.values.get("control/feature-suspend") == b"1"
    fdo.system_power = S5 if restart else S0
    fdo.FdoStop()
    assert ("control/feature-suspend" in store.values) is restart
    assert fdo.platform is None and rig.platforms[-1].closed


# ---- FdoScan: a store without `device` -------------------------------------------------------------------

def test_a_store_without_device_has_no_classes_but_another_error_is_not_swallowed(rig, machine,
                                                                                   monkeypatch) -> None:
    """fdo.c FdoScan: XENBUS_STORE(Directory, "device") failing with ENOENT (a domain with no PV devices yet)
    is an empty list of classes; any other failure is not taken for one."""
    rig.xenstore_classes = []  # FakeStore.directory("device"): ENOENT
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    assert set(fdo.children) == {"CONS", "IFACE"}  # the synthetic classes only: no VBD, no VIF
    assert fdo.FdoScan() is False  # nothing to add, nothing to remove
    store = rig.platforms[-1].store

    def refused(path: str) -> list[str]:
        raise XenstoreError("directory", path, "EACCES")

    monkeypatch.setattr(store, "directory", refused)
    with pytest.raises(XenstoreError, match="EACCES"):
        fdo.FdoScan()


def test_the_suspend_context_gets_the_fdos_suspend_capture_and_unplug(rig, machine) -> None:
    """SUSPEND's context is built with the FDO's own suspend hypercall, its SyncCapture (no other thread in
    the store ring across the suspend) and xen.sys's UnplugDevices (re-issued on resume, as suspend.c does):
    an interface built without them would suspend with the store busy and resume with the emulated devices."""
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    suspend = fdo.interfaces["SUSPEND"]
    assert suspend.suspend_domain == fdo._suspend_domain
    assert suspend.sync_capture == fdo._sync_capture
    assert suspend.unplug_devices == fdo.driver.xen.unplug.UnplugDevices


def test_the_suspend_thread_never_waits_without_a_timeout(rig, machine, monkeypatch: pytest.MonkeyPatch) -> None:
    """XENBUS's suspend thread waits for a control/shutdown watch event with a period (the model's
    SUSPEND_THREAD_PERIOD), waking to see whether it was asked to stop or the processor halted: a wait
    without a timeout is endless on Windows, and the kernel model gives the processor up after
    WAIT_DEADLINE_SECONDS of it, so an idle guest would stop after a minute with no event at all."""
    waits: list[float | None] = []
    real = fdo_module.KeWaitForSingleObject

    def recording(event, timeout=None):  # type: ignore[no-untyped-def]
        if event.name == "XENBUS suspend":
            waits.append(timeout)
        return real(event, timeout)

    monkeypatch.setattr(fdo_module, "KeWaitForSingleObject", recording)
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    deadline = time.monotonic() + 10
    while not waits:
        assert time.monotonic() < deadline, "the suspend thread never waited for its event"
        time.sleep(0.01)
    assert fdo._suspend_thread is not None and fdo._suspend_thread.is_alive()
    assert all(t is not None and 0 < t <= 1 for t in waits), waits


def test_one_control_shutdown_event_is_one_round_of_the_suspend_thread(rig, machine) -> None:
    """fdo.c's suspend thread waits on Fdo->SuspendEvent, a SynchronizationEvent (auto-reset): the wait a
    control/shutdown watch event satisfies resets it, so FdoSuspend runs with the event clear and the thread
    then waits for the next event, instead of running FdoSuspend again and again on an event left set."""
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    still_set: list[bool] = []
    fdo.FdoSuspend = lambda: still_set.append(fdo._suspend_event.read_state())  # type: ignore[method-assign]
    fdo._suspend_event.set()                         # what the control/shutdown watch does
    deadline = time.monotonic() + 10
    while not still_set:
        assert time.monotonic() < deadline, "the event never ran FdoSuspend"
        time.sleep(0.005)
    assert still_set[0] is False


def test_a_suspend_request_is_acknowledged_triggered_and_counted_once(rig, machine, monkeypatch) -> None:
    """fdo.c FdoSuspend: in D0, control/shutdown = "suspend" is acknowledged (the key is emptied) and
    SUSPEND.Trigger runs; the model counts each suspend (the agent reports the count). Fault injection
    (ignore_suspend) is off by default: a booted guest answers, and another request value is left alone."""
    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    assert not fdo.ignore_suspend and fdo.suspends == 0
    triggered: list[int] = []
    monkeypatch.setattr(fdo.interfaces["SUSPEND"], "SuspendTrigger", lambda: triggered.append(1))
    monkeypatch.setattr(fdo.platform.vcpu.relocation, "report", lambda reason: None)
    store = fdo.platform.store
    store.write("control/shutdown", "reboot")
    with booted.kernel.cpu.lock:
        fdo.FdoSuspend()
    assert (triggered, fdo.suspends, store.read("control/shutdown")) == ([], 0, b"reboot")
    for n in (1, 2):
        store.write("control/shutdown", "suspend")
        with booted.kernel.cpu.lock:
            fdo.FdoSuspend()
        assert (len(triggered), fdo.suspends, store.read("control/shutdown")) == (n, n, b"")


def test_the_fdos_sync_capture_is_the_platform_stores(rig, machine, monkeypatch) -> None:
    """The model's SyncCapture (what SUSPEND holds across the suspend hypercall) is the xenstore ring's
    capture of the FDO's platform: no other guest thread inside the store ring meanwhile."""
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    capture = object()
    monkeypatch.setattr(fdo.platform.store, "held", lambda: capture)
    assert fdo._sync_capture() is capture


def test_a_scan_reports_a_change_when_a_class_vanishes_as_when_one_appears(rig, machine) -> None:
    """fdo.c FdoScan: a class gone from xenstore's device/ marks its PDO missing, and like a new class it is a
    change the FDO reports (IoInvalidateDeviceRelations follows), so the PnP manager removes the device."""
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    assert {"VBD", "VIF"} <= set(fdo.children)
    assert fdo.FdoScan() is False                    # nothing changed
    store = rig.platforms[-1].store
    store.classes.remove("vif")
    assert fdo.FdoScan() is True and "VIF" not in fdo.children
    assert fdo.FdoScan() is False
    store.classes.append("vif")
    assert fdo.FdoScan() is True and "VIF" in fdo.children


def test_d3_gives_back_control_feature_suspend_and_d0_acquires_what_it_can(rig, machine, monkeypatch) -> None:
    """fdo.c __FdoD0ToD3 removes control/feature-suspend (a D3 for S3/S4 or a removal; only FdoStop after S5
    keeps it) and FdoD3ToD0 writes it again. FdoD3ToD0 acquires its interfaces in order, passing over one
    the FDO lacks; a CONSOLE that fails to come up leaves ConsoleAcquired FALSE and D0 is reached, while any
    other interface failing fails D0 and gives back what was acquired. A scan waits for D0 (poll does
    nothing in D3)."""
    from xenpv.stack.drivers.xenbus.fdo import D0, D3, FDO_HELD_INTERFACES
    from xenpv.stack.kernel.status import STATUS_UNSUCCESSFUL

    booted = rig.boot(machine(0x0001))
    fdo = booted.xenbus.active_fdo
    store = rig.platforms[-1].store
    assert store.values.get("control/feature-suspend") == b"1"
    assert fdo._held == list(FDO_HELD_INTERFACES)

    def cycle(**failing: int) -> int:
        with booted.kernel.cpu.lock:
            fdo.FdoD0ToD3()
            assert fdo.device_power == D3 and fdo._held == []
            assert "control/feature-suspend" not in store.values
            for name, status in failing.items():
                monkeypatch.setattr(fdo.interfaces[name], "acquire", lambda status=status: status)
            try:
                return fdo.FdoD3ToD0()
            finally:
                monkeypatch.undo()

    # In D3 the scan waits: a class that vanished meanwhile is not acted on.
    with booted.kernel.cpu.lock:
        fdo.FdoD0ToD3()
    store.classes.remove("vif")
    fdo._scan_event.set()
    fdo.poll()
    assert "VIF" in fdo.children
    with booted.kernel.cpu.lock:
        assert fdo.FdoD3ToD0() == STATUS_SUCCESS
    assert fdo.device_power == D0 and store.values.get("control/feature-suspend") == b"1"

    assert cycle(CONSOLE=STATUS_UNSUCCESSFUL) == STATUS_SUCCESS
    assert fdo.device_power == D0 and fdo._held == [n for n in FDO_HELD_INTERFACES if n != "CONSOLE"]
    assert cycle(STORE=STATUS_UNSUCCESSFUL) == STATUS_UNSUCCESSFUL
    assert fdo._held == []
    range_set = fdo.interfaces.pop("RANGE_SET")
    try:
        with booted.kernel.cpu.lock:
            assert fdo.FdoD3ToD0() == STATUS_SUCCESS
        assert fdo._held == [n for n in FDO_HELD_INTERFACES if n != "RANGE_SET"]
    finally:
        fdo.interfaces["RANGE_SET"] = range_set
