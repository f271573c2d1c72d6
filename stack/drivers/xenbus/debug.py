"""XENBUS DEBUG interface v1 (reference windows-pv-drivers.md 1).

Drivers register named callbacks that dump their state. The callbacks run when the guest crashes
(the 0->1 Acquire registers a bugcheck callback with the kernel, so their output lands in the debug
log and from there in the crash dump) or on demand through Trigger. `Printf` is only legal inside a
callback: it prefixes every line with the callback's Prefix and the caller's function, as the driver's
"<Prefix>|<Function>: " lines do.
"""
from __future__ import annotations

import itertools
import logging
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.bugcheck import BUG, BugCheck, KeDeregisterBugCheckCallback, KeRegisterBugCheckCallback
from xenpv.stack.kernel.debuglog import DbgLevel, current_log
from xenpv.stack.kernel.irql import HIGH_LEVEL, KeGetCurrentIrql, KeLowerIrql, KeRaiseIrql
from xenpv.stack.kernel.status import STATUS_SUCCESS, NTSTATUS

log = logging.getLogger("stack.drivers.xenbus.debug")

DEBUG_GUID = uuid.UUID("0DF600AE-6B20-4227-BF94-03DA9A26A114")

# Fn(Argument, Crashing)
DebugFunction = Callable[[Any, bool], None]

_addresses = itertools.count(0xFFFFE000_01000000, 0x40)


@dataclass(eq=False)
class DebugCallback:
    """XENBUS_DEBUG_CALLBACK: the handle Register gives out and Deregister takes back."""

    Prefix: str
    Function: DebugFunction
    Argument: Any
    address: int = field(default_factory=lambda: next(_addresses))

    def __str__(self) -> str:
        return f"DEBUG_CALLBACK({self.Prefix})"


class DebugInterface(Interface):
    NAME = "DEBUG"
    GUID = DEBUG_GUID
    TABLES = LAYOUTS["DEBUG"]

    def __init__(self) -> None:
        super().__init__()
        self.callbacks: list[DebugCallback] = []
        self._current: DebugCallback | None = None

    # -- Acquire/Release --------------------------------------------------------------------------

    def setup(self) -> int:
        KeRegisterBugCheckCallback(self._bugcheck_callback)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.callbacks:
            BUG("OUTSTANDING CALLBACKS")
        KeDeregisterBugCheckCallback(self._bugcheck_callback)

    def _bugcheck_callback(self, bugcheck: BugCheck) -> None:
        log.info("crash (%s): running %d debug callbacks", bugcheck.name, len(self.callbacks))
        self._run(list(self.callbacks), crashing=True)

    # -- members ----------------------------------------------------------------------------------

    def DebugRegister(self, Prefix: str, Function: DebugFunction, Argument: Any) -> tuple[NTSTATUS, DebugCallback]:
        callback = DebugCallback(Prefix, Function, Argument)
        self.callbacks.append(callback)
        return STATUS_SUCCESS, callback

    def DebugDeregister(self, Callback: DebugCallback) -> None:
        if Callback not in self.callbacks:
            BUG("UNKNOWN CALLBACK")
        self.callbacks.remove(Callback)

    def DebugPrintf(self, Format: str, *Arguments: Any) -> None:
        """debug.c DebugPrintf: only a debug callback may print (ASSERT(Context->CallbackPrefix != NULL)); a
        free build prints outside one too, with the NULL prefix as the CRT prints it, "(null)"."""
        callback = self._current
        ASSERT(callback is not None, "Context->CallbackPrefix != NULL")
        prefix = callback.Prefix if callback is not None else "(null)"
        function = sys._getframe(1).f_code.co_name
        text = Format % Arguments if Arguments else Format
        for line in text.rstrip("\n").split("\n"):
            current_log().print("xenbus", f"{prefix}|{function}: {line}", DbgLevel.INFO)

    def DebugTrigger(self, Callback: DebugCallback | None) -> None:
        """Run one callback (or all) now, not crashing. Callbacks always run at HIGH_LEVEL."""
        if Callback is not None and Callback not in self.callbacks:
            BUG("UNKNOWN CALLBACK")
        old = KeRaiseIrql(HIGH_LEVEL)
        try:
            self._run([Callback] if Callback is not None else list(self.callbacks), crashing=False)
        finally:
            KeLowerIrql(old)

    def _run(self, callbacks: list[DebugCallback], crashing: bool) -> None:
        if KeGetCurrentIrql() != HIGH_LEVEL:
            BUG("DEBUG CALLBACKS BELOW HIGH_LEVEL")
        for callback in callbacks:
            previous, self._current = self._current, callback
            current_log().print("xenbus", f"{callback.Prefix}: ====>", DbgLevel.INFO)
            try:
                callback.Function(callback.Argument, crashing)
            finally:
                self._current = previous
            current_log().print("xenbus", f"{callback.Prefix}: <====", DbgLevel.INFO)
