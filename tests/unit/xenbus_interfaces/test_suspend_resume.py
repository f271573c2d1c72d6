"""SUSPEND.Trigger and the callbacks XENBUS's own interfaces register, in suspend.c's order (issue 13): the
hypercall inside SyncCapture; after a resume in a new domain SuspendEarly (Count++, UnplugDevices) before
the EARLY list at HIGH_LEVEL - SHARED_INFO mapped again and every port masked, GNTTAB's frames mapped
again, EVTCHN's channels and STORE's transactions and watches inactive - then the LATE list at
DISPATCH_LEVEL - EVTCHN's upcall re-enabled, STORE's connection rebuilt and every watch's event set; after a
cancelled suspend (SchedShutdown's STATUS_CANCELLED) nothing of that, and Trigger returns success."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.debug import DebugInterface
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_UNBOUND, EvtchnInterface
from xenpv.stack.drivers.xenbus.gnttab import GnttabInterface
from xenpv.stack.drivers.xenbus.range_set import RangeSetInterface
from xenpv.stack.drivers.xenbus.shared_info import SharedInfoInterface
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_EARLY, SUSPEND_CALLBACK_LATE, SuspendInterface
from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, HIGH_LEVEL, PASSIVE_LEVEL, KeGetCurrentIrql
from xenpv.stack.kernel.status import STATUS_CANCELLED, STATUS_RETRY, STATUS_SUCCESS
from xenpv.xenabi.xen import EVTCHN_WORDS, SharedInfo

from .stack_of import table_of


class Rig:
    """XENBUS's interfaces wired as the FDO wires them, with a hypercall that says how it returned."""

    def __init__(self, platform, hypercall_status: int) -> None:
        self.platform = platform
        self.events: list[str] = platform.resumed  # the platform's resume steps land here too
        self.captured = False
        debug = DebugInterface()
        self.suspend = SuspendInterface(debug, self._hypercall, self._capture, self._unplug)
        self.status = hypercall_status
        self.shared_info = SharedInfoInterface(platform, debug, self.suspend)
        cache, range_set = CacheInterface(debug), RangeSetInterface(debug)
        self.evtchn = EvtchnInterface(platform, debug, self.suspend, self.shared_info)
        self.store = StoreInterface(platform, debug, self.suspend)
        self.gnttab = GnttabInterface(platform, debug, cache, range_set, self.suspend)

    @contextlib.contextmanager
    def _capture(self) -> Iterator[None]:
        self.events.append("capture")
        self.captured = True
        try:
            yield
        finally:
            self.captured = False
            self.events.append("release")

    def _hypercall(self) -> int:
        assert self.captured and KeGetCurrentIrql() == DISPATCH_LEVEL
        self.events.append("SCHEDOP_shutdown")
        return self.status

    def _unplug(self) -> int:
        assert KeGetCurrentIrql() == HIGH_LEVEL
        self.events.append("UnplugDevices")
        return 0


def test_resume_in_a_new_domain_runs_unplug_then_early_then_late(platform) -> None:
    rig = Rig(platform, STATUS_SUCCESS)
    si, ev, st, gt = (table_of(i) for i in (rig.shared_info, rig.evtchn, rig.store, rig.gnttab))
    for tbl, name in ((si, "SharedInfo"), (ev, "Evtchn"), (st, "Store"), (gt, "Gnttab")):
        assert getattr(tbl, f"{name}Acquire")() == STATUS_SUCCESS
    channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    watch_event = KEvent("client's watch", synchronization=True)
    _, watch = st.StoreWatchAdd("device", "vbd", watch_event)
    _, transaction = st.StoreTransactionStart()
    platform.store.pump()
    watch_event.clear()
    order: list[tuple[str, int]] = []
    client = table_of(rig.suspend)
    client.SuspendAcquire()
    early = client.SuspendRegister(SUSPEND_CALLBACK_EARLY, lambda _a: order.append(("client EARLY", KeGetCurrentIrql())), None)[1]
    late = client.SuspendRegister(SUSPEND_CALLBACK_LATE, lambda _a: order.append(("client LATE", KeGetCurrentIrql())), None)[1]
    rig.events.append("Trigger")

    assert client.SuspendTrigger() == STATUS_SUCCESS and KeGetCurrentIrql() == PASSIVE_LEVEL
    assert client.SuspendGetCount() == 1
    # The platform's steps and the hypercall, in the order suspend.c and the callbacks take them.
    assert rig.events == ["Trigger", "capture", "SCHEDOP_shutdown", "UnplugDevices", "map_shared_info",
                          "map_grant_frames", "reconnect_store", "release"]
    # Clients' callbacks after XENBUS's own (registered before them), EARLY at HIGH, LATE at DISPATCH.
    assert order == [("client EARLY", HIGH_LEVEL), ("client LATE", DISPATCH_LEVEL)]
    # SHARED_INFO EARLY masked every port of the new domain.
    mask = rig.shared_info.mem
    assert all(mask.load(SharedInfo.evtchn_mask.offset + w * 8, 8) == (1 << 64) - 1 for w in range(EVTCHN_WORDS))
    # EVTCHN: the old domain's channel is dead; LATE looked for pending upcalls once more.
    assert not channel.Active and platform.upcalls.scans == 1
    # STORE: the transaction ends in STATUS_RETRY; the watch's event was set by LATE, and it never fires
    # again - its removal asks nothing of xenstored (the new domain's never had it).
    assert watch_event.read_state()
    watch_event.clear()
    platform.store.write("device/vbd/768", "x")
    platform.store.pump()
    assert not watch_event.read_state()
    assert st.StoreTransactionEnd(transaction, True) == STATUS_RETRY
    assert "device/vbd" in platform.store.watches
    assert st.StoreWatchRemove(watch) == STATUS_SUCCESS
    assert "device/vbd" in platform.store.watches  # no UNWATCH was sent

    client.SuspendDeregister(early)
    client.SuspendDeregister(late)
    client.SuspendRelease()
    ev.EvtchnClose(channel)
    for tbl, name in ((gt, "Gnttab"), (st, "Store"), (ev, "Evtchn"), (si, "SharedInfo")):
        getattr(tbl, f"{name}Release")()


def test_a_cancelled_suspend_runs_no_callback_and_counts_nothing(platform) -> None:
    rig = Rig(platform, STATUS_CANCELLED)
    ev = table_of(rig.evtchn)
    ev.EvtchnAcquire()
    channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    client = table_of(rig.suspend)
    client.SuspendAcquire()
    ran: list[str] = []
    callbacks = [client.SuspendRegister(kind, ran.append, name)[1]
                 for kind, name in ((SUSPEND_CALLBACK_EARLY, "early"), (SUSPEND_CALLBACK_LATE, "late"))]
    assert client.SuspendTrigger() == STATUS_SUCCESS  # suspend.c returns success whatever happened
    assert rig.events == ["capture", "SCHEDOP_shutdown", "release"]
    assert ran == [] and client.SuspendGetCount() == 0
    assert channel.Active  # the same domain: its channels live on
    for cb in callbacks:
        client.SuspendDeregister(cb)
    client.SuspendRelease()
    ev.EvtchnClose(channel)
    ev.EvtchnRelease()
