"""A page allocator over guest RAM: the frames the guest's drivers use for rings, grant pages and
hypercall arguments. It hands out 4 KiB frames between 1 MiB and the frames the toolstack reserved
(the store page at the top of RAM), never the legacy window."""
from __future__ import annotations

import threading

from xenpv.base.errors import HarnessError

PAGE = 4096
FIRST_FREE_GFN = 0x100  # 1 MiB: below is the real-mode area and the legacy window


class OutOfGuestMemory(HarnessError):
    pass


class PageAllocator:
    def __init__(self, ram_pages: int) -> None:
        self._free = list(range(ram_pages - 1, FIRST_FREE_GFN - 1, -1))
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def reserve(self, gfn: int) -> None:
        """Take `gfn` out of the pool for good (a frame someone else owns)."""
        with self._lock:
            if gfn in self._used:
                raise HarnessError(f"frame {gfn:#x} is already allocated")
            if gfn in self._free:
                self._free.remove(gfn)

    def alloc(self, count: int = 1) -> list[int]:
        """`count` contiguous frames (multi-page rings need that): the lowest run of them that is free."""
        with self._lock:
            if count < 1 or count > len(self._free):
                raise OutOfGuestMemory(f"{count} pages asked, {len(self._free)} free")
            # The free list is kept descending, so the tail holds the lowest frames in order; a run of
            # `count` starts at index `end - count` when its first and last frames are `count - 1` apart.
            end = len(self._free)
            while end >= count and self._free[end - count] - self._free[end - 1] != count - 1:
                end -= 1
            if end < count:
                raise OutOfGuestMemory(f"no {count} contiguous free pages ({len(self._free)} free)")
            run = self._free[end - count:end][::-1]
            del self._free[end - count:end]
            self._used.update(run)
            return run

    def free(self, gfns: list[int]) -> None:
        with self._lock:
            for g in gfns:
                if g not in self._used:
                    raise HarnessError(f"frame {g:#x} freed but not allocated")
                self._used.remove(g)
            self._free = sorted(set(self._free) | set(gfns), reverse=True)

    @property
    def available(self) -> int:
        return len(self._free)

    def in_use(self) -> list[int]:
        """The allocated frames, ascending (what a hibernation image must hold; reserved frames are not
        the guest's)."""
        with self._lock:
            return sorted(self._used)
