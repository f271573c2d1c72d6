"""The granting guest's side of a v1 grant table: write entries (domid and frame first, flags last),
end foreign access with the compare-and-swap loop that reports a mapped entry busy, read entries back.
It holds nothing but atomic views of the table frames the guest mapped (xenabi.grant_entries)."""
from __future__ import annotations

from collections.abc import Iterable

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.grant_entries import (DOMID, DOMID_BYTES, FLAGS, FLAGS_BYTES, FRAME, FRAME_BYTES, GrantEntry, atomic_frame,
                                  entry_location, read_entry)
from xenpv.xenabi.grant_table import GRANT_ENTRIES_V1_PER_FRAME, GTF_permit_access, GTF_readonly, GTF_reading, GTF_writing


class GrantTableFrontend:
    """The granting guest's side of a v1 table: write entries, end access, read them back.

    It holds nothing but atomic views of the table frames (the pages the guest mapped), so it works in any
    process that maps them.
    """

    def __init__(self, frames: Iterable[memoryview] = ()) -> None:
        self._frames: list[AtomicMemory] = []
        for frame in frames:
            self.add_frame(frame)

    def add_frame(self, frame: memoryview) -> None:
        self._frames.append(atomic_frame(frame))

    @property
    def nr_entries(self) -> int:
        return len(self._frames) * GRANT_ENTRIES_V1_PER_FRAME

    def grant_access(self, ref: int, domid: int, gfn: int, readonly: bool = False) -> None:
        """Grant ``domid`` access to ``gfn``: domid and frame first, flags last, so a mapper that sees the
        flags sees the rest."""
        self._check_ref(ref)
        if not 0 <= domid < 1 << 8 * DOMID_BYTES:
            raise ValueError(f"domid {domid} does not fit a grant entry")
        if not 0 <= gfn < 1 << 8 * FRAME_BYTES:
            raise ValueError(f"gfn {gfn:#x} does not fit a v1 grant entry")
        mem, off = entry_location(self._frames, ref)
        mem.store(off + DOMID, DOMID_BYTES, domid)
        mem.store(off + FRAME, FRAME_BYTES, gfn)
        # Sequentially consistent stores: the flags store is ordered after the two above (the wmb of C code).
        mem.store(off + FLAGS, FLAGS_BYTES, GTF_permit_access | (GTF_readonly if readonly else 0))

    def end_foreign_access(self, ref: int) -> bool:
        """Revoke ``ref``.  False (busy) while a mapper holds it: the page must not be reused then."""
        self._check_ref(ref)
        mem, off = entry_location(self._frames, ref)
        flags = mem.load(off + FLAGS, FLAGS_BYTES)
        while True:
            if flags & (GTF_reading | GTF_writing):
                return False
            result = mem.cmpxchg(off + FLAGS, FLAGS_BYTES, flags, 0)
            if result.success:
                return True
            flags = result.observed

    def entry(self, ref: int) -> GrantEntry:
        self._check_ref(ref)
        return read_entry(self._frames, ref)

    def release(self) -> None:
        """Drop the atomic views; call before the frames' mapping is closed."""
        for frame in self._frames:
            frame.release()
        self._frames.clear()

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise IndexError(f"grant ref {ref} is beyond {self.nr_entries} entries")
