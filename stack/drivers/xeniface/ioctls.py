"""XENIFACE's IOCTL dispatcher and per-handle state (XI src/xeniface/ioctls.c at f12cbdb: XenIfaceIoctl,
XenIfaceCleanup, IoctlLog); the handlers are grouped by area as the C files are: ioctl_store.py,
ioctl_evtchn.py, ioctl_gnttab.py, ioctl_suspend.py, ioctl_sharedinfo.py.

XenIfaceIoctl answers STATUS_DEVICE_NOT_READY while the FDO's interfaces are not acquired (before START,
in D3), STATUS_ACCESS_DENIED to a handle not opened for both reading and writing
(WdmlibIoValidateDeviceIoControlAccess), STATUS_INVALID_DEVICE_REQUEST for a code it does not know, and otherwise what the handler
returns; only STATUS_PENDING leaves the IRP uncompleted (the grant and map requests, held until revoked
or cancelled). Sizes are checked as the C code checks them: a wrong InLen or OutLen is
STATUS_INVALID_BUFFER_SIZE, bad content STATUS_INVALID_PARAMETER, a STORE_READ or DIRECTORY with no output
buffer STATUS_BUFFER_OVERFLOW with the needed length in Information.

Store watches, event channels and suspend events belong to the file object (handle) that made them and
go at its IRP_MJ_CLEANUP (XenIfaceCleanup(Fdo, FileObject)); all of them go when the FDO leaves D0
(XenIfaceCleanup(Fdo, NULL)). Grants and maps belong to the pending IRP, so to the process whose thread
issued it: they go on revoke/unmap or when the IRP is cancelled (the thread's end), not at cleanup.

Contexts handed to user mode (a watch's or a suspend registration's PVOID Context) are the context's
address; a Context user mode passes back is only ever compared with the list's entries, never followed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from xenpv.stack.kernel import Irp, IoCompleteRequest
from xenpv.stack.kernel.debuglog import current_log
from xenpv.stack.kernel.io import (FILE_READ_ACCESS, FILE_WRITE_ACCESS, DeviceIoControlParameters, FileObject,
                                   WdmlibIoValidateDeviceIoControlAccess)
from xenpv.stack.kernel.status import (STATUS_DEVICE_NOT_READY, STATUS_INVALID_DEVICE_REQUEST,
                                       STATUS_INVALID_PARAMETER, STATUS_PENDING, STATUS_SUCCESS, NTSTATUS)

from . import abi
from . import ioctl_evtchn, ioctl_gnttab, ioctl_sharedinfo, ioctl_store, ioctl_suspend
from .request import Request

log = logging.getLogger("stack.drivers.xeniface.ioctls")

Handler = Callable[[Request], NTSTATUS]


@dataclass
class XenIfaceState:
    """The FDO's lists (StoreWatchList, EvtchnList, SuspendList, the gnttab IRP queue)."""

    fdo: Any  # the XenifaceFdo (fdo.py imports this module)
    store_watches: list[Any] = field(default_factory=list)
    evtchns: list[Any] = field(default_factory=list)
    suspends: list[Any] = field(default_factory=list)
    gnttab_queue: list[Any] = field(default_factory=list)  # (IRP, context) of pending grant/map requests

    def XenIfaceIoctl(self, irp: Irp) -> NTSTATUS:
        params: DeviceIoControlParameters = irp.parameters
        request = Request(self, self.fdo, irp, params.io_control_code, params.input, params.output_length, params.file_object)
        if not self.fdo.InterfacesAcquired:
            status = STATUS_DEVICE_NOT_READY
        elif (status := WdmlibIoValidateDeviceIoControlAccess(params, FILE_READ_ACCESS | FILE_WRITE_ACCESS)) \
                != STATUS_SUCCESS:
            pass  # a handle not opened for reading and writing may not send any of them
        else:
            handler = HANDLERS.get(request.code)
            status = STATUS_INVALID_DEVICE_REQUEST if handler is None else handler(request)
        irp.io_status.status = status
        if status != STATUS_PENDING:
            IoCompleteRequest(irp)
        return status

    def XenIfaceCleanup(self, file_object: FileObject | None) -> None:
        """The store watches, event channels and suspend events of `file_object` (None: everyone's)."""
        mine = (lambda c: True) if file_object is None else (lambda c: c.file_object is file_object)
        for context in [c for c in self.store_watches if mine(c)]:
            self.store_watches.remove(context)
            ioctl_store.StoreFreeWatch(self, context)
        for context in [c for c in self.evtchns if mine(c)]:
            self.evtchns.remove(context)
            ioctl_evtchn.EvtchnFree(self, context)
        for context in [c for c in self.suspends if mine(c)]:
            self.suspends.remove(context)
            ioctl_suspend.SuspendFreeEvent(self, context)

    def SuspendEventFire(self) -> None:
        ioctl_suspend.SuspendEventFire(self)

    def owned_by(self, file_object: FileObject) -> dict[str, int]:
        """What one handle holds, for the console and tests."""
        return {"watches": sum(c.file_object is file_object for c in self.store_watches),
                "evtchns": sum(c.file_object is file_object for c in self.evtchns),
                "suspend_events": sum(c.file_object is file_object for c in self.suspends)}


def is_valid_log_str(data: bytes) -> bool:
    """ioctls.c __IsValidStr: printable or CR/LF up to a NUL, which must come within the buffer."""
    for byte in data:
        if byte == 0:
            return True
        if byte in (0x0A, 0x0D):
            continue
        if not 0x20 <= byte < 0x7F:
            return False
    return False


def IoctlLog(request: Request) -> NTSTATUS:
    if request.in_len == 0 or request.in_len > abi.XENIFACE_LOG_MAX_LENGTH or request.out_len != 0:
        return abi.STATUS_INVALID_BUFFER_SIZE
    if not is_valid_log_str(request.input):
        return STATUS_INVALID_PARAMETER
    message = request.input.split(b"\0", 1)[0].rstrip(b"\r\n").decode("ascii")
    current_log().print("XENIFACE", f"USER: {message}")
    return STATUS_SUCCESS


HANDLERS: dict[int, Handler] = {
    abi.IOCTL_XENIFACE_STORE_READ: ioctl_store.IoctlStoreRead,
    abi.IOCTL_XENIFACE_STORE_WRITE: ioctl_store.IoctlStoreWrite,
    abi.IOCTL_XENIFACE_STORE_DIRECTORY: ioctl_store.IoctlStoreDirectory,
    abi.IOCTL_XENIFACE_STORE_REMOVE: ioctl_store.IoctlStoreRemove,
    abi.IOCTL_XENIFACE_STORE_SET_PERMISSIONS: ioctl_store.IoctlStoreSetPermissions,
    abi.IOCTL_XENIFACE_STORE_ADD_WATCH: ioctl_store.IoctlStoreAddWatch,
    abi.IOCTL_XENIFACE_STORE_REMOVE_WATCH: ioctl_store.IoctlStoreRemoveWatch,
    abi.IOCTL_XENIFACE_EVTCHN_BIND_UNBOUND: ioctl_evtchn.IoctlEvtchnBindUnbound,
    abi.IOCTL_XENIFACE_EVTCHN_BIND_INTERDOMAIN: ioctl_evtchn.IoctlEvtchnBindInterdomain,
    abi.IOCTL_XENIFACE_EVTCHN_CLOSE: ioctl_evtchn.IoctlEvtchnClose,
    abi.IOCTL_XENIFACE_EVTCHN_NOTIFY: ioctl_evtchn.IoctlEvtchnNotify,
    abi.IOCTL_XENIFACE_EVTCHN_UNMASK: ioctl_evtchn.IoctlEvtchnUnmask,
    abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS: ioctl_gnttab.IoctlGnttabPermitForeignAccess,
    abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_V2: ioctl_gnttab.IoctlGnttabPermitForeignAccess,
    abi.IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS: ioctl_gnttab.IoctlGnttabRevokeForeignAccess,
    abi.IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_V2: ioctl_gnttab.IoctlGnttabRevokeForeignAccess,
    abi.IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES: ioctl_gnttab.IoctlGnttabMapForeignPages,
    abi.IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_V2: ioctl_gnttab.IoctlGnttabMapForeignPages,
    abi.IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES: ioctl_gnttab.IoctlGnttabUnmapForeignPages,
    abi.IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_V2: ioctl_gnttab.IoctlGnttabUnmapForeignPages,
    abi.IOCTL_XENIFACE_SUSPEND_GET_COUNT: ioctl_suspend.IoctlSuspendGetCount,
    abi.IOCTL_XENIFACE_SUSPEND_REGISTER: ioctl_suspend.IoctlSuspendRegister,
    abi.IOCTL_XENIFACE_SUSPEND_DEREGISTER: ioctl_suspend.IoctlSuspendDeregister,
    abi.IOCTL_XENIFACE_SHAREDINFO_GET_TIME: ioctl_sharedinfo.IoctlSharedInfoGetTime,
    abi.IOCTL_XENIFACE_LOG: IoctlLog,
}
