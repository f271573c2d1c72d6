"""XENBUS SUSPEND interface v1 (reference windows-pv-drivers.md 1 and 7).

Clients register EARLY callbacks (run at HIGH_LEVEL straight after the domain comes back, before
interrupts are enabled) and LATE callbacks (at DISPATCH_LEVEL afterwards); each list runs in
registration order. `Trigger` is the migration path: PASSIVE only, raise to DISPATCH, the suspend
hypercall, Count++, EARLY list at HIGH_LEVEL, LATE list at DISPATCH_LEVEL.

The hypercall (SCHEDOP_shutdown(SHUTDOWN_suspend)) belongs to xen.sys; the FDO hands it in as
`suspend_domain`, a callable returning its NTSTATUS. The model has one vCPU, so "corral the other
CPUs" and the per-CPU SuspendEarly are the single Count++ here.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from xenpv.stack.drivers.interface import Interface, table
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, HIGH_LEVEL, KeLowerIrql, KeRaiseIrql, assert_passive
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_SUCCESS, NTSTATUS, status_name

log = logging.getLogger("stack.drivers.xenbus.suspend")

SUSPEND_GUID = uuid.UUID("0554F2AF-B510-4C71-AC03-1C503E394238")

SuspendFunction = Callable[[Any], None]

_addresses = itertools.count(0xFFFFE000_01100000, 0x40)


class SuspendCallbackType(IntEnum):
    SUSPEND_CALLBACK_EARLY = 1
    SUSPEND_CALLBACK_LATE = 2


SUSPEND_CALLBACK_EARLY = SuspendCallbackType.SUSPEND_CALLBACK_EARLY
SUSPEND_CALLBACK_LATE = SuspendCallbackType.SUSPEND_CALLBACK_LATE


@dataclass(eq=False)
class SuspendCallback:
    Type: SuspendCallbackType
    Function: SuspendFunction
    Argument: Any
    address: int = field(default_factory=lambda: next(_addresses))


class SuspendInterface(Interface):
    NAME = "SUSPEND"
    GUID = SUSPEND_GUID
    TABLES = {1: table(1, "Register", "Deregister", "Trigger", "GetCount")}

    def __init__(self, debug: DebugInterface, suspend_domain: Callable[[], int]) -> None:
        super().__init__()
        self.debug = debug
        self.suspend_domain = suspend_domain
        self.early: list[SuspendCallback] = []
        self.late: list[SuspendCallback] = []
        self.count = 0
        self._debug_callback: DebugCallback | None = None

    def setup(self) -> int:
        status = self.debug.acquire()
        if not NT_SUCCESS(status):
            return status
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|SUSPEND", self._dump, None)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.early or self.late:
            BUG("OUTSTANDING CALLBACKS")
        assert self._debug_callback is not None
        self.debug.DebugDeregister(self._debug_callback)
        self._debug_callback = None
        self.debug.release()

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        self.debug.DebugPrintf("Count = %u", self.count)
        for name, callbacks in (("EARLY", self.early), ("LATE", self.late)):
            for callback in callbacks:
                self.debug.DebugPrintf("%s: %s(%r)", name, getattr(callback.Function, "__qualname__", "?"),
                                       callback.Argument)

    def SuspendRegister(self, Type: int, Function: SuspendFunction,
                        Argument: Any) -> tuple[NTSTATUS, SuspendCallback | None]:
        try:
            kind = SuspendCallbackType(Type)
        except ValueError:
            return STATUS_INVALID_PARAMETER, None
        callback = SuspendCallback(kind, Function, Argument)
        (self.early if kind == SUSPEND_CALLBACK_EARLY else self.late).append(callback)
        return STATUS_SUCCESS, callback

    def SuspendDeregister(self, Callback: SuspendCallback) -> None:
        callbacks = self.early if Callback.Type == SUSPEND_CALLBACK_EARLY else self.late
        if Callback not in callbacks:
            BUG("UNKNOWN CALLBACK")
        callbacks.remove(Callback)

    def SuspendTrigger(self) -> NTSTATUS:
        assert_passive("SuspendTrigger")
        old = KeRaiseIrql(DISPATCH_LEVEL)
        try:
            status = self.suspend_domain()
            if not NT_SUCCESS(status):
                log.warning("suspend hypercall failed: %s; callbacks not run", status_name(status))
                return status
            self.count += 1
            log.info("resumed (count %d): %d early, %d late callbacks", self.count, len(self.early),
                     len(self.late))
            KeRaiseIrql(HIGH_LEVEL)
            for callback in list(self.early):
                callback.Function(callback.Argument)
            KeLowerIrql(DISPATCH_LEVEL)
            for callback in list(self.late):
                callback.Function(callback.Argument)
            return STATUS_SUCCESS
        finally:
            KeLowerIrql(old)

    def SuspendGetCount(self) -> int:
        return self.count
