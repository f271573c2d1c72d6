"""An exception leaving an ISR or a DPC is the STOP Windows gives it (KMODE_EXCEPTION_NOT_HANDLED, blamed
on the driver it came from), never an IRQL left raised for the next thread that owns the CPU (which used to
stop the guest with a false 0xD1 blamed on whoever waited next). A crash on the interrupt thread reaches
the main thread at once; a thread of the model that is stopped is waited for with the kernel lock given
away, and one that does not stop is the harness's error."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from xenpv.base.errors import WaitTimeout
from xenpv.stack.kernel import (DISPATCH_LEVEL, PASSIVE_LEVEL, BugCheck, BugCheckCode, IoConnectInterrupt, KEvent,
                                KeGetCurrentIrql, KeInitializeDpc, KeInsertQueueDpc, KeLowerIrql, KeRaiseIrql,
                                KeWaitForSingleObject, Processor)
from xenpv.stack.kernel.bugcheck import _DRIVERS_DIR
from xenpv.stack.kernel.event import wait_for_thread
from xenpv.stack.kernel.irql import KernelModelError


def _failing(_dpc: Any, _context: Any, _a1: Any, _a2: Any) -> None:
    raise ValueError("ring released")


def test_an_exception_in_a_dpc_stops_with_kmode_exception_not_handled(cpu: Processor) -> None:
    dpc = KeInitializeDpc(_failing, module="xenvif.sys")
    with pytest.raises(BugCheck) as stop:
        KeInsertQueueDpc(dpc)  # at PASSIVE_LEVEL: runs at once
    assert stop.value.code == BugCheckCode.KMODE_EXCEPTION_NOT_HANDLED == 0x1E
    assert stop.value.module == "xenvif.sys"
    assert stop.value.param_notes[0] == "ValueError: ring released"
    assert "_failing" in stop.value.param_notes[1]
    assert stop.value.irql == DISPATCH_LEVEL  # where it happened
    assert isinstance(stop.value.__context__, ValueError)  # the dump's traceback shows the original
    assert cpu.crashed is stop.value


def test_an_exception_in_an_isr_stops_with_kmode_exception_not_handled() -> None:
    def isr(_interrupt: Any, _context: Any) -> bool:
        raise KeyError("port 7")

    interrupt = IoConnectInterrupt(isr, module="xenbus.sys")
    with pytest.raises(BugCheck) as stop:
        interrupt.fire()
    assert stop.value.code == BugCheckCode.KMODE_EXCEPTION_NOT_HANDLED
    assert stop.value.module == "xenbus.sys" and stop.value.param_notes[0] == "KeyError: 'port 7'"


def test_the_culprit_is_the_innermost_driver_frame() -> None:
    # A routine of xenbus.sys's DPC calls into code of xenvif.sys that raises: Windows names the module of
    # the faulting address. (The function is compiled as if it lived under stack/drivers/xenvif/.)
    namespace: dict[str, Any] = {}
    exec(compile("def reap():\n    raise IndexError('slot 300')\n",
                 os.path.join(_DRIVERS_DIR, "xenvif", "frontend.py"), "exec"), namespace)
    dpc = KeInitializeDpc(lambda *_: namespace["reap"](), module="xenbus.sys")
    with pytest.raises(BugCheck) as stop:
        KeInsertQueueDpc(dpc)
    assert stop.value.module == "xenvif.sys"


def test_a_failed_dpc_on_the_interrupt_thread_stops_the_waiter_with_that_bugcheck(cpu: Processor) -> None:
    """The false-0xD1 case: the line thread's DPC fails while the main thread waits for it."""
    dpc = KeInitializeDpc(_failing, module="xenvif.sys")
    interrupt = IoConnectInterrupt(lambda i, c: KeInsertQueueDpc(dpc) or True, module="xenbus.sys")
    line_outcome: list[BaseException] = []

    def line() -> None:
        try:
            interrupt.fire()
        except BaseException as exc:  # noqa: BLE001 - checked below
            line_outcome.append(exc)

    never_set = KEvent("response")
    with cpu.lock:
        line_thread = threading.Thread(target=line)
        line_thread.start()
        started = time.monotonic()
        with pytest.raises(BugCheck) as stop:
            KeWaitForSingleObject(never_set)  # gives the CPU to the line; bounded by WAIT_DEADLINE_SECONDS
        waited = time.monotonic() - started
    line_thread.join(5)
    assert stop.value.code == BugCheckCode.KMODE_EXCEPTION_NOT_HANDLED and stop.value.module == "xenvif.sys"
    assert line_outcome == [stop.value]
    assert waited < 30, "the waiter was not woken by the crash"


def test_a_stopped_processor_runs_no_more_code(cpu: Processor) -> None:
    with pytest.raises(BugCheck) as stop:
        KeInsertQueueDpc(KeInitializeDpc(_failing, module="xenvif.sys"))
    got: list[BaseException] = []

    def other_thread() -> None:
        try:
            with cpu.lock:
                got.append(AssertionError("driver code ran on a stopped CPU"))
        except BugCheck as exc:
            got.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(5)
    assert got == [stop.value]


def test_an_irql_changed_across_a_wait_is_a_model_error_not_a_stop(cpu: Processor) -> None:
    set_later = KEvent("set by the other thread")

    def misbehaving_model_thread() -> None:
        with cpu.lock:
            KeRaiseIrql(DISPATCH_LEVEL)  # and never lowered: a model bug, not a driver's
            set_later.set()

    with cpu.lock:
        thread = threading.Thread(target=misbehaving_model_thread)
        thread.start()
        with pytest.raises(KernelModelError, match="another thread of the model left the CPU at DISPATCH_LEVEL"):
            KeWaitForSingleObject(set_later, 5.0)
        assert KeGetCurrentIrql() == PASSIVE_LEVEL  # the waiter's IRQL is put back
    thread.join(5)
    assert cpu.crashed is None


def test_wait_for_thread_gives_the_kernel_lock_away(cpu: Processor) -> None:
    ran = threading.Event()

    def needs_the_cpu() -> None:
        with cpu.lock:
            ran.set()

    with cpu.lock:
        thread = threading.Thread(target=needs_the_cpu)
        thread.start()
        wait_for_thread(thread, "test", timeout=5)
        assert cpu.lock.owned()
    assert ran.is_set() and not thread.is_alive()


def test_wait_for_a_thread_that_does_not_stop_is_the_harness_error(cpu: Processor) -> None:
    gate = threading.Event()
    thread = threading.Thread(target=gate.wait, args=(10,), name="stuck")
    thread.start()
    with cpu.lock:
        with pytest.raises(WaitTimeout, match="test teardown: thread stuck still running"):
            wait_for_thread(thread, "test teardown", timeout=0.2)
        assert cpu.lock.owned()
    gate.set()
    thread.join(5)
    assert cpu.crashed is None


def test_a_thread_that_runs_while_another_waits_at_dispatch_starts_at_passive(cpu: Processor) -> None:
    """The model's own joins (wait_for_thread) may run at DISPATCH_LEVEL (a STORE or EVTCHN teardown under a
    spin lock); the thread that gets the CPU meanwhile is another thread and runs at its own IRQL. It used
    to inherit DISPATCH_LEVEL and stop with a false 0xD1 in its first KeWaitForSingleObject (seen under load
    in the XENBUS suspend thread)."""
    seen: list[object] = []

    def other_thread() -> None:
        try:
            with cpu.lock:
                seen.append(KeGetCurrentIrql())
                KeWaitForSingleObject(KEvent("never set"), 0.01)  # legal at PASSIVE_LEVEL
                seen.append("waited")
        except BaseException as exc:  # noqa: BLE001 - the test reports whatever it was
            seen.append(exc)

    with cpu.lock:
        old = KeRaiseIrql(DISPATCH_LEVEL)
        thread = threading.Thread(target=other_thread)
        thread.start()
        wait_for_thread(thread, "the other thread", timeout=10)
        assert KeGetCurrentIrql() == DISPATCH_LEVEL  # the waiter's own IRQL is back
        KeLowerIrql(old)
    assert seen == [PASSIVE_LEVEL, "waited"]
    assert cpu.crashed is None


def test_a_waiter_woken_by_a_stop_leaves_the_cpu_at_high_level(cpu: Processor) -> None:
    """A STOP wakes every waiter, which raises it; taking the CPU back must not put the waiter's own IRQL
    over the STOP's HIGH_LEVEL while the bugcheck callbacks run (XENBUS's debug callback then stopped on
    'BUG: DEBUG CALLBACKS BELOW HIGH_LEVEL')."""
    from xenpv.stack.kernel import HIGH_LEVEL, KeBugCheckEx

    waiting = threading.Event()
    seen: list[BaseException] = []

    def waiter() -> None:
        try:
            with cpu.lock:
                waiting.set()
                KeWaitForSingleObject(KEvent("never set"), 10.0)
        except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
            seen.append(exc)

    thread = threading.Thread(target=waiter)
    thread.start()
    assert waiting.wait(5)
    with pytest.raises(BugCheck) as stop:
        KeBugCheckEx(BugCheckCode.MANUALLY_INITIATED_CRASH)
    thread.join(5)
    assert seen == [stop.value]
    assert cpu.irql == HIGH_LEVEL
