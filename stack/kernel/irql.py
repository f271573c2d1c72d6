"""IRQL, the processor, the kernel lock and spin locks.

The model has one processor (CPU 0); its current IRQL lives on the `Processor` object, not in a thread
local. Two threads run kernel code in the agent: the main thread (PnP, power, console commands) and the
interrupt thread (event-channel upcalls). They are serialised by the processor's `KernelLock`: a thread
owns the CPU while it holds the lock, so "current IRQL" is always the IRQL of whichever thread holds it,
exactly as on a real single CPU where an interrupt runs on top of the interrupted code. A wait
(`KeWaitForSingleObject`) releases the lock, which is how the interrupt thread gets to run while the main
thread is blocked at PASSIVE_LEVEL.

Interrupts and DPCs are delivered the way the CPU and the kernel do it: an interrupt that arrives while
the IRQL is at or above its level stays pending until the IRQL drops below it; queued DPCs run (at
DISPATCH_LEVEL) when the IRQL drops below DISPATCH_LEVEL. Both happen inside `KeLowerIrql`.

A stopped processor runs nothing more: once a bugcheck is recorded (on whichever thread), a thread that
takes the kernel lock gets that bugcheck raised instead of the CPU, and a thread blocked in a wait is woken
to raise it, so the STOP reaches the agent's main thread at once rather than as a later, unrelated STOP.
The processor stops the same way, without a STOP, when a deadline of the harness passed on any thread
(`give_up` with stack.timescale.HarnessTooSlow): what ran late cannot be trusted to have left the guest
as Windows would, so nothing runs after it, and the first of the two (STOP or give-up) is what is reported.

Bugcheck codes are the ones Windows' HAL and kernel use: raising to a lower level is
IRQL_NOT_GREATER_OR_EQUAL (0x9); lowering to a higher level is IRQL_NOT_LESS_OR_EQUAL (0xA); an operation
that is forbidden above some IRQL is DRIVER_IRQL_NOT_LESS_OR_EQUAL (0xD1) when a driver did it and
IRQL_NOT_LESS_OR_EQUAL (0xA) otherwise, with p1 = what was touched, p2 = IRQL, p3 = access (0 read,
1 write, 8 execute), p4 = the caller, as Windows defines them.
"""
from __future__ import annotations

import functools
import itertools
import os
import logging
import sys
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, TypeVar

from xenpv.base.errors import HarnessError
from xenpv.stack.timescale import HarnessTooSlow

from .bugcheck import BugCheck, BugCheckCallback, BugCheckCode, KeBugCheckEx, caller_module
from .schedule import Scheduler

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger("stack.kernel.irql")

F = TypeVar("F", bound=Callable[..., Any])

PASSIVE_LEVEL = 0
LOW_LEVEL = 0
APC_LEVEL = 1
DISPATCH_LEVEL = 2
# Device interrupt levels are 3..11 on x64; the model gives every line interrupt one level.
DIRQL = 5
CLOCK_LEVEL = 13
IPI_LEVEL = 14
HIGH_LEVEL = 15

IRQL_NAMES = {PASSIVE_LEVEL: "PASSIVE_LEVEL", APC_LEVEL: "APC_LEVEL", DISPATCH_LEVEL: "DISPATCH_LEVEL",
              DIRQL: "DIRQL", CLOCK_LEVEL: "CLOCK_LEVEL", IPI_LEVEL: "IPI_LEVEL", HIGH_LEVEL: "HIGH_LEVEL"}

# Access kinds for p3 of 0xA/0xD1.
ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_EXECUTE = 8


def irql_name(level: int) -> str:
    return IRQL_NAMES.get(level, f"IRQL {level}")


class KernelModelError(HarnessError):
    """The kernel model broke one of its own invariants: a harness bug, never a driver's STOP."""


class KernelLock:
    """The one lock that serialises all kernel and driver code (the model's "owning the CPU").

    Re-entrant. `release_all`/`restore` let a wait give up every recursion level and take them back.
    Once `stopped` is set (the processor crashed, or the harness gave up on it) a thread that newly takes
    the lock gets that exception raised instead: a stopped CPU runs no more kernel or driver code.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self.stopped: BugCheck | HarnessTooSlow | None = None

    def acquire(self, timeout: float = -1) -> bool:
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            return True
        if not self._lock.acquire(timeout=timeout):
            return False
        stopped = self.stopped
        if stopped is not None:
            self._lock.release()
            raise stopped
        self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        if self._owner != threading.get_ident():
            raise RuntimeError("kernel lock released by a thread that does not own it")
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def owned(self) -> bool:
        return self._owner == threading.get_ident()

    def release_all(self) -> int:
        """Give the CPU away completely; returns the depth to `restore`. 0 if this thread did not own it."""
        if not self.owned():
            return 0
        depth, self._depth, self._owner = self._depth, 0, None
        self._lock.release()
        return depth

    def restore(self, depth: int) -> None:
        if depth == 0:
            return
        self._lock.acquire()
        self._owner, self._depth = threading.get_ident(), depth

    @contextmanager
    def released(self) -> Iterator[None]:
        """Without the CPU for the block (release_all ... restore): e.g. while joining a thread that needs it."""
        depth = self.release_all()
        try:
            yield
        finally:
            self.restore(depth)

    def __enter__(self) -> KernelLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Deliverable(Protocol):
    """A queued DPC or a pending interrupt: something the processor runs when the IRQL allows."""

    def deliver(self, cpu: Processor) -> None: ...


class Waiter(Protocol):
    """An object a thread is blocked on (a KEVENT): woken without being signalled when the CPU stops."""

    def wake(self) -> None: ...


@dataclass
class ThreadContext:
    """What a thread that gives the CPU away while it waits takes with it (Processor.give_away)."""

    depth: int
    irql: int


@dataclass
class Processor:
    """CPU 0: current IRQL, held spin locks, queued DPCs, pending interrupts and the crash state."""

    number: int = 0
    irql: int = PASSIVE_LEVEL
    lock: KernelLock = field(default_factory=KernelLock)
    spin_locks: list[KSpinLock] = field(default_factory=list)
    dpc_queue: deque[Deliverable] = field(default_factory=deque)
    pending_interrupts: list[tuple[int, Deliverable]] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    bugcheck_callbacks: list[BugCheckCallback] = field(default_factory=list)
    crashed: BugCheck | None = None
    # Set instead of `crashed` when a deadline of the harness passed (give_up): stopped, but no STOP.
    too_slow: HarnessTooSlow | None = None
    # Objects threads are blocked on in KeWaitForSingleObject, so a crash can wake them.
    waiting: set[Waiter] = field(default_factory=set)
    # The seeded scheduling mode (stack.kernel.schedule); None: FIFO DPCs, arrival-ordered interrupts.
    scheduler: Scheduler | None = None
    _delivering: bool = False

    def running_driver(self) -> str | None:
        return self.running[-1] if self.running else None

    @contextmanager
    def running_as(self, module: str) -> Iterator[None]:
        """Attribute whatever runs inside to `module` (a dispatch routine, AddDevice, an ISR...)."""
        self.running.append(module)
        try:
            yield
        finally:
            self.running.pop()

    def give_away(self) -> ThreadContext | None:
        """Give the CPU away for a wait: this thread's IRQL goes with it, and whoever runs meanwhile starts at
        PASSIVE_LEVEL, as another thread would on Windows. Without this the next thread inherited the waiter's
        DISPATCH_LEVEL and stopped with a false 0xD1 in its first wait. None if this thread does not own
        the CPU."""
        if not self.lock.owned():
            return None
        saved = ThreadContext(0, self.irql)
        self.irql = PASSIVE_LEVEL
        saved.depth = self.lock.release_all()
        return saved

    def take_back(self, saved: ThreadContext | None, what: str) -> None:
        """Own the CPU again after `give_away`, at this thread's IRQL. A stop meanwhile is raised (the STOP of
        another thread, or the harness giving up); a CPU another thread left raised is an error of the
        model, not of a driver."""
        if saved is None:
            return
        self.lock.restore(saved.depth)
        if self.halted is not None:
            raise self.halted  # at the IRQL the stop left (HIGH_LEVEL), not this thread's
        left, self.irql = self.irql, saved.irql
        if left != PASSIVE_LEVEL:
            raise KernelModelError(f"while this thread was {what}, another thread of the model left the CPU at "
                                   f"{irql_name(left)}")

    def crash(self, bugcheck: BugCheck) -> None:
        """Record the first bugcheck, go to HIGH_LEVEL as KeBugCheckEx does and run the callbacks."""
        self.crashed = bugcheck
        self.lock.stopped = bugcheck
        self.irql = HIGH_LEVEL
        self.dpc_queue.clear()
        self.pending_interrupts.clear()
        for waiter in list(self.waiting):
            waiter.wake()
        for callback in list(self.bugcheck_callbacks):
            # Windows runs each callback under an exception handler; one failing must not stop the others.
            try:
                callback(bugcheck)
            except Exception:  # noqa: BLE001
                log.exception("bugcheck callback %r failed", callback)

    @property
    def halted(self) -> BugCheck | HarnessTooSlow | None:
        """Why this processor runs nothing more (the first bugcheck or give-up), or None."""
        return self.crashed if self.crashed is not None else self.too_slow

    def give_up(self, too_slow: HarnessTooSlow) -> None:
        """A deadline of the harness passed on some thread: stop the processor without a STOP, and wake
        every waiter so the agent's main thread reports it at once. A processor already stopped keeps
        its first reason."""
        if self.halted is not None:
            return
        log.error("%s; the processor stops", too_slow)
        # Called from any thread, with or without the kernel lock: the DPC and interrupt queues are left
        # as they are (their owner may be walking them); nothing queued runs on a halted processor.
        self.too_slow = too_slow
        self.lock.stopped = too_slow
        for waiter in list(self.waiting):
            waiter.wake()

    def request_interrupt(self, level: int, item: Deliverable) -> None:
        """An interrupt at `level` arrives: run it now if the IRQL allows, else keep it pending."""
        if self.halted is not None:
            return
        self.pending_interrupts.append((level, item))
        if self.irql < level:
            self.deliver_pending()

    def queue_dpc(self, dpc: Deliverable) -> None:
        self.dpc_queue.append(dpc)
        if self.irql < DISPATCH_LEVEL:
            self.deliver_pending()

    def deliver_pending(self) -> None:
        """Run pending interrupts above the IRQL, then DPCs if below DISPATCH, until nothing can run."""
        if self._delivering:
            # Re-entered from inside an ISR or DPC that lowered the IRQL; the outer loop picks up the rest.
            return
        self._delivering = True
        try:
            while self.halted is None:
                runnable = [entry for entry in self.pending_interrupts if entry[0] > self.irql]
                if runnable:
                    top = max(e[0] for e in runnable)
                    highest = [e for e in runnable if e[0] == top]
                    entry = highest[self.scheduler.pick("interrupt", len(highest))] if self.scheduler else highest[0]
                    self.pending_interrupts.remove(entry)
                    entry[1].deliver(self)
                    continue
                if self.irql < DISPATCH_LEVEL and self.dpc_queue:
                    if self.scheduler is not None and len(self.dpc_queue) > 1:
                        index = self.scheduler.pick("dpc", len(self.dpc_queue))
                        dpc = self.dpc_queue[index]
                        del self.dpc_queue[index]
                    else:
                        dpc = self.dpc_queue.popleft()
                    dpc.deliver(self)
                    continue
                break
        finally:
            self._delivering = False


class KSpinLock:
    """KSPIN_LOCK. Acquire raises to DISPATCH_LEVEL; on one CPU a second acquire is a deadlock,
    which Windows reports as SPIN_LOCK_ALREADY_OWNED (0xF)."""

    _addresses = itertools.count(0xFFFFE000_00010000, 0x10)

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.address = next(self._addresses)
        self.owner: Processor | None = None

    def __repr__(self) -> str:
        return f"KSPIN_LOCK({self.name or hex(self.address)})"

    def __str__(self) -> str:
        return repr(self)

    @contextmanager
    def held(self) -> Iterator[int]:
        """`with lock.held() as old_irql:` == KeAcquireSpinLock ... KeReleaseSpinLock."""
        old = KeAcquireSpinLock(self)
        try:
            yield old
        finally:
            KeReleaseSpinLock(self, old)


_current = Processor()


def current_processor() -> Processor:
    return _current


def set_current_processor(cpu: Processor) -> Processor:
    """Make `cpu` the processor the Ke* functions act on (the Kernel does this); returns the old one."""
    global _current
    previous, _current = _current, cpu
    return previous


def KeGetCurrentIrql() -> int:
    return _current.irql


def KeRaiseIrql(new_irql: int) -> int:
    """Raise to `new_irql`; returns the old IRQL. Raising to a lower level is a bugcheck (0x9)."""
    cpu = _current
    old = cpu.irql
    if new_irql < old:
        raise KeBugCheckEx(BugCheckCode.IRQL_NOT_GREATER_OR_EQUAL, old, new_irql, 0, 0,
                           module=caller_module(sys._getframe(1)),
                           message=f"KeRaiseIrql to {irql_name(new_irql)} from {irql_name(old)}")
    cpu.irql = new_irql
    return old


def KeLowerIrql(new_irql: int) -> None:
    """Lower to `new_irql`, delivering interrupts and DPCs that were held back. Lowering to a higher
    level is a bugcheck (0xA)."""
    cpu = _current
    if cpu.crashed is not None:
        return
    if new_irql > cpu.irql:
        raise KeBugCheckEx(BugCheckCode.IRQL_NOT_LESS_OR_EQUAL, new_irql, cpu.irql, 0, 0,
                           module=caller_module(sys._getframe(1)),
                           message=f"KeLowerIrql to {irql_name(new_irql)} from {irql_name(cpu.irql)}")
    cpu.irql = new_irql
    cpu.deliver_pending()


def KeRaiseIrqlToDpcLevel() -> int:
    return KeRaiseIrql(DISPATCH_LEVEL)


def KeAcquireSpinLock(lock: KSpinLock) -> int:
    """Raise to DISPATCH_LEVEL and take `lock`; returns the old IRQL for KeReleaseSpinLock."""
    caller = sys._getframe(1)
    old = _raise_for_spin_lock(caller)
    _take(lock, caller)
    return old


def KeReleaseSpinLock(lock: KSpinLock, old_irql: int) -> None:
    _give(lock, sys._getframe(1))
    KeLowerIrql(old_irql)


def KeAcquireSpinLockAtDpcLevel(lock: KSpinLock) -> None:
    caller = sys._getframe(1)
    if _current.irql < DISPATCH_LEVEL:
        raise KeBugCheckEx(BugCheckCode.IRQL_NOT_GREATER_OR_EQUAL, _current.irql, DISPATCH_LEVEL, lock, 0,
                           module=caller_module(caller),
                           message=f"KeAcquireSpinLockAtDpcLevel({lock}) at {irql_name(_current.irql)}")
    _take(lock, caller)


def KeReleaseSpinLockFromDpcLevel(lock: KSpinLock) -> None:
    _give(lock, sys._getframe(1))


def _raise_for_spin_lock(caller: FrameType) -> int:
    cpu = _current
    old = cpu.irql
    if old > DISPATCH_LEVEL:
        raise KeBugCheckEx(BugCheckCode.IRQL_NOT_GREATER_OR_EQUAL, old, DISPATCH_LEVEL, 0, 0,
                           module=caller_module(caller),
                           message=f"spin lock acquired at {irql_name(old)}")
    cpu.irql = DISPATCH_LEVEL
    return old


def _take(lock: KSpinLock, caller: FrameType) -> None:
    cpu = _current
    if lock.owner is cpu:
        raise KeBugCheckEx(BugCheckCode.SPIN_LOCK_ALREADY_OWNED, lock, 0, 0, 0, module=caller_module(caller),
                           message=f"{lock} acquired twice on CPU {cpu.number}")
    if lock.owner is not None:
        # Only one CPU exists, so another owner means a lock leaked across processors (a model misuse).
        raise KeBugCheckEx(BugCheckCode.SPIN_LOCK_ALREADY_OWNED, lock, 1, 0, 0, module=caller_module(caller),
                           message=f"{lock} owned by CPU {lock.owner.number}")
    lock.owner = cpu
    cpu.spin_locks.append(lock)


def _give(lock: KSpinLock, caller: FrameType) -> None:
    cpu = _current
    if cpu.crashed is not None:
        return
    if lock.owner is not cpu:
        raise KeBugCheckEx(BugCheckCode.SPIN_LOCK_NOT_OWNED, lock, 0, 0, 0, module=caller_module(caller),
                           message=f"{lock} released but not owned")
    lock.owner = None
    cpu.spin_locks.remove(lock)


def _first_outside_kernel(frame: FrameType | None) -> FrameType | None:
    kernel_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(kernel_dir):
        frame = frame.f_back
    return frame


def assert_max_irql(level: int, what: str, *, access: int = ACCESS_EXECUTE) -> None:
    """Bugcheck like Windows if the current IRQL is above `level` while doing `what`.

    `what` names the operation ("IRP_MN_QUERY_INTERFACE", "ZwSetValueKey", "KeWaitForSingleObject"); it
    is p1's note. The culprit (p4 and the module) is the first caller outside the kernel model.
    """
    cpu = _current
    if cpu.irql <= level:
        return
    caller = _first_outside_kernel(sys._getframe(1))
    module = caller_module(caller) if caller is not None else caller_module()
    where = (f"{caller.f_code.co_qualname} ({caller.f_code.co_filename}:{caller.f_lineno})"
             if caller is not None else "kernel")
    code = (BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL if module != "ntoskrnl.exe"
            else BugCheckCode.IRQL_NOT_LESS_OR_EQUAL)
    raise KeBugCheckEx(code, what, cpu.irql, access, where, module=module,
                       message=f"{what} at {irql_name(cpu.irql)} (allowed up to {irql_name(level)})")


def assert_passive(what: str, *, access: int = ACCESS_EXECUTE) -> None:
    assert_max_irql(PASSIVE_LEVEL, what, access=access)


def kernel_api(what: str, level: int = PASSIVE_LEVEL, *, access: int = ACCESS_EXECUTE) -> Callable[[F], F]:
    """An API that any thread of the agent calls (driver code, a console command, a user-mode service):
    the call runs owning the CPU — a thread that does not own it waits its turn, as a thread waits to be
    scheduled, and then runs at PASSIVE_LEVEL — and bugchecks like Windows when its caller's IRQL is above
    `level`. Checking the IRQL without owning the CPU read another thread's: under load, the xenagent
    service's registry read at a reboot while xenvif's DPC held the CPU at DISPATCH_LEVEL was a false 0xD1."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            cpu = _current
            with cpu.lock:
                assert_max_irql(level, what, access=access)
                return fn(*args, **kwargs)
        return call  # type: ignore[return-value]
    return wrap
