"""XENIFACE's event channel IOCTLs, 0x810-0x814 (XI src/xeniface/ioctl_evtchn.c at f12cbdb).

BIND_UNBOUND and BIND_INTERDOMAIN open a channel through XENBUS's EVTCHN.Open with XENIFACE's interrupt
handler, which queues the context's DPC; the DPC (EvtchnNotificationDpc) sets the user's event and unmasks
the channel again. Unless the caller asked for it masked, the channel is unmasked at once. CLOSE, NOTIFY and
UNMASK find the channel by local port among the calling handle's own: CLOSE and NOTIFY answer
STATUS_NOT_FOUND for another handle's port, UNMASK STATUS_INVALID_PARAMETER (as the C code does). A failed
Open is STATUS_UNSUCCESSFUL.

EvtchnFree (CLOSE, and cleanup) takes the channel out of the context first, so a DPC already queued finds
none and does nothing (fa2c84a's use-after-free fix), then closes it. KeFlushQueuedDpcs has no
equivalent on the model's one processor: a queued DPC is simply taken off the queue.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.xenbus.evtchn import EvtchnType
from xenpv.stack.kernel.dpc import KDpc, KeInitializeDpc, KeInsertQueueDpc, KeRemoveQueueDpc
from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, KeLowerIrql, KeRaiseIrql
from xenpv.stack.kernel.io import FileObject
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_SUCCESS,
                                       STATUS_UNSUCCESSFUL, NTSTATUS)

from . import abi
from .request import Request, context_address

log = logging.getLogger("stack.drivers.xeniface.evtchn")


@dataclass(eq=False)
class EvtchnContext:
    """XENIFACE_EVTCHN_CONTEXT."""

    event: KEvent
    file_object: FileObject
    fdo: Any
    channel: Any = None
    local_port: int = 0
    dpc: KDpc | None = None
    address: int = field(default_factory=context_address)


def EvtchnNotificationDpc(_dpc: KDpc, context: EvtchnContext, _a1: Any, _a2: Any) -> None:
    channel = context.channel
    if channel is None:
        return
    context.event.set()
    context.fdo.interfaces["EVTCHN"].EvtchnUnmask(channel, False, True)


def EvtchnInterruptHandler(_interrupt: Any, context: EvtchnContext) -> bool:
    assert context.dpc is not None
    KeInsertQueueDpc(context.dpc)
    return True


def _bind(request: Request, in_layout: type[abi.Layout], out_layout: type[abi.Layout], kind: EvtchnType) -> NTSTATUS:
    if request.in_len != in_layout.size() or request.out_len != out_layout.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    header = in_layout.unpack(request.input)
    status, event = request.file_object.process.ObReferenceObjectByHandle(header.Event, KEvent)
    if not NT_SUCCESS(status):
        return status
    context = EvtchnContext(event, request.file_object, request.fdo)
    context.dpc = KeInitializeDpc(EvtchnNotificationDpc, context, module="xeniface.sys")
    evtchn = request.fdo.interfaces["EVTCHN"]
    if kind == EvtchnType.EVTCHN_UNBOUND:
        channel = evtchn.EvtchnOpen(kind, EvtchnInterruptHandler, context, header.RemoteDomain, True)
    else:
        channel = evtchn.EvtchnOpen(kind, EvtchnInterruptHandler, context, header.RemoteDomain, header.RemotePort,
                                    True)
    if channel is None:
        return STATUS_UNSUCCESSFUL
    context.local_port = evtchn.EvtchnGetPort(channel)
    context.channel = channel
    request.state.evtchns.append(context)
    if not header.Mask:
        evtchn.EvtchnUnmask(channel, False, True)
    request.complete_with(out_layout(LocalPort=context.local_port).pack())
    log.info("bound %s: local port %d for %r", kind.name, context.local_port, request.file_object)
    return STATUS_SUCCESS


def IoctlEvtchnBindUnbound(request: Request) -> NTSTATUS:
    return _bind(request, abi.XENIFACE_EVTCHN_BIND_UNBOUND_IN, abi.XENIFACE_EVTCHN_BIND_UNBOUND_OUT,
                 EvtchnType.EVTCHN_UNBOUND)


def IoctlEvtchnBindInterdomain(request: Request) -> NTSTATUS:
    return _bind(request, abi.XENIFACE_EVTCHN_BIND_INTERDOMAIN_IN, abi.XENIFACE_EVTCHN_BIND_INTERDOMAIN_OUT,
                 EvtchnType.EVTCHN_INTER_DOMAIN)


def EvtchnFree(state: Any, context: EvtchnContext) -> None:
    channel, context.channel = context.channel, None
    if context.dpc is not None:
        KeRemoveQueueDpc(context.dpc)
    if channel is not None:
        state.fdo.interfaces["EVTCHN"].EvtchnClose(channel)


def EvtchnFindChannel(state: Any, local_port: int, file_object: FileObject | None) -> EvtchnContext | None:
    for context in state.evtchns:
        if context.local_port == local_port and (file_object is None or context.file_object is file_object):
            return context
    return None


def _port(request: Request, layout: type[abi.Layout]) -> int | None:
    if request.in_len != layout.size() or request.out_len != 0:
        return None
    return layout.unpack(request.input).LocalPort


def IoctlEvtchnClose(request: Request) -> NTSTATUS:
    port = _port(request, abi.XENIFACE_EVTCHN_CLOSE_IN)
    if port is None:
        return abi.STATUS_INVALID_BUFFER_SIZE
    context = EvtchnFindChannel(request.state, port, request.file_object)
    if context is None:
        return STATUS_NOT_FOUND
    request.state.evtchns.remove(context)
    EvtchnFree(request.state, context)
    return STATUS_SUCCESS


def EvtchnNotify(state: Any, local_port: int, file_object: FileObject | None) -> NTSTATUS:
    context = EvtchnFindChannel(state, local_port, file_object)
    if context is None:
        return STATUS_NOT_FOUND
    # XI sends holding Fdo->EvtchnLock, i.e. at DISPATCH_LEVEL, which EVTCHN's Send ASSERTs (evtchn.c).
    old = KeRaiseIrql(DISPATCH_LEVEL)
    try:
        state.fdo.interfaces["EVTCHN"].EvtchnSend(context.channel)
    finally:
        KeLowerIrql(old)
    return STATUS_SUCCESS


def IoctlEvtchnNotify(request: Request) -> NTSTATUS:
    port = _port(request, abi.XENIFACE_EVTCHN_NOTIFY_IN)
    if port is None:
        return abi.STATUS_INVALID_BUFFER_SIZE
    return EvtchnNotify(request.state, port, request.file_object)


def IoctlEvtchnUnmask(request: Request) -> NTSTATUS:
    port = _port(request, abi.XENIFACE_EVTCHN_UNMASK_IN)
    if port is None:
        return abi.STATUS_INVALID_BUFFER_SIZE
    context = EvtchnFindChannel(request.state, port, request.file_object)
    if context is None:
        return STATUS_INVALID_PARAMETER
    request.fdo.interfaces["EVTCHN"].EvtchnUnmask(context.channel, False, True)
    return STATUS_SUCCESS
