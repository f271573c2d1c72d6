from __future__ import annotations

import pytest

from xenpv.stack.drivers.xenbus.store import STATUS_IO_TIMEOUT, XENBUS_STORE_PERM_READ, StorePermission, errno_to_status
from xenpv.stack.kernel.bugcheck import BugCheck
from xenpv.stack.kernel.event import KEvent, KeWaitForSingleObject
from xenpv.stack.kernel.status import (STATUS_ACCESS_DENIED, STATUS_OBJECT_NAME_NOT_FOUND, STATUS_RETRY, STATUS_SUCCESS)

from .stack_of import interfaces, table_of


def test_read_printf_directory_remove_and_errors(platform) -> None:
    st = table_of(interfaces(platform).store)
    assert st.StoreAcquire() == STATUS_SUCCESS
    assert st.StorePrintf(None, "device/vif/0", "state", "%u", 4) == STATUS_SUCCESS
    status, buf = st.StoreRead(None, "device/vif/0", "state")
    assert status == STATUS_SUCCESS and buf.Value == b"4"
    st.StoreFree(buf)
    st.StorePrintf(None, None, "device/vif/1/state", "1")
    status, buf = st.StoreDirectory(None, None, "device/vif")
    assert buf.Value == b"0\x001\x00\x00"
    st.StoreFree(buf)
    assert st.StoreRemove(None, "device/vif", "1") == STATUS_SUCCESS
    assert st.StoreRead(None, "device/vif", "1") == (STATUS_OBJECT_NAME_NOT_FOUND, None)
    platform.store.denied.add("forbidden")
    assert st.StorePrintf(None, None, "forbidden", "x") == STATUS_ACCESS_DENIED
    assert st.StorePermissionsSet(None, None, "device/vif/0", [StorePermission(7, 0), StorePermission(0, XENBUS_STORE_PERM_READ)],
                                  2) == STATUS_SUCCESS
    assert platform.store.perms["device/vif/0"] == ["n7", "r0"]
    assert errno_to_status("EAGAIN") == STATUS_RETRY and STATUS_IO_TIMEOUT == 0xC00000B5
    st.StoreRelease()


def test_transaction_conflict_is_retry_and_suspend_cuts_transactions_off(platform) -> None:
    ifs = interfaces(platform)
    st = table_of(ifs.store)
    st.StoreAcquire()
    for attempt in range(3):
        status, tx = st.StoreTransactionStart()
        st.StorePrintf(tx, None, "data/a", "%d", attempt)
        if attempt == 0:
            platform.store.write("data/b", "conflict")
        status = st.StoreTransactionEnd(tx, True)
        if status != STATUS_RETRY:
            break
    assert status == STATUS_SUCCESS and attempt == 1 and platform.store.tree["data/a"] == b"1"
    _, tx = st.StoreTransactionStart()
    ifs.suspend.SuspendTrigger()
    assert st.StoreTransactionEnd(tx, True) == STATUS_RETRY
    st.StoreRelease()


def test_watches_set_the_clients_kevent(platform) -> None:
    st = table_of(interfaces(platform).store)
    st.StoreAcquire()
    event = KEvent("watch", synchronization=True)
    status, watch = st.StoreWatchAdd("device", "vif", event)
    assert status == STATUS_SUCCESS
    assert KeWaitForSingleObject(event, 2.0) == STATUS_SUCCESS  # the initial event
    platform.store.write("device/vif/0/state", "4")
    assert KeWaitForSingleObject(event, 2.0) == STATUS_SUCCESS
    assert st.StoreWatchRemove(watch) == STATUS_SUCCESS
    st.StoreRelease()


def test_release_with_outstanding_buffers_or_watches_is_a_bug(platform) -> None:
    st = table_of(interfaces(platform).store)
    st.StoreAcquire()
    st.StoreRead(None, None, "name")
    with pytest.raises(BugCheck) as stop:
        st.StoreRelease()
    assert stop.value.message == "BUG: OUTSTANDING BUFFER"  # store.c StoreRelease: BUG("OUTSTANDING BUFFER")
