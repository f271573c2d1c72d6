"""Guest RAM as the agent and dom0 see it: a shared mapping of QEMU's memory-backend-file.

QEMU's `pc` machine puts RAM at guest-physical 0 up to the 32-bit PCI hole, so for the sizes a guest
definition allows (<= 3 GiB) a guest-physical address is the offset in the RAM file. The legacy window
0xA0000-0xFFFFF is not RAM to the CPU (VGA, option ROMs, BIOS shadow), so accesses there are refused
rather than silently disagreeing with what qtest sees.
"""
from __future__ import annotations

import gc
import mmap
import os
from pathlib import Path

from xenpv.base.errors import HarnessError

LEGACY_HOLE = range(0xA0000, 0x100000)
PAGE_SIZE = 4096


class GuestMemoryError(HarnessError):
    pass


class GuestMemory:
    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR)
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise GuestMemoryError(f"RAM file {path} holds {actual} bytes, expected {size}")
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)

    def _check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(f"{length} bytes at {gpa:#x} are outside guest RAM (size {self.size:#x})")
        if length and gpa < LEGACY_HOLE.stop and gpa + length > LEGACY_HOLE.start:
            raise GuestMemoryError(
                f"{length} bytes at {gpa:#x} touch the legacy window {LEGACY_HOLE.start:#x}-{LEGACY_HOLE.stop - 1:#x}, "
                "which is not RAM to the CPU"
            )

    def read(self, gpa: int, length: int) -> bytes:
        self._check(gpa, length)
        return bytes(self._view[gpa : gpa + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self._check(gpa, len(data))
        self._view[gpa : gpa + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A live window on guest RAM (for rings and shared pages); it must be released before close()."""
        self._check(gpa, length)
        return self._view[gpa : gpa + length]

    def page(self, pfn: int) -> memoryview:
        return self.view(pfn * PAGE_SIZE, PAGE_SIZE)

    def close(self) -> None:
        self._view.release()
        close_mapping(self._map, f"guest RAM {self.path}")


def close_mapping(mapping: mmap.mmap, what: str) -> None:
    """Close a shared mapping. Views of it that only reference cycles keep alive (a failed test's
    traceback holding a ctypes view of a ring page, say) are collected first; a view that is really
    still in use is an error."""
    try:
        mapping.close()
    except BufferError:
        gc.collect()
        try:
            mapping.close()
        except BufferError as exc:
            raise GuestMemoryError(f"{what} still has live views: {exc}") from None
