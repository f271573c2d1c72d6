"""XENBUS GNTTAB interface v2-v4 (reference windows-pv-drivers.md 1 and 7): grant table v1 entries for
the guest's children.

References 0 (console) and 1 (xenstore) are the toolstack's, and XENBUS reserves the first
RESERVED_ENTRY_COUNT (32: Xen's 8 plus 8-31 for the crash kernel), so entries handed out here start at
32. Free references live in a RANGE_SET; each client cache (CreateCache) is a CACHE of entries whose
constructor pops a reference from that set and whose destructor puts it back.

Permit writes domid and frame before the flags (GrantTableFrontend orders the stores). Revoke is the
driver's CAS loop: at most 100 attempts to clear the flags while the back-end has neither GTF_reading
nor GTF_writing set, yielding between attempts; after that STATUS_UNSUCCESSFUL and the entry stays out
(its page must not be reused while mapped). The driver's yield (SchedYield) lets Xen finish a grant copy
on another CPU, which takes microseconds; here the copy runs in xenhv, another process the host may
deschedule for milliseconds, so each yield is a sleep of REVOKE_PAUSE_SECONDS (scaled by
XENPV_TIME_SCALE, stack.timescale): a transient pin outlasts 100 attempts only when the machine is far
behind, while a back-end that really keeps the grant mapped is still refused after 100.

The grant frames are the ones XenPlatform mapped at start-up (the driver maps them on demand); the
SUSPEND EARLY re-mapping has nothing to do here because the model's frames survive. MapForeignPages and
UnmapForeignPages answer STATUS_NOT_SUPPORTED: xenhv does not model an HVM guest mapping another
domain's grants (GNTTABOP_map_grant_ref is dom0's, through its control socket).

The platform's own `grant()` hands out references from 8 up; while GNTTAB is acquired those below 32
are the only ones it may use, which XENBUS never needs.
"""
from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.interface import Interface, acquire_all
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.cache import Cache, CacheInterface, CacheLock, CacheObject
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.drivers.xenbus.range_set import RangeSet, RangeSetInterface
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_EARLY, SuspendCallback, SuspendInterface
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER,
                                 STATUS_NOT_SUPPORTED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL, NTSTATUS)
from xenpv.stack.timescale import scaled
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi.grant_table import GTF_permit_access, GTF_readonly, GTF_type_mask

log = logging.getLogger("stack.drivers.xenbus.gnttab")

GNTTAB_GUID = uuid.UUID("763679C5-E5C2-4A6D-8B88-6BB02EC42D8E")

GNTTAB_RESERVED_CONSOLE = 0
GNTTAB_RESERVED_XENSTORE = 1
RESERVED_ENTRY_COUNT = 32
REVOKE_ATTEMPTS = 100
REVOKE_PAUSE_SECONDS = 0.0005

_addresses = itertools.count(0xFFFFE000_01600000, 0x40)

@dataclass(eq=False)
class GnttabEntry:
    """XENBUS_GNTTAB_ENTRY: a reference and what it currently grants."""

    Reference: int
    Domain: int = 0
    Pfn: int = 0
    ReadOnly: bool = False
    cache_object: CacheObject | None = None
    address: int = field(default_factory=lambda: next(_addresses))


@dataclass(eq=False)
class GnttabCache:
    Name: str
    cache: Cache
    address: int = field(default_factory=lambda: next(_addresses))


class GnttabInterface(Interface):
    NAME = "GNTTAB"
    GUID = GNTTAB_GUID
    TABLES = LAYOUTS["GNTTAB"]  # v2 and v3 create caches with CreateCacheVersion1 (no Cap); v3 added QueryReference

    def __init__(self, platform: XenPlatform, debug: DebugInterface, cache: CacheInterface,
                 range_set: RangeSetInterface, suspend: SuspendInterface | None = None) -> None:
        super().__init__()
        self.platform = platform
        self.debug = debug
        self.cache = cache
        self.range_set = range_set
        self.suspend = suspend
        self.caches: list[GnttabCache] = []
        self._free: RangeSet | None = None
        self._debug_callback: DebugCallback | None = None
        self._suspend_callback: SuspendCallback | None = None

    # -- Acquire/Release --------------------------------------------------------------------------

    def setup(self) -> int:
        status = acquire_all((self.debug, self.cache, self.range_set)
                             + ((self.suspend,) if self.suspend is not None else ()))
        if not NT_SUCCESS(status):
            return status
        if self.suspend is not None:
            _, self._suspend_callback = self.suspend.SuspendRegister(SUSPEND_CALLBACK_EARLY, self._suspend_early,
                                                                     None)
        _, self._free = self.range_set.RangeSetCreate("gnttab")
        entries = self.platform.grants.nr_entries
        self.range_set.RangeSetPut(self._free, RESERVED_ENTRY_COUNT, entries - RESERVED_ENTRY_COUNT)
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|GNTTAB", self._dump, None)
        log.info("grant references %d-%d available", RESERVED_ENTRY_COUNT, entries - 1)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.caches:
            BUG("OUTSTANDING CACHES")
        assert self._free is not None and self._debug_callback is not None
        entries = self.platform.grants.nr_entries
        self.range_set.RangeSetGet(self._free, RESERVED_ENTRY_COUNT, entries - RESERVED_ENTRY_COUNT)
        self.range_set.RangeSetDestroy(self._free)
        self.debug.DebugDeregister(self._debug_callback)
        self._free = self._debug_callback = None
        if self.suspend is not None and self._suspend_callback is not None:
            self.suspend.SuspendDeregister(self._suspend_callback)
            self._suspend_callback = None
            self.suspend.release()
        for dependency in (self.range_set, self.cache, self.debug):
            dependency.release()

    def _suspend_early(self, _argument: Any) -> None:
        """GnttabSuspendCallbackEarly (GnttabMap): the table's frames are mapped again in the new domain.
        The entries' owners (frontends) revoke and grant again as they reconnect."""
        self.platform.map_grant_frames()
        log.info("GNTTAB: EARLY: grant frames mapped again")

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        for gnttab_cache in self.caches:
            self.debug.DebugPrintf("%s: %u entries out", gnttab_cache.Name, gnttab_cache.cache.outstanding)

    # -- entry cache constructor/destructor -------------------------------------------------------

    def _entry_ctor(self, _argument: Any, obj: CacheObject) -> int:
        assert self._free is not None
        status, reference = self.range_set.RangeSetPop(self._free, 1)
        if not NT_SUCCESS(status):
            return status
        obj.entry = GnttabEntry(reference, cache_object=obj)
        return STATUS_SUCCESS

    def _entry_dtor(self, _argument: Any, obj: CacheObject) -> None:
        assert self._free is not None
        self.range_set.RangeSetPut(self._free, obj.entry.Reference, 1)

    # -- members ----------------------------------------------------------------------------------

    def GnttabCreateCache(self, Name: str, Reservation: int, Cap: int, Lock: CacheLock, Unlock: CacheLock,
                          Argument: Any) -> tuple[NTSTATUS, GnttabCache | None]:
        status, cache = self.cache.CacheCreate(f"{Name}_gnttab", 8, Reservation, Cap, self._entry_ctor,
                                               self._entry_dtor, lambda _a: Lock(Argument),
                                               lambda _a: Unlock(Argument), None)
        if not NT_SUCCESS(status):
            return status, None
        assert cache is not None
        gnttab_cache = GnttabCache(Name, cache)
        self.caches.append(gnttab_cache)
        return STATUS_SUCCESS, gnttab_cache

    def GnttabCreateCacheVersion1(self, Name: str, Reservation: int, Lock: CacheLock, Unlock: CacheLock,
                                  Argument: Any) -> tuple[NTSTATUS, GnttabCache | None]:
        """v2/v3: GnttabCreateCache with Cap 0, no cap (gnttab.c GnttabCreateCacheVersion1)."""
        return self.GnttabCreateCache(Name, Reservation, 0, Lock, Unlock, Argument)

    def GnttabDestroyCache(self, Cache: GnttabCache) -> None:
        if Cache not in self.caches:
            BUG("UNKNOWN CACHE")
        self.caches.remove(Cache)
        self.cache.CacheDestroy(Cache.cache)

    def GnttabPermitForeignAccess(self, Cache: GnttabCache, Locked: bool, Domain: int, Pfn: int,
                                  ReadOnly: bool) -> tuple[NTSTATUS, GnttabEntry | None]:
        obj = self.cache.CacheGet(Cache.cache, Locked)
        if obj is None:
            return STATUS_INSUFFICIENT_RESOURCES, None
        entry: GnttabEntry = obj.entry
        entry.Domain, entry.Pfn, entry.ReadOnly = Domain, Pfn, bool(ReadOnly)
        try:
            self.platform.grants.grant_access(entry.Reference, Domain, Pfn, bool(ReadOnly))
        except ValueError as error:
            log.warning("permit %s: %s", entry.Reference, error)
            self.cache.CachePut(Cache.cache, obj, Locked)
            return STATUS_INVALID_PARAMETER, None
        return STATUS_SUCCESS, entry

    def GnttabRevokeForeignAccess(self, Cache: GnttabCache, Locked: bool, Entry: GnttabEntry) -> NTSTATUS:
        pause = scaled(REVOKE_PAUSE_SECONDS)
        for _ in range(REVOKE_ATTEMPTS):
            if self.platform.grants.end_foreign_access(Entry.Reference):
                self.cache.CachePut(Cache.cache, Entry.cache_object, Locked)
                return STATUS_SUCCESS
            time.sleep(pause)  # SchedYield: give the back-end a chance to finish with it
        log.warning("revoke of reference %d to dom%d: still mapped after %d attempts", Entry.Reference,
                    Entry.Domain, REVOKE_ATTEMPTS)
        return STATUS_UNSUCCESSFUL

    def GnttabGetReference(self, Entry: GnttabEntry) -> int:
        return Entry.Reference

    def GnttabQueryReference(self, Reference: int) -> tuple[NTSTATUS, int | None, bool | None]:
        """(status, Pfn, ReadOnly) of a reference currently permitting access."""
        if not 0 <= Reference < self.platform.grants.nr_entries:
            return STATUS_INVALID_PARAMETER, None, None
        entry = self.platform.grants.entry(Reference)
        if entry.flags & GTF_type_mask != GTF_permit_access:
            return STATUS_INVALID_PARAMETER, None, None
        return STATUS_SUCCESS, entry.frame, bool(entry.flags & GTF_readonly)

    def GnttabMapForeignPages(self, Domain: int, NumberPages: int, References: list[int],
                              ReadOnly: bool) -> tuple[NTSTATUS, None]:
        return STATUS_NOT_SUPPORTED, None

    def GnttabUnmapForeignPages(self, Address: int) -> NTSTATUS:
        return STATUS_NOT_SUPPORTED
