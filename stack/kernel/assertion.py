"""The PV drivers' ASSERT: a check a checked build makes and a free build does not (src/common/assert.h).

Under `#if DBG` (a checked build) a false ASSERT logs "ASSERTION FAILED: <expression>" and executes
DbgRaiseAssertionFailure (int 0x2c), which raises STATUS_ASSERTION_FAILURE in the caller. With no kernel
debugger attached nothing handles it: in an ISR or a DPC the kernel stops with KMODE_EXCEPTION_NOT_HANDLED
(0x1E), in a system thread (where the model's other code runs: PnP and power dispatch, the drivers' own
threads) the thread's start frame stops it with SYSTEM_THREAD_EXCEPTION_NOT_HANDLED (0x7E); P1 is
0xC0000420 either way. A free build compiles ASSERT to nothing, so execution goes on past the broken rule.
BUG() is not an ASSERT: it stops both builds (bugcheck.BUG).

The build is the guest's (guests.schema `build: free|checked`): `set_build` runs at every boot, next to
the bug switches, before any driver loads.
"""
from __future__ import annotations

import logging
import sys
from types import FrameType

from .bugcheck import BugCheckCode, KeBugCheckEx, caller_module
from .debuglog import DbgLevel, DebugLog, current_log

log = logging.getLogger("stack.kernel.assertion")

BUILDS = ("free", "checked")
STATUS_ASSERTION_FAILURE = 0xC0000420

_build = "free"


def set_build(build: str, debug_log: DebugLog | None = None) -> None:
    """This boot's driver build: "free" (the default) or "checked"; a checked one is said in `debug_log`."""
    global _build
    if build not in BUILDS:
        raise ValueError(f"no driver build {build!r} (known: {', '.join(BUILDS)})")
    _build = build
    if build != "free" and debug_log is not None:
        debug_log.print("SETUP", f"PV drivers: {build} build (a failed ASSERT stops the guest)", DbgLevel.WARNING)


def current_build() -> str:
    return _build


def ASSERT(condition: object, expression: str, *, module: str | None = None) -> None:
    """`ASSERT(expression)`: `expression` is the C text the checked build logs. Returns (doing nothing)
    when the condition holds or the build is free."""
    if condition or _build != "checked":
        return
    caller = sys._getframe(1)
    culprit = module or caller_module(caller)
    current_log().print(culprit.removesuffix(".sys"), f"ASSERTION FAILED: {expression}", DbgLevel.ERROR)
    code = (BugCheckCode.KMODE_EXCEPTION_NOT_HANDLED if _in_interrupt_or_dpc(caller)
            else BugCheckCode.SYSTEM_THREAD_EXCEPTION_NOT_HANDLED)
    where = f"{caller.f_code.co_filename}:{caller.f_lineno}"
    raise KeBugCheckEx(code, STATUS_ASSERTION_FAILURE, where, 0, 0, module=culprit,
                       message=f"ASSERTION FAILED: {expression}")


def _in_interrupt_or_dpc(frame: FrameType | None) -> bool:
    """Whether the kernel model's ISR or DPC delivery is on the stack (dpc.py): no thread start frame
    catches an exception there."""
    from .dpc import KDpc, KInterrupt  # dpc imports bugcheck; import late, as bugcheck does irql

    deliveries = {KDpc.deliver.__code__, KInterrupt.deliver.__code__}
    while frame is not None:
        if frame.f_code in deliveries:
            return True
        frame = frame.f_back
    return False
