"""The compare-and-swap holds across processes: a mapper (GrantTable) and a revoker (GrantTableFrontend)
race on one grant entry in a shared page, and the revoker never wins while a mapping is live."""
from __future__ import annotations

import mmap
import multiprocessing
import time

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.backends.xenhv.errors import GrantError
from xenpv.backends.xenhv.gnttab import GrantTable
from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.xenabi.grant_table import GTF_reading, GTF_writing

PAGE = 4096
REF = 9
GUEST, BACKEND, OTHER = 1, 0, 2
RUN_SECONDS = 1.5
# One u64 counter per slot of the control page, each written by one process only (a shared counter would
# need an atomic add: both children finish at the same moment).
LIVE, MAPS, MAP_REFUSED, REVOKES, BUSY, MAPPER_VIOLATIONS, REVOKER_VIOLATIONS, GO, MAPPER_DONE, REVOKER_DONE = (
    8 * i for i in range(10))
# What the revoker grants next, in turn: writable and read-only to the mapper, and to a domain that is not it.
GRANTS = ((BACKEND, False), (BACKEND, True), (OTHER, False))


def _wait_for_go(control: AtomicMemory) -> float:
    while not control.load(GO, 8):
        time.sleep(0.001)
    return time.monotonic() + RUN_SECONDS


def _mapper(frame: memoryview, control_view: memoryview) -> None:
    control = AtomicMemory(control_view)
    scratch = bytearray(PAGE)
    table = GrantTable(GUEST, lambda index: frame, lambda gfn: memoryview(scratch))
    deadline = _wait_for_go(control)
    iteration = 0
    while time.monotonic() < deadline:
        iteration += 1
        readonly = iteration % 2 == 0
        try:
            mapping = table.map(BACKEND, REF, readonly)
        except GrantError:
            control.store(MAP_REFUSED, 8, control.load(MAP_REFUSED, 8) + 1)
            continue
        control.store(LIVE, 8, 1)
        for _ in range(3):
            entry = table.entry(REF)
            held = GTF_reading | (0 if readonly else GTF_writing)
            if entry.domid != BACKEND or entry.flags & held != held:
                control.store(MAPPER_VIOLATIONS, 8, control.load(MAPPER_VIOLATIONS, 8) + 1)
        control.store(LIVE, 8, 0)
        table.unmap(mapping.handle)
        control.store(MAPS, 8, control.load(MAPS, 8) + 1)
    table.release()
    control.store(MAPPER_DONE, 8, 1)
    control.release()


def _revoker(frame: memoryview, control_view: memoryview) -> None:
    control = AtomicMemory(control_view)
    front = GrantTableFrontend([frame])
    deadline = _wait_for_go(control)
    turn = 0
    while time.monotonic() < deadline:
        if front.end_foreign_access(REF):
            if control.load(LIVE, 8):
                control.store(REVOKER_VIOLATIONS, 8, control.load(REVOKER_VIOLATIONS, 8) + 1)
            control.store(REVOKES, 8, control.load(REVOKES, 8) + 1)
            domid, readonly = GRANTS[turn % len(GRANTS)]
            turn += 1
            front.grant_access(REF, domid, 3, readonly)
        else:
            control.store(BUSY, 8, control.load(BUSY, 8) + 1)
    front.release()
    control.store(REVOKER_DONE, 8, 1)
    control.release()


def test_revoker_never_wins_while_mapped() -> None:
    shared = mmap.mmap(-1, 2 * PAGE)  # MAP_SHARED: the forked children see the same pages
    view = memoryview(shared)
    frame, control_view = view[:PAGE], view[PAGE:]
    GrantTableFrontend([frame]).grant_access(REF, BACKEND, 3)
    context = multiprocessing.get_context("fork")
    children = [context.Process(target=_mapper, args=(frame, control_view)),
                context.Process(target=_revoker, args=(frame, control_view))]
    for child in children:
        child.start()
    control = AtomicMemory(control_view)
    front = GrantTableFrontend([frame])
    try:
        control.store(GO, 8, 1)
        for child in children:
            child.join(timeout=RUN_SECONDS + 10)
        assert [child.exitcode for child in children] == [0, 0]
        counts = {name: control.load(offset, 8) for name, offset in
                  (("maps", MAPS), ("refused", MAP_REFUSED), ("revokes", REVOKES), ("busy", BUSY),
                   ("mapper_violations", MAPPER_VIOLATIONS), ("revoker_violations", REVOKER_VIOLATIONS),
                   ("mapper_done", MAPPER_DONE), ("revoker_done", REVOKER_DONE))}
        assert counts["mapper_done"] == counts["revoker_done"] == 1, counts
        assert counts["maps"] > 0 and counts["revokes"] > 0 and counts["busy"] > 0, counts
        assert counts["mapper_violations"] == 0 and counts["revoker_violations"] == 0, counts
        # No lost bits: with the mapper gone, nothing may still claim the entry.
        assert front.entry(REF).flags & (GTF_reading | GTF_writing) == 0
    finally:
        for child in children:
            if child.is_alive():
                child.kill()
        control.release()
        front.release()
        frame.release()
        control_view.release()
        view.release()
        shared.close()
