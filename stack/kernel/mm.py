"""The memory manager drivers allocate from: physical pages of guest RAM (from the guest's one page
allocator) described by an MDL, read and written through the vCPU's view of guest memory. Rings, grant
pages and data buffers of the PV drivers live here, so a back-end sees them at the same frames."""
from __future__ import annotations

from dataclasses import dataclass

from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.stack.vcpu.pages import PAGE, PageAllocator


@dataclass(eq=False)
class Mdl:
    """A memory descriptor list: the frames of an allocation, in order."""

    pfns: list[int]

    @property
    def byte_count(self) -> int:
        return len(self.pfns) * PAGE


class MemoryManager:
    def __init__(self, pages: PageAllocator, vcpu: Vcpu) -> None:
        self.pages = pages
        self.vcpu = vcpu

    def MmAllocatePagesForMdl(self, count: int) -> Mdl:
        """`count` zeroed pages, physically contiguous (multi-page rings need that)."""
        mdl = Mdl(self.pages.alloc(count))
        self.vcpu.write_phys(mdl.pfns[0] * PAGE, bytes(count * PAGE))
        return mdl

    def MmFreePagesFromMdl(self, mdl: Mdl) -> None:
        self.pages.free(mdl.pfns)
        mdl.pfns = []

    def read(self, mdl: Mdl, offset: int, length: int) -> bytes:
        return self.vcpu.read_phys(mdl.pfns[0] * PAGE + offset, length) if self._contiguous(mdl) else \
            b"".join(self._chunks(mdl, offset, length, None))

    def write(self, mdl: Mdl, offset: int, data: bytes) -> None:
        if self._contiguous(mdl):
            self.vcpu.write_phys(mdl.pfns[0] * PAGE + offset, data)
        else:
            list(self._chunks(mdl, offset, len(data), data))

    def view(self, mdl: Mdl) -> memoryview:
        """A live view of a contiguous allocation (a shared ring); release it before freeing."""
        if not self._contiguous(mdl):
            raise ValueError("a view needs physically contiguous pages")
        return self.vcpu.memory.view(mdl.pfns[0] * PAGE, mdl.byte_count)

    @staticmethod
    def _contiguous(mdl: Mdl) -> bool:
        return mdl.pfns == list(range(mdl.pfns[0], mdl.pfns[0] + len(mdl.pfns)))

    def _chunks(self, mdl: Mdl, offset: int, length: int, data: bytes | None):
        pos = 0
        while pos < length:
            page, off = divmod(offset + pos, PAGE)
            n = min(PAGE - off, length - pos)
            gpa = mdl.pfns[page] * PAGE + off
            if data is None:
                yield self.vcpu.read_phys(gpa, n)
            else:
                self.vcpu.write_phys(gpa, data[pos:pos + n])
                yield b""
            pos += n


_current: MemoryManager | None = None


def set_current_mm(mm: MemoryManager | None) -> None:
    global _current
    _current = mm


def current_mm() -> MemoryManager:
    if _current is None:
        raise RuntimeError("no memory manager: the kernel was not booted on a machine")
    return _current


def MmAllocatePagesForMdl(count: int) -> Mdl:
    return current_mm().MmAllocatePagesForMdl(count)


def MmFreePagesFromMdl(mdl: Mdl) -> None:
    current_mm().MmFreePagesFromMdl(mdl)
