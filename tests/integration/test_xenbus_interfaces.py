"""XENBUS's EVTCHN, STORE and GNTTAB interfaces on the real stack: QEMU as the vCPU, xenhv's event
channels and grant table, xenstored over the guest's ring."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from xenpv.backends.xenstored.client import XsClient
from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.debug import DebugInterface
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_UNBOUND, EvtchnInterface
from xenpv.stack.drivers.xenbus.gnttab import GnttabInterface
from xenpv.stack.drivers.xenbus.range_set import RangeSetInterface
from xenpv.stack.drivers.xenbus.shared_info import SharedInfoInterface
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SuspendInterface
from xenpv.stack.kernel import DIRQL, KEvent, Kernel, KeGetCurrentIrql, KeWaitForSingleObject
from xenpv.stack.kernel.status import STATUS_RETRY, STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.stack.vcpu.platform import XenPlatform

pytestmark = pytest.mark.integration


@pytest.fixture
def xenbus(xen_guest_factory) -> Iterator[tuple[Any, Kernel, dict[str, Any]]]:
    d = xen_guest_factory("default")
    kernel = Kernel().activate()
    platform = XenPlatform.start(d.vcpu, d.machine.guest.memory_mib << 8)
    debug = DebugInterface()
    suspend = SuspendInterface(debug, lambda: STATUS_SUCCESS)
    shared_info = SharedInfoInterface(platform, debug)
    cache, range_set = CacheInterface(debug), RangeSetInterface(debug)
    ifs = {"evtchn": EvtchnInterface(platform, debug, suspend, shared_info),
           "store": StoreInterface(platform, debug, suspend),
           "gnttab": GnttabInterface(platform, debug, cache, range_set)}
    tables = {name: i.get_interface(i.max_version(), 4096)[1] for name, i in ifs.items()}
    try:
        with kernel.cpu.lock:
            yield d, kernel, tables
    finally:
        platform.close()


def test_evtchn_unbound_bound_by_dom0_runs_the_callback_at_dirql(xenbus) -> None:
    d, _kernel, t = xenbus
    ev = t["evtchn"]
    assert ev.EvtchnAcquire() == STATUS_SUCCESS
    calls: list[tuple[int, str]] = []
    channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, arg: calls.append((KeGetCurrentIrql(), arg)) or True,
                            "vif", 0, False)
    port = ev.EvtchnGetPort(channel)
    bound = d.toolstack.ctl.call("evtchn_bind_interdomain", remote_dom=d.domid, remote_port=port)
    count = ev.EvtchnGetCount(channel)  # an interdomain bind marks the local port pending
    d.toolstack.ctl.call("evtchn_send", port=bound["port"])
    assert ev.EvtchnWait(channel, count + 1, 5.0) == STATUS_SUCCESS
    assert calls and all(c == (DIRQL, "vif") for c in calls)
    ev.EvtchnSend(channel)
    ev.EvtchnClose(channel)
    d.toolstack.ctl.call("evtchn_close", port=bound["port"])
    ev.EvtchnRelease()


def test_store_read_write_transaction_retry_and_watch_over_the_ring(xenbus) -> None:
    d, _kernel, t = xenbus
    st = t["store"]
    assert st.StoreAcquire() == STATUS_SUCCESS
    status, buf = st.StoreRead(None, None, "name")
    assert status == STATUS_SUCCESS and buf.Value == b"default"
    st.StoreFree(buf)
    event = KEvent("watch", synchronization=True)
    _, watch = st.StoreWatchAdd("data", "w", event)
    assert KeWaitForSingleObject(event, 5.0) == STATUS_SUCCESS  # initial event
    for attempt in range(3):
        _, tx = st.StoreTransactionStart()
        st.StorePrintf(tx, "data", "a", "%d", attempt)
        if attempt == 0:
            with XsClient(d.host.xenstored_socket) as dom0:
                dom0.write(f"/local/domain/{d.domid}/data/w", b"1")
        status = st.StoreTransactionEnd(tx, True)
        if status != STATUS_RETRY:
            break
    assert status == STATUS_SUCCESS and attempt == 1
    assert KeWaitForSingleObject(event, 5.0) == STATUS_SUCCESS  # dom0's write fired the watch
    status, buf = st.StoreRead(None, "data", "a")
    assert buf.Value == b"1"
    st.StoreFree(buf)
    st.StoreWatchRemove(watch)
    st.StoreRelease()


def test_gnttab_revoke_fails_while_dom0_has_the_grant_mapped(xenbus) -> None:
    d, _kernel, t = xenbus
    gt = t["gnttab"]
    assert gt.GnttabAcquire() == STATUS_SUCCESS
    _, gc = gt.GnttabCreateCache("test", 0, 8, lambda _a: None, lambda _a: None, None)
    status, entry = gt.GnttabPermitForeignAccess(gc, False, 0, 0x400, False)
    assert status == STATUS_SUCCESS and gt.GnttabGetReference(entry) >= 32
    mapping = d.toolstack.ctl.call("gnttab_map", domid=d.domid, ref=gt.GnttabGetReference(entry), readonly=False)
    assert mapping["gfn"] == 0x400
    assert gt.GnttabRevokeForeignAccess(gc, False, entry) == STATUS_UNSUCCESSFUL
    d.toolstack.ctl.call("gnttab_unmap", handle=mapping["handle"])
    assert gt.GnttabRevokeForeignAccess(gc, False, entry) == STATUS_SUCCESS
    gt.GnttabDestroyCache(gc)
    gt.GnttabRelease()
