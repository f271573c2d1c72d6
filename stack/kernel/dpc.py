"""Interrupts and DPCs.

An interrupt object (`KInterrupt`, from `IoConnectInterrupt`) ties a service routine (ISR) to an IRQL.
`KInterrupt.fire()` is what the agent's interrupt thread calls when an event-channel upcall arrives: it
takes the kernel lock (waiting while the main thread runs driver code, as a real CPU would run the ISR
on top of it at the next instruction boundary; the model's boundary is "the main thread releases the
lock or waits"), then raises to the interrupt's IRQL and runs the ISR. If the IRQL is already at or
above the interrupt's level (the ISR fired from inside driver code on the same thread, or nested) it
stays pending until the IRQL drops below it, as a masked interrupt does.

DPCs queued with `KeInsertQueueDpc` (from an ISR, typically) run at DISPATCH_LEVEL as soon as the IRQL
drops below DISPATCH_LEVEL: after the ISR returns, or right away when queued from PASSIVE_LEVEL. A DPC
already in the queue is not queued twice (KeInsertQueueDpc returns False), as in Windows. A DPC routine
that returns at another IRQL stops the guest with IRQL_UNEXPECTED_VALUE.

An exception that leaves an ISR or a DPC routine stops the guest with KMODE_EXCEPTION_NOT_HANDLED
(0x1E), blamed on the driver it came from, as Windows does: nothing above a DPC or an ISR handles
exceptions. Whatever happens, delivery puts the IRQL back to what it interrupted, so a failure can never
leave the processor at DISPATCH_LEVEL or DIRQL for the next thread that owns the CPU.

Simplifications: one processor, so no DPC targeting or importance; no interrupt spin lock beyond the
IRQL (KeSynchronizeExecution raises to the interrupt's IRQL, which on one CPU is the same guarantee).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

from .bugcheck import BugCheckCode, KeBugCheckEx, KeUnhandledException
from .irql import DIRQL, DISPATCH_LEVEL, KeLowerIrql, KeRaiseIrql, Processor, current_processor, irql_name

log = logging.getLogger("stack.kernel.dpc")

DpcRoutine = Callable[["KDpc", Any, Any, Any], None]
ServiceRoutine = Callable[["KInterrupt", Any], bool]

_addresses = itertools.count(0xFFFFE000_00400000, 0x40)


class KDpc:
    def __init__(self, routine: DpcRoutine, context: Any = None, *, module: str | None = None) -> None:
        self.routine = routine
        self.context = context
        # Attribution for bugchecks inside the routine: the driver that initialised it.
        self.module = module or current_processor().running_driver() or "ntoskrnl.exe"
        self.address = next(_addresses)
        self.queued = False
        self._args: tuple[Any, Any] = (None, None)

    def __str__(self) -> str:
        return f"KDPC({getattr(self.routine, '__qualname__', self.routine)})"

    def deliver(self, cpu: Processor) -> None:
        self.queued = False
        old = cpu.irql
        cpu.irql = DISPATCH_LEVEL
        try:
            with cpu.running_as(self.module):
                try:
                    self.routine(self, self.context, *self._args)
                except Exception as exc:
                    raise KeUnhandledException(exc, self, module=self.module)
                if cpu.irql != DISPATCH_LEVEL:
                    raise KeBugCheckEx(BugCheckCode.IRQL_UNEXPECTED_VALUE, (cpu.irql << 16) | (DISPATCH_LEVEL << 8),
                                       self.routine.__qualname__, 0, 0, module=self.module,
                                       message=f"{self} returned at {irql_name(cpu.irql)}")
        finally:
            _restore_irql(cpu, old)


def KeInitializeDpc(routine: DpcRoutine, context: Any = None, *, module: str | None = None) -> KDpc:
    return KDpc(routine, context, module=module)


def KeInsertQueueDpc(dpc: KDpc, argument1: Any = None, argument2: Any = None) -> bool:
    if dpc.queued:
        return False
    dpc.queued = True
    dpc._args = (argument1, argument2)
    current_processor().queue_dpc(dpc)
    return True


def KeRemoveQueueDpc(dpc: KDpc) -> bool:
    if not dpc.queued:
        return False
    current_processor().dpc_queue.remove(dpc)
    dpc.queued = False
    return True


class KInterrupt:
    def __init__(self, service_routine: ServiceRoutine, context: Any, irql: int, module: str) -> None:
        self.service_routine = service_routine
        self.context = context
        self.irql = irql
        self.module = module
        self.address = next(_addresses)
        self.connected = True
        self.count = 0
        self.claimed = 0

    def __str__(self) -> str:
        return f"KINTERRUPT({self.module}, {irql_name(self.irql)})"

    def fire(self) -> None:
        """The interrupt line asserts. Thread-safe: serialised with all driver code by the kernel lock."""
        cpu = current_processor()
        with cpu.lock:
            if self.connected:
                cpu.request_interrupt(self.irql, self)

    def deliver(self, cpu: Processor) -> None:
        if not self.connected:
            return
        old = cpu.irql
        cpu.irql = self.irql
        self.count += 1
        try:
            with cpu.running_as(self.module):
                try:
                    claimed = self.service_routine(self, self.context)
                except Exception as exc:
                    raise KeUnhandledException(exc, self.service_routine, module=self.module)
                if claimed:
                    self.claimed += 1
        finally:
            _restore_irql(cpu, old)


def _restore_irql(cpu: Processor, old: int) -> None:
    # A stopped processor stays at HIGH_LEVEL (KeBugCheckEx put it there); anything else unwinding
    # through a delivery (a KeyboardInterrupt, say) must not leave the interrupted code's IRQL raised.
    if cpu.crashed is None:
        cpu.irql = old


def IoConnectInterrupt(service_routine: ServiceRoutine, context: Any = None, *, irql: int = DIRQL,
                       module: str | None = None) -> KInterrupt:
    if irql <= DISPATCH_LEVEL:
        raise ValueError(f"an interrupt runs above DISPATCH_LEVEL, not at {irql_name(irql)}")
    owner = module or current_processor().running_driver() or "ntoskrnl.exe"
    return KInterrupt(service_routine, context, irql, owner)


def IoDisconnectInterrupt(interrupt: KInterrupt) -> None:
    interrupt.connected = False


def KeSynchronizeExecution(interrupt: KInterrupt, routine: Callable[[Any], Any], context: Any = None) -> Any:
    """Run `routine(context)` at the interrupt's IRQL so the ISR cannot run concurrently."""
    old = KeRaiseIrql(interrupt.irql)
    try:
        return routine(context)
    finally:
        KeLowerIrql(old)
