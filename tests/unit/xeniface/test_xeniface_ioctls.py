"""XENIFACE's IOCTLs against XI src/xeniface/ioctl_*.c at f12cbdb (function names in each test)."""
from __future__ import annotations

import ctypes

import pytest

from xenpv.stack.drivers.xeniface import abi
from xenpv.stack.kernel.io import IoError
from xenpv.stack.kernel.status import (STATUS_BUFFER_OVERFLOW, STATUS_CANCELLED, STATUS_DEVICE_NOT_READY,
                                       STATUS_INVALID_DEVICE_REQUEST, STATUS_INVALID_PARAMETER, STATUS_NOT_FOUND,
                                       STATUS_NOT_SUPPORTED, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_PENDING,
                                       STATUS_SUCCESS)


def test_ioctl_codes_are_ctl_code_of_the_header() -> None:
    """xeniface_ioctls.h: CTL_CODE(FILE_DEVICE_UNKNOWN, fn, METHOD_BUFFERED, FILE_ANY_ACCESS), the grant and
    map requests METHOD_NEITHER."""
    assert abi.IOCTL_XENIFACE_STORE_READ == 0x00222000
    assert abi.IOCTL_XENIFACE_STORE_REMOVE_WATCH == 0x00222018
    assert abi.IOCTL_XENIFACE_EVTCHN_BIND_INTERDOMAIN == 0x00222040
    assert abi.IOCTL_XENIFACE_EVTCHN_UNMASK == 0x00222050
    assert abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS == 0x00222083
    assert abi.IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_V2 == 0x0022209C
    assert abi.IOCTL_XENIFACE_SUSPEND_GET_COUNT == 0x002220C0
    assert abi.IOCTL_XENIFACE_SHAREDINFO_GET_TIME == 0x00222100
    assert abi.IOCTL_XENIFACE_LOG == 0x0022213C
    functions = sorted((code >> 2) & 0xFFF for code in abi.IOCTL_NAMES)
    assert functions == [*range(0x800, 0x807), *range(0x810, 0x815), *range(0x820, 0x828), 0x830, 0x831, 0x832,
                         0x840, 0x84F]


@pytest.mark.parametrize("layout, size", [
    (abi.XENIFACE_STORE_SET_PERMISSIONS_IN, 24), (abi.XENIFACE_STORE_ADD_WATCH_IN, 24),
    (abi.XENIFACE_STORE_ADD_WATCH_OUT, 8), (abi.XENIFACE_EVTCHN_BIND_INTERDOMAIN_IN, 24),
    (abi.XENIFACE_EVTCHN_BIND_UNBOUND_IN, 16), (abi.XENIFACE_EVTCHN_CLOSE_IN, 4),
    (abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN, 24), (abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN_V2, 32),
    (abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, 16), (abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN, 28),
    (abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN_V2, 24), (abi.XENIFACE_SUSPEND_REGISTER_IN, 8),
    (abi.XENIFACE_SHAREDINFO_GET_TIME_OUT, 12)])
def test_layouts_have_the_x64_sizes_the_driver_checks(layout, size) -> None:
    assert ctypes.sizeof(layout) == size
    assert abi.XENIFACE_EVTCHN_BIND_INTERDOMAIN_IN.Event.offset == 16
    assert abi.field_offset(abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, "References", 2) == 16
    assert abi.field_offset(abi.XENIFACE_STORE_SET_PERMISSIONS_IN, "Permissions", 1) == 24


def _read(rig, file, path: bytes, out_len: int):
    return rig.process.DeviceIoControl(file, abi.IOCTL_XENIFACE_STORE_READ, path + b"\0", out_len)


def test_store_read_write_directory_remove_as_ioctl_store_c(rig) -> None:
    f = rig.open()
    write = lambda data: rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_WRITE, data)  # noqa: E731
    assert write(b"data/a\0hello\0\0").status == STATUS_SUCCESS
    # IoctlStoreRead: no output buffer -> BUFFER_OVERFLOW with the length; a short one INVALID_PARAMETER
    first = _read(rig, f, b"data/a", 0)
    assert (first.status, first.information) == (STATUS_BUFFER_OVERFLOW, 6)
    assert _read(rig, f, b"data/a", 5).status == STATUS_INVALID_PARAMETER
    got = _read(rig, f, b"data/a", 6)
    assert (got.status, got.output) == (STATUS_SUCCESS, b"hello\0")
    assert _read(rig, f, b"data/none", 8).status == STATUS_OBJECT_NAME_NOT_FOUND
    # __IsValidStr: no NUL inside the buffer, or a control character, is INVALID_PARAMETER
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_READ, b"data/a", 8).status == STATUS_INVALID_PARAMETER
    assert _read(rig, f, b"data/\x01", 8).status == STATUS_INVALID_PARAMETER
    assert write(b"data/b\0no-nul").status == STATUS_INVALID_PARAMETER
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_WRITE, b"", 0).status == abi.STATUS_INVALID_BUFFER_SIZE
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_WRITE, b"x\0y\0", 4).status == \
        abi.STATUS_INVALID_BUFFER_SIZE  # IoctlStoreWrite: OutLen must be 0
    write(b"data/c\0x\0")
    d = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_DIRECTORY, b"data\0", 0)
    assert (d.status, d.information) == (STATUS_BUFFER_OVERFLOW, len(b"a\0c\0\0") + 1)
    d = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_DIRECTORY, b"data\0", d.information)
    assert d.output == b"a\0c\0\0\0"
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_REMOVE, b"data/c\0").status == STATUS_SUCCESS
    assert "data/c" not in rig.platform.store.tree


def test_set_permissions_checks_length_count_and_masks(rig) -> None:
    """IoctlStoreSetPermissions: InLen == FIELD_OFFSET(Permissions[N]), PathLength 1..3072, masks within
    READ|WRITE (__ConvertPermissions), the path captured from the caller's memory."""
    f = rig.open()
    layout = abi.XENIFACE_STORE_SET_PERMISSIONS_IN
    path = rig.process.buffer(b"data/p\0")

    def request(perms: list[tuple[int, int]], address: int = path, length: int = 7) -> bytes:
        head = layout(Path=address, PathLength=length, NumberPermissions=len(perms)).pack()[:16]
        return head + b"".join(abi.XENIFACE_STORE_PERMISSION(Domain=d, Mask=m).pack() for d, m in perms)

    def call(data: bytes) -> int:
        return rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_SET_PERMISSIONS, data).status

    rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_WRITE, b"data/p\0v\0")
    ok = request([(0, abi.XENIFACE_STORE_PERM_NONE), (5, abi.XENIFACE_STORE_PERM_READ)])
    assert call(ok) == STATUS_SUCCESS
    assert rig.platform.store.perms["data/p"] == ["n0", "r5"]
    assert call(ok + bytes(8)) == abi.STATUS_INVALID_BUFFER_SIZE  # one entry more than NumberPermissions
    assert call(ok[:16]) == abi.STATUS_INVALID_BUFFER_SIZE  # shorter than sizeof(IN)
    assert call(request([(0, 4)])) == STATUS_INVALID_PARAMETER  # a mask outside READ|WRITE
    assert call(request([(0, 1)], length=0)) == STATUS_INVALID_PARAMETER
    assert call(request([(0, 1)], length=3073)) == STATUS_INVALID_PARAMETER  # XENSTORE_ABS_PATH_MAX
    assert call(request([(0, 1)], address=0x1000)) == abi.STATUS_ACCESS_VIOLATION  # nothing mapped there


def test_watches_and_event_channels_belong_to_their_handle_and_go_at_its_cleanup(rig) -> None:
    """IoctlStoreAddWatch / IoctlEvtchnBindUnbound keep FileObject; XenIfaceCleanup(Fdo, FileObject) at
    IRP_MJ_CLEANUP frees only that handle's; another handle's port is NOT_FOUND to CLOSE and NOTIFY and
    INVALID_PARAMETER to UNMASK (EvtchnFindChannel)."""
    a, b = rig.open(), rig.open()
    handle, event = rig.process.CreateEvent("watch")
    path = b"control/shutdown\0"
    watch_in = abi.XENIFACE_STORE_ADD_WATCH_IN(Path=rig.process.buffer(path), PathLength=len(path), Event=handle)
    assert rig.process.DeviceIoControl(a, abi.IOCTL_XENIFACE_STORE_ADD_WATCH, watch_in.pack() + b"x", 8).status == \
        abi.STATUS_INVALID_BUFFER_SIZE
    assert rig.process.DeviceIoControl(a, abi.IOCTL_XENIFACE_STORE_ADD_WATCH, watch_in.pack(), 8).status == \
        STATUS_SUCCESS
    bind = abi.XENIFACE_EVTCHN_BIND_UNBOUND_IN(RemoteDomain=0, Mask=0, Event=handle).pack()
    r = rig.process.DeviceIoControl(a, abi.IOCTL_XENIFACE_EVTCHN_BIND_UNBOUND, bind, 4)
    assert r.status == STATUS_SUCCESS
    port = int.from_bytes(r.output, "little")
    assert rig.process.DeviceIoControl(b, abi.IOCTL_XENIFACE_EVTCHN_CLOSE, port.to_bytes(4, "little")).status == \
        STATUS_NOT_FOUND
    assert rig.process.DeviceIoControl(b, abi.IOCTL_XENIFACE_EVTCHN_NOTIFY, port.to_bytes(4, "little")).status == \
        STATUS_NOT_FOUND
    assert rig.process.DeviceIoControl(b, abi.IOCTL_XENIFACE_EVTCHN_UNMASK, port.to_bytes(4, "little")).status == \
        STATUS_INVALID_PARAMETER
    assert rig.process.DeviceIoControl(a, abi.IOCTL_XENIFACE_EVTCHN_NOTIFY, port.to_bytes(4, "little")).status == \
        STATUS_SUCCESS
    assert port in rig.platform.vcpu.evtchn.sent
    reg = rig.process.DeviceIoControl(b, abi.IOCTL_XENIFACE_SUSPEND_REGISTER,
                                      abi.XENIFACE_SUSPEND_REGISTER_IN(Event=handle).pack(), 8)
    assert reg.status == STATUS_SUCCESS
    assert rig.fdo.state.owned_by(a) == {"watches": 1, "evtchns": 1, "suspend_events": 0}
    assert list(rig.platform.store.watches) == ["control/shutdown"]
    rig.process.CloseHandle(a)
    assert port in rig.platform.vcpu.evtchn.closed and rig.platform.store.watches == {}
    assert rig.fdo.state.owned_by(a) == {"watches": 0, "evtchns": 0, "suspend_events": 0}
    assert len(rig.fdo.state.suspends) == 1  # b's registration is untouched
    rig.process.CloseHandle(b)
    assert rig.fdo.state.suspends == []
    with pytest.raises(IoError):
        rig.process.DeviceIoControl(a, abi.IOCTL_XENIFACE_LOG, b"x\0")


def test_a_watch_sets_the_callers_event_and_removes_by_its_own_context_only(rig) -> None:
    f, other = rig.open(), rig.open()
    handle, event = rig.process.CreateEvent("shutdown")
    layout = abi.XENIFACE_STORE_ADD_WATCH_IN
    path = rig.process.buffer(b"control/shutdown\0")
    add = lambda file, **kw: rig.process.DeviceIoControl(  # noqa: E731
        file, abi.IOCTL_XENIFACE_STORE_ADD_WATCH, layout(**{"Path": path, "PathLength": 17, "Event": handle, **kw}
                                                         ).pack(), 8)
    assert add(f, PathLength=0).status == STATUS_INVALID_PARAMETER
    assert add(f, Event=0x999).status == abi.STATUS_INVALID_HANDLE
    assert add(f, Path=0x1000).status == abi.STATUS_ACCESS_VIOLATION
    ok = add(f)
    assert ok.status == STATUS_SUCCESS and len(rig.fdo.state.store_watches) == 1
    token = rig.platform.store.watches["control/shutdown"]
    rig.fdo.interfaces["STORE"].Context._fire("control/shutdown", token)
    assert event.read_state()  # StoreWatch set the caller's event
    context = ok.output
    assert rig.process.DeviceIoControl(other, abi.IOCTL_XENIFACE_STORE_REMOVE_WATCH, context).status == \
        STATUS_NOT_FOUND  # IoctlStoreRemoveWatch matches the FileObject too
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_STORE_REMOVE_WATCH, context).status == STATUS_SUCCESS
    assert rig.fdo.state.store_watches == [] and rig.platform.store.watches == {}


def test_grants_pend_until_revoked_or_the_process_ends(rig) -> None:
    """IoctlGnttabPermitForeignAccess returns STATUS_PENDING; Revoke completes it; the thread's end cancels
    it (CsqCompleteCanceledIrp -> CompleteGnttabIrp)."""
    f = rig.open()
    v1 = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN
    out_len = abi.field_offset(abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, "References", 2)
    req = v1(RequestId=7, RemoteDomain=0, NumberPages=2, Flags=abi.XENIFACE_GNTTAB_USE_NOTIFY_OFFSET,
             NotifyOffset=10).pack()
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, req, out_len - 4).status == \
        abi.STATUS_INVALID_BUFFER_SIZE
    granted = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, req, out_len)
    assert granted.status == STATUS_PENDING and len(rig.process.pending) == 1
    refs = [int.from_bytes(granted.output[8 + 4 * i:12 + 4 * i], "little") for i in range(2)]
    assert all(r >= 32 for r in refs)  # past the RESERVED_ENTRY_COUNT references
    again = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, req, out_len)
    assert again.status == STATUS_INVALID_PARAMETER  # the same RequestId in the same process
    revoke = abi.XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS_IN
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS,
                                       revoke(RequestId=8).pack()).status == STATUS_NOT_FOUND
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_REVOKE_FOREIGN_ACCESS,
                                       revoke(RequestId=7).pack()).status == STATUS_SUCCESS
    assert granted.irp.completed and granted.irp.io_status.status == STATUS_SUCCESS and rig.process.pending == []
    # v2, then the process ends without revoking: the IRP is cancelled and the grant revoked
    v2 = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN_V2(RemoteDomain=0, NumberPages=1).pack()
    out_len = abi.field_offset(abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, "References", 1)
    second = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_V2, v2, out_len)
    assert second.status == STATUS_PENDING
    rig.process.CloseHandle(f)
    assert not second.irp.completed  # cleanup does not touch grants: they are the thread's
    rig.process.exit()
    assert second.irp.completed and second.irp.io_status.status == STATUS_CANCELLED
    assert rig.fdo.state.gnttab_queue == []
    user_memory = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN_V2(RemoteDomain=0, NumberPages=1, Address=0x10000).pack()
    g = rig.process.CreateFile(rig.open().link)
    assert rig.process.DeviceIoControl(g, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_V2, user_memory,
                                       out_len).status == abi.STATUS_ACCESS_VIOLATION


def test_legacy_map_always_fails_its_length_check_and_v2_reaches_gnttab(rig) -> None:
    """IoctlGnttabMapForeignPages checks InLen against the V2 layout for both IOCTLs."""
    f = rig.open()
    legacy = abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN(RequestId=1, RemoteDomain=0, NumberPages=1).pack()
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES, legacy, 8).status == \
        abi.STATUS_INVALID_BUFFER_SIZE
    v2 = abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN_V2(RemoteDomain=0, NumberPages=2).pack()
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_V2, v2, 8).status == \
        STATUS_INVALID_PARAMETER  # NumberPages 2, one reference
    v2 = abi.XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_IN_V2(RemoteDomain=0, NumberPages=1).pack()
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_MAP_FOREIGN_PAGES_V2, v2, 8).status == \
        STATUS_NOT_SUPPORTED
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_UNMAP_FOREIGN_PAGES_V2, bytes(8)).status == \
        STATUS_NOT_FOUND


def test_suspend_count_time_log_and_unknown_codes(rig) -> None:
    f = rig.open()
    count = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_SUSPEND_GET_COUNT, b"", 4)
    assert (count.status, count.output) == (STATUS_SUCCESS, bytes(4))
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_SUSPEND_GET_COUNT, b"", 8).status == \
        abi.STATUS_INVALID_BUFFER_SIZE
    t = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_SHAREDINFO_GET_TIME, b"", 12)
    out = abi.XENIFACE_SHAREDINFO_GET_TIME_OUT.unpack(t.output)
    assert t.status == STATUS_SUCCESS
    assert (out.Time.dwHighDateTime << 32 | out.Time.dwLowDateTime, out.Local) == (116_444_736_000_000_000, 0)
    # IoctlLog: 1..256 bytes, printable or CR/LF up to a NUL, no output
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"hello\r\n\0").status == STATUS_SUCCESS
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"a" * 256 + b"\0").status == \
        abi.STATUS_INVALID_BUFFER_SIZE
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"tab\there\0").status == STATUS_INVALID_PARAMETER
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"x\0", 4).status == abi.STATUS_INVALID_BUFFER_SIZE
    assert rig.process.DeviceIoControl(f, 0x00222FFC, b"").status == STATUS_INVALID_DEVICE_REQUEST
    rig.fdo.FdoD0ToD3()  # XenIfaceIoctl: InterfacesAcquired FALSE -> DEVICE_NOT_READY
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"x\0").status == STATUS_DEVICE_NOT_READY
    rig.fdo.FdoD3ToD0()


def test_a_handle_not_opened_for_reading_and_writing_is_refused(rig) -> None:
    """XenIfaceIoctl: WdmlibIoValidateDeviceIoControlAccess(Irp, FILE_READ_ACCESS | FILE_WRITE_ACCESS)."""
    from xenpv.stack.kernel.io import GENERIC_READ, GENERIC_WRITE
    from xenpv.stack.kernel.status import STATUS_ACCESS_DENIED
    link = rig.open().link
    for access in (GENERIC_READ, GENERIC_WRITE, 0):
        f = rig.process.CreateFile(link, access)
        assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"x\0").status == STATUS_ACCESS_DENIED
    f = rig.process.CreateFile(link, GENERIC_READ | GENERIC_WRITE)
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_LOG, b"x\0").status == STATUS_SUCCESS
