"""STORE's last release may run at DISPATCH_LEVEL (XENBUS's FdoD0ToD3 releases the FDO's interfaces
raised): stopping its watch thread there must not give the processor away, or another thread of the model
runs driver code at a level it never raised to (a KernelModelError that cut `power S4` short)."""
from __future__ import annotations

import threading

from xenpv.stack.kernel.irql import DISPATCH_LEVEL, KeLowerIrql, KeRaiseIrql, Processor
from xenpv.stack.kernel.status import STATUS_SUCCESS

from .stack_of import interfaces, table_of


def test_store_release_at_dispatch_keeps_the_processor(platform, cpu: Processor) -> None:
    entered, gate = threading.Event(), threading.Event()
    pump = platform.store.pump

    def slow_pump() -> None:  # the watch thread is mid-pump when told to stop: the join has to wait
        entered.set()
        gate.wait(5)
        pump()

    platform.store.pump = slow_pump
    ran_at: list[int] = []

    def contender() -> None:  # another thread of the model that wants the processor meanwhile
        with cpu.lock:
            ran_at.append(cpu.irql)

    with cpu.lock:
        ifs = interfaces(platform)
        st = table_of(ifs.store)
        assert st.StoreAcquire() == STATUS_SUCCESS
        assert entered.wait(5)
        other = threading.Thread(target=contender, daemon=True)
        other.start()
        threading.Timer(0.3, gate.set).start()
        old = KeRaiseIrql(DISPATCH_LEVEL)
        st.StoreRelease()
        assert ran_at == [], f"another thread ran driver code at IRQL {ran_at} during StoreRelease"
        KeLowerIrql(old)
    other.join(5)
    assert ran_at == [0] and cpu.crashed is None
