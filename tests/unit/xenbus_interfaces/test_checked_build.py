"""Checked and free builds: an ASSERT stops only a checked build, a BUG stops both (win-xenbus 1087a8d
src/common/assert.h: ASSERT is `#if DBG` __NT_ASSERT -> DbgRaiseAssertionFailure, nothing otherwise; BUG is
KeBugCheckEx(ASSERTION_FAILURE = 0xDEAD, text, file, line, 0) in both)."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_UNBOUND
from xenpv.stack.kernel.assertion import STATUS_ASSERTION_FAILURE, ASSERT, current_build, set_build
from xenpv.stack.kernel.bugcheck import BugCheck, BugCheckCode
from xenpv.stack.kernel.debuglog import current_log
from xenpv.stack.kernel.dpc import KeInitializeDpc, KeInsertQueueDpc
from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.irql import DIRQL, DISPATCH_LEVEL, KeLowerIrql, KeRaiseIrql
from xenpv.stack.kernel.status import STATUS_SUCCESS

from .stack_of import Interfaces, interfaces, table_of


@pytest.fixture(params=["free", "checked"])
def build(request: pytest.FixtureRequest) -> Iterator[str]:
    set_build(request.param)
    yield request.param
    set_build("free")


def _range_set_destroy_non_empty(ifs: Interfaces) -> None:
    rs = table_of(ifs.range_set)
    rs.RangeSetAcquire()
    _, s = rs.RangeSetCreate("x")
    rs.RangeSetPut(s, 10, 5)
    rs.RangeSetDestroy(s)


def _cache_destroy_with_objects_out(ifs: Interfaces) -> None:
    cache = table_of(ifs.cache)
    cache.CacheAcquire()
    _, c = cache.CacheCreate("c", 8, 0, 0, lambda _a, _o: STATUS_SUCCESS, lambda _a, _o: None, lambda _a: None,
                             lambda _a: None, None)
    cache.CacheGet(c, True)
    cache.CacheDestroy(c)


def _suspend_register_unknown_type(ifs: Interfaces) -> None:
    suspend = table_of(ifs.suspend)
    suspend.SuspendAcquire()
    assert suspend.SuspendRegister(3, lambda _a: None, None)[0] == STATUS_SUCCESS


def _debug_printf_outside_a_callback(ifs: Interfaces) -> None:
    debug = table_of(ifs.debug)
    debug.DebugAcquire()
    debug.DebugPrintf("no")


def _evtchn_send_below_dispatch(ifs: Interfaces) -> None:
    evtchn = table_of(ifs.evtchn, 6)
    evtchn.EvtchnAcquire()
    channel = evtchn.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    evtchn.EvtchnSend(channel)


def _evtchn_get_port_after_suspend(ifs: Interfaces) -> None:
    evtchn = table_of(ifs.evtchn)
    evtchn.EvtchnAcquire()
    channel = evtchn.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    assert ifs.suspend.SuspendTrigger() == STATUS_SUCCESS  # the channel belonged to the old domain
    assert evtchn.EvtchnGetPort(channel) == 10


def _evtchn_wait_above_dispatch(ifs: Interfaces) -> None:
    evtchn = table_of(ifs.evtchn)
    evtchn.EvtchnAcquire()
    channel = evtchn.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    old = KeRaiseIrql(DIRQL)
    try:
        assert evtchn.EvtchnWait(channel, 0, 0.0) == STATUS_SUCCESS  # already reached
    finally:
        KeLowerIrql(old)


def _evtchn_close_twice(ifs: Interfaces) -> None:
    evtchn = table_of(ifs.evtchn)
    evtchn.EvtchnAcquire()
    channel = evtchn.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    evtchn.EvtchnClose(channel)
    evtchn.EvtchnClose(channel)


def _store_free_twice(ifs: Interfaces) -> None:
    store = table_of(ifs.store)
    store.StoreAcquire()
    _, buffer = store.StoreRead(None, None, "name")
    store.StoreFree(buffer)
    store.StoreFree(buffer)


def _store_transaction_end_twice(ifs: Interfaces) -> None:
    store = table_of(ifs.store)
    store.StoreAcquire()
    _, transaction = store.StoreTransactionStart()
    store.StoreTransactionEnd(transaction, False)
    store.StoreTransactionEnd(transaction, False)


def _store_watch_remove_twice(ifs: Interfaces) -> None:
    store = table_of(ifs.store)
    store.StoreAcquire()
    _, watch = store.StoreWatchAdd(None, "data", KEvent("watch"))
    store.StoreWatchRemove(watch)
    store.StoreWatchRemove(watch)


# The Magic ASSERTs a stale object trips in a checked build. A free build goes on into freed pool, which
# the model does not follow: it stops with its own BUG (UNKNOWN ...), so only the checked stop is upstream's.
MAGIC_ASSERTS: dict[str, tuple[Callable[[Interfaces], None], str]] = {
    "evtchn.c EvtchnClose": (_evtchn_close_twice, "Channel->Magic == XENBUS_EVTCHN_CHANNEL_MAGIC"),
    "store.c StoreFreePayload": (_store_free_twice, "Buffer->Magic == XENBUS_STORE_BUFFER_MAGIC"),
    "store.c StoreTransactionEnd": (_store_transaction_end_twice, "Transaction->Magic == STORE_TRANSACTION_MAGIC"),
    "store.c StoreWatchRemove": (_store_watch_remove_twice, "Watch->Magic == STORE_WATCH_MAGIC"),
}


@pytest.mark.parametrize("site", sorted(MAGIC_ASSERTS))
def test_a_stale_object_trips_the_magic_assert_of_a_checked_build(site: str, build: str, platform) -> None:
    stale, expression = MAGIC_ASSERTS[site]
    with pytest.raises(BugCheck) as stop:
        stale(interfaces(platform))
    if build == "free":
        assert stop.value.code == BugCheckCode.ASSERTION_FAILURE and stop.value.message.startswith("BUG: UNKNOWN ")
        return
    assert stop.value.code == BugCheckCode.SYSTEM_THREAD_EXCEPTION_NOT_HANDLED
    assert stop.value.message == f"ASSERTION FAILED: {expression}"


# (what breaks the rule, the ASSERT's C expression), by upstream file and function
ASSERTS: dict[str, tuple[Callable[[Interfaces], None], str]] = {
    "range_set.c RangeSetDestroy": (_range_set_destroy_non_empty, "__RangeSetIsEmpty(RangeSet)"),
    "cache.c CacheDestroy": (_cache_destroy_with_objects_out, "Cache->CurrentObjects == 0"),
    "suspend.c SuspendRegister": (_suspend_register_unknown_type, "FALSE"),
    "debug.c DebugPrintf": (_debug_printf_outside_a_callback, "Context->CallbackPrefix != NULL"),
    "evtchn.c EvtchnSend": (_evtchn_send_below_dispatch, "KeGetCurrentIrql() >= DISPATCH_LEVEL"),
    "evtchn.c EvtchnGetPort": (_evtchn_get_port_after_suspend, "Channel->Active"),
    "evtchn.c EvtchnWait": (_evtchn_wait_above_dispatch, "KeGetCurrentIrql() <= DISPATCH_LEVEL"),
}


@pytest.mark.parametrize("site", sorted(ASSERTS))
def test_an_assert_stops_a_checked_build_only(site: str, build: str, platform) -> None:
    breaks_rule, expression = ASSERTS[site]
    ifs = interfaces(platform)
    if build == "free":
        breaks_rule(ifs)  # runs past the broken rule
        assert not any("ASSERTION FAILED" in line for line in current_log().tail(50))
        return
    with pytest.raises(BugCheck) as stop:
        breaks_rule(ifs)
    # In a system thread (the model's PnP, power and driver threads) the thread's start frame stops it.
    assert stop.value.code == BugCheckCode.SYSTEM_THREAD_EXCEPTION_NOT_HANDLED
    assert stop.value.params[0] == STATUS_ASSERTION_FAILURE == 0xC0000420
    assert stop.value.module == "xenbus.sys" and stop.value.message == f"ASSERTION FAILED: {expression}"
    assert f"ASSERTION FAILED: {expression}" in "\n".join(current_log().tail(20))


def test_an_assert_in_a_dpc_is_kmode_exception_not_handled(cpu) -> None:
    """A DPC has no thread start frame to catch STATUS_ASSERTION_FAILURE: 0x1E, not 0x7E."""
    set_build("checked")
    try:
        dpc = KeInitializeDpc(lambda *_a: ASSERT(False, "FALSE", module="xenbus.sys"), None, module="xenbus.sys")
        with cpu.lock, pytest.raises(BugCheck) as stop:
            old = KeRaiseIrql(DISPATCH_LEVEL)
            KeInsertQueueDpc(dpc)
            KeLowerIrql(old)  # the DPC runs as the IRQL drops below DISPATCH_LEVEL
    finally:
        set_build("free")
    assert stop.value.code == BugCheckCode.KMODE_EXCEPTION_NOT_HANDLED
    assert stop.value.params[0] == STATUS_ASSERTION_FAILURE


def test_the_default_build_is_free() -> None:
    assert current_build() == "free"
    with pytest.raises(ValueError, match="debug"):
        set_build("debug")


def _outstanding(ifs: Interfaces, name: str) -> Any:
    """Leave one object of `name` alive and release the interface: its Release BUGs."""
    tbl = table_of(getattr(ifs, name))
    getattr(tbl, tbl.Context.prefix() + "Acquire")()
    if name == "evtchn":
        tbl.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    elif name == "store":
        tbl.StoreRead(None, None, "name")
    elif name == "suspend":
        tbl.SuspendRegister(1, lambda _a: None, None)
    elif name == "debug":
        tbl.DebugRegister("X", lambda _a, _c: None, None)
    elif name == "range_set":
        tbl.RangeSetCreate("x")
    elif name == "cache":
        tbl.CacheCreate("c", 8, 0, 0, lambda _a, _o: STATUS_SUCCESS, lambda _a, _o: None, lambda _a: None,
                        lambda _a: None, None)
    elif name == "gnttab":
        tbl.GnttabCreateCache("g", 0, 0, lambda _a: None, lambda _a: None, None)
    elif name == "console":
        tbl.ConsoleWakeupAdd(KEvent("wakeup"))
    return getattr(tbl, tbl.Context.prefix() + "Release")


# The BUG texts of each interface's Release, as win-xenbus 1087a8d writes them.
BUGS = {
    "evtchn": "OUTSTANDING EVENT CHANNELS",   # evtchn.c EvtchnRelease
    "store": "OUTSTANDING BUFFER",            # store.c StoreRelease
    "suspend": "OUTSTANDING CALLBACKS",       # suspend.c SuspendRelease
    "debug": "OUTSTANDING CALLBACKS",         # debug.c DebugRelease
    "range_set": "OUTSTANDING RANGE SETS",    # range_set.c RangeSetRelease
    "cache": "OUTSTANDING CACHES",            # cache.c CacheRelease
    "gnttab": "OUTSTANDING CACHES",           # gnttab.c GnttabRelease
    "console": "OUTSTANDING WAKEUPS",         # console.c ConsoleRelease
}


@pytest.mark.parametrize("name", sorted(BUGS))
def test_a_bug_stops_both_builds_with_the_real_text(name: str, build: str, platform) -> None:
    release = _outstanding(interfaces(platform), name)
    with pytest.raises(BugCheck) as stop:
        release()
    assert stop.value.code == BugCheckCode.ASSERTION_FAILURE == 0xDEAD
    assert stop.value.message == f"BUG: {BUGS[name]}" and stop.value.module == "xenbus.sys"
    assert f"BUG: {BUGS[name]}" in "\n".join(current_log().tail(20))
