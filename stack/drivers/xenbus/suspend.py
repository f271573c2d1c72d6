"""XENBUS SUSPEND interface v1 (reference windows-pv-drivers.md 1 and 7; XB src/xenbus/suspend.c).

Clients register EARLY callbacks (run at HIGH_LEVEL straight after the domain comes back, before
interrupts are enabled) and LATE callbacks (at DISPATCH_LEVEL afterwards); each list runs in
registration order. `Trigger` is the migration path, as suspend.c's SuspendTrigger:
1. PASSIVE only; raise to DISPATCH; SyncCapture the other CPUs and disable interrupts;
2. SCHEDOP_shutdown(SHUTDOWN_suspend): the vCPU stays in it until the toolstack resumes the domain (the
   hypercall returns 1: cancelled, a checkpoint, as STATUS_CANCELLED) or its state runs in a new domain
   (returns 0);
3. only when it returned 0: SuspendEarly - Count++, vcpu_info re-registered, then (CPU 0) UnplugDevices
   before the EARLY list at HIGH_LEVEL (08def99: the new domain's device model has the emulated devices
   again);
4. interrupts enabled; again only after a resume in a new domain, the LATE list at DISPATCH_LEVEL;
5. SyncRelease, back to the caller's IRQL. Trigger itself returns STATUS_SUCCESS whatever happened.

The hypercall belongs to xen.sys; the FDO hands it in as `suspend_domain`, a callable returning the
NTSTATUS of SchedShutdown (STATUS_CANCELLED for a return value of 1). The model has one vCPU: "corral the
other CPUs" is `sync_capture`, a context the FDO supplies that keeps the guest's other threads out of the
xenstore ring while the domain goes away (they would otherwise be inside it, notifying a port of the old
domain); the per-CPU SuspendEarly is the single Count++ here. `unplug_devices` is xen.sys's UnplugDevices.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.pool import MmAccess
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, HIGH_LEVEL, KeLowerIrql, KeRaiseIrql, assert_passive
from xenpv.stack.kernel.debuglog import current_log
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_SUCCESS, NTSTATUS, status_name

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
    TABLES = LAYOUTS["SUSPEND"]  # its header names the members Register...; tables answer to SuspendRegister...

    def __init__(self, debug: DebugInterface, suspend_domain: Callable[[], int],
                 sync_capture: Callable[[], AbstractContextManager[Any]] | None = None,
                 unplug_devices: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.debug = debug
        self.suspend_domain = suspend_domain
        self.sync_capture = sync_capture or contextlib.nullcontext
        self.unplug_devices = unplug_devices
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
        """suspend.c SuspendRegister: an unknown Type is `default: ASSERT(FALSE)`; a free build returns
        STATUS_SUCCESS with a callback on neither list, which never runs."""
        callback = SuspendCallback(Type, Function, Argument)  # type: ignore[arg-type]
        if Type == SUSPEND_CALLBACK_EARLY:
            self.early.append(callback)
        elif Type == SUSPEND_CALLBACK_LATE:
            self.late.append(callback)
        else:
            ASSERT(False, "FALSE")
            log.warning("SuspendRegister: unknown callback type %r: the callback will never run", Type)
        return STATUS_SUCCESS, callback

    def SuspendDeregister(self, Callback: SuspendCallback) -> None:
        # suspend.c: RemoveEntryList(&Callback->ListEntry) under Context->Lock, i.e. at DISPATCH_LEVEL; a
        # NULL Callback (a client deregistering twice, xennet 0e04a15) faults right there.
        with self._lock.held():
            MmAccess(Callback, "ListEntry", write=True)
            callbacks = self.early if Callback.Type == SUSPEND_CALLBACK_EARLY else self.late
            if Callback not in callbacks:
                BUG("UNKNOWN CALLBACK")
            callbacks.remove(Callback)

    def _print(self, text: str) -> None:
        # suspend.c's LogPrintf lines: the guest's debug log is how a test sees which way it came back.
        log.info("%s", text)
        current_log().print("XENBUS", text)

    def SuspendTrigger(self) -> NTSTATUS:
        assert_passive("SuspendTrigger")
        old = KeRaiseIrql(DISPATCH_LEVEL)
        try:
            self._print("SUSPEND: ====>")
            with self.sync_capture():
                self._print("SUSPEND: SCHEDOP_shutdown:SHUTDOWN_suspend ====>")
                status = self.suspend_domain()
                self._print(f"SUSPEND: SCHEDOP_shutdown:SHUTDOWN_suspend <==== ({status:08x} "
                            f"{status_name(status)})")
                if NT_SUCCESS(status):
                    self._early()
                if NT_SUCCESS(status):
                    self._late()
            self._print("SUSPEND: <====")
            return STATUS_SUCCESS
        finally:
            KeLowerIrql(old)

    def _early(self) -> None:
        """SuspendEarly on CPU 0, at HIGH_LEVEL with interrupts off."""
        KeRaiseIrql(HIGH_LEVEL)
        self._print("SUSPEND: EARLY (0)")
        self.count += 1
        # SystemProcessorRegisterVcpuInfo: the model's vCPU uses the legacy vcpu_info slot 0 of shared_info,
        # which the SHARED_INFO EARLY callback maps again; nothing else to register.
        if self.unplug_devices is not None:
            self.unplug_devices()
        for callback in list(self.early):
            callback.Function(callback.Argument)
        KeLowerIrql(DISPATCH_LEVEL)

    def _late(self) -> None:
        """SuspendLate on CPU 0, at DISPATCH_LEVEL."""
        self._print("SUSPEND: LATE (0)")
        for callback in list(self.late):
            callback.Function(callback.Argument)

    def SuspendGetCount(self) -> int:
        return self.count
