"""XENIFACE's IOCTL_XENIFACE_SHAREDINFO_GET_TIME, 0x840 (XI src/xeniface/ioctl_sharedinfo.c at f12cbdb): no
input, exactly XENIFACE_SHAREDINFO_GET_TIME_OUT of output, filled from XENBUS's SHARED_INFO.GetTime (the
wall clock as a FILETIME, and whether the RTC keeps local time)."""
from __future__ import annotations

from xenpv.stack.kernel.status import STATUS_SUCCESS, NTSTATUS

from . import abi
from .request import Request


def IoctlSharedInfoGetTime(request: Request) -> NTSTATUS:
    if request.in_len != 0 or request.out_len != abi.XENIFACE_SHAREDINFO_GET_TIME_OUT.size():
        return abi.STATUS_INVALID_BUFFER_SIZE
    time, local = request.fdo.interfaces["SHARED_INFO"].SharedInfoGetTime()
    out = abi.XENIFACE_SHAREDINFO_GET_TIME_OUT(Local=1 if local else 0)
    out.Time.dwLowDateTime = time & 0xFFFFFFFF
    out.Time.dwHighDateTime = (time >> 32) & 0xFFFFFFFF
    request.complete_with(out.pack())
    return STATUS_SUCCESS
