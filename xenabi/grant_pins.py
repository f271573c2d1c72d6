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

Where it runs: a pin and an unpin are each one call of the native helper (``xpv_pin`` and ``xpv_unpin`` in
xenabi/_atomic_ops.c, the only implementation of the rules above); this module states the layouts, passes
every offset and constant to it (:class:`_NativeLayout`, once per table) and words its refusals.  The page
check of a pin is native too when it is the table's own rule (the frame is guest RAM below ``ram_pages``
and no hypervisor page covers it: what a back-end reaches over vhost-user); a caller with another rule
(xenhv's p2m) passes ``page_ok``, which runs with the entry held, between ``xpv_pin`` and
``xpv_pin_finish``.  xenhv's recovery of a gone party (:meth:`PinTable.recover_party`) is the slow path
and stays here, reading the same word.
"""
from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xenpv.xenabi.atomic import AtomicMemory, helper
from xenpv.xenabi.grant_entries import (COMBO, COMBO_BYTES, DOMID_SHIFT, ENTRY_SIZE as GRANT_ENTRY_SIZE, FLAGS,
                                        FLAGS_BYTES, FLAGS_MASK, FRAME, FRAME_BYTES, entry_location)
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
# A reader retries the overlay list this many times while xenhv rewrites it, then lets xenhv decide.
OVERLAY_ATTEMPTS = 100
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
# A party's count of one entry: readers in the low byte, writers in the high one.
COUNT_MASK, COUNT_W_SHIFT = 0xFF, 8


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


# ---- the native helper's view of a table (xenabi/_atomic_ops.c, struct xpv_pins) ------------------------

class _NativeLayout(ctypes.Structure):
    """What ``xpv_pin``/``xpv_unpin`` know of the layouts above, field for field in the order of struct
    xpv_pins (its size is checked against the helper's at import).  Offsets of the header and of an entry
    are from the table's first byte and the entry's; ``*_width`` are sizes in bytes."""

    _fields_ = [(name, ctypes.c_uint64) for name in (
        "size",
        "party_gen", "party_gen_width", "ram_pages", "ram_pages_width",
        "overlay_seq", "overlay_seq_width", "overlay_count", "overlay_count_width", "overlay", "overlay_width",
        "max_overlay", "overlay_attempts",
        "entries", "entry_size", "word", "word_width", "gfn", "gfn_width", "domid", "domid_width",
        "counts", "count_width", "max_entries", "count_w_shift", "count_mask",
        "holder_mask", "op_pin", "op_unpin", "op_writable", "old_r_shift", "old_w_shift", "total_r_shift",
        "total_w_shift", "total_mask", "max_party_pins", "xenhv_party", "lock_wait_ns",
        "combo", "combo_width", "flags", "flags_width", "frame", "frame_width", "domid_shift", "flags_mask",
        "gtf_permit_access", "gtf_readonly", "gtf_reading", "gtf_writing", "cmpxchg_attempts")]


if helper().xpv_pins_size() != ctypes.sizeof(_NativeLayout):
    raise ImportError(f"xenabi/_atomic_ops.so's struct xpv_pins has {helper().xpv_pins_size()} bytes, "
                      f"grant_pins' layout {ctypes.sizeof(_NativeLayout)}: rebuild it (python -m xenpv.xenabi.native)")


def _element_width(struct: type[ctypes.Structure], name: str) -> int:
    field_type = dict(struct._fields_)[name]
    return ctypes.sizeof(getattr(field_type, "_type_", field_type))


def _native_layout(max_entries: int) -> _NativeLayout:
    header, entry = PinTableHeader, PinEntry
    return _NativeLayout(
        size=ctypes.sizeof(_NativeLayout),
        party_gen=header.party_gen.offset, party_gen_width=_element_width(header, "party_gen"),
        ram_pages=header.ram_pages.offset, ram_pages_width=header.ram_pages.size,
        overlay_seq=header.overlay_seq.offset, overlay_seq_width=header.overlay_seq.size,
        overlay_count=header.overlay_count.offset, overlay_count_width=header.overlay_count.size,
        overlay=header.overlay.offset, overlay_width=_element_width(header, "overlay"), max_overlay=MAX_OVERLAY,
        overlay_attempts=OVERLAY_ATTEMPTS,
        entries=ENTRIES_OFFSET, entry_size=ENTRY_SIZE, word=entry.word.offset, word_width=entry.word.size,
        gfn=entry.gfn.offset, gfn_width=entry.gfn.size, domid=entry.domid.offset, domid_width=entry.domid.size,
        counts=_counts_offset(max_entries), count_width=PARTY_COUNT_BYTES, max_entries=max_entries,
        count_w_shift=COUNT_W_SHIFT, count_mask=COUNT_MASK,
        holder_mask=HOLDER_MASK, op_pin=OP_PIN, op_unpin=OP_UNPIN, op_writable=OP_WRITABLE,
        old_r_shift=OLD_R_SHIFT, old_w_shift=OLD_W_SHIFT, total_r_shift=TOTAL_R_SHIFT, total_w_shift=TOTAL_W_SHIFT,
        total_mask=TOTAL_MASK, max_party_pins=MAX_PARTY_PINS, xenhv_party=XENHV_PARTY,
        lock_wait_ns=int(LOCK_WAIT_SECONDS * 1e9),
        combo=COMBO, combo_width=COMBO_BYTES, flags=FLAGS, flags_width=FLAGS_BYTES, frame=FRAME,
        frame_width=FRAME_BYTES, domid_shift=DOMID_SHIFT, flags_mask=FLAGS_MASK,
        gtf_permit_access=GTF_permit_access, gtf_readonly=GTF_readonly, gtf_reading=GTF_reading,
        gtf_writing=GTF_writing, cmpxchg_attempts=CMPXCHG_ATTEMPTS)


# What a native call returns: one of these codes in the low byte, a value above it (enum xpv_pin_code).
CODE_BITS = 8
CODE_MASK = (1 << CODE_BITS) - 1
(PIN_OK, PIN_BUSY, PIN_REVOKED, PIN_NO_SPACE, PIN_NOT_GRANTED, PIN_READ_ONLY, PIN_CHANGING, PIN_IN_USE,
 PIN_NOT_LOCAL, PIN_PAGE_CHECK, PIN_NO_PIN, PIN_LOST) = range(12)
# A call's other arguments, packed in two words: `who` is the ref | the party << 32 | the mapping domain (or
# the owner of an unpin) << 40; `how` is the mask in its low 16 bits, these flags and the generation << 32.
_WHO_PARTY_SHIFT, _WHO_DOMAIN_SHIFT = 32, 40
_HOW_WRITABLE = 1 << 16
_HOW_CALLER_CHECKS_PAGE = 1 << 17
_HOW_GENERATION_SHIFT = 32
_FIRST_PIN = 1 << 32  # in PIN_PAGE_CHECK's value, above the frame

# The points of a pin or unpin where a test's hook runs (enum xpv_pin_point): a party can die at any of them.
AT_HELD = 1  # the entry was just taken
AT_STATUS = 2  # before each compare-and-swap of the guest's flags and domid
AT_SETTLE = 3  # before GTF_reading/GTF_writing are settled (a release, or a pin undone)
AT_COUNTED = 4  # the party's count is stored, the entry not yet released
_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint)


@contextlib.contextmanager
def native_hook(callback: Callable[[int, int], None]) -> Iterator[None]:
    """For tests: ``callback(point, ref)`` runs at every AT_* point of every pin and unpin of this process
    while the block runs (one hook at a time).  It runs in the pinning thread with the pin table's and the
    grant frame's :class:`AtomicMemory` held, so it must reach those pages through other views; an exception
    it raises is printed and ignored (ctypes), so record what it saw instead."""
    hook = _HOOK(callback)
    helper().xpv_pins_set_hook(ctypes.cast(hook, ctypes.c_void_p))
    try:
        yield
    finally:
        helper().xpv_pins_set_hook(None)


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
        self._length = table_size(self.max_entries)
        # The native helper's view of this table, passed by address with every pin and unpin.
        self._native = _native_layout(self.max_entries)
        self._native_address = ctypes.addressof(self._native)
        self.frames = frames
        self.granter = granter
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
        return PartyCounts(value & COUNT_MASK, value >> COUNT_W_SHIFT)

    def _check_ref(self, ref: int, op: str) -> None:
        if isinstance(ref, int) and 0 <= ref < self._known_entries:
            return
        self._known_entries = min(self.nr_entries, self.max_entries, len(self.frames) * GRANT_ENTRIES_V1_PER_FRAME)
        if not isinstance(ref, int) or not 0 <= ref < self._known_entries:
            raise GrantRefused(GNTST_bad_gntref, f"{op}: dom{self.granter} ref {ref} is beyond "
                                                 f"{self.nr_entries} entries")

    def pin(self, party: int, ref: int, writable: bool, mapper: int, *, mask: int,
            page_ok: Callable[[int], bool] | None = None, op: str, generation: int = 0) -> int:
        """Pin ``ref`` for ``party`` (of domain ``mapper``): returns the frame pinned.  Without ``page_ok``
        the frame must be guest RAM no hypervisor page covers (the table's own rule, checked natively; a
        frame that is not is GrantNotLocal: only xenhv can decide it).  ``page_ok(gfn)`` is another rule,
        called with the entry held; it may raise GrantNotLocal itself."""
        self._check_ref(ref, op)
        frame, offset = entry_location(self.frames, ref)
        who = ref | party << _WHO_PARTY_SHIFT | mapper << _WHO_DOMAIN_SHIFT
        how = mask | generation << _HOW_GENERATION_SHIFT | (_HOW_WRITABLE if writable else 0)
        if page_ok is not None:
            how |= _HOW_CALLER_CHECKS_PAGE
        result = self._mem.call_with("xpv_pin", self._length, frame, offset, GRANT_ENTRY_SIZE, self._native_address,
                                     who, how)
        code = result & CODE_MASK
        if code == PIN_OK:
            return result >> CODE_BITS
        if code == PIN_PAGE_CHECK and page_ok is not None:
            return self._check_page(party, ref, mapper, who, how, frame, offset, result >> CODE_BITS, page_ok, op)
        raise self._refusal(result, party, ref, writable, mapper, op)

    def _check_page(self, party: int, ref: int, mapper: int, who: int, how: int, frame: AtomicMemory, offset: int,
                    value: int, page_ok: Callable[[int], bool], op: str) -> int:
        """The caller's page check of a pin whose entry ``xpv_pin`` left held; ``xpv_pin_finish`` counts the
        pin or undoes it."""
        gfn = value & (_FIRST_PIN - 1)
        try:
            ok = bool(page_ok(gfn))
        except BaseException:
            self._finish(party, ref, mapper, who, how, frame, offset, gfn, False, op)
            raise
        self._finish(party, ref, mapper, who, how, frame, offset, gfn, ok, op)
        if ok:
            return gfn
        if value & _FIRST_PIN:
            raise GrantRefused(GNTST_bad_page, f"{op}: dom{self.granter} ref {ref} grants gfn {gfn:#x}, "
                                               f"which is not a page of the domain")
        raise GrantNotLocal(f"{op}: dom{self.granter} ref {ref}: gfn {gfn:#x} is not RAM here")

    def _finish(self, party: int, ref: int, mapper: int, who: int, how: int, frame: AtomicMemory, offset: int,
                gfn: int, ok: bool, op: str) -> None:
        result = self._mem.call_with("xpv_pin_finish", self._length, frame, offset, GRANT_ENTRY_SIZE,
                                     self._native_address, who, how, gfn, ok)
        if result & CODE_MASK != PIN_OK:
            raise self._refusal(result, party, ref, bool(how & _HOW_WRITABLE), mapper, op)

    def unpin(self, party: int, ref: int, writable: bool, *, generation: int = 0, owner: int | None = None) -> None:
        """Drop one of ``owner``'s pins (default: ``party``'s own) on ``ref``; the last writer clears
        GTF_writing, the last pin GTF_reading."""
        self._check_ref(ref, "unpin")
        owner = party if owner is None else owner
        frame, offset = entry_location(self.frames, ref)
        result = self._mem.call_with("xpv_unpin", self._length, frame, offset, GRANT_ENTRY_SIZE, self._native_address,
                                     ref | party << _WHO_PARTY_SHIFT | owner << _WHO_DOMAIN_SHIFT,
                                     generation << _HOW_GENERATION_SHIFT | (_HOW_WRITABLE if writable else 0))
        if result:
            raise self._refusal(result, party, ref, writable, None, "unpin", owner)

    def _refusal(self, result: int, party: int, ref: int, writable: bool, mapper: int | None, op: str,
                 owner: int | None = None) -> GrantRefused:
        """The exception for a native call's refusal, worded as Xen's rule that refused it."""
        code, value = result & CODE_MASK, result >> CODE_BITS
        granter = self.granter
        if code == PIN_BUSY:
            return GrantRefused(GNTST_eagain, f"dom{granter} ref {ref}: its active entry is held by party {value} "
                                              f"for more than {LOCK_WAIT_SECONDS}s")
        if code == PIN_REVOKED:
            return GrantRefused(GNTST_general_error, f"{op}: party {party}'s access to dom{granter}'s grants was "
                                                     f"revoked (its link was detached)")
        if code == PIN_NO_SPACE:
            return GrantRefused(GNTST_no_space, f"{op}: dom{granter} ref {ref} has too many pins")
        if code == PIN_NOT_GRANTED:
            return GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} (flags {value & FLAGS_MASK:#x}, "
                                                     f"domid {value >> DOMID_SHIFT}) does not grant access to "
                                                     f"dom{mapper}")
        if code == PIN_READ_ONLY:
            return GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} is read-only, dom{mapper} "
                                                     f"asked to write")
        if code == PIN_CHANGING:
            return GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} kept changing during "
                                                     f"{CMPXCHG_ATTEMPTS} compare-and-swap attempts")
        if code == PIN_IN_USE:
            return GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref} is in use by dom{value}, "
                                                     f"not dom{mapper}")
        if code == PIN_NOT_LOCAL:
            return GrantNotLocal(f"dom{granter}: gfn {value:#x} is not guest RAM")
        if code == PIN_NO_PIN:
            return GrantRefused(GNTST_bad_handle, f"unpin: party {owner} holds no {'write' if writable else 'read'} "
                                                  f"pin on dom{granter} ref {ref}")
        if code == PIN_LOST:
            return GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref}: party {party} lost its active "
                                                     f"entry while checking the page (held by party {value} now)")
        return GrantRefused(GNTST_general_error, f"{op}: dom{granter} ref {ref}: the native pin helper returned "
                                                 f"{result:#x}")

    # ---- xenhv's repair of a party that died holding an entry --------------------------------------------

    def _clear_flags(self, ref: int, bits: int) -> None:
        mem, off = entry_location(self.frames, ref)
        mem.fetch_and(off + FLAGS, FLAGS_BYTES, ~bits)

    def _settle_flags(self, ref: int, readers: int, writers: int) -> None:
        """Make the guest's GTF_reading/GTF_writing say what the totals say (the repair's copy of the rule
        xpv_unpin applies)."""
        if readers + writers == 0:
            self._clear_flags(ref, GTF_reading | GTF_writing)
        elif writers == 0:
            self._clear_flags(ref, GTF_writing)

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
            for writable, n in ((False, value & COUNT_MASK), (True, value >> COUNT_W_SHIFT)):
                for _ in range(n):
                    self.unpin(XENHV_PARTY, ref, writable, owner=party)
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
        old = ((word >> OLD_R_SHIFT) & COUNT_MASK) | ((word >> OLD_W_SHIFT) & COUNT_MASK) << COUNT_W_SHIFT
        readers, writers = _totals(word)
        if op == OP_UNPIN and (old >> COUNT_W_SHIFT if writable else old & COUNT_MASK):
            # Roll forward: the unpin had been asked for, so the pin goes.
            if writable:
                writers, old = writers - 1, old - (1 << COUNT_W_SHIFT)
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
