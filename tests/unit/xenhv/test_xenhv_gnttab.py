"""Grant table v1 rules of xen-abi.md section 7, on frames shared by the table and the guest's frontend."""
from __future__ import annotations

import mmap
from collections.abc import Iterator

import pytest

from xenpv.backends.xenhv.errors import GrantError, XenError
from xenpv.backends.xenhv.gnttab import GrantTable, GrantTableHub
from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.event_channel import DOMID_SELF
from xenpv.xenabi.grant_pins import AT_STATUS, native_hook
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
    GTF_permit_access,
    GTF_readonly,
    GTF_reading,
    GTF_sub_page,
    GTF_writing,
    GnttabCopy,
)
from xenpv.xenabi.xen import XEN_EINVAL

PAGE = 4096
RAM_PAGES = 16
GUEST, BACKEND, OTHER = 1, 0, 2


class Setup:
    def __init__(self) -> None:
        self._frames_map = mmap.mmap(-1, 4 * PAGE)
        self.frames = memoryview(self._frames_map)
        self.ram = bytearray(RAM_PAGES * PAGE)
        self.table = GrantTable(GUEST, self.frame, self.page, max_frames=4)
        self.front = GrantTableFrontend([self.frame(0)])
        self.hub = GrantTableHub()
        self.hub.add(self.table)

    def frame(self, index: int) -> memoryview:
        return self.frames[index * PAGE:(index + 1) * PAGE]

    def page(self, gfn: int) -> memoryview | None:
        return memoryview(self.ram)[gfn * PAGE:(gfn + 1) * PAGE] if 0 <= gfn < RAM_PAGES else None

    def flags(self, ref: int) -> int:
        return self.front.entry(ref).flags

    def close(self) -> None:
        self.front.release()
        self.hub.remove(GUEST)
        self.frames.release()
        self._frames_map.close()


@pytest.fixture
def s() -> Iterator[Setup]:
    setup = Setup()
    yield setup
    setup.close()


def status_of(call, *args: object) -> int:
    with pytest.raises(GrantError) as info:
        call(*args)
    return info.value.status


def test_map_sets_reading_and_writing_and_unmap_clears(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    mapping = s.hub.map(BACKEND, GUEST, 8, readonly=False)
    assert (mapping.gfn, mapping.readonly, mapping.dom) == (3, False, GUEST)
    assert s.flags(8) == GTF_permit_access | GTF_reading | GTF_writing
    s.hub.unmap(BACKEND, mapping.handle)
    assert s.flags(8) == GTF_permit_access


def test_readonly_map_sets_only_reading(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3, readonly=True)
    mapping = s.hub.map(BACKEND, GUEST, 8, readonly=True)
    assert s.flags(8) == GTF_permit_access | GTF_readonly | GTF_reading
    s.hub.unmap(BACKEND, mapping.handle)
    assert s.flags(8) == GTF_permit_access | GTF_readonly


def test_writable_map_of_readonly_grant_is_refused(s: Setup) -> None:
    # Xen's _set_status_v1 fails this (and the type/domid checks) with GNTST_general_error.
    s.front.grant_access(8, BACKEND, 3, readonly=True)
    assert status_of(s.hub.map, BACKEND, GUEST, 8, False) == GNTST_general_error
    assert s.flags(8) == GTF_permit_access | GTF_readonly


def test_map_checks_type(s: Setup) -> None:
    assert status_of(s.hub.map, BACKEND, GUEST, 8, True) == GNTST_general_error  # GTF_invalid
    s.front.grant_access(8, BACKEND, 3)
    s.front.end_foreign_access(8)
    assert status_of(s.hub.map, BACKEND, GUEST, 8, True) == GNTST_general_error
    assert s.flags(8) == 0


def test_map_checks_domid(s: Setup) -> None:
    s.front.grant_access(8, OTHER, 3)
    assert status_of(s.hub.map, BACKEND, GUEST, 8, True) == GNTST_general_error
    assert s.flags(8) == GTF_permit_access


def test_map_refuses_sub_page_grant_but_copy_accepts_it(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    s.frame(0)[8 * 8:8 * 8 + 2] = (GTF_permit_access | GTF_sub_page).to_bytes(2, "little")
    assert status_of(s.hub.map, BACKEND, GUEST, 8, True) == GNTST_general_error
    backend_page = bytearray(PAGE)
    s.hub.add(GrantTable(BACKEND, lambda i: memoryview(bytearray(PAGE)), lambda gfn: memoryview(backend_page)))
    s.ram[3 * PAGE:3 * PAGE + 4] = b"abcd"
    s.hub.copy(BACKEND, copy_op(ref_src=8, dom_src=GUEST, length=4))
    assert backend_page[:4] == b"abcd"
    assert s.flags(8) == GTF_permit_access | GTF_sub_page


def test_multiple_mappers_only_last_unmap_clears(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    reader = s.hub.map(BACKEND, GUEST, 8, readonly=True)
    writer1 = s.hub.map(BACKEND, GUEST, 8, readonly=False)
    writer2 = s.hub.map(BACKEND, GUEST, 8, readonly=False)
    assert len({reader.handle, writer1.handle, writer2.handle}) == 3
    s.hub.unmap(BACKEND, writer1.handle)
    assert s.flags(8) == GTF_permit_access | GTF_reading | GTF_writing
    s.hub.unmap(BACKEND, writer2.handle)
    assert s.flags(8) == GTF_permit_access | GTF_reading
    s.hub.unmap(BACKEND, reader.handle)
    assert s.flags(8) == GTF_permit_access


def test_pinned_entry_is_refused_to_another_mapper(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    s.hub.map(BACKEND, GUEST, 8, readonly=True)
    assert status_of(s.hub.map, OTHER, GUEST, 8, True) == GNTST_general_error


def test_bad_ref_handle_domain_and_frame(s: Setup) -> None:
    assert status_of(s.hub.map, BACKEND, GUEST, GRANT_ENTRIES_V1_PER_FRAME, True) == GNTST_bad_gntref
    assert status_of(s.hub.map, BACKEND, GUEST, -1, True) == GNTST_bad_gntref
    assert status_of(s.hub.map, BACKEND, 9, 8, True) == GNTST_bad_domain
    assert status_of(s.hub.unmap, BACKEND, 0) == GNTST_bad_handle
    s.front.grant_access(8, BACKEND, RAM_PAGES + 5)
    assert status_of(s.hub.map, BACKEND, GUEST, 8, False) == GNTST_bad_page
    assert s.flags(8) == GTF_permit_access  # the pin was undone
    s.front.grant_access(9, BACKEND, 3)
    mapping = s.hub.map(BACKEND, GUEST, 9, True)
    assert status_of(s.hub.unmap, OTHER, mapping.handle) == GNTST_bad_handle
    s.hub.unmap(BACKEND, mapping.handle)
    assert status_of(s.hub.unmap, BACKEND, mapping.handle) == GNTST_bad_handle


def test_table_grows_to_max_frames(s: Setup) -> None:
    assert s.table.query_size() == (1, 4)
    s.hub.setup_table(GUEST, DOMID_SELF, 2)
    assert s.hub.query_size(GUEST, GUEST) == (2, 4)
    s.front.add_frame(s.frame(1))
    ref = GRANT_ENTRIES_V1_PER_FRAME + 1
    s.front.grant_access(ref, BACKEND, 4)
    s.hub.unmap(BACKEND, s.hub.map(BACKEND, GUEST, ref, True).handle)
    assert status_of(s.hub.setup_table, GUEST, GUEST, 5) == GNTST_general_error
    assert status_of(s.hub.query_size, OTHER, 9) == GNTST_bad_domain
    assert status_of(s.hub.query_size, OTHER, GUEST) == GNTST_permission_denied
    assert s.hub.query_size(BACKEND, GUEST) == (2, 4)  # dom0 is privileged
    with pytest.raises(XenError) as info:
        s.table.grow(5)
    assert info.value.errno == XEN_EINVAL


def test_revoke_while_mapped_is_busy_and_after_unmap_succeeds(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    mapping = s.hub.map(BACKEND, GUEST, 8, readonly=False)
    assert s.front.end_foreign_access(8) is False
    assert s.flags(8) == GTF_permit_access | GTF_reading | GTF_writing
    s.hub.unmap(BACKEND, mapping.handle)
    assert s.front.end_foreign_access(8) is True
    assert s.flags(8) == 0
    assert status_of(s.hub.map, BACKEND, GUEST, 8, True) == GNTST_general_error


def test_map_gives_up_on_an_entry_that_keeps_changing(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    flips = []
    guest = AtomicMemory(s.frame(0))  # the guest's own view: the table's is held while the native pin runs

    def guest_races(point: int, ref: int) -> None:
        # The guest toggles GTF_PWT between Xen's read and its compare-and-swap, every time.
        if point == AT_STATUS and ref == 8:
            flips.append(1)
            guest.store(8 * 8, 4, guest.load(8 * 8, 4) ^ (1 << 5))

    with native_hook(guest_races):
        assert status_of(s.hub.map, BACKEND, GUEST, 8, True) == GNTST_general_error
    guest.release()
    assert len(flips) == 5
    assert not s.flags(8) & (GTF_reading | GTF_writing)


def copy_op(*, ref_src: int | None = None, dom_src: int = DOMID_SELF, gmfn_src: int = 0,
            ref_dst: int | None = None, dom_dst: int = DOMID_SELF, gmfn_dst: int = 0,
            src_off: int = 0, dst_off: int = 0, length: int = 0) -> GnttabCopy:
    op = GnttabCopy()
    op.flags = (GNTCOPY_source_gref if ref_src is not None else 0) | (GNTCOPY_dest_gref if ref_dst is not None else 0)
    if ref_src is not None:
        op.source.u.ref = ref_src
    else:
        op.source.u.gmfn = gmfn_src
    if ref_dst is not None:
        op.dest.u.ref = ref_dst
    else:
        op.dest.u.gmfn = gmfn_dst
    op.source.domid, op.dest.domid = dom_src, dom_dst
    op.source.offset, op.dest.offset, op.len = src_off, dst_off, length
    return op


def test_copy_between_grant_and_own_frame(s: Setup) -> None:
    backend_ram = bytearray(4 * PAGE)
    s.hub.add(GrantTable(BACKEND, lambda i: memoryview(bytearray(PAGE)),
                         lambda gfn: memoryview(backend_ram)[gfn * PAGE:(gfn + 1) * PAGE] if 0 <= gfn < 4 else None))
    s.ram[3 * PAGE + 100:3 * PAGE + 105] = b"hello"
    s.front.grant_access(8, BACKEND, 3, readonly=True)
    s.hub.copy(BACKEND, copy_op(ref_src=8, dom_src=GUEST, gmfn_dst=2, src_off=100, dst_off=7, length=5))
    assert backend_ram[2 * PAGE + 7:2 * PAGE + 12] == b"hello"
    assert s.flags(8) == GTF_permit_access | GTF_readonly  # the transient pin is gone
    # Writing needs a writable grant.
    assert status_of(s.hub.copy, BACKEND, copy_op(gmfn_src=2, ref_dst=8, dom_dst=GUEST, length=5)) == \
        GNTST_general_error
    s.front.grant_access(9, BACKEND, 4)
    s.hub.copy(BACKEND, copy_op(gmfn_src=2, src_off=7, ref_dst=9, dom_dst=GUEST, dst_off=4090, length=5))
    assert s.ram[4 * PAGE + 4090:4 * PAGE + 4095] == b"hello"
    assert s.flags(9) == GTF_permit_access
    # Copy is refused beyond the page, for a frame of another domain, and for unbacked frames.
    assert status_of(s.hub.copy, BACKEND, copy_op(gmfn_src=2, ref_dst=9, dom_dst=GUEST, dst_off=4090,
                                                  length=7)) == GNTST_bad_copy_arg
    assert s.flags(9) == GTF_permit_access
    assert status_of(s.hub.copy, BACKEND, copy_op(gmfn_src=2, dom_src=GUEST, ref_dst=9, dom_dst=GUEST,
                                                  length=1)) == GNTST_permission_denied
    assert status_of(s.hub.copy, BACKEND, copy_op(gmfn_src=99, ref_dst=9, dom_dst=GUEST,
                                                  length=1)) == GNTST_bad_page
    assert status_of(s.hub.copy, BACKEND, copy_op(ref_src=8, dom_src=7, length=1)) == GNTST_bad_domain
    assert status_of(s.hub.copy, BACKEND, copy_op(ref_src=5000, dom_src=GUEST, length=1)) == GNTST_bad_gntref
    assert s.flags(9) == GTF_permit_access and s.flags(8) == GTF_permit_access | GTF_readonly


def test_copy_pin_coexists_with_a_mapping(s: Setup) -> None:
    s.hub.add(GrantTable(BACKEND, lambda i: memoryview(bytearray(PAGE)), lambda gfn: memoryview(bytearray(PAGE))))
    s.front.grant_access(8, BACKEND, 3)
    mapping = s.hub.map(BACKEND, GUEST, 8, readonly=True)
    s.hub.copy(BACKEND, copy_op(gmfn_src=0, ref_dst=8, dom_dst=GUEST, length=1))
    assert s.flags(8) == GTF_permit_access | GTF_reading  # writing dropped with the copy, reading kept
    s.hub.unmap(BACKEND, mapping.handle)
    assert s.flags(8) == GTF_permit_access


def test_removing_a_domain_drops_its_mappings(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    s.hub.map(BACKEND, GUEST, 8, readonly=False)
    s.hub.add(GrantTable(BACKEND, lambda i: memoryview(bytearray(PAGE)), lambda gfn: None))
    s.hub.remove(BACKEND)
    assert s.flags(8) == GTF_permit_access
    assert s.front.end_foreign_access(8)


def test_frontend_rejects_values_that_do_not_fit(s: Setup) -> None:
    with pytest.raises(IndexError):
        s.front.grant_access(GRANT_ENTRIES_V1_PER_FRAME, BACKEND, 1)
    with pytest.raises(ValueError):
        s.front.grant_access(8, BACKEND, 1 << 32)
    with pytest.raises(ValueError):
        s.front.grant_access(8, 1 << 16, 1)


def test_releasing_a_backend_unmaps_only_its_own_mappings_of_that_domain(s: Setup) -> None:
    for ref in (8, 9, 10):
        s.front.grant_access(ref, BACKEND, ref)
    dead = [s.hub.map(BACKEND, GUEST, 8, False, owner="blkback"), s.hub.map(BACKEND, GUEST, 9, True, owner="blkback")]
    other = s.hub.map(BACKEND, GUEST, 10, False, owner="netback")
    untagged = s.hub.map(BACKEND, GUEST, 10, True)
    assert not s.front.end_foreign_access(8)  # the dead back-end's mapping keeps the guest from revoking
    assert s.hub.release_owner(BACKEND, GUEST, "blkback") == 2
    assert s.flags(8) == s.flags(9) == GTF_permit_access
    assert s.front.end_foreign_access(8) and s.front.end_foreign_access(9)
    assert s.flags(10) == GTF_permit_access | GTF_reading | GTF_writing
    assert s.hub.release_owner(BACKEND, GUEST, "blkback") == 0
    for mapping in dead:  # gone with their owner: nobody can unmap them again
        assert status_of(s.hub.unmap, BACKEND, mapping.handle, "blkback") == GNTST_bad_handle
    s.hub.unmap(BACKEND, other.handle, "netback")
    s.hub.unmap(BACKEND, untagged.handle)


def test_a_handle_is_unmapped_only_by_the_backend_that_mapped_it(s: Setup) -> None:
    s.front.grant_access(8, BACKEND, 3)
    mapping = s.hub.map(BACKEND, GUEST, 8, False, owner="blkback")
    # A predecessor that outlived its link, or the toolstack, cannot unmap what blkback holds now.
    assert status_of(s.hub.unmap, BACKEND, mapping.handle, "netback") == GNTST_bad_handle
    assert status_of(s.hub.unmap, BACKEND, mapping.handle) == GNTST_bad_handle
    assert s.flags(8) & GTF_writing
    s.hub.unmap(BACKEND, mapping.handle, "blkback")
    assert s.flags(8) == GTF_permit_access


def test_a_table_made_without_a_limit_has_xens_default_of_64_frames() -> None:
    """xen/common/grant_table.c opt_max_grant_frames = 64 (the gnttab_max_frames boot parameter's default):
    a GrantTable given no max_frames grows to 64 frames and refuses the 65th, as GNTTABOP_setup_table
    (GNTST_general_error) and as the XENMEM_add_to_physmap growth path (EINVAL)."""
    frames_map = mmap.mmap(-1, 65 * PAGE)
    frames = memoryview(frames_map)
    hub = GrantTableHub()
    hub.add(GrantTable(GUEST, lambda i: frames[i * PAGE:(i + 1) * PAGE], lambda gfn: None))
    try:
        assert hub.query_size(GUEST, GUEST) == (1, 64)
        assert status_of(hub.setup_table, GUEST, GUEST, 65) == GNTST_general_error
        table = hub.setup_table(GUEST, GUEST, 64)
        assert hub.query_size(GUEST, GUEST) == (64, 64)
        with pytest.raises(XenError) as info:
            table.grow(65)
        assert info.value.errno == XEN_EINVAL
    finally:
        hub.remove(GUEST)
        frames.release()
        frames_map.close()


def test_a_mapper_holds_at_most_65536_mappings(s: Setup) -> None:
    """Xen refuses a map when the mapper is out of maptrack handles (xen/common/grant_table.c map_grant_ref:
    get_maptrack_handle fails -> GNTST_no_space; opt_max_maptrack_frames bounds them). xenhv bounds each
    mapper at DEFAULT_MAX_MAPTRACK = 65536 handles, so a back-end that leaks mappings is refused instead of
    growing xenhv's state without end; an unmap frees a handle for the next map. 65536 maps of one table:
    at most 255 read-only and 255 writable pins per ref and party (xenabi.grant_pins), so 129 refs."""
    refs = range(8, 8 + 129)
    for ref in refs:
        s.front.grant_access(ref, BACKEND, 3)
    handles: list[int] = []
    try:
        for ref in refs:
            for readonly in (True, False):
                for _ in range(min(255, 65536 - len(handles))):
                    handles.append(s.hub.map(BACKEND, GUEST, ref, readonly=readonly).handle)
        assert len(handles) == 65536
        # The last ref has 255 read-only pins and one writable: room for more pins, but no handle.
        assert status_of(s.hub.map, BACKEND, GUEST, refs[-1], False) == GNTST_no_space
        freed = handles.pop(1000)
        s.hub.unmap(BACKEND, freed)
        handles.append(s.hub.map(BACKEND, GUEST, refs[-1], readonly=False).handle)
        assert handles[-1] == freed  # the one free handle
        assert status_of(s.hub.map, BACKEND, GUEST, refs[-1], False) == GNTST_no_space
    finally:
        # Unmapped here, one by one: GrantTableHub.remove drops a table's mappings in time quadratic in
        # their number (it scans the mapper's whole maptrack for each), minutes for 65536.
        for handle in handles:
            s.hub.unmap(BACKEND, handle)


def test_map_handles_count_from_0_and_the_lowest_free_is_reused(s: Setup) -> None:
    """A grant handle indexes the mapper's maptrack (xen/common/grant_table.c maptrack_entry(t, handle), handles
    0 .. maptrack_limit - 1): the first map is handle 0, and an unmapped handle is handed out again before the
    table reaches for a new one."""
    s.front.grant_access(8, BACKEND, 3)
    assert [s.hub.map(BACKEND, GUEST, 8, readonly=True).handle for _ in range(4)] == [0, 1, 2, 3]
    s.hub.unmap(BACKEND, 1)
    s.hub.unmap(BACKEND, 2)
    assert [s.hub.map(BACKEND, GUEST, 8, readonly=True).handle for _ in range(3)] == [1, 2, 4]
    for handle in range(5):
        s.hub.unmap(BACKEND, handle)


def test_a_table_may_start_at_its_maximum_and_set_up_zero_frames() -> None:
    """xen/common/grant_table.c: a domain may be created with max_grant_frames = 1, the frame it starts with
    (INITIAL_NR_GRANT_FRAMES), and gnttab_setup_table with nr_frames = 0 is GNTST_okay and changes nothing (it
    only refuses nr_frames > max_grant_frames)."""
    frames_map = mmap.mmap(-1, 2 * PAGE)
    frames = memoryview(frames_map)
    hub = GrantTableHub()
    hub.add(GrantTable(GUEST, lambda i: frames[i * PAGE:(i + 1) * PAGE], lambda gfn: None, max_frames=1))
    try:
        assert hub.query_size(GUEST, GUEST) == (1, 1)
        hub.setup_table(GUEST, GUEST, 0)
        hub.setup_table(GUEST, DOMID_SELF, 1)
        assert hub.query_size(GUEST, GUEST) == (1, 1)
        assert status_of(hub.setup_table, GUEST, GUEST, 2) == GNTST_general_error
    finally:
        hub.remove(GUEST)
        frames.release()
        frames_map.close()


def test_a_table_not_told_the_ram_size_lets_no_back_end_map_frames_itself(s: Setup) -> None:
    """The pin table tells back-ends how many of the guest's frames are RAM they may map from the guest's memory
    file themselves (backends/grants.py: any gfn at or past ram_pages goes through xenhv). A GrantTable made
    without ram_pages must say 0, so nothing is mapped directly on a guess."""
    assert s.table.pins.ram_pages == 0


def test_each_back_end_link_shares_its_own_party_until_it_is_gone(s: Setup) -> None:
    """Back-ends pin grants themselves in the shared pin table (xenabi.grant_pins), each link as a party of its
    own: the same link gets the same party and generation again, another link another party, and a link that
    is gone gives its party back (revoked: generation 0) for the next link, as unshare() drops its pins."""
    blk = s.table.share("blkback-1")
    assert s.table.share("blkback-1") == blk
    net = s.table.share("netback-1")
    assert net[0] != blk[0] and net[1] != 0 and blk[1] != 0
    assert s.table.unshare("blkback-1") == 0    # it held no pins
    assert s.table.pins.party_generation(blk[0]) == 0
    assert s.table.unshare("blkback-1") == 0    # already gone
    again = s.table.share("blkback-2")
    assert again[0] == blk[0] and again[1] != 0
    s.table.unshare("blkback-2")
    s.table.unshare("netback-1")


def test_a_table_unmaps_only_a_handle_it_has_for_the_domain_that_mapped_it(s: Setup) -> None:
    """xen/common/grant_table.c unmap_common: a handle the table does not have, or one another domain mapped,
    is GNTST_bad_handle and unpins nothing (GrantTable.unmap is what GrantTableHub.remove calls per handle)."""
    s.front.grant_access(8, BACKEND, 3)
    mapping = s.table.map(BACKEND, 8, readonly=False)
    assert status_of(s.table.unmap, mapping.handle + 1) == GNTST_bad_handle
    assert status_of(s.table.unmap, mapping.handle, OTHER) == GNTST_bad_handle
    assert s.flags(8) & (GTF_reading | GTF_writing) == GTF_reading | GTF_writing   # still mapped
    assert s.table.unmap(mapping.handle, BACKEND).ref == 8
    assert s.flags(8) == GTF_permit_access


def test_ref_0_is_an_entry_like_any_other(s: Setup) -> None:
    """Refs 0..7 are reserved for the toolstack (GNTTAB_NR_RESERVED_ENTRIES; grant_table.h GNTTAB_RESERVED_CONSOLE
    is ref 0) but are real entries: the console ring's grant is read at ref 0; the last ref of the table is the
    last entry, one past it is GNTST_bad_gntref."""
    s.front.grant_access(0, BACKEND, 5, readonly=True)
    assert (s.table.entry(0).frame, s.table.entry(0).domid) == (5, BACKEND)
    last = s.table.nr_entries - 1
    assert s.table.entry(last).flags == 0
    assert status_of(s.table.entry, last + 1) == GNTST_bad_gntref
    assert status_of(s.table.entry, -1) == GNTST_bad_gntref


def test_restore_clears_stale_transfer_flags_only_on_unpinned_entries_in_the_table(s: Setup) -> None:
    """A restored table's GTF_reading/GTF_writing bits described the source host's mappings, which died with it
    (hypervisor.control_restore): a stale bit would make the guest's end of access fail for ever (Linux
    grant-table.c gnttab_end_foreign_access_ref_v1 refuses while either is set). clear_transfer_flags clears
    them on each named ref that no mapping here pins, skips refs outside the table, and counts what it cleared;
    with no refs it does every entry."""
    def set_busy(ref: int) -> None:
        flags = int.from_bytes(s.frames[ref * 8:ref * 8 + 2], "little") | GTF_reading | GTF_writing
        s.frames[ref * 8:ref * 8 + 2] = flags.to_bytes(2, "little")

    for ref in (0, 9, 10, 11, 12):
        s.front.grant_access(ref, BACKEND, 3)
    mapping = s.hub.map(BACKEND, GUEST, 11, readonly=False)      # pinned here: its bits are live
    set_busy(0)
    set_busy(9)
    # Refs to skip come first: skipping one must not end the walk.
    assert s.table.clear_transfer_flags([s.table.nr_entries, -1, 11, 0, 10, 9]) == 2
    assert [s.flags(ref) for ref in (0, 9, 10)] == [GTF_permit_access] * 3
    assert s.flags(11) == GTF_permit_access | GTF_reading | GTF_writing
    set_busy(12)                                                  # past the pinned ref 11
    assert s.table.clear_transfer_flags() == 1
    assert s.flags(12) == GTF_permit_access and s.flags(11) & GTF_writing
    s.hub.unmap(BACKEND, mapping.handle)


class _OtherDomain:
    """A second granting domain (OTHER) with a one-frame table in the hub of `s`."""

    def __init__(self, s: Setup) -> None:
        self._map = mmap.mmap(-1, PAGE)
        self.frame = memoryview(self._map)
        self.ram = bytearray(RAM_PAGES * PAGE)
        s.hub.add(GrantTable(OTHER, lambda i: self.frame, lambda gfn: memoryview(self.ram)[gfn * PAGE:(gfn + 1) * PAGE]
                             if 0 <= gfn < RAM_PAGES else None, max_frames=1))
        self.front = GrantTableFrontend([self.frame])

    def close(self) -> None:
        self.front.release()
        self.frame.release()
        self._map.close()


def test_removing_a_domain_drops_only_the_mappings_of_its_grants(s: Setup) -> None:
    """Domain destruction (xen/common/grant_table.c gnttab_release_mappings, and here GrantTableHub.remove):
    every mapping other domains hold of the dead domain's grants goes, with its handle; mappings of other
    domains' grants by the same mapper stay."""
    other = _OtherDomain(s)
    try:
        s.front.grant_access(8, BACKEND, 3)
        other.front.grant_access(8, BACKEND, 4)
        mine = s.hub.map(BACKEND, GUEST, 8, readonly=False)
        theirs = s.hub.map(BACKEND, OTHER, 8, readonly=False)
        s.hub.remove(OTHER)
        assert status_of(s.hub.unmap, BACKEND, theirs.handle) == GNTST_bad_handle
        assert s.hub.map(BACKEND, GUEST, 8, readonly=True).handle == theirs.handle   # free again
        s.hub.unmap(BACKEND, theirs.handle)
        assert s.hub.unmap(BACKEND, mine.handle).ref == 8
    finally:
        other.close()


def test_releasing_a_back_end_unmaps_its_grants_of_that_domain_only(s: Setup) -> None:
    """GrantTableHub.release_owner (a back-end died or detached from one domain): exactly the mappings that
    back-end holds of that domain's grants are unmapped; the same back-end's mappings of another domain and
    another back-end's mappings of that domain stay."""
    other = _OtherDomain(s)
    try:
        s.front.grant_access(8, BACKEND, 3)
        s.front.grant_access(9, BACKEND, 4)
        other.front.grant_access(8, BACKEND, 5)
        blk = s.hub.map(BACKEND, GUEST, 8, readonly=False, owner="blk")
        net = s.hub.map(BACKEND, GUEST, 9, readonly=False, owner="net")
        blk_other = s.hub.map(BACKEND, OTHER, 8, readonly=False, owner="blk")
        assert s.hub.release_owner(BACKEND, GUEST, "blk") == 1
        assert status_of(s.hub.unmap, BACKEND, blk.handle, "blk") == GNTST_bad_handle
        assert s.flags(8) == GTF_permit_access
        s.hub.unmap(BACKEND, net.handle, "net")
        s.hub.unmap(BACKEND, blk_other.handle, "blk")
    finally:
        s.hub.remove(OTHER)
        other.close()
