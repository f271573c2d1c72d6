"""XENVBD's GrantReaper without a machine: a grant the backend still maps is retried until it is revoked,
the pages behind it stay out of the allocator until then, and its GNTTAB cache outlives the ring until
its last stale entry is revoked."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from xenpv.stack.drivers.xenvbd.request import BlkRequest
from xenpv.stack.drivers.xenvbd.ring import BlkifRing, GrantReaper, RingInterfaces, StaleGrants, Submitted
from xenpv.stack.kernel.mm import MemoryManager, Mdl, set_current_mm
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.stack.vcpu.pages import FIRST_FREE_GFN, PageAllocator
from xenpv.xenabi.blkif import BLKIF_OP_WRITE


@dataclass
class FakeGnttab:
    """GNTTAB's revoke as the reaper sees it: busy while the backend maps the entry."""

    mapped: set[str] = field(default_factory=set)
    revoked: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    attempts: int = 0

    def GnttabRevokeForeignAccess(self, cache: str, locked: bool, entry: str) -> int:
        self.attempts += 1
        if entry in self.mapped:
            return STATUS_UNSUCCESSFUL
        self.revoked.append(entry)
        return STATUS_SUCCESS

    def GnttabDestroyCache(self, cache: str) -> None:
        self.destroyed.append(cache)


@pytest.fixture
def pages() -> Iterator[PageAllocator]:
    allocator = PageAllocator(FIRST_FREE_GFN + 16)
    set_current_mm(MemoryManager(allocator, None))  # type: ignore[arg-type]  # freeing touches no vCPU
    yield allocator
    set_current_mm(None)


def test_stale_grants_keep_their_pages_until_the_backend_lets_go(pages: PageAllocator) -> None:
    gnttab = FakeGnttab(mapped={"ring0", "ring1"})
    reaper = GrantReaper(gnttab)  # type: ignore[arg-type]
    ring = Mdl(pages.alloc(2))
    free = pages.available
    reaper.add(StaleGrants("q0 ring", "cache", ["ring0", "ring1"], ring))
    reaper.retire("cache")
    assert gnttab.destroyed == []  # entries of it are still out
    assert reaper.retry(force=True) == 2
    assert pages.available == free and gnttab.destroyed == []
    gnttab.mapped.discard("ring0")
    assert reaper.retry(force=True) == 1
    assert pages.available == free  # one page of the ring is still mapped: neither goes back
    gnttab.mapped.clear()
    assert reaper.retry(force=True) == 0
    assert pages.available == free + 2 and gnttab.revoked == ["ring0", "ring1"]
    assert gnttab.destroyed == ["cache"] and reaper.outstanding == 0


def test_retries_back_off_while_nothing_is_released(pages: PageAllocator) -> None:
    gnttab = FakeGnttab(mapped={"e"})
    reaper = GrantReaper(gnttab)  # type: ignore[arg-type]
    reaper.add(StaleGrants("request", "cache", ["e"]))
    reaper.retry(force=True)
    tried = gnttab.attempts
    assert reaper.retry() == 1 and gnttab.attempts == tried  # within the backoff: not tried again


def test_a_request_with_stale_grants_still_reaches_its_buffer(pages: PageAllocator) -> None:
    gnttab = FakeGnttab(mapped={"g"})
    reaper = GrantReaper(gnttab)  # type: ignore[arg-type]
    item = Submitted(BlkRequest(BLKIF_OP_WRITE), None, lambda *_: None)
    assert not item.granted
    record = StaleGrants("write", "cache", ["g"])
    item.stale.append(record)
    reaper.add(record)
    assert item.granted  # its buffer must not be freed yet, though it holds no live grant
    gnttab.mapped.clear()
    reaper.retry(force=True)
    assert not item.granted


def test_an_idle_cache_is_destroyed_when_its_ring_goes(pages: PageAllocator) -> None:
    gnttab = FakeGnttab()
    reaper = GrantReaper(gnttab)  # type: ignore[arg-type]
    reaper.retire("cache")
    assert gnttab.destroyed == ["cache"]


def test_a_revoke_that_fails_keeps_the_request_granted_and_its_indirect_table_out(pages: PageAllocator) -> None:
    gnttab = FakeGnttab(mapped={"data1"})
    reaper = GrantReaper(gnttab)  # type: ignore[arg-type]
    ring = BlkifRing("vbd51728", 0, 0, RingInterfaces(None, gnttab), 0, reaper)  # type: ignore[arg-type]
    ring.gnttab_cache = "cache"
    item = Submitted(BlkRequest(BLKIF_OP_WRITE), None, lambda *_: None)
    item.grants = ["data0", "data1", "table"]
    item.indirect = Mdl(pages.alloc(1))
    free = pages.available
    assert not ring._revoke(item)
    # A replay grants afresh (no live grants, a new indirect table); the old ones wait in the reaper.
    assert item.grants == [] and item.indirect is None
    assert item.granted and reaper.outstanding == 1 and pages.available == free
    gnttab.mapped.clear()
    reaper.retry(force=True)
    assert not item.granted and pages.available == free + 1
