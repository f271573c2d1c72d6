"""Deadlines of the kernel model: a STOP only from a modelled rule, never from the harness's own timing.

A wait Windows would never end gives up with HarnessTooSlow (no STOP); a give-up on any thread stops the
processor like a crash does, without one; the power manager's 0x9F stays, on a deadline scaled by
XENPV_TIME_SCALE like every other."""
from __future__ import annotations

import threading

import pytest

from xenpv.base.errors import ConfigError
from xenpv.stack.kernel import S4, BugCheck, BugCheckCode, KEvent, KeBugCheckEx, KeWaitForSingleObject
from xenpv.stack.kernel import event as event_module
from xenpv.stack.kernel.irql import Processor
from xenpv.stack.kernel.status import STATUS_SUCCESS
from xenpv.stack.timescale import TIME_SCALE_ENV, HarnessTooSlow, scaled, time_scale

from .test_power import three_levels
from .toydrivers import World


@pytest.mark.parametrize("raw, factor", [("", 1.0), ("1", 1.0), (" 2.5 ", 2.5), ("10", 10.0)])
def test_the_time_scale(raw: str, factor: float) -> None:
    assert time_scale({TIME_SCALE_ENV: raw}) == factor
    assert time_scale({}) == 1.0


@pytest.mark.parametrize("raw", ["0.5", "0", "-2", "fast", "nan", "inf", "1e400"])
def test_an_unusable_time_scale_is_a_config_error_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"{TIME_SCALE_ENV}={raw!r}"):
        time_scale({TIME_SCALE_ENV: raw})


def test_scaled_reads_the_environment_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIME_SCALE_ENV, "3")
    assert scaled(2.0) == 6.0
    monkeypatch.delenv(TIME_SCALE_ENV)
    assert scaled(2.0) == 2.0


def test_an_endless_wait_past_its_deadline_is_the_harness_too_slow_not_a_stop(
        cpu: Processor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_module, "WAIT_DEADLINE_SECONDS", 0.05)
    monkeypatch.setenv(TIME_SCALE_ENV, "2")
    never_set = KEvent("reply")
    with cpu.lock:
        with pytest.raises(HarnessTooSlow) as too_slow:
            KeWaitForSingleObject(never_set)
        assert cpu.lock.owned()
    assert too_slow.value.seconds == pytest.approx(0.1)  # the deadline, scaled
    assert "harness too slow: KEVENT(reply) not set" in str(too_slow.value)
    assert cpu.crashed is None


def test_an_endless_wait_gets_the_scaled_deadline(cpu: Processor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_module, "WAIT_DEADLINE_SECONDS", 0.05)
    monkeypatch.setenv(TIME_SCALE_ENV, "400")  # 20 s
    late = KEvent("set late")
    setter = threading.Timer(0.3, late.set)
    with cpu.lock:
        setter.start()
        assert KeWaitForSingleObject(late) == STATUS_SUCCESS
    setter.join()


def test_a_give_up_on_another_thread_wakes_the_waiter_and_stops_the_processor(cpu: Processor) -> None:
    too_slow = HarnessTooSlow("no reply from xenstored to READ device/vbd", 5.0)
    response = KEvent("response")
    giver = threading.Timer(0.1, cpu.give_up, args=(too_slow,))
    with cpu.lock:
        giver.start()
        with pytest.raises(HarnessTooSlow) as woken:
            KeWaitForSingleObject(response, 30.0)
    giver.join()
    assert woken.value is too_slow and cpu.too_slow is too_slow and cpu.crashed is None
    got: list[BaseException] = []

    def other_thread() -> None:
        try:
            with cpu.lock:
                got.append(AssertionError("driver code ran after the harness gave up"))
        except HarnessTooSlow as exc:
            got.append(exc)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(5)
    assert got == [too_slow]
    # A STOP after the give-up is not evidence of anything: the first reason stands.
    with pytest.raises(HarnessTooSlow):
        KeBugCheckEx(BugCheckCode.MANUALLY_INITIATED_CRASH)
    assert cpu.crashed is None
    cpu.give_up(HarnessTooSlow("a second one", 1.0))
    assert cpu.too_slow is too_slow


def test_a_give_up_after_a_stop_keeps_the_stop(cpu: Processor) -> None:
    with pytest.raises(BugCheck) as stop:
        KeBugCheckEx(BugCheckCode.MANUALLY_INITIATED_CRASH)
    cpu.give_up(HarnessTooSlow("late", 1.0))
    assert cpu.too_slow is None and cpu.halted is stop.value


def test_the_power_irp_watchdog_stays_a_0x9f_on_a_scaled_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIME_SCALE_ENV, "4")
    kernel = three_levels(World(hold_set_power={r"TOYBUS\DEV_MID"}), timeout=0.05)
    with pytest.raises(BugCheck) as stop:
        kernel.power.set_system_state(S4)
    assert stop.value.code == BugCheckCode.DRIVER_POWER_STATE_FAILURE
    assert stop.value.message.endswith("within 0.2s")
