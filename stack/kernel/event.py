"""KEVENT and KeWaitForSingleObject.

Windows rules modelled: a wait with a non-zero timeout is allowed up to APC_LEVEL, a zero-timeout poll up
to DISPATCH_LEVEL; anything else bugchecks (0xD1 from a driver, 0xA from the kernel). Notification events
stay signalled; synchronization events reset when a wait is satisfied.

A wait gives the kernel lock away (see irql.py) so the interrupt thread can run the ISR/DPC that will set
the event, and takes it back before returning. Windows would wait forever on an event nobody sets; the
model bounds "forever" by `WAIT_DEADLINE_SECONDS` (scaled, stack.timescale) and then gives up with
HarnessTooSlow: what the waiter waited for comes from outside the guest (a back-end, xenstored, the
interrupt thread), so a wait that long says the harness fell behind, not that a driver broke a rule.

While the lock is given away other threads run kernel code on the one processor, so the wait checks on
return that the IRQL is the caller's again; anything else is a bug of the model (an ISR or DPC delivery
that did not restore it), reported as such instead of as the 0xD1 the caller's next call would cause. A
crash on another thread wakes the waiter, which then raises that bugcheck: the CPU has stopped; so does
a give-up (HarnessTooSlow) on another thread.

`wait_for_thread` is the same kind of wait on a thread of the model (the driver's KeWaitForSingleObject
on a thread object when it stops one), bounded by a (scaled) deadline whose expiry is the harness's error.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time

from xenpv.base import threads
from xenpv.stack.timescale import HarnessTooSlow, scaled

from .bugcheck import BugCheckCode, KeBugCheckEx
from .irql import APC_LEVEL, DISPATCH_LEVEL, KernelModelError, Processor, assert_max_irql, current_processor
from .status import STATUS_SUCCESS, STATUS_TIMEOUT, NTSTATUS

log = logging.getLogger("stack.kernel.event")

WAIT_DEADLINE_SECONDS = 60.0


class KEvent:
    _addresses = itertools.count(0xFFFFE000_00200000, 0x20)

    def __init__(self, name: str = "", *, synchronization: bool = False, signaled: bool = False) -> None:
        self.name = name
        self.synchronization = synchronization
        self.address = next(self._addresses)
        self._signaled = signaled
        self._condition = threading.Condition(threading.Lock())

    def __str__(self) -> str:
        return f"KEVENT({self.name or hex(self.address)})"

    def set(self) -> bool:
        """KeSetEvent; returns the previous state. Callable at any IRQL up to DISPATCH and from any thread."""
        with self._condition:
            previous, self._signaled = self._signaled, True
            self._condition.notify_all()
        return previous

    def clear(self) -> None:
        with self._condition:
            self._signaled = False

    def read_state(self) -> bool:
        return self._signaled

    def wake(self) -> None:
        """Wake the waiters without signalling (the processor stopped); they look at why themselves."""
        with self._condition:
            self._condition.notify_all()

    def _wait(self, timeout: float | None, cpu: Processor | None = None) -> bool:
        """False on timeout, or as soon as `cpu` has stopped (a crash, or the harness gave up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self._signaled:
                if cpu is not None and cpu.halted is not None:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._condition.wait(remaining)
            if self.synchronization:
                self._signaled = False
            return True


def KeSetEvent(event: KEvent) -> bool:
    return event.set()


def KeClearEvent(event: KEvent) -> None:
    event.clear()


def KeWaitForSingleObject(event: KEvent, timeout: float | None = None) -> NTSTATUS:
    """Wait for `event`; `timeout` in seconds (None = forever, 0 = poll). STATUS_SUCCESS or STATUS_TIMEOUT."""
    if timeout == 0:
        assert_max_irql(DISPATCH_LEVEL, "KeWaitForSingleObject")
        return STATUS_SUCCESS if event._wait(0) else STATUS_TIMEOUT
    assert_max_irql(APC_LEVEL, "KeWaitForSingleObject")
    cpu = current_processor()
    bounded = scaled(WAIT_DEADLINE_SECONDS) if timeout is None else timeout
    cpu.waiting.add(event)
    saved = cpu.give_away()
    try:
        satisfied = event._wait(bounded, cpu)
    finally:
        cpu.waiting.discard(event)
        cpu.take_back(saved, f"waiting for {event}")
    if satisfied:
        return STATUS_SUCCESS
    if timeout is None:
        raise HarnessTooSlow(f"{event} not set (a wait without a timeout, endless on Windows)", bounded)
    return STATUS_TIMEOUT


# ke.h: the wait blocks a thread carries for itself; more objects need the caller's WaitBlockArray.
THREAD_WAIT_OBJECTS = 3
MAXIMUM_WAIT_OBJECTS = 64
WAIT_ALL = 0
WAIT_ANY = 1
MAXIMUM_WAIT_OBJECTS_EXCEEDED = BugCheckCode.MAXIMUM_WAIT_OBJECTS_EXCEEDED


def KeWaitForMultipleObjects(objects: list[KEvent], wait_type: int = WAIT_ALL, timeout: float | None = None,
                             wait_block_array: list[object] | None = None) -> NTSTATUS:
    """Wait for all (WAIT_ALL) or any (WAIT_ANY) of `objects`. Windows checks the count first: more than
    THREAD_WAIT_OBJECTS without a WaitBlockArray, or more than MAXIMUM_WAIT_OBJECTS at all, stops the
    system with MAXIMUM_WAIT_OBJECTS_EXCEEDED (0xC, no parameters). WAIT_ALL waits for each in turn,
    which is the same as waiting for all at once for notification events (the model's synchronization
    events are never waited for together). WAIT_ANY returns STATUS_WAIT_0 + the index (STATUS_SUCCESS
    is STATUS_WAIT_0)."""
    count = len(objects)
    if count > MAXIMUM_WAIT_OBJECTS or (count > THREAD_WAIT_OBJECTS and wait_block_array is None):
        raise KeBugCheckEx(MAXIMUM_WAIT_OBJECTS_EXCEEDED,
                           message=f"KeWaitForMultipleObjects: {count} objects, "
                                   f"{'no wait block array' if wait_block_array is None else 'too many'} "
                                   f"(THREAD_WAIT_OBJECTS {THREAD_WAIT_OBJECTS})")
    if wait_block_array is not None and len(wait_block_array) < count:
        raise KernelModelError(f"a WaitBlockArray of {len(wait_block_array)} for {count} objects")
    if wait_type == WAIT_ALL:
        for event in objects:
            status = KeWaitForSingleObject(event, timeout)
            if status != STATUS_SUCCESS:
                return status
        return STATUS_SUCCESS
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        for index, event in enumerate(objects):
            if KeWaitForSingleObject(event, 0) == STATUS_SUCCESS:
                return STATUS_SUCCESS + index
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            return STATUS_TIMEOUT
        KeWaitForSingleObject(objects[0], min(0.01, remaining) if remaining is not None else 0.01)


def wait_for_thread(thread: threading.Thread, what: str, timeout: float | None = None) -> None:
    """Wait for `thread` (already told to stop) to end, giving the kernel lock away meanwhile: the thread
    may need it to finish what it is doing (an interrupt line firing, say). WaitTimeout, naming `what`,
    if it is still running after `timeout` (default base.threads.THREAD_EXIT_DEADLINE, scaled; see
    join_stopped): the caller must then leave alone whatever the thread uses."""
    cpu = current_processor()
    saved = cpu.give_away()
    try:
        threads.join_stopped(thread, what, scaled(threads.THREAD_EXIT_DEADLINE) if timeout is None else timeout)
    finally:
        cpu.take_back(saved, f"stopping thread {thread.name}")
