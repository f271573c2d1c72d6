"""The shared pin table (xenabi.grant_pins): Xen's grant rules as a back-end party applies them itself, pins
counted together with xenhv's, and xenhv's recovery of a party that died or was detached, including one
that died in the middle of changing an entry.  The granting guest is stack.vcpu.grants.GrantTableFrontend
on the same grant frame, so its end_foreign_access sees exactly what the pins left (Xen's gnttab.c
_set_status_v1 and gnttab_end_foreign_access_ref_v1 are the references)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.grant_entries import DOMID, DOMID_BYTES, DOMID_SHIFT, GrantEntry
from xenpv.xenabi.grant_pins import (AT_SETTLE, AT_STATUS, COPY_MASK, MAP_MASK, XENHV_PARTY, GrantRefused, PinTable,
                                     create_table, native_hook)
from xenpv.xenabi.grant_table import (GNTST_bad_page, GNTST_general_error, GTF_permit_access, GTF_reading,
                                      GTF_sub_page, GTF_transitive, GTF_writing)

PAGE = 4096
GUEST, DOM0 = 5, 0
PARTY = 2  # a back-end's party
REF = 9
RAM_PAGES = 64


@dataclass
class Rig:
    table: PinTable
    guest: GrantTableFrontend
    frame: bytearray
    mapping: object
    frames: list[AtomicMemory]

    def pin(self, writable: bool, party: int = PARTY, ref: int = REF, mask: int = MAP_MASK, generation: int = 0) -> int:
        return self.table.pin(party, ref, writable, DOM0, mask=mask, page_ok=lambda gfn: gfn < RAM_PAGES, op="map",
                              generation=generation)

    def flags(self, ref: int = REF) -> int:
        return self.guest.entry(ref).flags

    def snapshot(self) -> tuple[bytes, bytes]:
        return bytes(self.mapping), bytes(self.frame)  # type: ignore[call-overload]

    def restore(self, state: tuple[bytes, bytes]) -> None:
        self.mapping[:] = state[0]  # type: ignore[index]
        self.frame[:] = state[1]


@pytest.fixture
def rig() -> Iterator[Rig]:
    fd, mapping = create_table(512, RAM_PAGES, "test-pins")
    frame = bytearray(PAGE)
    frames = [AtomicMemory(frame)]
    table = PinTable(memoryview(mapping), frames, GUEST)
    table.set_nr_entries(512)
    guest = GrantTableFrontend([memoryview(frame)])
    yield Rig(table, guest, frame, mapping, frames)
    guest.release()
    table.release()
    for f in frames:
        f.release()
    mapping.close()
    import os
    os.close(fd)


def test_a_pin_sets_the_guests_flags_and_blocks_its_revoke_until_the_last_unpin(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    assert rig.pin(writable=True) == 7
    assert rig.flags() == GTF_permit_access | GTF_reading | GTF_writing
    assert rig.pin(writable=False) == 7
    assert not rig.guest.end_foreign_access(REF), "a pinned grant cannot be revoked"
    rig.table.unpin(PARTY, REF, True)
    assert rig.flags() == GTF_permit_access | GTF_reading  # the last writer clears GTF_writing only
    rig.table.unpin(PARTY, REF, False)
    assert rig.flags() == GTF_permit_access
    assert rig.guest.end_foreign_access(REF)
    with pytest.raises(GrantRefused, match="does not grant access") as exc:
        rig.pin(writable=False)  # revoked: the page is out of reach
    assert exc.value.status == GNTST_general_error


def test_the_grant_rules_refuse_without_touching_the_entry(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7, readonly=True)
    with pytest.raises(GrantRefused, match="read-only"):
        rig.pin(writable=True)
    assert rig.flags() == GTF_permit_access | 1 << 2  # GTF_readonly, nothing set
    assert rig.pin(writable=False) == 7
    with pytest.raises(GrantRefused, match="read-only"):
        rig.pin(writable=True)  # a write pin on top of read pins is checked too
    assert rig.flags() & GTF_writing == 0
    rig.table.unpin(PARTY, REF, False)

    rig.guest.grant_access(REF + 1, 3, 7)  # granted to dom3, not to dom0
    with pytest.raises(GrantRefused, match="does not grant access to dom0"):
        rig.pin(writable=False, ref=REF + 1)
    rig.guest.grant_access(REF + 2, DOM0, RAM_PAGES + 5)  # a frame that is not RAM
    with pytest.raises(GrantRefused) as exc:
        rig.pin(writable=False, ref=REF + 2)
    assert exc.value.status == GNTST_bad_page
    assert rig.flags(REF + 2) == GTF_permit_access, "a refused pin leaves no flag behind"
    with pytest.raises(GrantRefused, match="beyond"):
        rig.pin(writable=False, ref=512)


@pytest.mark.parametrize("flags", [GTF_transitive, GTF_permit_access | GTF_sub_page, 0])
def test_transitive_sub_page_and_invalid_entries_are_refused(rig: Rig, flags: int) -> None:
    mem = rig.frames[0]
    mem.store(REF * 8 + 4, 4, 7)
    mem.store(REF * 8, 4, flags | DOM0 << DOMID_SHIFT)
    with pytest.raises(GrantRefused, match="does not grant access"):
        rig.pin(writable=False)
    if flags & GTF_sub_page:
        assert rig.pin(writable=False, mask=COPY_MASK) == 7  # a copy may use a sub-page grant


def test_a_domid_changed_during_the_swap_is_not_pinned(rig: Rig) -> None:
    """The guest rewrites the entry's domid between the pinner's check and its compare-and-swap (the
    native pin's hook runs there; the frame's own AtomicMemory is held, so the guest writes through its
    bytes)."""
    rig.guest.grant_access(REF, DOM0, 7)
    races = [1]

    def guest_regrants(point: int, ref: int) -> None:
        if point == AT_STATUS and ref == REF and races[0]:
            races[0] -= 1
            rig.frame[REF * 8 + DOMID:REF * 8 + DOMID + DOMID_BYTES] = (3).to_bytes(DOMID_BYTES, "little")  # dom3

    with native_hook(guest_regrants):
        with pytest.raises(GrantRefused, match="does not grant access to dom0"):
            rig.pin(writable=True)
    assert races == [0], "the hook ran before the swap"
    assert rig.guest.entry(REF) == GrantEntry(GTF_permit_access, 3, 7)


def test_xenhvs_and_a_backends_pins_count_together(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    rig.pin(writable=False, party=XENHV_PARTY)
    rig.pin(writable=True)
    assert rig.table.totals(REF) == (1, 1)
    rig.table.unpin(PARTY, REF, True)
    assert rig.flags() == GTF_permit_access | GTF_reading, "xenhv's pin still holds the entry"
    with pytest.raises(GrantRefused, match="holds no write pin"):
        rig.table.unpin(PARTY, REF, True)
    rig.table.unpin(XENHV_PARTY, REF, False)
    assert rig.flags() == GTF_permit_access


def test_the_frame_pinned_is_the_one_granted_at_the_first_pin(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    rig.pin(writable=False)
    rig.frames[0].store(REF * 8 + 4, 4, 8)  # the guest rewrites the frame under a pin
    assert rig.pin(writable=False) == 7
    rig.table.unpin(PARTY, REF, False)
    rig.table.unpin(PARTY, REF, False)


def test_recovery_drops_a_gone_partys_pins_and_revokes_it(rig: Rig) -> None:
    party, generation = rig.table.allocate_party(set())  # type: ignore[misc]
    rig.guest.grant_access(REF, DOM0, 7)
    rig.guest.grant_access(REF + 1, DOM0, 8)
    rig.pin(writable=True, party=party, generation=generation)
    rig.pin(writable=False, party=party, generation=generation)
    rig.pin(writable=False, party=party, ref=REF + 1, generation=generation)
    rig.pin(writable=False, party=XENHV_PARTY, ref=REF + 1)
    assert rig.table.recover_party(party) == 3
    assert rig.flags() == GTF_permit_access
    assert rig.flags(REF + 1) == GTF_permit_access | GTF_reading  # xenhv's own pin stays
    assert rig.guest.end_foreign_access(REF)
    rig.guest.grant_access(REF, DOM0, 7)
    with pytest.raises(GrantRefused, match="revoked"):
        rig.pin(writable=False, party=party, generation=generation)
    assert rig.flags() == GTF_permit_access


@pytest.mark.parametrize("writable", [False, True])
def test_a_party_that_died_in_the_middle_of_a_pin_is_undone(rig: Rig, writable: bool) -> None:
    party, generation = rig.table.allocate_party(set())  # type: ignore[misc]
    rig.guest.grant_access(REF, DOM0, 7)
    died: list[tuple[bytes, bytes]] = []

    def dies_here(gfn: int) -> bool:
        died.append(rig.snapshot())  # the entry is held, the guest's flags are set: the process dies now
        return True

    rig.table.pin(party, REF, writable, DOM0, mask=MAP_MASK, page_ok=dies_here, op="map", generation=generation)
    rig.restore(died[0])
    assert rig.flags() & GTF_reading
    assert rig.table.recover_party(party) == 0
    assert rig.flags() == GTF_permit_access and rig.table.totals(REF) == (0, 0)
    assert rig.guest.end_foreign_access(REF)


def test_a_party_that_died_in_the_middle_of_an_unpin_is_finished(rig: Rig) -> None:
    party, generation = rig.table.allocate_party(set())  # type: ignore[misc]
    rig.guest.grant_access(REF, DOM0, 7)
    rig.pin(writable=True, party=party, generation=generation)
    rig.pin(writable=False, party=XENHV_PARTY)
    died: list[tuple[bytes, bytes]] = []

    def dies_before_clearing(point: int, ref: int) -> None:
        if point == AT_SETTLE and ref == REF:
            died.append(rig.snapshot())

    with native_hook(dies_before_clearing):
        rig.table.unpin(party, REF, True, generation=generation)
    rig.restore(died[0])
    assert rig.flags() & GTF_writing
    rig.table.recover_party(party)
    assert rig.flags() == GTF_permit_access | GTF_reading, "the unpin is finished; xenhv's read pin stays"
    assert rig.table.totals(REF) == (1, 0)
    rig.table.unpin(XENHV_PARTY, REF, False)
    assert rig.guest.end_foreign_access(REF)
