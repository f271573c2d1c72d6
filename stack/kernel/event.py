"""KEVENT and KeWaitForSingleObject.

Windows rules modelled: a wait with a non-zero timeout is allowed up to APC_LEVEL, a zero-timeout poll up
to DISPATCH_LEVEL; anything else bugchecks (0xD1 from a driver, 0xA from the kernel). Notification events
stay signalled; synchronization events reset when a wait is satisfied.

A wait gives the kernel lock away (see irql.py) so the interrupt thread can run the ISR/DPC that will set
the event, and takes it back before returning. Windows would wait forever on an event nobody sets; the
model bounds "forever" by `WAIT_DEADLINE_SECONDS` and then stops with MODEL_WAIT_DEADLINE_EXCEEDED, so a
hung guest ends its test with a dump that shows the waiter.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time

from .bugcheck import BugCheckCode, KeBugCheckEx
from .irql import APC_LEVEL, DISPATCH_LEVEL, assert_max_irql, current_processor
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

    def _wait(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self._signaled:
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
    bounded = WAIT_DEADLINE_SECONDS if timeout is None else timeout
    depth = cpu.lock.release_all()
    try:
        satisfied = event._wait(bounded)
    finally:
        cpu.lock.restore(depth)
    if satisfied:
        return STATUS_SUCCESS
    if timeout is None:
        raise KeBugCheckEx(BugCheckCode.MODEL_WAIT_DEADLINE_EXCEEDED, event, int(bounded), 0, 0,
                           message=f"waited {bounded:g}s for {event}, which nothing set")
    return STATUS_TIMEOUT
