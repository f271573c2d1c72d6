"""Grant table v1 entries in shared frames: where entry `ref` lives, and reading it as one snapshot.

Both ends use this: xenhv (the hypervisor's checks and pins) and the granting guest (stack.vcpu.grants).
The frames are pages both map, so every access goes through xenabi.atomic.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.grant_table import GRANT_ENTRIES_V1_PER_FRAME, GrantEntryV1
from xenpv.xenabi.ring import XEN_PAGE_SIZE

ENTRY_SIZE = ctypes.sizeof(GrantEntryV1)
FLAGS = GrantEntryV1.flags.offset
FLAGS_BYTES = GrantEntryV1.flags.size
DOMID = GrantEntryV1.domid.offset
DOMID_BYTES = GrantEntryV1.domid.size
FRAME = GrantEntryV1.frame.offset
FRAME_BYTES = GrantEntryV1.frame.size
# Xen updates flags and domid as one 32-bit word, so a guest changing the domid between the check and the
# update makes the compare-and-swap fail instead of handing the page to the wrong domain.
COMBO = FLAGS
COMBO_BYTES = FLAGS_BYTES + DOMID_BYTES
DOMID_SHIFT = 8 * (DOMID - FLAGS)
FLAGS_MASK = (1 << 8 * FLAGS_BYTES) - 1
if DOMID != FLAGS + FLAGS_BYTES:
    raise ImportError("grant_entry_v1: domid does not follow flags; the combined cmpxchg needs them adjacent")


@dataclass(frozen=True)
class GrantEntry:
    """A snapshot of one v1 entry."""

    flags: int
    domid: int
    frame: int


def entry_location(frames: list[AtomicMemory], ref: int) -> tuple[AtomicMemory, int]:
    index, slot = divmod(ref, GRANT_ENTRIES_V1_PER_FRAME)
    return frames[index], slot * ENTRY_SIZE


def atomic_frame(view: memoryview) -> AtomicMemory:
    if len(view) < XEN_PAGE_SIZE:
        raise ValueError(f"grant frame has {len(view)} bytes, needs {XEN_PAGE_SIZE}")
    return AtomicMemory(view)


def read_entry(frames: list[AtomicMemory], ref: int) -> GrantEntry:
    mem, off = entry_location(frames, ref)
    combo = mem.load(off + COMBO, COMBO_BYTES)
    return GrantEntry(combo & FLAGS_MASK, combo >> DOMID_SHIFT, mem.load(off + FRAME, FRAME_BYTES))
