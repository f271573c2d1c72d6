"""The memory rules of stack.kernel.pool and the wait-block rule of KeWaitForMultipleObjects: each invalid
access or pool call stops with the code, parameters and culprit Windows gives it, and valid ones pass."""
from __future__ import annotations

import pytest

from xenpv.stack.kernel.bugcheck import BugCheck
from xenpv.stack.kernel.event import (MAXIMUM_WAIT_OBJECTS_EXCEEDED, THREAD_WAIT_OBJECTS, WAIT_ALL, WAIT_ANY, KEvent,
                                      KeWaitForMultipleObjects)
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, HIGH_LEVEL, KeLowerIrql, KeRaiseIrql, Processor
from xenpv.stack.kernel.pool import (MM_SYSTEM_RANGE_START, POOL_TYPE, STATUS_ACCESS_VIOLATION, CodePage,
                                     ExAllocatePoolWithTag, ExFreePoolWithTag, MmAccess, MmAccessElement,
                                     MmExecute, pool_tag)
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_TIMEOUT

TAG = pool_tag("Test")


def _stop(cpu: Processor, call, *args, module: str = "toy.sys", **kwargs) -> BugCheck:
    with cpu.running_as(module), pytest.raises(BugCheck) as stop:
        call(*args, **kwargs)
    return stop.value


def test_valid_accesses_return_what_they_touched() -> None:
    block = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 16, TAG, contents=["a", "b"])
    assert MmAccess(block, "Field") is block
    assert MmAccessElement(block, 1, 8, "Array") == "b"
    page = CodePage("hypercall page", populated=True)
    MmExecute(page, 32, "xen_version")
    ExFreePoolWithTag(block, TAG)
    assert block.freed and block.contents is None


def test_null_read_below_dispatch_is_an_unhandled_access_violation(cpu: Processor) -> None:
    stop = _stop(cpu, MmAccess, None, "ListEntry")
    assert (stop.code, stop.params[0], stop.module) == (0x7E, STATUS_ACCESS_VIOLATION, "toy.sys")
    assert "NULL->ListEntry" in stop.message


@pytest.mark.parametrize("module, code", [("toy.sys", 0xD1), ("ntoskrnl.exe", 0x0A)])
def test_null_read_at_dispatch_is_irql_not_less_or_equal(cpu: Processor, module: str, code: int) -> None:
    KeRaiseIrql(DISPATCH_LEVEL)
    stop = _stop(cpu, MmAccess, None, "Count", module=module, write=True)
    assert (stop.code, stop.params[:3], stop.module) == (code, (0, DISPATCH_LEVEL, 1), module)


@pytest.mark.parametrize("irql", [0, DISPATCH_LEVEL])
def test_freed_pool_is_special_pool_at_any_irql(cpu: Processor, irql: int) -> None:
    block = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 8, TAG)
    ExFreePoolWithTag(block, TAG)
    if irql:
        KeRaiseIrql(irql)
    stop = _stop(cpu, MmAccess, block, "Next")
    assert (stop.code, stop.params[:2]) == (0xD5, (block.address, 0))
    assert "freed pool" in stop.message


def test_index_far_beyond_an_array_is_a_fault_in_nonpaged_area(cpu: Processor) -> None:
    block = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 16, TAG, contents=[1, 2])
    stop = _stop(cpu, MmAccessElement, block, 0xFFFFFFFE, 8, "Ring")
    assert (stop.code, stop.params[0]) == (0x50, (block.address + 0xFFFFFFFE * 8) & (2**64 - 1))


def test_index_beyond_an_array_at_dispatch_is_d1(cpu: Processor) -> None:
    block = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 16, TAG, contents=[1, 2])
    KeRaiseIrql(DISPATCH_LEVEL)
    assert _stop(cpu, MmAccessElement, block, 2, 8, "Ring").code == 0xD1


def test_a_call_into_an_unpopulated_code_page_faults(cpu: Processor) -> None:
    stop = _stop(cpu, MmExecute, CodePage("hypercall page"), 17 * 32, "xen_version")
    assert (stop.code, stop.params[0]) == (0x7E, STATUS_ACCESS_VIOLATION)
    assert "holds no code" in stop.message


def test_free_of_null_is_bad_pool_caller_0x40(cpu: Processor) -> None:
    stop = _stop(cpu, ExFreePoolWithTag, None, TAG)
    assert (stop.code, stop.params[:3], stop.module) == (0xC2, (0x40, 0, MM_SYSTEM_RANGE_START), "toy.sys")


def test_free_with_another_tag_is_bad_pool_caller_0x0a(cpu: Processor) -> None:
    block = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 8, TAG)
    assert _stop(cpu, ExFreePoolWithTag, block, pool_tag("Othr")).params[:4] == (0x0A, block.address, TAG,
                                                                                  pool_tag("Othr"))


def test_double_free_is_bad_pool_caller_0x07(cpu: Processor) -> None:
    block = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 8, TAG)
    ExFreePoolWithTag(block, TAG)
    stop = _stop(cpu, ExFreePoolWithTag, block, TAG)
    assert (stop.code, stop.params[0], stop.params[3]) == (0xC2, 0x07, block.address)


@pytest.mark.parametrize("pool_type, irql", [(POOL_TYPE.NonPagedPool, HIGH_LEVEL), (POOL_TYPE.PagedPool, DISPATCH_LEVEL)])
def test_pool_above_its_irql_is_bad_pool_caller(cpu: Processor, pool_type: POOL_TYPE, irql: int) -> None:
    block = ExAllocatePoolWithTag(pool_type, 8, TAG)
    KeRaiseIrql(irql)
    stop = _stop(cpu, ExFreePoolWithTag, block, TAG)
    assert (stop.code, stop.params[:3]) == (0xC2, (0x09, irql, int(pool_type)))


def test_allocation_above_its_irql_is_bad_pool_caller(cpu: Processor) -> None:
    KeRaiseIrql(DISPATCH_LEVEL)
    stop = _stop(cpu, ExAllocatePoolWithTag, POOL_TYPE.PagedPool, 64, TAG)
    assert (stop.code, stop.params) == (0xC2, (0x08, DISPATCH_LEVEL, int(POOL_TYPE.PagedPool), 64))


def test_nonpaged_pool_at_dispatch_is_fine() -> None:
    old = KeRaiseIrql(DISPATCH_LEVEL)
    ExFreePoolWithTag(ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, 8, TAG), TAG)
    KeLowerIrql(old)


def test_more_wait_objects_than_the_thread_has_blocks_need_an_array(cpu: Processor) -> None:
    events = [KEvent(f"e{i}", signaled=True) for i in range(THREAD_WAIT_OBJECTS + 1)]
    assert KeWaitForMultipleObjects(events[:THREAD_WAIT_OBJECTS], WAIT_ALL) == STATUS_SUCCESS
    assert KeWaitForMultipleObjects(events, WAIT_ALL, wait_block_array=[object()] * len(events)) == STATUS_SUCCESS
    stop = _stop(cpu, KeWaitForMultipleObjects, events, WAIT_ALL)
    assert (stop.code, stop.module) == (MAXIMUM_WAIT_OBJECTS_EXCEEDED, "toy.sys")


def test_wait_any_returns_the_index_of_the_signalled_object() -> None:
    events = [KEvent("a"), KEvent("b", signaled=True)]
    assert KeWaitForMultipleObjects(events, WAIT_ANY) == STATUS_SUCCESS + 1
    assert KeWaitForMultipleObjects([KEvent("c")], WAIT_ANY, timeout=0.02) == STATUS_TIMEOUT
