"""RANGE_SET, CACHE, GNTTAB and CONSOLE."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.xenbus.gnttab import RESERVED_ENTRY_COUNT
from xenpv.stack.drivers.xenbus.range_set import bar_hole_free_frames
from xenpv.stack.kernel.bugcheck import BugCheck
from xenpv.stack.kernel.event import KEvent
from xenpv.stack.kernel.status import (STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER, STATUS_NOT_SUPPORTED,
                                 STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, STATUS_UNSUCCESSFUL)
from xenpv.xenabi.grant_table import GTF_reading

from .conftest import BAR_ADDRESS, GRANT_FRAMES
from .stack_of import interfaces, table_of


def test_range_set_put_pop_get_and_vetoes(platform) -> None:
    rs = table_of(interfaces(platform).range_set)
    rs.RangeSetAcquire()
    first, count = bar_hole_free_frames(platform, GRANT_FRAMES)
    assert (first, count) == ((BAR_ADDRESS >> 12) + 3, 256 - 3)
    _, s = rs.RangeSetCreate("hole")
    assert rs.RangeSetPut(s, first, count) == STATUS_SUCCESS
    assert rs.RangeSetPut(s, first + 1, 1) == STATUS_INVALID_PARAMETER  # overlap
    for op in (lambda: rs.RangeSetPut(s, 0, 0), lambda: rs.RangeSetGet(s, first, 0)):
        assert op() == STATUS_INVALID_PARAMETER
    assert rs.RangeSetPop(s, 0) == (STATUS_INVALID_PARAMETER, None)
    assert rs.RangeSetPop(s, 2) == (STATUS_SUCCESS, first)
    assert rs.RangeSetGet(s, first + 10, 5) == STATUS_SUCCESS
    assert rs.RangeSetGet(s, first + 10, 1) == STATUS_OBJECT_NAME_NOT_FOUND
    assert rs.RangeSetPop(s, 1000) == (STATUS_INSUFFICIENT_RESOURCES, None)
    # range_set.c RangeSetDestroy: ASSERT(__RangeSetIsEmpty(RangeSet)): a free build destroys a set that
    # still holds ranges (they leak); the checked build's stop is in test_checked_build.py.
    rs.RangeSetDestroy(s)
    assert rs.Context.sets == []
    rs.RangeSetRelease()


def test_range_set_merges_what_is_put_back(platform) -> None:
    rs = table_of(interfaces(platform).range_set)
    rs.RangeSetAcquire()
    _, s = rs.RangeSetCreate("x")
    rs.RangeSetPut(s, 10, 5)
    rs.RangeSetPut(s, 20, 5)
    rs.RangeSetPut(s, 15, 5)
    assert s.ranges == [(10, 25)]
    assert rs.RangeSetGet(s, 10, 15) == STATUS_SUCCESS
    rs.RangeSetDestroy(s)
    rs.RangeSetRelease()


def test_cache_reservation_cap_lock_and_destroy(platform) -> None:
    ifs = interfaces(platform)
    cache = table_of(ifs.cache)
    cache.CacheAcquire()
    locks: list[str] = []
    built: list[int] = []
    status, c = cache.CacheCreate("obj", 64, 2, 3, lambda a, o: built.append(1) or STATUS_SUCCESS,
                                  lambda a, o: built.pop(), lambda a: locks.append("lock"),
                                  lambda a: locks.append("unlock"), None)
    assert status == STATUS_SUCCESS and len(built) == 2  # reservation met at once
    objs = [cache.CacheGet(c, False) for _ in range(3)]
    assert all(o is not None and len(o.data) == 64 for o in objs) and cache.CacheGet(c, True) is None  # cap
    assert locks[:2] == ["lock", "unlock"]
    cache.CachePut(c, objs[0], False)
    # cache.c CacheDestroy: ASSERT(Cache->CurrentObjects == 0): a free build destroys the cache, runs the
    # destructor of the free object only and leaks the two still out (test_checked_build.py: the stop).
    cache.CacheDestroy(c)
    assert len(built) == 2 and ifs.cache.caches == []
    cache.CacheRelease()


def test_cache_v1_create_has_no_cap(platform) -> None:
    ifs = interfaces(platform)
    v1 = ifs.cache.get_interface(1, 4096)[1]
    v1.CacheAcquire()
    with pytest.raises(AttributeError):
        v1.CacheCreate  # v1's member is CacheCreateVersion1 (include/cache_interface.h), without the Cap
    status, c = v1.CacheCreateVersion1("v1", 8, 0, lambda a, o: STATUS_SUCCESS, lambda a, o: None, lambda a: None,
                               lambda a: None, None)
    assert status == STATUS_SUCCESS
    objs = [v1.CacheGet(c, True) for _ in range(50)]
    for o in objs:
        v1.CachePut(c, o, True)
    v1.CacheDestroy(c)
    v1.CacheRelease()


def test_gnttab_permit_revoke_and_a_mapped_entry(platform) -> None:
    ifs = interfaces(platform)
    gt = table_of(ifs.gnttab)
    assert gt.GnttabAcquire() == STATUS_SUCCESS
    status, gc = gt.GnttabCreateCache("vif", 0, 4, lambda a: None, lambda a: None, None)
    status, e = gt.GnttabPermitForeignAccess(gc, False, 0, 0x1234, True)
    assert status == STATUS_SUCCESS and gt.GnttabGetReference(e) == RESERVED_ENTRY_COUNT
    assert gt.GnttabQueryReference(RESERVED_ENTRY_COUNT) == (STATUS_SUCCESS, 0x1234, True)
    # The back-end maps it: Xen sets GTF_reading in the shared entry.
    frame = ifs.gnttab.platform.grants._frames[0]
    frame.fetch_or(RESERVED_ENTRY_COUNT * 8, 2, GTF_reading)
    assert gt.GnttabRevokeForeignAccess(gc, False, e) == STATUS_UNSUCCESSFUL
    frame.fetch_and(RESERVED_ENTRY_COUNT * 8, 2, ~GTF_reading)
    assert gt.GnttabRevokeForeignAccess(gc, False, e) == STATUS_SUCCESS
    assert gt.GnttabQueryReference(RESERVED_ENTRY_COUNT)[0] == STATUS_INVALID_PARAMETER
    assert gt.GnttabMapForeignPages(0, 1, [8], False)[0] == STATUS_NOT_SUPPORTED
    gt.GnttabDestroyCache(gc)
    gt.GnttabRelease()
    assert ifs.cache.references == ifs.range_set.references == 0


def test_console_ring_read_write_and_wakeups(platform) -> None:
    ifs = interfaces(platform)
    con = table_of(ifs.console)
    con.ConsoleAcquire()
    event = KEvent("console")
    _, wakeup = con.ConsoleWakeupAdd(event)
    assert con.ConsoleCanWrite() and not con.ConsoleCanRead()
    assert con.ConsoleWrite(b"hello", 5) == 5 and event.read_state()
    page = platform.vcpu.page(ifs.console.ring_gfn)
    assert bytes(page[1024:1029]) == b"hello"
    page[0:3] = b"abc"
    ifs.console.mem.store(3076, 4, 3)  # the back-end produces three bytes of input
    buf = bytearray(8)
    assert con.ConsoleCanRead() and con.ConsoleRead(buf, 8) == 3 and bytes(buf[:3]) == b"abc"
    assert con.ConsoleWrite(bytes(4096), 4096) == 2048 - 5 and not con.ConsoleCanWrite()
    with pytest.raises(BugCheck):
        con.ConsoleRelease()  # the wakeup is still registered
    del wakeup
