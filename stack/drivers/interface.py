"""Versioned interfaces, as the PV drivers define them (reference windows-pv-drivers.md 1 and 2).

Every interface has a GUID and a range of versions. A version is a table of methods that starts with
the WDM INTERFACE header {Size, Version, Context, InterfaceReference, InterfaceDereference}; the drivers'
static tables leave the two reference routines NULL, so taking a table takes no reference: the client
calls Acquire (References++ under a spin lock; the 0->1 transition does the real setup and may fail)
and Release (teardown on 1->0). `GetInterface(Version, Size)` answers IRP_MN_QUERY_INTERFACE:
an unknown version is STATUS_NOT_SUPPORTED, a buffer shorter than the version's table is
STATUS_BUFFER_OVERFLOW, success copies the table and sets its Context.

A provider module (one per interface) subclasses `Interface`, lists its tables with `table(version,
members)` and implements the members as methods named as in C (`EvtchnOpen`...); Acquire and Release
are `acquire`/`release` with `setup`/`teardown` overridden. The table a client receives exposes only
the members of its version, under their C names: `table.EvtchnOpen(...)` is `If->EvtchnOpen(...)`.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from xenpv.stack.kernel.irql import KeAcquireSpinLock, KeReleaseSpinLock, KSpinLock
from xenpv.stack.kernel.status import STATUS_BUFFER_OVERFLOW, STATUS_NOT_SUPPORTED, STATUS_SUCCESS

log = logging.getLogger("stack.drivers.interface")

POINTER_SIZE = 8
# USHORT Size, USHORT Version, (pad), PVOID Context, PINTERFACE_REFERENCE x2 on x64
INTERFACE_HEADER_SIZE = 2 + 2 + 4 + 3 * POINTER_SIZE


@dataclass(frozen=True)
class TableLayout:
    version: int
    members: tuple[str, ...]  # in C order, Acquire and Release first

    @property
    def size(self) -> int:
        return INTERFACE_HEADER_SIZE + POINTER_SIZE * len(self.members)


@dataclass
class InterfaceTable:
    """What a client holds after a successful query: the header and the version's methods."""

    Size: int
    Version: int
    Context: "Interface"
    InterfaceReference: None = None
    InterfaceDereference: None = None
    methods: dict[str, Callable[..., Any]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self.__dict__["methods"][name]
        except KeyError:
            raise AttributeError(f"{type(self.Context).__name__} v{self.Version} has no member {name}") from None


class Interface:
    """One interface context (per FDO in XENBUS). Subclasses set NAME, GUID and TABLES."""

    NAME: ClassVar[str]
    GUID: ClassVar[uuid.UUID]
    TABLES: ClassVar[dict[int, TableLayout]]

    def __init__(self) -> None:
        self.references = 0
        self._lock = KSpinLock()

    @classmethod
    def versions(cls) -> range:
        return range(min(cls.TABLES), max(cls.TABLES) + 1)

    @classmethod
    def min_version(cls) -> int:
        return min(cls.TABLES)

    @classmethod
    def max_version(cls) -> int:
        return max(cls.TABLES)

    def get_interface(self, version: int, size: int) -> tuple[int, InterfaceTable | None]:
        layout = self.TABLES.get(version)
        if layout is None:
            return STATUS_NOT_SUPPORTED, None
        if size < layout.size:
            return STATUS_BUFFER_OVERFLOW, None
        prefix = self.NAME.title().replace("_", "")
        methods = {prefix + name: {"Acquire": self.acquire, "Release": self.release}.get(name)
                   or getattr(self, prefix + name) for name in layout.members}
        return STATUS_SUCCESS, InterfaceTable(layout.size, version, self, methods=methods)

    def acquire(self) -> int:
        irql = KeAcquireSpinLock(self._lock)
        try:
            first = self.references == 0
            self.references += 1
        finally:
            KeReleaseSpinLock(self._lock, irql)
        if first:
            status = self.setup()
            if status != STATUS_SUCCESS:
                irql = KeAcquireSpinLock(self._lock)
                self.references -= 1
                KeReleaseSpinLock(self._lock, irql)
                return status
        return STATUS_SUCCESS

    def release(self) -> None:
        irql = KeAcquireSpinLock(self._lock)
        try:
            self.references -= 1
            last = self.references == 0
        finally:
            KeReleaseSpinLock(self._lock, irql)
        if last:
            self.teardown()

    def setup(self) -> int:
        """The 0->1 work of Acquire."""
        return STATUS_SUCCESS

    def teardown(self) -> None:
        """The 1->0 work of Release."""


def table(version: int, *members: str) -> TableLayout:
    return TableLayout(version, ("Acquire", "Release") + members)


def acquire_all(dependencies: tuple[Interface, ...]) -> int:
    """Acquire each dependency in order (what an interface's first Acquire does with the ones it uses);
    on a failure release those already taken, newest first, and return that status."""
    acquired: list[Interface] = []
    for dependency in dependencies:
        status = dependency.acquire()
        if status != STATUS_SUCCESS:
            for held in reversed(acquired):
                held.release()
            return status
        acquired.append(dependency)
    return STATUS_SUCCESS
