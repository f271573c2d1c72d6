import pytest

from xenpv.base.errors import HarnessError
from xenpv.stack.vcpu.pages import FIRST_FREE_GFN, OutOfGuestMemory, PageAllocator


def test_pages_come_from_above_1mib_contiguous_and_never_reserved() -> None:
    a = PageAllocator(FIRST_FREE_GFN + 8)
    a.reserve(FIRST_FREE_GFN + 3)
    assert a.alloc(2) == [FIRST_FREE_GFN, FIRST_FREE_GFN + 1]
    with pytest.raises(OutOfGuestMemory, match="contiguous"):
        a.alloc(2)  # +2 is free but +3 is reserved, so no run of two starts here
    assert a.alloc() == [FIRST_FREE_GFN + 2]


def test_free_returns_frames_and_rejects_strangers() -> None:
    a = PageAllocator(FIRST_FREE_GFN + 2)
    got = a.alloc(2)
    with pytest.raises(OutOfGuestMemory):
        a.alloc()
    a.free(got)
    assert a.available == 2
    with pytest.raises(HarnessError, match="not allocated"):
        a.free([got[0]])
