from __future__ import annotations

import pytest

from xenpv.stack.kernel.bugcheck import BugCheck, BugCheckCode, KeBugCheckEx
from xenpv.stack.kernel.irql import (DISPATCH_LEVEL, HIGH_LEVEL, PASSIVE_LEVEL, KeAcquireSpinLock,
                               KeAcquireSpinLockAtDpcLevel, KeGetCurrentIrql, KeLowerIrql, KeRaiseIrql,
                               KeReleaseSpinLock, KSpinLock, Processor, assert_passive)


def test_raise_and_lower_restore_the_level() -> None:
    old = KeRaiseIrql(DISPATCH_LEVEL)
    assert (old, KeGetCurrentIrql()) == (PASSIVE_LEVEL, DISPATCH_LEVEL)
    KeLowerIrql(old)
    assert KeGetCurrentIrql() == PASSIVE_LEVEL


def test_raising_to_a_lower_level_is_irql_not_greater_or_equal() -> None:
    KeRaiseIrql(DISPATCH_LEVEL)
    with pytest.raises(BugCheck) as stop:
        KeRaiseIrql(PASSIVE_LEVEL)
    assert stop.value.code == BugCheckCode.IRQL_NOT_GREATER_OR_EQUAL == 0x9
    assert stop.value.params[:2] == (DISPATCH_LEVEL, PASSIVE_LEVEL)


def test_lowering_to_a_higher_level_is_irql_not_less_or_equal() -> None:
    with pytest.raises(BugCheck) as stop:
        KeLowerIrql(DISPATCH_LEVEL)
    assert stop.value.code == BugCheckCode.IRQL_NOT_LESS_OR_EQUAL == 0xA


def test_bugcheck_is_not_an_exception_and_the_first_one_wins(cpu: Processor) -> None:
    assert not issubclass(BugCheck, Exception)
    with pytest.raises(BugCheck) as first:
        KeBugCheckEx(BugCheckCode.INACCESSIBLE_BOOT_DEVICE, 1, 2, 3, 4)
    assert cpu.irql == HIGH_LEVEL
    with pytest.raises(BugCheck) as second:
        KeBugCheckEx(BugCheckCode.MANUALLY_INITIATED_CRASH)
    assert second.value is first.value
    assert first.value.params == (1, 2, 3, 4) and first.value.module == "ntoskrnl.exe"


def test_spin_lock_raises_to_dispatch_and_release_restores() -> None:
    lock = KSpinLock("test")
    old = KeAcquireSpinLock(lock)
    assert KeGetCurrentIrql() == DISPATCH_LEVEL and old == PASSIVE_LEVEL
    KeReleaseSpinLock(lock, old)
    assert KeGetCurrentIrql() == PASSIVE_LEVEL and lock.owner is None
    with lock.held() as held_old:
        assert held_old == PASSIVE_LEVEL and KeGetCurrentIrql() == DISPATCH_LEVEL
    assert KeGetCurrentIrql() == PASSIVE_LEVEL


def test_acquiring_a_spin_lock_twice_is_spin_lock_already_owned() -> None:
    lock = KSpinLock("twice")
    KeAcquireSpinLock(lock)
    with pytest.raises(BugCheck) as stop:
        KeAcquireSpinLockAtDpcLevel(lock)
    assert stop.value.code == BugCheckCode.SPIN_LOCK_ALREADY_OWNED == 0xF
    assert stop.value.params[0] == lock.address


def test_releasing_an_unowned_spin_lock_is_spin_lock_not_owned() -> None:
    with pytest.raises(BugCheck) as stop:
        KeReleaseSpinLock(KSpinLock("free"), PASSIVE_LEVEL)
    assert stop.value.code == BugCheckCode.SPIN_LOCK_NOT_OWNED


def test_spin_lock_at_high_level_is_irql_not_greater_or_equal() -> None:
    KeRaiseIrql(HIGH_LEVEL)
    with pytest.raises(BugCheck) as stop:
        KeAcquireSpinLock(KSpinLock("isr"))
    assert stop.value.code == BugCheckCode.IRQL_NOT_GREATER_OR_EQUAL


def test_passive_only_operation_from_a_driver_is_driver_irql_not_less_or_equal(cpu: Processor) -> None:
    assert_passive("ZwOpenKey")  # fine at PASSIVE
    KeRaiseIrql(DISPATCH_LEVEL)
    with cpu.running_as("xenvif.sys"), pytest.raises(BugCheck) as stop:
        assert_passive("ZwOpenKey")
    assert stop.value.code == BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL == 0xD1
    assert stop.value.module == "xenvif.sys"
    assert stop.value.params[1] == DISPATCH_LEVEL and stop.value.param_notes[0] == "ZwOpenKey"


def test_passive_only_operation_from_the_kernel_is_irql_not_less_or_equal() -> None:
    KeRaiseIrql(DISPATCH_LEVEL)
    with pytest.raises(BugCheck) as stop:
        assert_passive("MmPageEntireDriver")
    assert stop.value.code == BugCheckCode.IRQL_NOT_LESS_OR_EQUAL
