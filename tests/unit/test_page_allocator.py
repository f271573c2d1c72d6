import pytest

from xenpv.base.errors import HarnessError
from xenpv.stack.vcpu.pages import FIRST_FREE_GFN, OutOfGuestMemory, PageAllocator


def test_pages_come_from_above_1mib_contiguous_and_never_reserved() -> None:
    a = PageAllocator(FIRST_FREE_GFN + 8)
    a.reserve(FIRST_FREE_GFN + 3)
    assert a.alloc(2) == [FIRST_FREE_GFN, FIRST_FREE_GFN + 1]
    # +2 is free but +3 is reserved: the lowest run of two is further up, and the hole stays usable.
    assert a.alloc(2) == [FIRST_FREE_GFN + 4, FIRST_FREE_GFN + 5]
    with pytest.raises(OutOfGuestMemory, match="contiguous"):
        a.alloc(3)  # +2, +6 and +7 are free, but not three in a row
    assert a.alloc() == [FIRST_FREE_GFN + 2]


def test_a_hole_left_by_a_freed_page_does_not_fail_larger_allocations() -> None:
    a = PageAllocator(FIRST_FREE_GFN + 64)
    low, kept = a.alloc(), a.alloc()
    a.free(low)  # a one-page hole below a page still in use
    assert a.alloc(8) == list(range(kept[0] + 1, kept[0] + 9))
    assert a.alloc() == low


def test_free_returns_frames_and_rejects_strangers() -> None:
    a = PageAllocator(FIRST_FREE_GFN + 2)
    got = a.alloc(2)
    with pytest.raises(OutOfGuestMemory):
        a.alloc()
    a.free(got)
    assert a.available == 2
    with pytest.raises(HarnessError, match="not allocated"):
        a.free([got[0]])
