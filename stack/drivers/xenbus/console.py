"""XENBUS CONSOLE interface v1 (reference windows-pv-drivers.md 1): the PV console for XENCONS.

Our toolstack provisions no PV console (HVM_PARAM_CONSOLE_PFN/EVTCHN stay unset and no back-end
serves one), so the interface keeps its own ring: a page of guest RAM in the `xencons_interface`
layout of io/console.h (in[1024], out[2048], then in_cons, in_prod, out_cons, out_prod), with the guest
as the front end: Write produces into `out`, Read consumes from `in`, and the indexes are atomics on
the page, so a back-end added later (or a test writing guest memory) is a peer without changes here.
`ring_gfn` says where the page is.

Wakeups are the client's KEVENTs. The driver sets them from its event channel DPC when the back-end
notifies; with no back-end, this interface sets them whenever a Read or Write of its own moved data,
which is when a waiting reader or writer can make progress on a ring nobody else touches.
"""
from __future__ import annotations

import itertools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.event import KEvent, KeSetEvent
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_SUCCESS, NTSTATUS
from xenpv.stack.vcpu.platform import XenPlatform

log = logging.getLogger("stack.drivers.xenbus.console")

CONSOLE_GUID = uuid.UUID("04C4F738-034A-4268-BD20-A92AC90D4F82")

IN_RING_SIZE = 1024
OUT_RING_SIZE = 2048
_IN = 0
_OUT = IN_RING_SIZE
_IN_CONS = IN_RING_SIZE + OUT_RING_SIZE
_IN_PROD = _IN_CONS + 4
_OUT_CONS = _IN_CONS + 8
_OUT_PROD = _IN_CONS + 12

_addresses = itertools.count(0xFFFFE000_01700000, 0x40)


@dataclass(eq=False)
class ConsoleWakeup:
    Event: KEvent
    address: int = field(default_factory=lambda: next(_addresses))


class ConsoleInterface(Interface):
    NAME = "CONSOLE"
    GUID = CONSOLE_GUID
    TABLES = LAYOUTS["CONSOLE"]

    def __init__(self, platform: XenPlatform, debug: DebugInterface) -> None:
        super().__init__()
        self.platform = platform
        self.debug = debug
        self.wakeups: list[ConsoleWakeup] = []
        self.ring_gfn: int | None = None
        self._page: memoryview | None = None
        self._mem: AtomicMemory | None = None
        self._debug_callback: DebugCallback | None = None

    def setup(self) -> int:
        status = self.debug.acquire()
        if not NT_SUCCESS(status):
            return status
        (self.ring_gfn,) = self.platform.pages.alloc()
        self._page = self.platform.vcpu.page(self.ring_gfn)
        self._page[:] = bytes(len(self._page))
        self._mem = AtomicMemory(self._page)
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|CONSOLE", self._dump, None)
        log.info("console ring at gfn %#x", self.ring_gfn)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.wakeups:
            BUG("OUTSTANDING WAKEUPS")
        assert self._mem is not None and self._page is not None and self._debug_callback is not None
        assert self.ring_gfn is not None
        self.debug.DebugDeregister(self._debug_callback)
        self._mem.release()
        self._page.release()
        self.platform.pages.free([self.ring_gfn])
        self._mem = self._page = self._debug_callback = self.ring_gfn = None
        self.debug.release()

    @property
    def mem(self) -> AtomicMemory:
        if self._mem is None:
            raise RuntimeError("CONSOLE used without Acquire")
        return self._mem

    def _index(self, offset: int) -> int:
        return self.mem.load(offset, 4)

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        self.debug.DebugPrintf("in_cons = %u in_prod = %u out_cons = %u out_prod = %u", self._index(_IN_CONS),
                               self._index(_IN_PROD), self._index(_OUT_CONS), self._index(_OUT_PROD))

    def _wake(self) -> None:
        for wakeup in self.wakeups:
            KeSetEvent(wakeup.Event)

    def ConsoleCanRead(self) -> bool:
        return self._index(_IN_PROD) != self._index(_IN_CONS)

    def ConsoleRead(self, Buffer: bytearray, Length: int) -> int:
        """Copy up to Length bytes of input into Buffer; returns how many."""
        assert self._page is not None
        consumer, producer = self._index(_IN_CONS), self._index(_IN_PROD)
        available = (producer - consumer) & 0xFFFFFFFF
        if available > IN_RING_SIZE:
            log.warning("console input indexes are corrupt (cons %u prod %u)", consumer, producer)
            return 0
        count = min(Length, available, len(Buffer))
        for i in range(count):
            Buffer[i] = self._page[_IN + (consumer + i) % IN_RING_SIZE]
        if count:
            self.mem.store(_IN_CONS, 4, (consumer + count) & 0xFFFFFFFF)
            self._wake()
        return count

    def ConsoleCanWrite(self) -> bool:
        return (self._index(_OUT_PROD) - self._index(_OUT_CONS)) & 0xFFFFFFFF < OUT_RING_SIZE

    def ConsoleWrite(self, Buffer: bytes, Length: int) -> int:
        """Queue up to Length bytes of Buffer for output; returns how many fit."""
        assert self._page is not None
        consumer, producer = self._index(_OUT_CONS), self._index(_OUT_PROD)
        used = (producer - consumer) & 0xFFFFFFFF
        count = min(Length, len(Buffer), max(0, OUT_RING_SIZE - used))
        for i in range(count):
            self._page[_OUT + (producer + i) % OUT_RING_SIZE] = Buffer[i]
        if count:
            # The data stores come before the index store (sequentially consistent atomics), as wmb() orders them.
            self.mem.store(_OUT_PROD, 4, (producer + count) & 0xFFFFFFFF)
            self._wake()
        return count

    def ConsoleWakeupAdd(self, Event: KEvent) -> tuple[NTSTATUS, ConsoleWakeup]:
        wakeup = ConsoleWakeup(Event)
        self.wakeups.append(wakeup)
        return STATUS_SUCCESS, wakeup

    def ConsoleWakeupRemove(self, Wakeup: ConsoleWakeup) -> None:
        if Wakeup not in self.wakeups:
            BUG("UNKNOWN WAKEUP")
        self.wakeups.remove(Wakeup)
