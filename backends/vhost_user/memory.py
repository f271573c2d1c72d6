"""Guest memory as a vhost-user back-end sees it: region fds mapped MAP_SHARED, addressed by
guest-physical address."""
from __future__ import annotations

import mmap
import os
import stat
import threading
from dataclasses import dataclass

from xenpv.backends.vhost_user.messages import MEM_REGION, U64_LIMIT, VhostUserProtocolError, log


class GuestMemoryError(Exception):
    """A guest-physical range is not wholly inside one mapped region."""

    def __init__(self, gpa: int, length: int, reason: str) -> None:
        self.gpa = gpa
        self.length = length
        self.reason = reason
        super().__init__(f"guest range {gpa:#x}+{length:#x}: {reason}")


@dataclass(frozen=True)
class RegionDescriptor:
    """One memory region as the protocol describes it."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    @classmethod
    def unpack(cls, data: bytes | memoryview, offset: int = 0) -> "RegionDescriptor":
        return cls(*MEM_REGION.unpack_from(data, offset))

    def pack(self) -> bytes:
        return MEM_REGION.pack(self.gpa, self.size, self.uva, self.mmap_offset)

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass
class MappedRegion:
    desc: RegionDescriptor
    mapping: mmap.mmap
    view: memoryview  # the region's bytes, i.e. the mapping from mmap_offset on


class GuestMemory:
    """The regions of one session. Thread-safe: device code may read and write from any thread
    while the session's event loop adds or removes regions."""

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._regions: list[MappedRegion] = []
        self._lock = threading.Lock()

    @property
    def regions(self) -> list[RegionDescriptor]:
        with self._lock:
            return [r.desc for r in self._regions]

    def add(self, desc: RegionDescriptor, fd: int) -> None:
        """Validates and maps `desc` from `fd`; the caller keeps ownership of `fd`."""
        if desc.size == 0:
            raise VhostUserProtocolError(f"region at gpa {desc.gpa:#x} has size 0")
        for name, start in (("gpa", desc.gpa), ("uva", desc.uva), ("mmap_offset", desc.mmap_offset)):
            if start + desc.size > U64_LIMIT:
                raise VhostUserProtocolError(f"region {name} {start:#x} + size {desc.size:#x} overflows 64 bits")
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and desc.mmap_offset + desc.size > st.st_size:
            raise VhostUserProtocolError(
                f"region at gpa {desc.gpa:#x}: mmap_offset {desc.mmap_offset:#x} + size {desc.size:#x} "
                f"is beyond the end of its fd ({st.st_size:#x} bytes)"
            )
        with self._lock:
            if len(self._regions) >= self.max_regions:
                raise VhostUserProtocolError(f"too many memory regions (limit {self.max_regions})")
            for r in self._regions:
                if desc.gpa < r.desc.end and r.desc.gpa < desc.end:
                    raise VhostUserProtocolError(
                        f"region {desc.gpa:#x}+{desc.size:#x} overlaps region {r.desc.gpa:#x}+{r.desc.size:#x}"
                    )
            try:
                mapping = mmap.mmap(fd, desc.mmap_offset + desc.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as exc:
                raise VhostUserProtocolError(f"cannot map region at gpa {desc.gpa:#x}: {exc}") from exc
            view = memoryview(mapping)[desc.mmap_offset :]
            self._regions.append(MappedRegion(desc, mapping, view))
            self._regions.sort(key=lambda r: r.desc.gpa)

    def remove(self, gpa: int, size: int) -> bool:
        """Unmaps the region with exactly this gpa and size; False if there is none."""
        with self._lock:
            for i, r in enumerate(self._regions):
                if r.desc.gpa == gpa and r.desc.size == size:
                    del self._regions[i]
                    _unmap(r)
                    return True
        return False

    def clear(self) -> None:
        with self._lock:
            regions, self._regions = self._regions, []
        for r in regions:
            _unmap(r)

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of guest bytes [gpa, gpa+length); the range must lie in one region."""
        if length < 0 or gpa < 0 or gpa + length > U64_LIMIT:
            raise GuestMemoryError(gpa, length, "invalid range")
        with self._lock:
            for r in self._regions:
                if r.desc.gpa <= gpa < r.desc.end:
                    if gpa + length > r.desc.end:
                        raise GuestMemoryError(
                            gpa, length, f"straddles the end of region {r.desc.gpa:#x}+{r.desc.size:#x}"
                        )
                    start = gpa - r.desc.gpa
                    return r.view[start : start + length]
        raise GuestMemoryError(gpa, length, "not mapped")

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.view(gpa, len(data))[:] = data


def _unmap(r: MappedRegion) -> None:
    try:
        r.view.release()
        r.mapping.close()
    except BufferError:
        # Device code still holds a view: the mapping goes away when the last view is dropped.
        log.debug("region %#x+%#x still referenced; unmapped when released", r.desc.gpa, r.desc.size)
