"""Grant pins shared by xenhv and dom0's back-end processes: Xen's active grant entries, in shared memory.

In Xen one hypervisor owns every active entry (gnttab.c's ``struct active_grant_entry``: pin counts and
the frame pinned) and changes it under the entry's lock.  Here dom0's back-ends are separate processes
that check, pin and copy granted pages themselves, on the guest RAM they map over vhost-user, so that a
forwarded frame costs no round trip to xenhv.  The active entries therefore live in a memfd xenhv creates
per domain and hands to each back-end it attached (control op ``gnttab_share``); xenhv keeps using the same
table for its own mappings, and keeps the bookkeeping: when a back-end dies or is detached, xenhv drops
its pins (:meth:`PinTable.recover_party`), so the guest's revoke works again.

Every pinner is a *party*: xenhv is :data:`XENHV_PARTY`, each back-end link gets one of the others.  An
entry's 64-bit word holds the total pins (readers and writers, all parties) and, while a party changes the
entry, that party's id, what it is doing and its own counts before the change.  A party takes the entry by
compare-and-swap of the word (Xen's active entry lock), sets or clears GTF_reading/GTF_writing on the
guest's grant entry, updates its own count and then stores the new totals, which releases the entry.  A
party that dies holding an entry leaves in the word everything xenhv needs to finish or undo its change.

Flag rules (Xen's ``_set_status_v1``, one source for xenhv and the back-ends): the first pin checks that
the entry is GTF_permit_access (no transitive, no sub-page for maps), that its domid is the pinning
domain's, that a write pin is not on a GTF_readonly entry, and sets GTF_reading (and GTF_writing) with a
compare-and-swap of flags and domid together: the guest may change them concurrently, and a changed domid
must fail the swap rather than hand the page to another domain.  The last writer clears GTF_writing, the
last pin GTF_reading; until then the guest's end_foreign_access sees the entry busy.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.grant_entries import (COMBO, COMBO_BYTES, DOMID_SHIFT, FLAGS, FLAGS_BYTES, FLAGS_MASK, FRAME,
                                        FRAME_BYTES, entry_location)
from xenpv.xenabi.grant_table import (GNTST_bad_gntref, GNTST_bad_handle, GNTST_bad_page, GNTST_eagain,
                                      GNTST_general_error, GNTST_no_space, GRANT_ENTRIES_V1_PER_FRAME,
                                      GTF_permit_access, GTF_readonly, GTF_reading, GTF_sub_page, GTF_type_mask,
                                      GTF_writing)
from xenpv.xenabi.layout import XenStruct
from xenpv.xenabi.ring import XEN_PAGE_SIZE

# Xen gives up on an entry the guest keeps changing after this many compare-and-swap attempts.
CMPXCHG_ATTEMPTS = 5
# Party ids fit the word's holder field; 0 means the entry is not being changed.
MAX_PARTIES = 16
XENHV_PARTY = 1
# A party holds an entry for a few atomic operations; one that holds it this long is stopped or dead.
LOCK_WAIT_SECONDS = 0.5
# Hypervisor frames a guest can place in its physical map (shared_info and the grant frames).
MAX_OVERLAY = 128
MAGIC = 0x70696E73  # "pins"
# The highest count of one kind one party may hold on one entry (its count is a byte).
MAX_PARTY_PINS = 0xFF

# The entry word: holder | op | old party counts while held; the totals always.
HOLDER_MASK = 0xF
OP_MASK = 0x3 << 4
OP_PIN, OP_UNPIN = 1 << 4, 2 << 4
OP_WRITABLE = 1 << 6
OLD_R_SHIFT, OLD_W_SHIFT = 8, 16
TOTAL_R_SHIFT, TOTAL_W_SHIFT = 24, 44
TOTAL_MASK = (1 << 20) - 1
TOTALS_MASK = ~((1 << TOTAL_R_SHIFT) - 1) & ((1 << 64) - 1)


class PinTableHeader(XenStruct):
    """The first page of a pin table.  ``party_gen[p]`` is nonzero while party ``p`` may pin (xenhv zeroes
    it when the party's link goes); ``overlay`` lists the guest frames where xenhv placed hypervisor pages
    (their RAM is not what the guest maps there), under the seqlock ``overlay_seq``."""

    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("nr_entries", ctypes.c_uint32),
        ("overlay_seq", ctypes.c_uint32),
        ("ram_pages", ctypes.c_uint64),
        ("overlay_count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("party_gen", ctypes.c_uint32 * MAX_PARTIES),
        ("overlay", ctypes.c_uint64 * MAX_OVERLAY),
    ]


class PinEntry(XenStruct):
    """One active entry: the word (see module docstring), the frame pinned and the domain pinning it, both
    valid while the totals are nonzero."""

    _fields_ = [
        ("word", ctypes.c_uint64),
        ("gfn", ctypes.c_uint32),
        ("domid", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    ]


ENTRY_SIZE = ctypes.sizeof(PinEntry)
ENTRIES_OFFSET = XEN_PAGE_SIZE
if ctypes.sizeof(PinTableHeader) > ENTRIES_OFFSET:
    raise ImportError("the pin table header does not fit its page")
# Each party's own counts follow the entries: one 16-bit word per entry, readers in the low byte.
PARTY_COUNT_BYTES = 2


def table_size(max_entries: int) -> int:
    return _counts_offset(max_entries) + MAX_PARTIES * max_entries * PARTY_COUNT_BYTES


def _counts_offset(max_entries: int) -> int:
    return ENTRIES_OFFSET + -(-max_entries * ENTRY_SIZE // XEN_PAGE_SIZE) * XEN_PAGE_SIZE


def _totals(word: int) -> tuple[int, int]:
    return (word >> TOTAL_R_SHIFT) & TOTAL_MASK, (word >> TOTAL_W_SHIFT) & TOTAL_MASK


def _word(readers: int, writers: int) -> int:
    return (readers << TOTAL_R_SHIFT) | (writers << TOTAL_W_SHIFT)


class GrantRefused(Exception):
    """A grant rule refused a pin; ``status`` is the GNTST_* code Xen would report."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class GrantNotLocal(GrantRefused):
    """The grant may be fine, but its frame is not guest RAM this party can reach (a hypervisor page
    placed in the guest's physical map, or no page at all): only xenhv can decide it."""

    def __init__(self, message: str) -> None:
        super().__init__(GNTST_bad_page, message)


def set_status(frames: list[AtomicMemory], granter: int, ref: int, mapper: int, readonly: bool, mask: int, *,
               check_grant: bool, op: str) -> None:
    """Xen's ``_set_status_v1``: set GTF_reading (and GTF_writing unless ``readonly``) on ``ref`` for
    ``mapper``, checking the entry grants it (when ``check_grant``: the first pin) and that a write pin is
    not on a read-only grant.  ``mask`` is the flag bits that must read GTF_permit_access."""
    mem, off = entry_location(frames, ref)
    combo = mem.load(off + COMBO, COMBO_BYTES)
    for _attempt in range(CMPXCHG_ATTEMPTS):
        flags, domid = combo & FLAGS_MASK, combo >> DOMID_SHIFT
        if check_grant and ((flags & mask) != GTF_permit_access or domid != mapper):
            raise GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} (flags {flags:#x}, "
                                                    f"domid {domid}) does not grant access to dom{mapper}")
        new_flags = flags | GTF_reading
        if not readonly:
            if flags & GTF_readonly:
                raise GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} is read-only, "
                                                        f"dom{mapper} asked to write")
            new_flags |= GTF_writing
        result = mem.cmpxchg(off + COMBO, COMBO_BYTES, combo, (domid << DOMID_SHIFT) | new_flags)
        if result.success:
            return
        combo = result.observed
    raise GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} kept changing during "
                                            f"{CMPXCHG_ATTEMPTS} compare-and-swap attempts")


MAP_MASK = GTF_type_mask | GTF_sub_page  # a mapping covers the whole page: sub-page grants are refused
COPY_MASK = GTF_type_mask  # a copy may use a sub-page grant


@dataclass(frozen=True)
class PartyCounts:
    readers: int
    writers: int


class PinTable:
    """A domain's active entries over ``buffer`` (the pin table memfd's mapping) and its grant ``frames``
    (the list may grow as the table does).  ``granter`` is the domain whose grants these are."""

    def __init__(self, buffer: memoryview, frames: list[AtomicMemory], granter: int) -> None:
        self._buffer = buffer
        self._mem = AtomicMemory(buffer)
        self._raw = memoryview(buffer).cast("B")
        header = PinTableHeader.from_buffer_copy(self._raw[:ctypes.sizeof(PinTableHeader)])
        if header.magic != MAGIC:
            raise ValueError(f"not a pin table (magic {header.magic:#x})")
        self.max_entries = header.max_entries
        if len(self._raw) < table_size(self.max_entries):
            raise ValueError(f"pin table of {len(self._raw)} bytes is too small for {self.max_entries} entries")
        self._counts = _counts_offset(self.max_entries)
        self.frames = frames
        self.granter = granter
        self._overlay_seen = -1
        self._overlay: frozenset[int] = frozenset()
        self._known_entries = 0  # the table never shrinks: refs below this need no look at the header

    @staticmethod
    def format(buffer: memoryview, max_entries: int, ram_pages: int) -> None:
        """Lay out a zeroed buffer of :func:`table_size` bytes as an empty table (xenhv, at domain creation)."""
        header = PinTableHeader(magic=MAGIC, max_entries=max_entries, ram_pages=ram_pages)
        with memoryview(buffer) as view, view.cast("B") as raw:
            raw[:ctypes.sizeof(header)] = bytes(header)

    def release(self) -> None:
        """Give back every view of the buffer (its mapping can be closed afterwards)."""
        self._mem.release()
        self._raw.release()
        if isinstance(self._buffer, memoryview):
            self._buffer.release()

    # ---- header ------------------------------------------------------------------------------------------

    @property
    def nr_entries(self) -> int:
        return self._mem.load(PinTableHeader.nr_entries.offset, 4)

    def set_nr_entries(self, n: int) -> None:
        self._mem.store(PinTableHeader.nr_entries.offset, 4, n)

    @property
    def ram_pages(self) -> int:
        return self._mem.load(PinTableHeader.ram_pages.offset, 8)

    def party_generation(self, party: int) -> int:
        return self._mem.load(PinTableHeader.party_gen.offset + 4 * party, 4)

    def set_party_generation(self, party: int, gen: int) -> None:
        self._mem.store(PinTableHeader.party_gen.offset + 4 * party, 4, gen)

    def publish_overlay(self, gfns: list[int]) -> None:
        """xenhv: the guest frames covered by hypervisor pages, for the back-ends' p2m check."""
        if len(gfns) > MAX_OVERLAY:
            raise ValueError(f"{len(gfns)} hypervisor frames placed, the table has room for {MAX_OVERLAY}")
        # xenhv is the only writer: an odd sequence number tells readers a rewrite is in progress.
        seq = PinTableHeader.overlay_seq.offset
        self._mem.store(seq, 4, self._mem.load(seq, 4) + 1)
        for i, gfn in enumerate(gfns):
            self._mem.store(PinTableHeader.overlay.offset + 8 * i, 8, gfn)
        self._mem.store(PinTableHeader.overlay_count.offset, 4, len(gfns))
        self._mem.store(seq, 4, self._mem.load(seq, 4) + 1)

    def overlaid(self, gfn: int) -> bool:
        """Whether a hypervisor page covers ``gfn`` (a seqlock read, cached until xenhv publishes again)."""
        seq_off = PinTableHeader.overlay_seq.offset
        for _attempt in range(100):
            seq = self._mem.load(seq_off, 4)
            if seq == self._overlay_seen:
                return gfn in self._overlay
            if seq & 1:
                time.sleep(0)
                continue
            count = min(self._mem.load(PinTableHeader.overlay_count.offset, 4), MAX_OVERLAY)
            gfns = frozenset(self._mem.load(PinTableHeader.overlay.offset + 8 * i, 8) for i in range(count))
            if self._mem.load(seq_off, 4) == seq:
                self._overlay, self._overlay_seen = gfns, seq
                return gfn in gfns
        return True  # xenhv kept rewriting it: let xenhv decide this one

    # ---- entries -----------------------------------------------------------------------------------------

    def _word_offset(self, ref: int) -> int:
        return ENTRIES_OFFSET + ref * ENTRY_SIZE + PinEntry.word.offset

    def _count_offset(self, party: int, ref: int) -> int:
        return self._counts + (party * self.max_entries + ref) * PARTY_COUNT_BYTES

    def totals(self, ref: int) -> tuple[int, int]:
        """(readers, writers) pinning ``ref``, every party together."""
        return _totals(self._mem.load(self._word_offset(ref), 8))

    def pinned(self, ref: int) -> bool:
        return self._mem.load(self._word_offset(ref), 8) & TOTALS_MASK != 0

    def pinned_gfn(self, ref: int) -> int:
        return self._mem.load(ENTRIES_OFFSET + ref * ENTRY_SIZE + PinEntry.gfn.offset, 4)

    def party_counts(self, party: int, ref: int) -> PartyCounts:
        value = self._mem.load(self._count_offset(party, ref), PARTY_COUNT_BYTES)
        return PartyCounts(value & 0xFF, value >> 8)

    def _check_ref(self, ref: int, op: str) -> None:
        if isinstance(ref, int) and 0 <= ref < self._known_entries:
            return
        self._known_entries = min(self.nr_entries, self.max_entries, len(self.frames) * GRANT_ENTRIES_V1_PER_FRAME)
        if not isinstance(ref, int) or not 0 <= ref < self._known_entries:
            raise GrantRefused(GNTST_bad_gntref, f"{op}: dom{self.granter} ref {ref} is beyond "
                                                 f"{self.nr_entries} entries")

    def _lock(self, holder: int, ref: int, op_bits: int, count_party: int) -> tuple[int, int]:
        """Take entry ``ref`` for ``holder``: returns (the word before, ``count_party``'s counts then)."""
        off = self._word_offset(ref)
        word = self._mem.load(off, 8)
        deadline = None
        while True:
            if word & HOLDER_MASK == 0:
                counts = self._mem.load(self._count_offset(count_party, ref), PARTY_COUNT_BYTES)
                locked = (word | holder | op_bits | (counts & 0xFF) << OLD_R_SHIFT | (counts >> 8) << OLD_W_SHIFT)
                result = self._mem.cmpxchg(off, 8, word, locked)
                if result.success:
                    return word, counts
                word = result.observed
                continue
            now = time.monotonic()
            if deadline is None:
                deadline = now + LOCK_WAIT_SECONDS
            elif now > deadline:
                raise GrantRefused(GNTST_eagain, f"dom{self.granter} ref {ref}: its active entry is held by "
                                                 f"party {word & HOLDER_MASK} for more than {LOCK_WAIT_SECONDS}s")
            time.sleep(0)
            word = self._mem.load(off, 8)

    def _unlock(self, ref: int, word: int) -> None:
        self._mem.store(self._word_offset(ref), 8, word & TOTALS_MASK)

    def _clear_flags(self, ref: int, bits: int) -> None:
        mem, off = entry_location(self.frames, ref)
        mem.fetch_and(off + FLAGS, FLAGS_BYTES, ~bits)

    def _settle_flags(self, ref: int, readers: int, writers: int) -> None:
        """Make the guest's GTF_reading/GTF_writing say what the totals say (after a release)."""
        if readers + writers == 0:
            self._clear_flags(ref, GTF_reading | GTF_writing)
        elif writers == 0:
            self._clear_flags(ref, GTF_writing)

    def _check_party(self, party: int, generation: int, ref: int, word: int, op: str) -> None:
        if party != XENHV_PARTY and self.party_generation(party) != generation:
            self._unlock(ref, word)
            raise GrantRefused(GNTST_general_error, f"{op}: party {party}'s access to dom{self.granter}'s "
                                                    f"grants was revoked (its link was detached)")

    def pin(self, party: int, ref: int, writable: bool, mapper: int, *, mask: int,
            page_ok: Callable[[int], bool], op: str, generation: int = 0) -> int:
        """Pin ``ref`` for ``party`` (of domain ``mapper``): returns the frame pinned.  ``page_ok(gfn)`` says
        whether the frame is a page the caller can reach; it may raise GrantNotLocal itself."""
        self._check_ref(ref, op)
        word, counts = self._lock(party, ref, OP_PIN | (OP_WRITABLE if writable else 0), party)
        self._check_party(party, generation, ref, word, op)
        set_bits = 0
        try:
            readers, writers = _totals(word)
            mine = counts >> 8 if writable else counts & 0xFF
            if mine >= MAX_PARTY_PINS or readers + writers >= TOTAL_MASK:
                raise GrantRefused(GNTST_no_space, f"{op}: dom{self.granter} ref {ref} has too many pins")
            entry = ENTRIES_OFFSET + ref * ENTRY_SIZE
            if readers + writers == 0:
                set_status(self.frames, self.granter, ref, mapper, not writable, mask, check_grant=True, op=op)
                set_bits = GTF_reading | (GTF_writing if writable else 0)
                mem, off = entry_location(self.frames, ref)
                gfn = mem.load(off + FRAME, FRAME_BYTES)
                if not page_ok(gfn):
                    raise GrantRefused(GNTST_bad_page, f"{op}: dom{self.granter} ref {ref} grants gfn {gfn:#x}, "
                                                       f"which is not a page of the domain")
                self._mem.store(entry + PinEntry.gfn.offset, 4, gfn)
                self._mem.store(entry + PinEntry.domid.offset, 2, mapper)
            else:
                holder_dom = self._mem.load(entry + PinEntry.domid.offset, 2)
                if holder_dom != mapper:
                    raise GrantRefused(GNTST_general_error, f"{op}: dom{self.granter} ref {ref} is in use by "
                                                            f"dom{holder_dom}, not dom{mapper}")
                if writable and writers == 0:
                    # Once pinned, the entry cannot have been revoked, so only the read-only bit is re-checked.
                    set_status(self.frames, self.granter, ref, mapper, False, mask, check_grant=False, op=op)
                    set_bits = GTF_writing
                gfn = self._mem.load(entry + PinEntry.gfn.offset, 4)
                if not page_ok(gfn):
                    raise GrantNotLocal(f"{op}: dom{self.granter} ref {ref}: gfn {gfn:#x} is not RAM here")
        except BaseException:
            if set_bits:
                self._settle_flags(ref, readers, writers)
            self._unlock(ref, word)
            raise
        counts += 0x100 if writable else 1
        self._mem.store(self._count_offset(party, ref), PARTY_COUNT_BYTES, counts)
        self._unlock(ref, word + (1 << (TOTAL_W_SHIFT if writable else TOTAL_R_SHIFT)))
        return gfn

    def unpin(self, party: int, ref: int, writable: bool, *, generation: int = 0, owner: int | None = None) -> None:
        """Drop one of ``owner``'s pins (default: ``party``'s own) on ``ref``; the last writer clears
        GTF_writing, the last pin GTF_reading."""
        self._check_ref(ref, "unpin")
        owner = party if owner is None else owner
        word, counts = self._lock(party, ref, OP_UNPIN | (OP_WRITABLE if writable else 0), owner)
        self._check_party(party, generation, ref, word, "unpin")
        mine = counts >> 8 if writable else counts & 0xFF
        if mine == 0:
            self._unlock(ref, word)
            raise GrantRefused(GNTST_bad_handle, f"unpin: party {owner} holds no {'write' if writable else 'read'} "
                                                 f"pin on dom{self.granter} ref {ref}")
        self._release(ref, word, counts, writable, owner)

    def _release(self, ref: int, word: int, counts: int, writable: bool, owner: int) -> None:
        readers, writers = _totals(word)
        if writable:
            writers, counts = writers - 1, counts - 0x100
        else:
            readers, counts = readers - 1, counts - 1
        self._settle_flags(ref, readers, writers)
        self._mem.store(self._count_offset(owner, ref), PARTY_COUNT_BYTES, counts)
        self._unlock(ref, _word(readers, writers))

    # ---- xenhv's bookkeeping -----------------------------------------------------------------------------

    def allocate_party(self, used: set[int]) -> tuple[int, int] | None:
        """A free party id and a fresh generation for a back-end link (None when all are taken)."""
        for party in range(XENHV_PARTY + 1, MAX_PARTIES):
            if party not in used and self.party_generation(party) == 0:
                gen = (int.from_bytes(os.urandom(4), "little") | 1) & 0xFFFFFFFF
                self.set_party_generation(party, gen)
                return party, gen
        return None

    def recover_party(self, party: int, wait: float = 0.1) -> int:
        """The link of ``party`` is gone: revoke it, finish or undo the change it was making if it died
        holding an entry, and drop every pin it held.  Returns how many pins were dropped."""
        self.set_party_generation(party, 0)
        limit = min(self.nr_entries, self.max_entries)
        deadline = time.monotonic() + wait
        # A party still alive finishes the change it is making (and then sees itself revoked); one that is
        # dead left its entry held: after the wait, xenhv finishes or undoes the change from the word.
        while (held := self._held_by(party, limit)) and time.monotonic() < deadline:
            time.sleep(0.001)
        for ref in held:
            self._repair(party, ref)
        dropped = 0
        counts = array("H", bytes(self._raw[self._count_offset(party, 0):self._count_offset(party, limit)]))
        for ref, value in enumerate(counts):
            for writable, n in ((False, value & 0xFF), (True, value >> 8)):
                for _ in range(n):
                    word, now = self._lock(XENHV_PARTY, ref, OP_UNPIN | (OP_WRITABLE if writable else 0), party)
                    self._release(ref, word, now, writable, party)
                    dropped += 1
        return dropped

    def _held_by(self, party: int, limit: int) -> list[int]:
        words = array("Q", bytes(self._raw[ENTRIES_OFFSET:ENTRIES_OFFSET + limit * ENTRY_SIZE]))
        step = ENTRY_SIZE // 8
        return [i // step for i in range(0, len(words), step) if words[i] & HOLDER_MASK == party]

    def _repair(self, party: int, ref: int) -> None:
        off = self._word_offset(ref)
        word = self._mem.load(off, 8)
        if word & HOLDER_MASK != party:
            return
        op, writable = word & OP_MASK, bool(word & OP_WRITABLE)
        old = ((word >> OLD_R_SHIFT) & 0xFF) | ((word >> OLD_W_SHIFT) & 0xFF) << 8
        readers, writers = _totals(word)
        if op == OP_UNPIN and (old >> 8 if writable else old & 0xFF):
            # Roll forward: the unpin had been asked for, so the pin goes.
            if writable:
                writers, old = writers - 1, old - 0x100
            else:
                readers, old = readers - 1, old - 1
        # A pin in progress is undone: the totals in the word do not count it yet.
        self._settle_flags(ref, readers, writers)
        self._mem.store(self._count_offset(party, ref), PARTY_COUNT_BYTES, old)
        self._mem.store(off, 8, _word(readers, writers))


def create_table(max_entries: int, ram_pages: int, name: str) -> tuple[int, mmap.mmap]:
    """xenhv: a new pin table memfd and its mapping."""
    size = table_size(max_entries)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
    except BaseException:
        os.close(fd)
        raise
    PinTable.format(memoryview(mapping), max_entries, ram_pages)
    return fd, mapping
