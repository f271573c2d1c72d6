"""XENBUS's EVTCHN, STORE and GNTTAB interfaces on the real stack: QEMU as the vCPU, xenhv's event
channels and grant table, xenstored over the guest's ring."""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xenpv.backends.blkback.launch import RestartableBlkback
from xenpv.base.errors import WaitTimeout
from xenpv.stack.agent.cmd_vbd import sector_pattern
from xenpv.backends.xenstored.client import XsClient
from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.debug import DebugInterface
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_INTER_DOMAIN, EVTCHN_UNBOUND, EvtchnInterface
from xenpv.stack.drivers.xenbus.gnttab import GnttabInterface
from xenpv.stack.drivers.xenbus.range_set import RangeSetInterface
from xenpv.stack.drivers.xenbus.shared_info import SharedInfoInterface
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SuspendInterface
from xenpv.stack.kernel import DIRQL, KEvent, Kernel, KeGetCurrentIrql, KeWaitForSingleObject
from xenpv.stack.kernel.irql import PASSIVE_LEVEL
from xenpv.stack.kernel.status import STATUS_RETRY, STATUS_SUCCESS, STATUS_TIMEOUT, STATUS_UNSUCCESSFUL
from xenpv.stack.timescale import scaled
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


def test_evtchn_v5_client_sends_from_passive_and_waits_for_the_next_event(xenbus) -> None:
    """An EVTCHN v5 client (win-xenbus 1087a8d include/evtchn_interface.h, 112 bytes: no GetCount) on xenhv:
    SendVersion1 raises to DISPATCH_LEVEL itself, so a PASSIVE_LEVEL caller is legal; WaitVersion5 waits for
    the event after the call (evtchn.c EvtchnWaitVersion5: GetCount + 1), so one already counted does not
    satisfy it. The channel pair is a loopback: an unbound port for this domain and a bind to it."""
    d, _kernel, t = xenbus
    evtchn = t["evtchn"].Context
    status, v5 = evtchn.get_interface(5, 112)
    assert status == STATUS_SUCCESS and v5.Size == 112
    assert v5.EvtchnAcquire() == STATUS_SUCCESS
    listener = v5.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, d.domid, False)
    sender = v5.EvtchnOpen(EVTCHN_INTER_DOMAIN, lambda _i, _a: True, None, d.domid, v5.EvtchnGetPort(listener),
                           False)
    assert listener is not None and sender is not None
    count = evtchn.EvtchnGetCount(listener)
    assert KeGetCurrentIrql() == PASSIVE_LEVEL
    v5.EvtchnSendVersion1(sender)
    assert KeGetCurrentIrql() == PASSIVE_LEVEL
    assert evtchn.EvtchnWait(listener, count + 1, 5.0) == STATUS_SUCCESS  # xenhv delivered it
    settled = evtchn.EvtchnGetCount(listener)
    assert v5.EvtchnWaitVersion5(listener, 0.2) == STATUS_TIMEOUT  # nothing after the call
    assert evtchn.EvtchnGetCount(listener) == settled
    v5.EvtchnClose(sender)
    v5.EvtchnClose(listener)
    v5.EvtchnRelease()


def test_a_checked_build_guest_boots_and_does_pv_disk_io_without_an_assertion(host, artifacts, boot_guest) -> None:
    """guests/checked-build.yaml runs the drivers' checked build: every ASSERT they pass through on boot,
    unplug, reboot and PV disk I/O (XENVBD's EvtchnSend among them, evtchn.c: caller at DISPATCH_LEVEL)
    holds, so the guest does what the free build does (a failed one would stop it: test_checked_build.py)."""
    blkback = RestartableBlkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, artifacts)
    blkback.start()
    try:
        g = boot_guest("checked-build")
        assert g.console.run("reboot").startswith("boot 2")  # DISKS unplug requested on boot 1
        deadline = time.monotonic() + scaled(30.0)
        while "target 0 vbd 768 connected" not in (listing := g.console.run("vbd list")):
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"the checked build's PV disk never connected; last `vbd list`:\n{listing}")
            time.sleep(0.05)
        data = sector_pattern("seq", 4096, 16, 512)
        assert g.console.run("vbd write 0 4096 seq 16").endswith(hashlib.sha256(data).hexdigest())
        assert g.console.run("vbd read 0 4096 16") == f"sha256 {hashlib.sha256(data).hexdigest()} bytes {len(data)}"
        log = g.console.run("log 2000")
        assert "PV drivers: checked build" in log and "ASSERTION FAILED" not in log
    finally:
        blkback.stop()
