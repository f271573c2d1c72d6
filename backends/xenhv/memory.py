"""A domain's memory as xenhv sees it: guest RAM (QEMU's RAM file) and hypervisor frames, via the p2m.

The p2m is what Xen keeps per HVM domain: most guest frames are RAM; frames the guest picked with
XENMEM_add_to_physmap (usually in the platform PCI BAR hole) are hypervisor pages instead, here pages
of one memfd per domain that xenhv and the guest's vCPU both map. A RAM frame covered by such a
mapping is no longer RAM to the guest until the hypervisor frame moves elsewhere, as in Xen.
Every access is bounds-checked: a guest pointer that is not backed raises XenError(EFAULT).
"""
from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Callable

from xenpv.backends.xenhv.errors import XenError
from xenpv.xenabi.xen import XEN_EFAULT

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT


class DomainMemory:
    def __init__(self, domid: int, ram_path: Path, ram_size: int, hv_frames: int) -> None:
        self.domid = domid
        self.ram_pages = ram_size >> PAGE_SHIFT
        fd = os.open(ram_path, os.O_RDWR)
        try:
            self.ram_fd = os.dup(fd)
            self._ram = mmap.mmap(fd, ram_size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self.ram = memoryview(self._ram)
        self.frames_fd = os.memfd_create(f"xenhv-dom{domid}-frames", os.MFD_CLOEXEC)
        os.ftruncate(self.frames_fd, hv_frames * PAGE_SIZE)
        self._frames = mmap.mmap(self.frames_fd, hv_frames * PAGE_SIZE, mmap.MAP_SHARED)
        self.frames = memoryview(self._frames)
        self.hv_frames = hv_frames
        self._overlay: dict[int, int] = {}  # gfn -> hypervisor frame index
        self._where: dict[int, int] = {}  # hypervisor frame index -> gfn
        # Told when the p2m's hypervisor pages move: the back-ends' copy of which frames are not RAM.
        self.on_overlay_changed: Callable[[list[int]], None] | None = None

    def hv_frame(self, index: int) -> memoryview:
        return self.frames[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]

    def map_hv_frame(self, index: int, gfn: int) -> None:
        if not 0 <= index < self.hv_frames:
            raise XenError(22, f"hypervisor frame {index} does not exist")
        if not 0 <= gfn < (1 << 40):
            raise XenError(22, f"gfn {gfn:#x} is out of range")
        if (old := self._where.pop(index, None)) is not None:
            del self._overlay[old]
        if (other := self._overlay.get(gfn)) is not None:
            del self._where[other]
        self._overlay[gfn] = index
        self._where[index] = gfn
        if self.on_overlay_changed is not None:
            self.on_overlay_changed(list(self._overlay))

    def hv_mappings(self) -> dict[int, int]:
        """Hypervisor frame index -> gfn, for every frame the guest has placed."""
        return dict(self._where)

    def gfn_of(self, index: int) -> int | None:
        return self._where.get(index)

    def frame_at(self, gfn: int) -> int | None:
        return self._overlay.get(gfn)

    def page(self, gfn: int) -> memoryview:
        if (idx := self._overlay.get(gfn)) is not None:
            return self.hv_frame(idx)
        if 0 <= gfn < self.ram_pages:
            return self.ram[gfn << PAGE_SHIFT : (gfn + 1) << PAGE_SHIFT]
        raise XenError(XEN_EFAULT, f"dom{self.domid}: gfn {gfn:#x} is not backed")

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        for view in self._spans(gpa, length):
            out += view
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> None:
        pos = 0
        for view in self._spans(gpa, len(data)):
            view[:] = data[pos : pos + len(view)]
            pos += len(view)

    def _spans(self, gpa: int, length: int) -> list[memoryview]:
        if gpa < 0 or length < 0 or gpa + length > 1 << 52:
            raise XenError(XEN_EFAULT, f"dom{self.domid}: {length} bytes at {gpa:#x} are out of range")
        spans = []
        while length > 0:
            off = gpa & (PAGE_SIZE - 1)
            n = min(length, PAGE_SIZE - off)
            spans.append(self.page(gpa >> PAGE_SHIFT)[off : off + n])
            gpa += n
            length -= n
        return spans

    def close(self) -> None:
        self.ram.release()
        self.frames.release()
        self._ram.close()
        self._frames.close()
        os.close(self.ram_fd)
        os.close(self.frames_fd)
