"""Grant tables v1 with Xen's semantics (shared/reference/xen-abi.md section 7).

Two pieces:

* :class:`GrantTable`, one per granting domain, in xenhv.  Its frames are 4096-byte pages the guest maps too
  (``frame_source(i)`` hands out frame ``i`` when the table grows), so every change to an entry's flags is a
  real compare-and-swap on the shared page, racing the guest's own compare-and-swap from another process.
  Mapping a grant checks type, sub-page, domid and read-only, then sets GTF_reading (and GTF_writing) with a
  32-bit cmpxchg over flags+domid, retried at most 5 times against an entry that keeps changing.  Pins are
  counted per ref (readers and writers); the last writable unpin clears GTF_writing and the last unpin clears
  GTF_reading, with an atomic AND so a guest rewriting other flag bits cannot livelock it.  Those rules and
  the pin counts (Xen's active entries) are xenabi.grant_pins, in a memfd per domain shared with dom0's
  back-ends, which pin and copy grants themselves (backends.grants); xenhv is one party of that table and
  drops a back-end's pins when its link goes (:meth:`GrantTable.unshare`).  While either bit is
  set the guest's end_foreign_access (stack.vcpu.grants) reports the entry busy.
* :class:`GrantTableHub`, every domain's table plus the maptrack of each mapping domain: GNTTABOP_map/unmap
  with per-mapper handles, GNTTABOP_copy between grant refs and the caller's own frames, setup_table and
  query_size with the domain checks.  This is what the hypercall layer calls.  dom0's back-ends are separate
  processes sharing dom0's maptrack, so a mapping may name its ``owner`` (the back-end): only that owner
  unmaps it, and :meth:`GrantTableHub.release_owner` drops all of a dead back-end's mappings, as Xen drops a
  dying driver domain's.
The granting guest's side (grant, end access) is stack.vcpu.grants.GrantTableFrontend; entry access both
sides share is xenabi.grant_entries.

Failures raise :class:`~backends.xenhv.errors.GrantError` carrying the GNTST_* status for the op's ``status``
field; growing a table beyond its maximum from XENMEM_add_to_physmap raises XenError(EINVAL).
Guest frame numbers resolve through ``guest_frame(gfn)`` (the p2m): None or XenError means GNTST_bad_page.
"""
from __future__ import annotations

import heapq
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.backends.xenhv.errors import GrantError, XenError
from xenpv.xenabi.event_channel import DOMID_FIRST_RESERVED, DOMID_SELF
from xenpv.xenabi.grant_table import (
    GNTCOPY_dest_gref,
    GNTCOPY_source_gref,
    GNTST_bad_copy_arg,
    GNTST_bad_domain,
    GNTST_bad_gntref,
    GNTST_bad_handle,
    GNTST_bad_page,
    GNTST_general_error,
    GNTST_no_space,
    GNTST_permission_denied,
    GRANT_ENTRIES_V1_PER_FRAME,
    GTF_reading,
    GTF_writing,
    GnttabCopy,
)
from xenpv.xenabi.grant_entries import FLAGS, FLAGS_BYTES, GrantEntry, entry_location, atomic_frame, read_entry
from xenpv.xenabi.grant_pins import COPY_MASK, MAP_MASK, XENHV_PARTY, GrantRefused, PinTable, create_table
from xenpv.xenabi.ring import XEN_PAGE_SIZE
from xenpv.xenabi.xen import XEN_EINVAL

log = logging.getLogger("xenhv.gnttab")

DEFAULT_MAX_FRAMES = 64
DEFAULT_MAX_MAPTRACK = 1 << 16


@dataclass(frozen=True)
class GrantMapping:
    """A live mapping of ``ref`` of domain ``dom`` by ``mapper``; ``gfn`` is the granter's frame."""

    handle: int
    dom: int
    ref: int
    gfn: int
    readonly: bool
    mapper: int


class _Handles:
    """Lowest-free handle allocation, bounded."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._next = 0
        self._free: list[int] = []

    def allocate(self) -> int | None:
        if self._free:
            return heapq.heappop(self._free)
        if self._next >= self._limit:
            return None
        self._next += 1
        return self._next - 1

    def free(self, handle: int) -> None:
        heapq.heappush(self._free, handle)


class GrantTable:
    """The v1 grant table of domain ``domid`` as the hypervisor keeps it.

    ``frame_source(i)`` returns the writable shared page backing table frame ``i`` (called once per frame as
    the table grows); ``guest_frame(gfn)`` returns the page at a frame of this domain (None or XenError if
    the frame is not backed).  The table starts with ``initial_frames`` and grows up to ``max_frames``.
    """

    def __init__(self, domid: int, frame_source: Callable[[int], memoryview],
                 guest_frame: Callable[[int], memoryview | None], *, max_frames: int = DEFAULT_MAX_FRAMES,
                 initial_frames: int = 1, max_maps: int = DEFAULT_MAX_MAPTRACK, ram_pages: int = 0) -> None:
        if not 1 <= initial_frames <= max_frames:
            raise ValueError(f"initial_frames {initial_frames} is not in 1..max_frames {max_frames}")
        self.domid = domid
        self.max_frames = max_frames
        self._frame_source = frame_source
        self._guest_frame = guest_frame
        self._lock = threading.Lock()
        self._frames: list[AtomicMemory] = []
        # The active entries live in shared memory: dom0's back-ends pin this domain's grants themselves
        # (xenabi.grant_pins), and xenhv's own pins are one party among theirs.
        self.pins_fd, self._pins_map = create_table(max_frames * GRANT_ENTRIES_V1_PER_FRAME, ram_pages,
                                                    f"xenhv-dom{domid}-pins")
        self.pins = PinTable(memoryview(self._pins_map), self._frames, domid)
        self._parties: dict[str, int] = {}  # back-end link -> its party
        self._maps: dict[int, tuple[int, int, bool]] = {}  # handle -> (mapper, ref, readonly)
        self._handles = _Handles(max_maps)
        self.grow(initial_frames)

    # ---- size --------------------------------------------------------------------------------------------

    @property
    def nr_frames(self) -> int:
        return len(self._frames)

    @property
    def nr_entries(self) -> int:
        return len(self._frames) * GRANT_ENTRIES_V1_PER_FRAME

    def grow(self, nr_frames: int) -> None:
        """Make the table at least ``nr_frames`` long (XENMEM_add_to_physmap of a grant frame index grows it)."""
        with self._lock:
            if not 0 <= nr_frames <= self.max_frames:
                raise XenError(XEN_EINVAL, f"dom{self.domid}: grant table cannot have {nr_frames} frames "
                                           f"(maximum {self.max_frames})")
            while len(self._frames) < nr_frames:
                self._frames.append(atomic_frame(self._frame_source(len(self._frames))))
                self.pins.set_nr_entries(self.nr_entries)
                log.debug("dom%d: grant table grew to %d frames", self.domid, len(self._frames))

    def setup_table(self, nr_frames: int) -> None:
        """GNTTABOP_setup_table's effect on the table (the caller reports the frames' gfns)."""
        if not 0 <= nr_frames <= self.max_frames:
            raise GrantError(GNTST_general_error, f"setup_table: dom{self.domid} supports up to "
                                                  f"{self.max_frames} grant frames, not {nr_frames}")
        self.grow(nr_frames)

    def query_size(self) -> tuple[int, int]:
        """GNTTABOP_query_size: (nr_frames, max_nr_frames)."""
        return len(self._frames), self.max_frames

    # ---- mapping -----------------------------------------------------------------------------------------

    def map(self, mapper: int, ref: int, readonly: bool) -> GrantMapping:
        """Map ``ref`` for domain ``mapper``; the handle is this table's."""
        with self._lock:
            handle = self._handles.allocate()
            if handle is None:
                raise GrantError(GNTST_no_space, f"map: dom{self.domid} has no free map handle")
            try:
                gfn = self._pin(mapper, ref, readonly, MAP_MASK, "map")
            except GrantError:
                self._handles.free(handle)
                raise
            self._maps[handle] = (mapper, ref, readonly)
            log.debug("dom%d: ref %d mapped %s by dom%d (handle %d)", self.domid, ref,
                      "ro" if readonly else "rw", mapper, handle)
            return GrantMapping(handle, self.domid, ref, gfn, readonly, mapper)

    def unmap(self, handle: int, mapper: int | None = None) -> GrantMapping:
        """Unmap by handle; with ``mapper``, a handle of another mapping domain is GNTST_bad_handle too."""
        with self._lock:
            record = self._maps.get(handle)
            if record is None or (mapper is not None and record[0] != mapper):
                raise GrantError(GNTST_bad_handle, f"unmap: dom{self.domid} has no mapping with handle {handle}"
                                 + (f" for dom{mapper}" if mapper is not None else ""))
            owner, ref, readonly = record
            gfn = self.pins.pinned_gfn(ref)
            del self._maps[handle]
            self._handles.free(handle)
            self._unpin(ref, readonly)
            log.debug("dom%d: ref %d unmapped by dom%d (handle %d)", self.domid, ref, owner, handle)
            return GrantMapping(handle, self.domid, ref, gfn, readonly, owner)

    def mappings(self) -> list[GrantMapping]:
        with self._lock:
            return [GrantMapping(h, self.domid, ref, self.pins.pinned_gfn(ref), ro, owner)
                    for h, (owner, ref, ro) in sorted(self._maps.items())]

    # ---- transient pins for GNTTABOP_copy ---------------------------------------------------------------

    def acquire_for_copy(self, caller: int, ref: int, readonly: bool) -> memoryview:
        """Pin ``ref`` for one copy by ``caller`` and return the granted page; pair with release_for_copy."""
        with self._lock:
            # Copies may target sub-page grants; only maps refuse them.
            gfn = self._pin(caller, ref, readonly, COPY_MASK, "copy")
            page = self._page(gfn)
            if page is None:
                self._unpin(ref, readonly)
                raise GrantError(GNTST_bad_page, f"copy: dom{self.domid} ref {ref} grants gfn {gfn:#x}, "
                                                 f"which is not a page of the domain")
            return page

    def release_for_copy(self, ref: int, readonly: bool) -> None:
        with self._lock:
            self._unpin(ref, readonly)

    def guest_page(self, gfn: int) -> memoryview | None:
        """The page at ``gfn`` of this domain, or None."""
        return self._page(gfn)

    # ---- inspection and teardown -------------------------------------------------------------------------

    def entry(self, ref: int) -> GrantEntry:
        if not 0 <= ref < self.nr_entries:
            raise GrantError(GNTST_bad_gntref, f"dom{self.domid}: ref {ref} is beyond {self.nr_entries} entries")
        return read_entry(self._frames, ref)

    def clear_transfer_flags(self, refs: Iterable[int] | None = None) -> int:
        """Clear GTF_reading/GTF_writing on the entries `refs` (default: all) that no mapping of this table
        pins (a restored table's bits belong to the source domain's mappings); returns how many had them."""
        cleared = 0
        with self._lock:
            for ref in (range(self.nr_entries) if refs is None else refs):
                if not 0 <= ref < self.nr_entries or self.pins.pinned(ref):
                    continue
                mem, off = entry_location(self._frames, ref)
                if mem.load(off + FLAGS, FLAGS_BYTES) & (GTF_reading | GTF_writing):
                    self._clear_flags(ref, GTF_reading | GTF_writing)
                    cleared += 1
        return cleared

    # ---- back-ends pinning themselves ---------------------------------------------------------------------

    def share(self, backend: str) -> tuple[int, int]:
        """A party for back-end link ``backend`` (the same one while its link lasts): (party, generation).
        Raises GrantError(GNTST_no_space) when every party is taken; the back-end then maps through xenhv."""
        with self._lock:
            party = self._parties.get(backend)
            if party is not None:
                return party, self.pins.party_generation(party)
            got = self.pins.allocate_party(set(self._parties.values()))
            if got is None:
                raise GrantError(GNTST_no_space, f"dom{self.domid}: every pin table party is in use")
            self._parties[backend] = got[0]
            log.info("dom%d: back-end %s pins grants itself as party %d", self.domid, backend, got[0])
            return got

    def unshare(self, backend: str) -> int:
        """Back-end link ``backend`` is gone: its party is revoked and every pin it held dropped, so the guest
        can end access to those grants.  Returns how many pins were dropped."""
        with self._lock:
            party = self._parties.pop(backend, None)
            if party is None:
                return 0
            dropped = self.pins.recover_party(party)
        if dropped:
            log.info("dom%d: dropped %d pin(s) back-end %s held", self.domid, dropped, backend)
        return dropped

    def publish_overlay(self, gfns: list[int]) -> None:
        """The guest frames covered by hypervisor pages changed (XENMEM_add_to_physmap)."""
        self.pins.publish_overlay(gfns)

    def release(self) -> None:
        """Drop the atomic views of the frames; call before their mapping is closed."""
        with self._lock:
            for frame in self._frames:
                frame.release()
            self._frames.clear()
            self.pins.release()
            self._pins_map.close()
            os.close(self.pins_fd)

    # ---- internals (self._lock held) ---------------------------------------------------------------------

    def _page(self, gfn: int) -> memoryview | None:
        try:
            page = self._guest_frame(gfn)
        except XenError:
            return None
        return page if page is not None and len(page) >= XEN_PAGE_SIZE else None

    def _pin(self, mapper: int, ref: int, readonly: bool, mask: int, op: str) -> int:
        try:
            return self.pins.pin(XENHV_PARTY, ref, not readonly, mapper, mask=mask,
                                 page_ok=lambda gfn: self._page(gfn) is not None, op=op)
        except GrantRefused as exc:
            raise GrantError(exc.status, str(exc)) from None

    def _unpin(self, ref: int, readonly: bool) -> None:
        self.pins.unpin(XENHV_PARTY, ref, not readonly)

    def _clear_flags(self, ref: int, bits: int) -> None:
        mem, off = entry_location(self._frames, ref)
        mem.fetch_and(off + FLAGS, FLAGS_BYTES, ~bits)


class GrantTableHub:
    """Every domain's grant table, the maptrack of every mapping domain, and the cross-domain operations.

    ``privileged`` domains may query and set up other domains' tables.
    """

    def __init__(self, *, privileged: Iterable[int] = (0,), max_maptrack: int = DEFAULT_MAX_MAPTRACK) -> None:
        self.privileged = frozenset(privileged)
        self._max_maptrack = max_maptrack
        self._lock = threading.Lock()
        self._tables: dict[int, GrantTable] = {}
        self._maptrack: dict[int, dict[int, tuple[int, int]]] = {}  # mapper -> handle -> (dom, table handle)
        self._handles: dict[int, _Handles] = {}
        self._owners: dict[tuple[int, int], str] = {}  # (mapper, handle) -> the back-end that mapped it

    def add(self, table: GrantTable) -> None:
        with self._lock:
            if table.domid in self._tables:
                raise ValueError(f"dom{table.domid} already has a grant table")
            self._tables[table.domid] = table

    def get(self, domid: int) -> GrantTable | None:
        return self._tables.get(domid)

    def remove(self, domid: int) -> None:
        """Domain destruction: drop the maps it holds in other tables, then forget (and release) its table.

        Mappings other domains hold of its grants are dropped too: nothing can reach its memory afterwards.
        """
        with self._lock:
            mine = self._maptrack.pop(domid, {})
            self._handles.pop(domid, None)
            table = self._tables.pop(domid, None)
            for handle in mine:
                self._owners.pop((domid, handle), None)
        for dom, table_handle in mine.values():
            other = self._tables.get(dom)
            if other is not None:
                other.unmap(table_handle, domid)
        if table is not None:
            for mapping in table.mappings():
                with self._lock:
                    track = self._maptrack.get(mapping.mapper, {})
                    for handle, target in list(track.items()):
                        if target == (domid, mapping.handle):
                            del track[handle]
                            self._owners.pop((mapping.mapper, handle), None)
                            self._handles[mapping.mapper].free(handle)
                table.unmap(mapping.handle)
            table.release()

    # ---- operations ---------------------------------------------------------------------------------------

    def setup_table(self, caller: int, dom: int, nr_frames: int) -> GrantTable:
        table = self._table_for(caller, dom, "setup_table")
        table.setup_table(nr_frames)
        return table

    def query_size(self, caller: int, dom: int) -> tuple[int, int]:
        return self._table_for(caller, dom, "query_size").query_size()

    def map(self, mapper: int, dom: int, ref: int, readonly: bool, owner: str | None = None) -> GrantMapping:
        """GNTTABOP_map_grant_ref of ``ref`` of ``dom`` by ``mapper``; the handle is the mapper's.  ``owner``
        names the back-end process of ``mapper`` that holds the mapping (see :meth:`release_owner`)."""
        table = self._tables.get(dom) if dom < DOMID_FIRST_RESERVED else None
        if table is None:
            raise GrantError(GNTST_bad_domain, f"map: dom{mapper} named dom {dom}, which has no grant table")
        with self._lock:
            handles = self._handles.setdefault(mapper, _Handles(self._max_maptrack))
            handle = handles.allocate()
            if handle is None:
                raise GrantError(GNTST_no_space, f"map: dom{mapper} has {self._max_maptrack} mappings already")
        try:
            mapping = table.map(mapper, ref, readonly)
        except GrantError:
            with self._lock:
                handles.free(handle)
            raise
        with self._lock:
            self._maptrack.setdefault(mapper, {})[handle] = (dom, mapping.handle)
            if owner is not None:
                self._owners[(mapper, handle)] = owner
        return GrantMapping(handle, dom, ref, mapping.gfn, readonly, mapper)

    def unmap(self, mapper: int, handle: int, owner: str | None = None) -> GrantMapping:
        """GNTTABOP_unmap_grant_ref of ``mapper``'s ``handle``.  A handle mapped with an owner is unmapped only
        by that owner: a back-end that outlived its link cannot unmap what its successor mapped since."""
        with self._lock:
            track = self._maptrack.get(mapper, {})
            if handle not in track or self._owners.get((mapper, handle)) != owner:
                who = f" of {owner}" if owner is not None else ""
                raise GrantError(GNTST_bad_handle, f"unmap: dom{mapper} has no mapping{who} with handle {handle}")
            target = track.pop(handle)
            self._owners.pop((mapper, handle), None)
            self._handles[mapper].free(handle)
        dom, table_handle = target
        mapping = self._tables[dom].unmap(table_handle, mapper)
        return GrantMapping(handle, dom, mapping.ref, mapping.gfn, mapping.readonly, mapper)

    def release_owner(self, mapper: int, dom: int, owner: str) -> int:
        """Unmap every grant of ``dom`` that ``owner`` (a back-end of ``mapper``) holds: it died or detached, and
        nothing it mapped may stay pinned (the granting guest's revoke would fail for ever).  Returns how many."""
        with self._lock:
            track = self._maptrack.get(mapper, {})
            handles = [h for h, (d, _) in track.items() if d == dom and self._owners.get((mapper, h)) == owner]
        released = 0
        for handle in handles:
            try:
                self.unmap(mapper, handle, owner)
                released += 1
            except GrantError as exc:  # unmapped meanwhile (its table went with its domain)
                log.debug("release of dom%d handle %d of %s: %s", mapper, handle, owner, exc)
        if released:
            log.info("dom%d: released %d grant mapping(s) of dom%d held by %s", mapper, released, dom, owner)
        return released

    def copy(self, caller: int, op: GnttabCopy) -> None:
        """GNTTABOP_copy of one ``gnttab_copy``: grant refs are pinned (GTF_reading on the source,
        GTF_writing on the destination) only for the duration of the copy."""
        source_gref = bool(op.flags & GNTCOPY_source_gref)
        dest_gref = bool(op.flags & GNTCOPY_dest_gref)
        source_table = self._copy_domain(caller, op.source.domid, source_gref, "source")
        dest_table = self._copy_domain(caller, op.dest.domid, dest_gref, "dest")
        releases: list[Callable[[], None]] = []
        try:
            source = self._claim(caller, source_table, op.source, source_gref, True, releases)
            dest = self._claim(caller, dest_table, op.dest, dest_gref, False, releases)
            if op.source.offset + op.len > XEN_PAGE_SIZE or op.dest.offset + op.len > XEN_PAGE_SIZE:
                raise GrantError(GNTST_bad_copy_arg, f"copy: dom{caller} asked for {op.len} bytes at source "
                                                     f"offset {op.source.offset} / dest offset {op.dest.offset}, "
                                                     f"beyond the page")
            dest[op.dest.offset:op.dest.offset + op.len] = source[op.source.offset:op.source.offset + op.len]
        finally:
            for release in reversed(releases):
                release()

    # ---- internals ---------------------------------------------------------------------------------------

    def _table_for(self, caller: int, dom: int, op: str) -> GrantTable:
        target = caller if dom == DOMID_SELF else dom
        table = self._tables.get(target)
        if table is None:
            raise GrantError(GNTST_bad_domain, f"{op}: dom{caller} named dom {dom}, which has no grant table")
        if target != caller and caller not in self.privileged:
            raise GrantError(GNTST_permission_denied, f"{op}: dom{caller} may not use dom{target}'s table")
        return table

    def _copy_domain(self, caller: int, domid: int, is_gref: bool, which: str) -> GrantTable:
        # A frame number is only meaningful in the caller's own memory.
        if not is_gref and domid != DOMID_SELF:
            raise GrantError(GNTST_permission_denied, f"copy: dom{caller} {which} names gmfn of dom {domid}; "
                                                      f"frames are only allowed with DOMID_SELF")
        target = caller if domid == DOMID_SELF else domid
        table = self._tables.get(target)
        if table is None:
            raise GrantError(GNTST_bad_domain, f"copy: dom{caller} {which} names dom {domid}, "
                                               f"which has no grant table")
        return table

    @staticmethod
    def _claim(caller: int, table: GrantTable, ptr: object, is_gref: bool, readonly: bool,
               releases: list[Callable[[], None]]) -> memoryview:
        if is_gref:
            ref = ptr.u.ref  # type: ignore[attr-defined]
            page = table.acquire_for_copy(caller, ref, readonly)
            releases.append(lambda: table.release_for_copy(ref, readonly))
            return page
        gmfn = ptr.u.gmfn  # type: ignore[attr-defined]
        page = table.guest_page(gmfn)
        if page is None:
            raise GrantError(GNTST_bad_page, f"copy: dom{caller} frame {gmfn:#x} is not a page of the domain")
        return page
