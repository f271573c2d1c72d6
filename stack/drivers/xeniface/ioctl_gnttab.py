"""XENIFACE's grant table IOCTLs, 0x820-0x827 (XI src/xeniface/ioctl_gnttab.c at f12cbdb).

PERMIT_FOREIGN_ACCESS (v1: by RequestId; v2: by address) grants NumberPages pages (1 .. 1M) to RemoteDomain
through XENBUS's GNTTAB cache "xeniface-gnttab", answers the address and the references, and leaves the
IRP pending: the grant lives as long as the request. REVOKE_FOREIGN_ACCESS finds the calling process's
pending grant (by RequestId or address), zeroes the notify byte and/or notifies the notify port if asked,
revokes every page and completes the pending IRP with STATUS_SUCCESS; none is STATUS_NOT_FOUND. A second
grant with a RequestId the process already uses is STATUS_INVALID_PARAMETER. The pending IRP's cancel
routine (the issuing thread's end: CsqCompleteCanceledIrp, CompleteGnttabIrp) frees the grant the same way
and completes it STATUS_CANCELLED. InLen must be the exact structure (OutLen exactly
FIELD_OFFSET(References[NumberPages])): STATUS_INVALID_BUFFER_SIZE; a notify offset past the region is
STATUS_INVALID_PARAMETER.

MAP_FOREIGN_PAGES checks its input as the C code does (InLen at least the header, exactly
FIELD_OFFSET(References[NumberPages]), NumberPages agreeing with the count the length implies) and then
asks GNTTAB.MapForeignPages, which the model's XENBUS does not implement (STATUS_NOT_SUPPORTED).

Modelled rather than real: pages shared from the caller's own memory (a v2 request with an Address) need a
user address space the model lacks; probing one fails as an unmapped address does (STATUS_ACCESS_VIOLATION).
The driver's own pages come from the kernel's page allocator; the address handed back stands for their user
mapping. The legacy v1 PERMIT converts its input with `In->NumberPages = In->NumberPages` (the v2 copy's
own, uninitialised, field): the model takes In1->NumberPages, what the code means.

The XENIFACE_GNTTAB_CONTEXT of a PERMIT is nonpaged pool ('XIfc'): IoctlGnttabPermitForeignAccess allocates
it, GnttabPermitForeignAccess checks the RequestId/address and grants the pages, and on its failure the
IOCTL zeroes and frees the context (fail8); a revoke or a cancel zeroes and frees it the same way
(GnttabFreeGrant). Bug switch xeniface-1019522 puts back the pre-fix GnttabPermitForeignAccess, which freed
the context on failure too: the IOCTL's RtlZeroMemory then writes to freed pool.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers import bugs
from xenpv.stack.kernel import IoCompleteRequest, Irp
from xenpv.stack.kernel.io import IoCompleteCancelled, IoSetCancelRoutine, UserProcess
from xenpv.stack.kernel.mm import Mdl, current_mm
from xenpv.stack.kernel.pool import POOL_TYPE, ExAllocatePoolWithTag, ExFreePoolWithTag, MmAccess, PoolBlock, pool_tag
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND, STATUS_PENDING,
                                       STATUS_SUCCESS, NTSTATUS)

from . import abi
from .ioctl_evtchn import EvtchnNotify
from .request import Request

log = logging.getLogger("stack.drivers.xeniface.gnttab")

PAGE_SIZE = 4096
MAX_PAGES = 1024 * 1024
GRANT, MAP = 1, 2  # XENIFACE_GNTTAB_CONTEXT_TYPE
XENIFACE_POOL_TAG = pool_tag("cfIX")  # driver.h 'XIfc'
GNTTAB_CONTEXT_SIZE = 0x68  # sizeof (XENIFACE_GNTTAB_CONTEXT) on x64, near enough: nothing reads it
_user_addresses = itertools.count(0x0000_7FF0_0000_0000, 0x100_0000)  # one 16 MiB slot per region


@dataclass(eq=False)
class GnttabContext:
    """XENIFACE_GNTTAB_CONTEXT."""

    type: int
    process: UserProcess
    use_request_id: bool
    request_id: int
    remote_domain: int
    number_pages: int
    flags: int
    notify_offset: int
    notify_port: int
    grants: list[Any] = field(default_factory=list)
    mdl: Mdl | None = None
    user_va: int = 0
    irp: Irp | None = None
    pool: PoolBlock | None = None  # the allocation that holds this context (a PERMIT's)


def _same(a: GnttabContext, b: GnttabContext) -> bool:
    """irp_queue.c CsqPeekNextIrp: same type and process, then the same RequestId or address."""
    if a.type != b.type or a.process is not b.process or a.use_request_id != b.use_request_id:
        return False
    return a.request_id == b.request_id if a.use_request_id else a.user_va == b.user_va


def FindGnttabIrp(state: Any, context: GnttabContext) -> GnttabContext | None:
    return next((c for c in state.gnttab_queue if _same(c, context)), None)


def GnttabStopSharing(state: Any, context: GnttabContext) -> None:
    gnttab = state.fdo.interfaces["GNTTAB"]
    for entry in context.grants:
        status = gnttab.GnttabRevokeForeignAccess(state.fdo.gnttab_cache, False, entry)
        if not NT_SUCCESS(status):  # ASSERT in the C code; the page is not returned to the pool then
            log.error("revoking grant %d: %#x", gnttab.GnttabGetReference(entry), status)
            context.mdl = None
    context.grants = []
    if context.mdl is not None:
        current_mm().MmFreePagesFromMdl(context.mdl)
        context.mdl = None


def GnttabFreeGrant(state: Any, context: GnttabContext) -> None:
    if context.flags & abi.XENIFACE_GNTTAB_USE_NOTIFY_OFFSET and context.mdl is not None:
        current_mm().write(context.mdl, context.notify_offset, b"\0")
    if context.flags & abi.XENIFACE_GNTTAB_USE_NOTIFY_PORT:
        status = EvtchnNotify(state, context.notify_port, None)
        if not NT_SUCCESS(status):  # non-fatal: the memory must be freed
            log.warning("grant notify port %d: %#x", context.notify_port, status)
    GnttabStopSharing(state, context)
    MmAccess(context.pool, "XENIFACE_GNTTAB_CONTEXT", write=True)  # RtlZeroMemory(Context, sizeof (*Context))
    ExFreePoolWithTag(context.pool, XENIFACE_POOL_TAG)


def GnttabPermitForeignAccess(request: Request, context: GnttabContext) -> NTSTATUS:
    """The request's pages granted to its remote domain; on failure what was granted is revoked (fail1:
    GnttabStopSharing) and the context is left to the caller, which frees it."""
    status = _permit(request, context)
    if not NT_SUCCESS(status):
        GnttabStopSharing(request.state, context)
        if bugs.enabled("xeniface-1019522"):  # before 1019522 fail1 also zeroed and freed the context
            MmAccess(context.pool, "XENIFACE_GNTTAB_CONTEXT", write=True)
            ExFreePoolWithTag(context.pool, XENIFACE_POOL_TAG)
    return status


def _permit(request: Request, context: GnttabContext) -> NTSTATUS:
    if not context.use_request_id and context.user_va:
        return abi.STATUS_ACCESS_VIOLATION  # MmProbeAndLockPages of caller memory: see the module docstring
    if FindGnttabIrp(request.state, context) is not None:
        return STATUS_INVALID_PARAMETER
    gnttab = request.fdo.interfaces["GNTTAB"]
    context.mdl = current_mm().MmAllocatePagesForMdl(context.number_pages)
    for pfn in context.mdl.pfns:
        status, entry = gnttab.GnttabPermitForeignAccess(request.fdo.gnttab_cache, False, context.remote_domain, pfn,
                                                         bool(context.flags & abi.XENIFACE_GNTTAB_READONLY))
        if not NT_SUCCESS(status):
            return status
        context.grants.append(entry)
    context.user_va = next(_user_addresses)
    return STATUS_SUCCESS


def IoctlGnttabPermitForeignAccess(request: Request) -> NTSTATUS:
    legacy = request.code == abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS
    layout = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN if legacy else abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN_V2
    if request.in_len != layout.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    header = layout.unpack(request.input)
    pages, flags = header.NumberPages, header.Flags
    if pages == 0 or pages > MAX_PAGES:
        return STATUS_INVALID_PARAMETER
    if flags & abi.XENIFACE_GNTTAB_USE_NOTIFY_OFFSET and header.NotifyOffset >= pages * PAGE_SIZE:
        return STATUS_INVALID_PARAMETER
    if request.out_len != abi.field_offset(abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, "References", pages):
        return abi.STATUS_INVALID_BUFFER_SIZE
    context = GnttabContext(GRANT, request.file_object.process, legacy, header.RequestId if legacy else 0,
                            header.RemoteDomain, pages, flags, header.NotifyOffset, header.NotifyPort,
                            user_va=0 if legacy else header.Address)
    context.pool = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, GNTTAB_CONTEXT_SIZE, XENIFACE_POOL_TAG,
                                         contents=context)
    status = GnttabPermitForeignAccess(request, context)
    if not NT_SUCCESS(status):  # fail8: RtlZeroMemory(Context, sizeof (*Context)), then the free
        MmAccess(context.pool, "XENIFACE_GNTTAB_CONTEXT", write=True)
        ExFreePoolWithTag(context.pool, XENIFACE_POOL_TAG)
        return status
    state, gnttab = request.state, request.fdo.interfaces["GNTTAB"]
    references = [gnttab.GnttabGetReference(e) for e in context.grants]
    out = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT(Address=context.user_va).pack()[:8]
    request.complete_with(out + b"".join(r.to_bytes(4, "little") for r in references))
    context.irp = request.irp
    state.gnttab_queue.append(context)
    IoSetCancelRoutine(request.irp, lambda irp: _cancel(state, context))
    log.info("granted %d page(s) to dom%d: refs %s", pages, context.remote_domain, references)
    return STATUS_PENDING


def _cancel(state: Any, context: GnttabContext) -> None:
    """CsqCompleteCanceledIrp -> CompleteGnttabIrp: free it, complete the IRP STATUS_CANCELLED."""
    if context in state.gnttab_queue:
        state.gnttab_queue.remove(context)
    if context.type == GRANT:
        GnttabFreeGrant(state, context)
    assert context.irp is not None
    IoCompleteCancelled(context.irp)


def _remove_pending(request: Request, kind: int, legacy: bool, layout: type[abi.Layout]) -> GnttabContext | None:
    header = layout.unpack(request.input)
    seek = GnttabContext(kind, request.file_object.process, legacy, header.RequestId if legacy else 0, 0, 0, 0, 0, 0,
                         user_va=0 if legacy else header.Address)
    found = FindGnttabIrp(request.state, seek)
    if found is not None:
        request.state.gnttab_queue.remove(found)
        assert found.irp is not None
        IoSetCancelRoutine(found.irp, None)
    return found


def IoctlGnttabRevokeForeignAccess(request: Request) -> NTSTATUS:
    legacy = request.code == abi.IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS
    layout = abi.XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_IN if legacy else abi.XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_IN_V2
    if request.in_len != layout.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    context = _remove_pending(request, GRANT, legacy, layout)
    if context is None:
        return STATUS_NOT_FOUND
    GnttabFreeGrant(request.state, context)
    assert context.irp is not None
    context.irp.io_status.status = STATUS_SUCCESS
    context.irp.io_status.information = None
    IoCompleteRequest(context.irp)
    return STATUS_SUCCESS


def IoctlGnttabMapForeignPages(request: Request) -> NTSTATUS:
    legacy = request.code == abi.IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES
    layout = abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN if legacy else abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN_V2
    if request.in_len < layout.size() or request.out_len != abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_OUT.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    header = layout.unpack(request.input)
    implied = (request.in_len - abi.field_offset(layout, "References", 0)) // abi.ULONG_SIZE
    pages = header.NumberPages
    if pages == 0 or pages > MAX_PAGES or pages != implied:
        return STATUS_INVALID_PARAMETER
    if header.Flags & abi.XENIFACE_GNTTAB_USE_NOTIFY_OFFSET and header.NotifyOffset >= pages * PAGE_SIZE:
        return STATUS_INVALID_PARAMETER
    if request.in_len != abi.field_offset(abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN_V2, "References", pages):
        # The C code checks against the v2 layout for both IOCTLs, so a valid legacy request (whose
        # References start 4 bytes later) always fails here.
        return abi.STATUS_INVALID_BUFFER_SIZE
    context = GnttabContext(MAP, request.file_object.process, legacy, header.RequestId if legacy else 0,
                            header.RemoteDomain, pages, header.Flags, header.NotifyOffset, header.NotifyPort)
    if FindGnttabIrp(request.state, context) is not None:
        return STATUS_INVALID_PARAMETER
    at = abi.field_offset(layout, "References", 0)
    references = [int.from_bytes(request.input[at + 4 * i:at + 4 * i + 4], "little") for i in range(pages)]
    status, _address = request.fdo.interfaces["GNTTAB"].GnttabMapForeignPages(
        context.remote_domain, pages, references, bool(header.Flags & abi.XENIFACE_GNTTAB_READONLY))
    return status  # not reached with success: the model's GNTTAB maps no foreign pages


def IoctlGnttabUnmapForeignPages(request: Request) -> NTSTATUS:
    legacy = request.code == abi.IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES
    layout = abi.XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_IN if legacy else abi.XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_IN_V2
    if request.in_len != layout.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    return STATUS_NOT_FOUND if _remove_pending(request, MAP, legacy, layout) is None else STATUS_SUCCESS
