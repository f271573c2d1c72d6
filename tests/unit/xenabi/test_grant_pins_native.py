"""The native pin and unpin (xenabi/_atomic_ops.c's xpv_pin/xpv_unpin behind xenabi.grant_pins.PinTable): every
code the helper returns becomes the exception and message PinTable raised before, the table's own page check
(guest RAM no hypervisor page covers) runs natively, several processes pinning the same entries keep the
totals and the guest's flags consistent, and a party that dies at any point of a pin or unpin leaves a word
xenhv's recovery (still Python, reading the same layout) finishes or undoes.  The guest is
stack.vcpu.grants.GrantTableFrontend on the same grant frame; the frame and the table are memfds, so other
processes share them."""
from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.xenabi.atomic import AtomicMemory, AtomicMemoryReleasedError, helper
from xenpv.xenabi.grant_entries import COMBO, COMBO_BYTES
from xenpv.xenabi.grant_pins import (AT_COUNTED, AT_HELD, AT_SETTLE, AT_STATUS, CMPXCHG_ATTEMPTS, ENTRIES_OFFSET,
                                     ENTRY_SIZE, HOLDER_MASK, MAP_MASK, MAX_PARTY_PINS, OP_PIN, OP_UNPIN, TOTAL_MASK,
                                     TOTAL_R_SHIFT, XENHV_PARTY, GrantNotLocal, GrantRefused, PinTable, PinTableHeader,
                                     _NativeLayout, create_table, native_hook)
from xenpv.xenabi.grant_table import (GNTST_bad_handle, GNTST_bad_page, GNTST_eagain, GNTST_general_error,
                                      GNTST_no_space, GTF_PWT, GTF_permit_access, GTF_reading, GTF_writing)

PAGE = 4096
GUEST, DOM0 = 5, 0
REF = 9
RAM_PAGES = 64
ENTRIES = 1024  # two grant frames


@dataclass
class Rig:
    table: PinTable
    guest: GrantTableFrontend
    pins_fd: int
    pins: mmap.mmap
    frames_fd: int
    frames_map: mmap.mmap
    party: int
    generation: int

    def pin(self, writable: bool, ref: int = REF, party: int | None = None, mapper: int = DOM0, **kw: object) -> int:
        party = self.party if party is None else party
        generation = self.generation if party == self.party else 0
        return self.table.pin(party, ref, writable, mapper, mask=MAP_MASK, op="map",  # type: ignore[arg-type]
                              generation=generation, **kw)

    def unpin(self, writable: bool, ref: int = REF, party: int | None = None) -> None:
        party = self.party if party is None else party
        self.table.unpin(party, ref, writable, generation=self.generation if party == self.party else 0)

    def flags(self, ref: int = REF) -> int:
        return self.guest.entry(ref).flags

    def word(self, ref: int = REF) -> int:
        return struct.unpack_from("<Q", self.pins, ENTRIES_OFFSET + ref * ENTRY_SIZE)[0]


@pytest.fixture
def rig() -> Iterator[Rig]:
    pins_fd, pins = create_table(ENTRIES, RAM_PAGES, "test-native-pins")
    frames_fd = os.memfd_create("test-native-frames", os.MFD_CLOEXEC)
    os.ftruncate(frames_fd, 2 * PAGE)
    frames_map = mmap.mmap(frames_fd, 2 * PAGE, mmap.MAP_SHARED)
    frames = [AtomicMemory(memoryview(frames_map)[i * PAGE:(i + 1) * PAGE]) for i in range(2)]
    table = PinTable(memoryview(pins), frames, GUEST)
    table.set_nr_entries(ENTRIES)
    party, generation = table.allocate_party(set())  # type: ignore[misc]
    guest = GrantTableFrontend([memoryview(frames_map)[i * PAGE:(i + 1) * PAGE] for i in range(2)])
    yield Rig(table, guest, pins_fd, pins, frames_fd, frames_map, party, generation)
    guest.release()
    table.release()
    for frame in frames:
        frame.release()
    pins.close()
    frames_map.close()
    os.close(pins_fd)
    os.close(frames_fd)


def test_the_helpers_layout_is_the_one_grant_pins_fills() -> None:
    assert helper().xpv_pins_size() == len(bytes(_NativeLayout()))


def test_call_with_checks_both_buffers_before_the_helper_runs(rig: Rig) -> None:
    table, frame = AtomicMemory(bytearray(64)), AtomicMemory(bytearray(16))
    with pytest.raises(ValueError, match="two different buffers"):
        table.call_with("xpv_pin", 64, table, 0, 8)
    with pytest.raises(ValueError, match="unaligned or outside"):
        table.call_with("xpv_pin", 64, frame, 12, 8)
    with pytest.raises(ValueError, match="xpv_pin on 128 bytes of a 64-byte buffer"):
        table.call_with("xpv_pin", 128, frame, 0, 8)
    frame.release()
    with pytest.raises(AtomicMemoryReleasedError):
        table.call_with("xpv_pin", 64, frame, 0, 8)
    table.release()
    with pytest.raises(AtomicMemoryReleasedError):
        table.call_with("xpv_pin", 64, AtomicMemory(bytearray(8)), 0, 8)
    rig.guest.grant_access(REF, DOM0, 7)
    rig.table.release()
    with pytest.raises(AtomicMemoryReleasedError):
        rig.pin(False)


# ---- each refusal, as PinTable words it -------------------------------------------------------------------

def test_a_pin_that_is_fine_returns_the_frame_from_either_grant_frame(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    rig.guest.grant_access(600, DOM0, 8)  # in the second frame
    assert rig.pin(True) == 7 and rig.pin(False, ref=600) == 8
    assert rig.flags() == GTF_permit_access | GTF_reading | GTF_writing
    assert rig.flags(600) == GTF_permit_access | GTF_reading
    assert rig.table.pinned_gfn(600) == 8 and rig.table.party_counts(rig.party, 600).readers == 1
    rig.unpin(True)
    rig.unpin(False, ref=600)
    assert rig.flags() == rig.flags(600) == GTF_permit_access
    assert rig.table.totals(REF) == rig.table.totals(600) == (0, 0)


def test_an_entry_held_past_the_deadline_is_eagain(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    word_offset = ENTRIES_OFFSET + REF * ENTRY_SIZE
    struct.pack_into("<Q", rig.pins, word_offset, 3 | OP_PIN)  # party 3 holds it and never lets go
    with pytest.raises(GrantRefused, match=r"dom5 ref 9: its active entry is held by party 3 for more than "
                                           r"0.5s") as exc:
        rig.pin(False)
    assert exc.value.status == GNTST_eagain
    with pytest.raises(GrantRefused, match="held by party 3") as exc:
        rig.unpin(False)
    assert exc.value.status == GNTST_eagain
    assert rig.word() == 3 | OP_PIN and rig.flags() == GTF_permit_access, "nothing changed"


def test_a_revoked_party_is_refused_and_leaves_the_entry_as_it_was(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    rig.pin(True)
    rig.table.set_party_generation(rig.party, rig.generation ^ 2)
    for call in (lambda: rig.pin(False), lambda: rig.unpin(True)):
        with pytest.raises(GrantRefused, match=rf"party {rig.party}'s access to dom5's grants was revoked") as exc:
            call()
        assert exc.value.status == GNTST_general_error
    assert rig.word() & HOLDER_MASK == 0 and rig.table.totals(REF) == (0, 1)
    assert rig.flags() == GTF_permit_access | GTF_reading | GTF_writing
    assert rig.table.recover_party(rig.party) == 1
    assert rig.flags() == GTF_permit_access


def test_too_many_pins_of_one_party_or_in_total_are_no_space(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    for _ in range(MAX_PARTY_PINS):
        rig.pin(False)
    with pytest.raises(GrantRefused, match="dom5 ref 9 has too many pins") as exc:
        rig.pin(False)
    assert exc.value.status == GNTST_no_space
    assert rig.pin(True) == 7, "the party's write count is its own"
    assert rig.table.totals(REF) == (MAX_PARTY_PINS, 1)
    assert rig.table.recover_party(rig.party) == MAX_PARTY_PINS + 1
    # The totals field is full: nobody may pin, whatever its own count.
    rig.guest.grant_access(REF + 1, DOM0, 8)
    struct.pack_into("<Q", rig.pins, ENTRIES_OFFSET + (REF + 1) * ENTRY_SIZE, TOTAL_MASK << TOTAL_R_SHIFT)
    with pytest.raises(GrantRefused, match="has too many pins") as exc:
        rig.pin(False, ref=REF + 1, party=XENHV_PARTY)
    assert exc.value.status == GNTST_no_space


def test_a_grant_to_another_domain_and_a_read_only_grant_are_refused_as_xen_does(rig: Rig) -> None:
    rig.guest.grant_access(REF, 3, 7)
    with pytest.raises(GrantRefused, match=r"map: dom5 ref 9 \(flags 0x1, domid 3\) does not grant access to dom0"):
        rig.pin(False)
    rig.guest.grant_access(REF + 1, DOM0, 8, readonly=True)
    with pytest.raises(GrantRefused, match="map: dom5 ref 10 is read-only, dom0 asked to write") as exc:
        rig.pin(True, ref=REF + 1)
    assert exc.value.status == GNTST_general_error
    assert rig.flags(REF) == GTF_permit_access and rig.flags(REF + 1) & (GTF_reading | GTF_writing) == 0


def test_a_pin_gives_up_on_an_entry_the_guest_keeps_changing(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    guest = AtomicMemory(memoryview(rig.frames_map)[:PAGE])  # the table's own view is held during the pin
    flips: list[int] = []

    def guest_toggles_pwt(point: int, ref: int) -> None:
        if point == AT_STATUS and ref == REF:
            flips.append(ref)
            guest.store(REF * 8 + COMBO, COMBO_BYTES, guest.load(REF * 8 + COMBO, COMBO_BYTES) ^ GTF_PWT)

    try:
        with native_hook(guest_toggles_pwt):
            with pytest.raises(GrantRefused, match=f"dom5 ref 9 kept changing during {CMPXCHG_ATTEMPTS} "
                                                   f"compare-and-swap attempts") as exc:
                rig.pin(True)
    finally:
        guest.release()
    assert exc.value.status == GNTST_general_error and len(flips) == CMPXCHG_ATTEMPTS
    assert rig.flags() & (GTF_reading | GTF_writing) == 0 and rig.table.totals(REF) == (0, 0)


def test_an_entry_pinned_by_another_domain_is_in_use(rig: Rig) -> None:
    rig.guest.grant_access(REF, 3, 7)
    rig.pin(False, party=XENHV_PARTY, mapper=3, page_ok=lambda gfn: True)  # xenhv maps it for dom3
    with pytest.raises(GrantRefused, match="map: dom5 ref 9 is in use by dom3, not dom0") as exc:
        rig.pin(False)
    assert exc.value.status == GNTST_general_error
    rig.unpin(False, party=XENHV_PARTY)
    assert rig.flags() == GTF_permit_access


def test_the_tables_own_page_check_is_guest_ram_not_covered_by_a_hypervisor_page(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, RAM_PAGES)  # just past RAM
    with pytest.raises(GrantNotLocal, match=f"dom5: gfn {RAM_PAGES:#x} is not guest RAM") as exc:
        rig.pin(True)
    assert exc.value.status == GNTST_bad_page
    assert rig.flags() == GTF_permit_access, "the flags the pin set are cleared again"
    rig.guest.grant_access(REF, DOM0, 7)
    rig.table.publish_overlay([0x30, 7])
    with pytest.raises(GrantNotLocal, match="gfn 0x7 is not guest RAM"):
        rig.pin(False)
    assert rig.flags() == GTF_permit_access
    rig.table.publish_overlay([0x30])
    assert rig.pin(False) == 7
    # A frame xenhv pinned for its own reasons: the back-end's write pin sets and clears only GTF_writing.
    rig.guest.grant_access(REF + 1, DOM0, RAM_PAGES + 3)
    rig.pin(False, ref=REF + 1, party=XENHV_PARTY, page_ok=lambda gfn: True)
    with pytest.raises(GrantNotLocal):
        rig.pin(True, ref=REF + 1)
    assert rig.flags(REF + 1) == GTF_permit_access | GTF_reading and rig.table.totals(REF + 1) == (1, 0)


def test_an_overlay_list_xenhv_keeps_rewriting_is_left_to_xenhv(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    seq = PinTableHeader.overlay_seq.offset
    struct.pack_into("<I", rig.pins, seq, struct.unpack_from("<I", rig.pins, seq)[0] | 1)  # a rewrite never ends
    with pytest.raises(GrantNotLocal):
        rig.pin(False)
    struct.pack_into("<I", rig.pins, seq, struct.unpack_from("<I", rig.pins, seq)[0] + 1)
    assert rig.pin(False) == 7


def test_a_callers_page_check_runs_with_the_entry_held(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    seen: list[tuple[int, int, int]] = []

    def page_ok(gfn: int) -> bool:
        seen.append((gfn, rig.word() & HOLDER_MASK, rig.flags()))
        return gfn != 7

    with pytest.raises(GrantRefused, match="map: dom5 ref 9 grants gfn 0x7, which is not a page of the domain") as exc:
        rig.pin(True, party=XENHV_PARTY, page_ok=page_ok)
    assert exc.value.status == GNTST_bad_page and not isinstance(exc.value, GrantNotLocal)
    assert seen == [(7, XENHV_PARTY, GTF_permit_access | GTF_reading | GTF_writing)]
    assert rig.flags() == GTF_permit_access and rig.word() == 0
    rig.pin(False, party=XENHV_PARTY, page_ok=lambda gfn: True)
    with pytest.raises(GrantNotLocal, match="map: dom5 ref 9: gfn 0x7 is not RAM here"):
        rig.pin(True, party=XENHV_PARTY, page_ok=page_ok)
    assert rig.flags() == GTF_permit_access | GTF_reading, "the write pin's GTF_writing is undone"

    def page_check_fails(gfn: int) -> bool:
        raise KeyError(gfn)

    with pytest.raises(KeyError):
        rig.pin(True, party=XENHV_PARTY, page_ok=page_check_fails)
    assert rig.flags() == GTF_permit_access | GTF_reading and rig.table.totals(REF) == (1, 0)
    assert rig.word() & HOLDER_MASK == 0


def test_an_unpin_of_a_pin_not_held_is_bad_handle(rig: Rig) -> None:
    rig.guest.grant_access(REF, DOM0, 7)
    rig.pin(False)
    with pytest.raises(GrantRefused, match=f"unpin: party {rig.party} holds no write pin on dom5 ref 9") as exc:
        rig.unpin(True)
    assert exc.value.status == GNTST_bad_handle
    with pytest.raises(GrantRefused, match=f"unpin: party {XENHV_PARTY} holds no read pin"):
        rig.unpin(False, party=XENHV_PARTY)
    rig.unpin(False)
    assert rig.word() == 0 and rig.flags() == GTF_permit_access


def test_a_pin_whose_entry_was_repaired_during_its_page_check_is_refused(rig: Rig) -> None:
    """xenhv recovered the party while its page check ran (it looked dead): the pin must not count."""
    rig.guest.grant_access(REF, DOM0, 7)

    def xenhv_recovers_meanwhile(gfn: int) -> bool:
        rig.table.recover_party(rig.party, wait=0)
        return True

    with pytest.raises(GrantRefused, match="lost its active entry while checking the page") as exc:
        rig.pin(True, page_ok=xenhv_recovers_meanwhile)
    assert exc.value.status == GNTST_general_error
    assert rig.table.totals(REF) == (0, 0) and rig.flags() == GTF_permit_access


# ---- several parties at once --------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import mmap, os, random, sys
    from xenpv.xenabi.atomic import AtomicMemory
    from xenpv.xenabi.grant_pins import MAP_MASK, PinTable, native_hook
    from xenpv.xenabi.grant_table import GTF_reading, GTF_writing

    pins_fd, frames_fd, party, generation, guest, page = (int(a) for a in sys.argv[1:7])
    what, rounds, die_at, refs = sys.argv[7], int(sys.argv[8]), int(sys.argv[9]), [int(r) for r in sys.argv[10:]]
    pins = mmap.mmap(pins_fd, os.fstat(pins_fd).st_size, mmap.MAP_SHARED)
    frames = mmap.mmap(frames_fd, os.fstat(frames_fd).st_size, mmap.MAP_SHARED)
    views = [memoryview(frames)[i:i + page] for i in range(0, len(frames), page)]
    table = PinTable(memoryview(pins), [AtomicMemory(v) for v in views], guest)
    guest_view = AtomicMemory(memoryview(frames))

    def flags(ref):
        return guest_view.load(ref * 8, 2)

    if what == "race":
        rng = random.Random(party)
        held = []
        print("ready", flush=True)
        sys.stdin.read(1)  # every racer starts at once
        for _ in range(rounds):
            if held and (len(held) > 6 or rng.random() < 0.5):
                ref, writable = held.pop(rng.randrange(len(held)))
                table.unpin(party, ref, writable, generation=generation)
                continue
            ref, writable = rng.choice(refs), rng.random() < 0.4
            table.pin(party, ref, writable, 0, mask=MAP_MASK, op="map", generation=generation)
            want = GTF_reading | (GTF_writing if writable else 0)
            if flags(ref) & want != want:
                sys.exit(f"ref {ref}: pinned {'rw' if writable else 'ro'} but the guest's flags are {flags(ref):#x}")
            held.append((ref, writable))
        for ref, writable in held:
            table.unpin(party, ref, writable, generation=generation)
        sys.exit(0)

    # "pin-rw", "unpin-ro"...: the process dies at point `die_at` of that operation on refs[0].
    op, kind = what.split("-")
    writable = kind == "rw"
    if op == "unpin":
        table.pin(party, refs[0], writable, 0, mask=MAP_MASK, op="map", generation=generation)

    def dies(point, ref):
        if point == die_at:
            os._exit(9)

    with native_hook(dies):
        try:
            if op == "pin":
                table.pin(party, refs[0], writable, 0, mask=MAP_MASK, op="map", generation=generation)
            else:
                table.unpin(party, refs[0], writable, generation=generation)
        except Exception as exc:
            sys.exit(f"{what} did not reach point {die_at}: {exc}")
    sys.exit(f"{what} did not reach point {die_at}")
""")


def run_party(rig: Rig, party: int, generation: int, what: str, refs: list[int], rounds: int = 0,
              die_at: int = 0) -> subprocess.Popen[str]:
    args = [rig.pins_fd, rig.frames_fd, party, generation, GUEST, PAGE, what, rounds, die_at, *refs]
    return subprocess.Popen([sys.executable, "-c", CHILD, *map(str, args)], pass_fds=(rig.pins_fd, rig.frames_fd),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_and_xenhv_pinning_the_same_entries_keep_totals_and_flags_consistent(rig: Rig) -> None:
    refs = [8, 9, 10, 511, 512, 513]  # both grant frames
    for ref in refs:
        rig.guest.grant_access(ref, DOM0, 16 + ref % 32)
    other, other_gen = rig.table.allocate_party({rig.party})  # type: ignore[misc]
    children = [run_party(rig, rig.party, rig.generation, "race", refs, rounds=20000),
                run_party(rig, other, other_gen, "race", refs, rounds=20000)]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n", child.communicate(timeout=60)
    for child in children:
        assert child.stdin is not None
        child.stdin.write("g")
        child.stdin.flush()
    # xenhv pins too, in this process, with its own page check.
    for i in range(2000):
        ref = refs[i % len(refs)]
        rig.pin(i % 3 == 0, ref=ref, party=XENHV_PARTY, page_ok=lambda gfn: True)
        rig.unpin(i % 3 == 0, ref=ref, party=XENHV_PARTY)
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
    for ref in refs:
        assert rig.table.totals(ref) == (0, 0), ref
        assert rig.word(ref) == 0, ref
        assert rig.flags(ref) == GTF_permit_access, ref
        for party in (rig.party, other, XENHV_PARTY):
            assert rig.table.party_counts(party, ref).readers == rig.table.party_counts(party, ref).writers == 0
        assert rig.guest.end_foreign_access(ref)


def test_threads_of_one_process_pinning_the_same_entries_keep_the_totals(rig: Rig) -> None:
    refs = [8, 9, 600]
    for ref in refs:
        rig.guest.grant_access(ref, DOM0, 20)
    other, other_gen = rig.table.allocate_party({rig.party})  # type: ignore[misc]
    errors: list[BaseException] = []

    def pinner(party: int, generation: int) -> None:
        try:
            for i in range(2000):
                ref, writable = refs[i % len(refs)], i % 4 == 0
                rig.table.pin(party, ref, writable, DOM0, mask=MAP_MASK, op="map", generation=generation)
                rig.table.unpin(party, ref, writable, generation=generation)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pinner, args=args) for args in ((rig.party, rig.generation),
                                                                        (other, other_gen))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert all(rig.table.totals(ref) == (0, 0) and rig.flags(ref) == GTF_permit_access for ref in refs)


# ---- a party that dies in the middle -----------------------------------------------------------------------

@pytest.mark.parametrize("what,die_at,held_op", [
    ("pin-ro", AT_HELD, OP_PIN), ("pin-rw", AT_STATUS, OP_PIN), ("pin-rw", AT_COUNTED, OP_PIN),
    ("unpin-ro", AT_HELD, OP_UNPIN), ("unpin-rw", AT_SETTLE, OP_UNPIN), ("unpin-rw", AT_COUNTED, OP_UNPIN),
])
def test_a_party_that_died_holding_an_entry_is_repaired_by_recover_party(rig: Rig, what: str, die_at: int,
                                                                         held_op: int) -> None:
    """The child really dies (os._exit at the native hook): whatever it had done, xenhv's recovery leaves the
    entry as if the pin had not happened, or the unpin had."""
    rig.guest.grant_access(REF, DOM0, 7)
    rig.pin(False, party=XENHV_PARTY, page_ok=lambda gfn: True)  # xenhv's own pin must survive all this
    child = run_party(rig, rig.party, rig.generation, what, [REF], die_at=die_at)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 9, err
    word = rig.word()
    assert word & HOLDER_MASK == rig.party and word & (OP_PIN | OP_UNPIN) == held_op, f"{word:#x}"
    assert rig.table.recover_party(rig.party, wait=0) == 0, "its only pin was the one it was changing"
    assert rig.word() == 1 << TOTAL_R_SHIFT and rig.table.totals(REF) == (1, 0)
    assert rig.table.party_counts(rig.party, REF).readers == rig.table.party_counts(rig.party, REF).writers == 0
    assert rig.flags() == GTF_permit_access | GTF_reading, "xenhv's read pin only"
    rig.unpin(False, party=XENHV_PARTY)
    assert rig.guest.end_foreign_access(REF)


def test_a_party_that_died_undoing_a_refused_pin_is_repaired(rig: Rig) -> None:
    """Death at the settle of a pin's error path (the flags it set are still there)."""
    rig.guest.grant_access(REF, DOM0, RAM_PAGES + 1)  # not guest RAM: the pin sets the flags, then undoes them
    child = run_party(rig, rig.party, rig.generation, "pin-rw", [REF], die_at=AT_SETTLE)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 9, err
    assert rig.flags() == GTF_permit_access | GTF_reading | GTF_writing
    rig.table.recover_party(rig.party, wait=0)
    assert rig.word() == 0 and rig.flags() == GTF_permit_access
    assert rig.guest.end_foreign_access(REF)
