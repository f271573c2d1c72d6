"""Guest RAM as the agent and dom0 see it: a shared mapping of QEMU's memory-backend-file.

QEMU's `pc` machine puts RAM at guest-physical 0 up to the 32-bit PCI hole, so for the sizes a guest
definition allows (<= 3 GiB) a guest-physical address is the offset in the RAM file. The legacy window
0xA0000-0xFFFFF is not RAM to the CPU (VGA, option ROMs, BIOS shadow), so accesses there are refused
rather than silently disagreeing with what qtest sees.
"""
from __future__ import annotations

import ctypes
import ctypes.util
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

    def remap(self, path: Path) -> None:
        """Guest RAM is now `path` (a restored or powered-on machine's RAM file): the same guest-physical
        addresses, a new backing. Remapped in place (remap_shared), so every view of guest RAM the drivers
        hold sees the new file, as a guest's physical addresses do not move when its RAM is reloaded."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            remap_shared(self._map, fd, self.size, f"guest RAM {path}")
        finally:
            os.close(fd)
        self.path = path

    def close(self) -> None:
        self._view.release()
        close_mapping(self._map, f"guest RAM {self.path}")


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_MAP_FIXED = 0x10


def remap_shared(mapping: mmap.mmap, fd: int, size: int, what: str) -> None:
    """Put the first `size` bytes of file `fd` where `mapping` is (mmap MAP_SHARED|MAP_FIXED over it).

    The kernel swaps the pages atomically; the mmap object, and every memoryview of it, keeps its address
    and now reads and writes the new file. Refused unless the mapping is exactly `size` bytes and the file
    holds at least that many, so no access through an existing view can fault (SIGBUS) afterwards."""
    if len(mapping) != size:
        raise GuestMemoryError(f"{what}: the mapping is {len(mapping)} bytes, not {size}")
    actual = os.fstat(fd).st_size
    if actual < size:
        raise GuestMemoryError(f"{what} holds {actual} bytes, {size} needed")
    anchor = (ctypes.c_char * 1).from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor  # the buffer export would keep the mapping from being closed
    got = _libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
    if got != address:
        err = ctypes.get_errno()
        raise GuestMemoryError(f"{what}: mmap MAP_FIXED over {address:#x} failed: {os.strerror(err)}")


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
