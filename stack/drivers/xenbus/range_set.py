"""XENBUS RANGE_SET interface v1 (reference windows-pv-drivers.md 1): named sets of integer ranges.

XENBUS keeps the free frames of the platform BAR hole in one (those after shared_info and the grant
frames: `bar_hole_free_frames`) and GNTTAB its free grant references in another. Ranges are kept
sorted and merged; Pop takes the lowest fit. Zero-length Put/Pop/Get are vetoed (62d034b), and so is
putting a range that overlaps one already in the set. Destroying a set that still holds ranges is an
ASSERT (range_set.c RangeSetDestroy): a checked build stops, a free build frees the set and leaks its ranges.
"""
from __future__ import annotations

import bisect
import itertools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INSUFFICIENT_RESOURCES, STATUS_INVALID_PARAMETER,
                                 STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS, NTSTATUS)
from xenpv.stack.vcpu.platform import XenPlatform

log = logging.getLogger("stack.drivers.xenbus.range_set")

RANGE_SET_GUID = uuid.UUID("EE7E78A2-6847-48C5-B123-BB012F0EABF4")

_addresses = itertools.count(0xFFFFE000_01400000, 0x40)


@dataclass(eq=False)
class RangeSet:
    """XENBUS_RANGE_SET: disjoint, non-adjacent [start, end) ranges sorted by start."""

    Name: str
    ranges: list[tuple[int, int]] = field(default_factory=list)
    address: int = field(default_factory=lambda: next(_addresses))

    def __str__(self) -> str:
        return f"RANGE_SET({self.Name})"


def bar_hole_free_frames(platform: XenPlatform, grant_frames: int) -> tuple[int, int]:
    """(first frame, count) of the platform BAR hole left after shared_info and `grant_frames` grant
    frames: what the FDO puts in its RANGE_SET for later hypervisor mappings."""
    bar = next(b for b in platform.device.bars if b.kind == "mem")
    first = (bar.address >> 12) + 1 + grant_frames
    return first, (bar.size >> 12) - 1 - grant_frames


class RangeSetInterface(Interface):
    NAME = "RANGE_SET"
    GUID = RANGE_SET_GUID
    TABLES = LAYOUTS["RANGE_SET"]

    def __init__(self, debug: DebugInterface) -> None:
        super().__init__()
        self.debug = debug
        self.sets: list[RangeSet] = []
        self._debug_callback: DebugCallback | None = None

    def setup(self) -> int:
        status = self.debug.acquire()
        if not NT_SUCCESS(status):
            return status
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|RANGE_SET", self._dump, None)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.sets:
            BUG("OUTSTANDING RANGE SETS")
        assert self._debug_callback is not None
        self.debug.DebugDeregister(self._debug_callback)
        self._debug_callback = None
        self.debug.release()

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        for range_set in self.sets:
            spans = ", ".join(f"{start:x}-{end - 1:x}" for start, end in range_set.ranges)
            self.debug.DebugPrintf("%s: %s", range_set.Name, spans or "(empty)")

    def RangeSetCreate(self, Name: str) -> tuple[NTSTATUS, RangeSet]:
        range_set = RangeSet(Name)
        self.sets.append(range_set)
        return STATUS_SUCCESS, range_set

    def RangeSetPut(self, RangeSet: RangeSet, Start: int, Count: int) -> NTSTATUS:
        if Count <= 0:
            return STATUS_INVALID_PARAMETER
        ranges = RangeSet.ranges
        end = Start + Count
        index = bisect.bisect_left(ranges, (Start, end))
        if (index > 0 and ranges[index - 1][1] > Start) or (index < len(ranges) and ranges[index][0] < end):
            log.warning("%s: %#x+%#x overlaps a range already in the set", RangeSet, Start, Count)
            return STATUS_INVALID_PARAMETER
        ranges.insert(index, (Start, end))
        # Merge with neighbours that now touch, so Pop can find the largest runs.
        if index + 1 < len(ranges) and ranges[index + 1][0] == end:
            ranges[index] = (Start, ranges.pop(index + 1)[1])
        if index > 0 and ranges[index - 1][1] == Start:
            ranges[index - 1] = (ranges[index - 1][0], ranges.pop(index)[1])
        return STATUS_SUCCESS

    def RangeSetPop(self, RangeSet: RangeSet, Count: int) -> tuple[NTSTATUS, int | None]:
        if Count <= 0:
            return STATUS_INVALID_PARAMETER, None
        for index, (start, end) in enumerate(RangeSet.ranges):
            if end - start >= Count:
                if end - start == Count:
                    del RangeSet.ranges[index]
                else:
                    RangeSet.ranges[index] = (start + Count, end)
                return STATUS_SUCCESS, start
        return STATUS_INSUFFICIENT_RESOURCES, None

    def RangeSetGet(self, RangeSet: RangeSet, Start: int, Count: int) -> NTSTATUS:
        """Take exactly [Start, Start + Count) out of the set; all of it must be there."""
        if Count <= 0:
            return STATUS_INVALID_PARAMETER
        end = Start + Count
        for index, (first, last) in enumerate(RangeSet.ranges):
            if first <= Start and end <= last:
                pieces = [(a, b) for a, b in ((first, Start), (end, last)) if b > a]
                RangeSet.ranges[index:index + 1] = pieces
                return STATUS_SUCCESS
        return STATUS_OBJECT_NAME_NOT_FOUND

    def RangeSetDestroy(self, RangeSet: RangeSet) -> None:
        if RangeSet not in self.sets:
            BUG("UNKNOWN RANGE SET")
        self.sets.remove(RangeSet)
        ASSERT(not RangeSet.ranges, "__RangeSetIsEmpty(RangeSet)")
        if RangeSet.ranges:
            log.warning("%s destroyed holding %s: the ranges leak", RangeSet, RangeSet.ranges)
            RangeSet.ranges = []
