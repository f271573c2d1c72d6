"""XENIFACE's suspend IOCTLs, 0x830-0x832 (XI src/xeniface/ioctl_suspend.c at f12cbdb).

GET_COUNT takes no input and exactly a ULONG of output: XENBUS's SUSPEND.GetCount. REGISTER keeps the
caller's event, referenced through its handle, in the FDO's suspend list for the calling file object;
the FDO's SUSPEND LATE callback sets every one (SuspendEventFire) after a resume. DEREGISTER finds the
context among the calling handle's own (another handle's is STATUS_NOT_FOUND).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.io import FileObject
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_NOT_FOUND, STATUS_SUCCESS, NTSTATUS

from . import abi
from .request import Request, context_address


@dataclass(eq=False)
class SuspendContext:
    """XENIFACE_SUSPEND_CONTEXT."""

    event: KEvent
    file_object: FileObject
    address: int = field(default_factory=context_address)


def IoctlSuspendGetCount(request: Request) -> NTSTATUS:
    if request.in_len != 0 or request.out_len != abi.ULONG_SIZE:
        return abi.STATUS_INVALID_BUFFER_SIZE
    count = request.fdo.interfaces["SUSPEND"].SuspendGetCount()
    request.complete_with(bytes(abi.ULONG(count)))
    return STATUS_SUCCESS


def IoctlSuspendRegister(request: Request) -> NTSTATUS:
    if request.in_len != abi.XENIFACE_SUSPEND_REGISTER_IN.size() or \
            request.out_len != abi.XENIFACE_SUSPEND_REGISTER_OUT.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    handle = abi.XENIFACE_SUSPEND_REGISTER_IN.unpack(request.input).Event
    status, event = request.file_object.process.ObReferenceObjectByHandle(handle, KEvent)
    if not NT_SUCCESS(status):
        return status
    context = SuspendContext(event, request.file_object)
    request.state.suspends.append(context)
    request.complete_with(abi.XENIFACE_SUSPEND_REGISTER_OUT(Context=context.address).pack())
    return STATUS_SUCCESS


def SuspendFreeEvent(_state: Any, context: SuspendContext) -> None:
    """ObDereferenceObject: the model's event object lives on with its handle."""


def IoctlSuspendDeregister(request: Request) -> NTSTATUS:
    if request.in_len != abi.XENIFACE_SUSPEND_REGISTER_OUT.size() or request.out_len != 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    wanted = abi.XENIFACE_SUSPEND_REGISTER_OUT.unpack(request.input).Context
    for context in request.state.suspends:
        if context.address == wanted and context.file_object is request.file_object:
            request.state.suspends.remove(context)
            SuspendFreeEvent(request.state, context)
            return STATUS_SUCCESS
    return STATUS_NOT_FOUND


def SuspendEventFire(state: Any) -> None:
    for context in list(state.suspends):
        context.event.set()


