from __future__ import annotations

import pytest

from xenpv.stack.kernel.bugcheck import BugCheck, BugCheckCode, KeBugCheckEx
from xenpv.stack.kernel.debuglog import current_log
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, HIGH_LEVEL, PASSIVE_LEVEL, KeGetCurrentIrql, KeRaiseIrql
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_EARLY, SUSPEND_CALLBACK_LATE, SuspendInterface

from .stack_of import interfaces, table_of


def test_debug_callbacks_run_at_high_level_and_print_with_their_prefix(platform, cpu) -> None:
    debug = table_of(interfaces(platform).debug)
    assert debug.DebugAcquire() == STATUS_SUCCESS
    seen: list[tuple[int, bool]] = []

    def dump(arg: str, crashing: bool) -> None:
        seen.append((KeGetCurrentIrql(), crashing))
        debug.DebugPrintf("state of %s", arg)

    status, cb = debug.DebugRegister("XENVIF|FRONTEND", dump, "vif0")
    assert status == STATUS_SUCCESS
    debug.DebugTrigger(cb)
    debug.DebugTrigger(None)
    assert seen == [(HIGH_LEVEL, False)] * 2 and KeGetCurrentIrql() == PASSIVE_LEVEL
    assert any("XENVIF|FRONTEND|dump: state of vif0" in line for line in current_log().tail(10))
    debug.DebugDeregister(cb)
    debug.DebugRelease()
    assert cpu.bugcheck_callbacks == []


def test_debug_printf_outside_a_callback_prints_with_a_null_prefix_in_a_free_build(platform) -> None:
    """debug.c DebugPrintf: ASSERT(Context->CallbackPrefix != NULL), compiled out of a free build (the
    checked build's stop: test_checked_build.py)."""
    debug = table_of(interfaces(platform).debug)
    debug.DebugAcquire()
    debug.DebugPrintf("no")
    assert any("(null)|" in line and line.endswith(": no") for line in current_log().tail(5))
    debug.DebugRelease()


def test_a_crash_runs_the_debug_callbacks_into_the_log(platform, cpu) -> None:
    debug = table_of(interfaces(platform).debug)
    debug.DebugAcquire()
    crashing: list[bool] = []
    debug.DebugRegister("XENVBD|TARGET", lambda _a, c: (crashing.append(c), debug.DebugPrintf("ring busy")), None)
    with pytest.raises(BugCheck):
        KeBugCheckEx(BugCheckCode.MANUALLY_INITIATED_CRASH)
    assert crashing == [True]
    assert any("XENVBD|TARGET|<lambda>: ring busy" in line for line in current_log().tail(10))


def test_debug_release_with_live_callbacks_is_outstanding_callbacks(platform) -> None:
    debug = table_of(interfaces(platform).debug)
    debug.DebugAcquire()
    debug.DebugRegister("X", lambda _a, _c: None, None)
    with pytest.raises(BugCheck) as stop:
        debug.DebugRelease()
    assert stop.value.message == "BUG: OUTSTANDING CALLBACKS"


def test_suspend_trigger_runs_early_at_high_then_late_at_dispatch_in_order(platform) -> None:
    ifs = interfaces(platform)
    suspend = table_of(ifs.suspend)
    assert suspend.SuspendAcquire() == STATUS_SUCCESS
    assert ifs.debug.references == 1  # SUSPEND's Acquire acquires DEBUG
    order: list[tuple[str, int]] = []
    callbacks = [suspend.SuspendRegister(kind, lambda name: order.append((name, KeGetCurrentIrql())), name)[1]
                 for kind, name in ((SUSPEND_CALLBACK_LATE, "late1"), (SUSPEND_CALLBACK_EARLY, "early1"),
                                    (SUSPEND_CALLBACK_LATE, "late2"), (SUSPEND_CALLBACK_EARLY, "early2"))]
    # suspend.c SuspendRegister: an unknown type is ASSERT(FALSE); a free build succeeds with a callback
    # on neither list (test_checked_build.py has the checked build's stop).
    status, stray = suspend.SuspendRegister(3, lambda _a: order.append(("stray", 0)), None)
    assert status == STATUS_SUCCESS and stray is not None
    assert suspend.SuspendGetCount() == 0
    assert suspend.SuspendTrigger() == STATUS_SUCCESS
    assert order == [("early1", HIGH_LEVEL), ("early2", HIGH_LEVEL), ("late1", DISPATCH_LEVEL),
                     ("late2", DISPATCH_LEVEL)]
    assert suspend.SuspendGetCount() == 1 and KeGetCurrentIrql() == PASSIVE_LEVEL
    for cb in callbacks:
        suspend.SuspendDeregister(cb)
    suspend.SuspendRelease()
    assert ifs.debug.references == 0


def test_suspend_trigger_is_passive_only_and_a_failed_hypercall_runs_nothing(platform) -> None:
    ifs = interfaces(platform)
    failing = SuspendInterface(ifs.debug, lambda: STATUS_UNSUCCESSFUL)
    tbl = table_of(failing)
    tbl.SuspendAcquire()
    ran: list[int] = []
    tbl.SuspendRegister(SUSPEND_CALLBACK_EARLY, ran.append, 1)
    # suspend.c: Trigger returns STATUS_SUCCESS whatever the hypercall did; a failed one runs no callback.
    assert tbl.SuspendTrigger() == STATUS_SUCCESS and ran == [] and tbl.SuspendGetCount() == 0
    KeRaiseIrql(DISPATCH_LEVEL)
    with pytest.raises(BugCheck) as stop:
        tbl.SuspendTrigger()
    assert stop.value.code == BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL


def test_suspend_release_with_callbacks_is_a_bug(platform) -> None:
    suspend = table_of(interfaces(platform).suspend)
    suspend.SuspendAcquire()
    suspend.SuspendRegister(SUSPEND_CALLBACK_LATE, lambda _a: None, None)
    with pytest.raises(BugCheck) as stop:
        suspend.SuspendRelease()
    assert stop.value.message == "BUG: OUTSTANDING CALLBACKS"
