"""Seeded scheduling of deferred work (stack.kernel.schedule): with a scheduler the processor drains queued
DPCs, and pending interrupts of one level, in an order drawn from the seed; the same seed takes the same
order and leaves the same trace digest, another seed another order; without one, DPCs run first in, first
out. Every DPC still runs once, at DISPATCH_LEVEL."""
from __future__ import annotations

from typing import Any

from xenpv.stack.kernel import DISPATCH_LEVEL, PASSIVE_LEVEL, KeInitializeDpc, KeInsertQueueDpc, KeLowerIrql, KeRaiseIrql
from xenpv.stack.kernel.irql import DIRQL, Processor, set_current_processor
from xenpv.stack.kernel.schedule import Scheduler, summary


def drain(scheduler: Scheduler | None, count: int = 8) -> tuple[list[int], dict[str, Any]]:
    """Queue `count` DPCs at DISPATCH_LEVEL, drop to PASSIVE: the order they ran in."""
    cpu = Processor(scheduler=scheduler)
    previous = set_current_processor(cpu)
    ran: list[tuple[int, int]] = []
    try:
        old = KeRaiseIrql(DISPATCH_LEVEL)
        for n in range(count):
            KeInsertQueueDpc(KeInitializeDpc(lambda _d, ctx, _a, _b: ran.append((ctx, cpu.irql)), n, module="x.sys"))
        KeLowerIrql(old)
    finally:
        set_current_processor(previous)
    assert all(irql == DISPATCH_LEVEL for _, irql in ran) and cpu.irql == PASSIVE_LEVEL
    return [n for n, _ in ran], summary(scheduler)


def test_without_a_scheduler_dpcs_run_first_in_first_out() -> None:
    order, info = drain(None)
    assert order == list(range(8)) and info == {"mode": "os"}


def test_a_seed_draws_one_order_every_time_and_another_seed_another() -> None:
    first, info1 = drain(Scheduler(7))
    again, info2 = drain(Scheduler(7))
    assert first == again and info1 == info2
    assert sorted(first) == list(range(8)) and first != list(range(8))
    assert info1["decisions"] == 7 and info1["seed"] == 7  # the last DPC is no choice
    others = {tuple(drain(Scheduler(seed))[0]) for seed in range(8, 14)}
    assert len(others) > 1 and any(o != tuple(first) for o in others)
    assert drain(Scheduler(8))[1]["trace"] != info1["trace"]


class Line:
    def __init__(self, n: int, seen: list[int]) -> None:
        self.n, self.seen = n, seen

    def deliver(self, cpu: Processor) -> None:
        self.seen.append(self.n)


def test_pending_interrupts_of_one_level_are_drawn_and_higher_levels_still_go_first() -> None:
    def run(scheduler: Scheduler | None) -> list[int]:
        cpu = Processor(scheduler=scheduler, irql=15)
        seen: list[int] = []
        for n in range(6):
            cpu.request_interrupt(DIRQL, Line(n, seen))
        cpu.request_interrupt(DIRQL + 1, Line(99, seen))
        cpu.irql = PASSIVE_LEVEL
        cpu.deliver_pending()
        return seen

    assert run(None) == [99, 0, 1, 2, 3, 4, 5]
    seeded = run(Scheduler(3))
    assert seeded[0] == 99 and sorted(seeded[1:]) == list(range(6)) and seeded == run(Scheduler(3))
    assert seeded[1:] != list(range(6))


def test_order_draws_a_batch_in_a_seeded_order() -> None:
    assert Scheduler(5).order("ports", [1, 2, 3, 4]) == Scheduler(5).order("ports", [1, 2, 3, 4])
    assert sorted(Scheduler(5).order("ports", [1, 2, 3, 4])) == [1, 2, 3, 4]
