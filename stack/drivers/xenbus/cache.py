"""XENBUS CACHE interface v1-v2 (reference windows-pv-drivers.md 1): object caches with a constructor,
destructor, a reservation built up front, and (v2) a cap.

`Ctor(Argument, Object) -> NTSTATUS` initialises a fresh object, `Dtor(Argument, Object)` undoes it.
`Lock(Argument)`/`Unlock(Argument)` are the client's lock: Get/Put take it around the cache's own lists
unless the caller says it already holds it (Locked). Objects are `CacheObject`s: `Size` bytes in `.data`
plus whatever attributes the constructor sets. Releasing the interface with caches still alive is a BUG;
destroying a cache with objects still out is an ASSERT (cache.c CacheDestroy: CurrentObjects == 0): a
checked build stops there, a free build destroys the free objects and leaks those still out.

Simplification: the driver keeps per-CPU magazines and a monitor thread that trims the free list back
to the reservation; with one vCPU the model keeps a single free list and trims nothing.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER, STATUS_SUCCESS,
                                 NTSTATUS)

log = logging.getLogger("stack.drivers.xenbus.cache")

CACHE_GUID = uuid.UUID("A98DFD78-416A-4949-92A5-E084F2F4B44E")

CacheCtor = Callable[[Any, "CacheObject"], int]
CacheDtor = Callable[[Any, "CacheObject"], None]
CacheLock = Callable[[Any], None]

_addresses = itertools.count(0xFFFFE000_01500000, 0x40)


class CacheObject:
    """One cached object: its bytes, and attributes the client's constructor adds."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.address = next(_addresses)


@dataclass(eq=False)
class Cache:
    """XENBUS_CACHE."""

    Name: str
    Size: int
    Reservation: int
    Cap: int
    Ctor: CacheCtor
    Dtor: CacheDtor
    Lock: CacheLock
    Unlock: CacheLock
    Argument: Any
    free: list[CacheObject] = field(default_factory=list)
    allocated: list[CacheObject] = field(default_factory=list)
    address: int = field(default_factory=lambda: next(_addresses))

    @property
    def outstanding(self) -> int:
        return len(self.allocated) - len(self.free)

    def __str__(self) -> str:
        return f"CACHE({self.Name})"


# Cap 0 at Create means no cap: cache.c CacheCreate makes it ULONG_MAX.
ULONG_MAX = 0xFFFFFFFF


class CacheInterface(Interface):
    NAME = "CACHE"
    GUID = CACHE_GUID
    TABLES = LAYOUTS["CACHE"]  # v1 creates with CreateVersion1 (no Cap)

    def __init__(self, debug: DebugInterface) -> None:
        super().__init__()
        self.debug = debug
        self.caches: list[Cache] = []
        self._debug_callback: DebugCallback | None = None

    def setup(self) -> int:
        status = self.debug.acquire()
        if not NT_SUCCESS(status):
            return status
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|CACHE", self._dump, None)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.caches:
            BUG("OUTSTANDING CACHES")
        assert self._debug_callback is not None
        self.debug.DebugDeregister(self._debug_callback)
        self._debug_callback = None
        self.debug.release()

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        for cache in self.caches:
            self.debug.DebugPrintf("%s: Size = %u Allocated = %u Free = %u Cap = %u", cache.Name, cache.Size,
                                   len(cache.allocated), len(cache.free), cache.Cap)

    def CacheCreateVersion1(self, Name: str, Size: int, Reservation: int, Ctor: CacheCtor, Dtor: CacheDtor,
                            Lock: CacheLock, Unlock: CacheLock, Argument: Any) -> tuple[NTSTATUS, Cache | None]:
        """v1: CacheCreate with Cap 0, which means no cap (cache.c CacheCreateVersion1)."""
        return self.CacheCreate(Name, Size, Reservation, 0, Ctor, Dtor, Lock, Unlock, Argument)

    def _construct(self, cache: Cache) -> CacheObject | None:
        obj = CacheObject(cache.Size)
        status = cache.Ctor(cache.Argument, obj)
        if not NT_SUCCESS(status):
            log.debug("%s: constructor failed: %#x", cache, status)
            return None
        cache.allocated.append(obj)
        return obj

    def CacheCreate(self, Name: str, Size: int, Reservation: int, Cap: int, Ctor: CacheCtor, Dtor: CacheDtor,
                    Lock: CacheLock, Unlock: CacheLock, Argument: Any) -> tuple[NTSTATUS, Cache | None]:
        if Cap == 0:
            Cap = ULONG_MAX
        if Size <= 0 or Reservation < 0 or Cap < 0 or Reservation > Cap:
            return STATUS_INVALID_PARAMETER, None
        cache = Cache(Name, Size, Reservation, Cap, Ctor, Dtor, Lock, Unlock, Argument)
        # The reservation is met before Create returns, so a failing constructor fails the Create.
        for _ in range(Reservation):
            obj = self._construct(cache)
            if obj is None:
                for built in cache.allocated:
                    cache.Dtor(cache.Argument, built)
                return STATUS_INSUFFICIENT_RESOURCES, None
            cache.free.append(obj)
        self.caches.append(cache)
        log.info("created %s (size %d, reservation %d, cap %d)", cache, Size, Reservation, Cap)
        return STATUS_SUCCESS, cache

    def CacheGet(self, Cache: Cache, Locked: bool) -> CacheObject | None:
        if not Locked:
            Cache.Lock(Cache.Argument)
        try:
            if Cache.free:
                return Cache.free.pop()
            if len(Cache.allocated) >= Cache.Cap:
                return None
            return self._construct(Cache)
        finally:
            if not Locked:
                Cache.Unlock(Cache.Argument)

    def CachePut(self, Cache: Cache, Object: CacheObject, Locked: bool) -> None:
        if Object not in Cache.allocated or Object in Cache.free:
            BUG("OBJECT NOT OUTSTANDING")
        if not Locked:
            Cache.Lock(Cache.Argument)
        try:
            Cache.free.append(Object)
        finally:
            if not Locked:
                Cache.Unlock(Cache.Argument)

    def CacheDestroy(self, Cache: Cache) -> None:
        if Cache not in self.caches:
            BUG("UNKNOWN CACHE")
        self.caches.remove(Cache)
        ASSERT(Cache.outstanding == 0, "Cache->CurrentObjects == 0")
        if Cache.outstanding:
            log.warning("%s destroyed with %d objects out: they leak", Cache, Cache.outstanding)
        # CacheSpill(Cache, 0): the free objects are destructed; those still out are not the cache's to touch.
        for obj in Cache.free:
            Cache.Dtor(Cache.Argument, obj)
        Cache.allocated.clear()
        Cache.free.clear()
