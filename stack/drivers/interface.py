"""Versioned interfaces, as the PV drivers define them (reference windows-pv-drivers.md 1 and 2).

Every interface has a GUID and a range of versions. A version is a table of methods that starts with
the WDM INTERFACE header {Size, Version, Context, InterfaceReference, InterfaceDereference}; the drivers'
static tables leave the two reference routines NULL, so taking a table takes no reference: the client
calls Acquire (References++ under a spin lock; the 0->1 transition does the real setup and may fail)
and Release (teardown on 1->0). `GetInterface(Version, Size)` answers IRP_MN_QUERY_INTERFACE:
an unknown version is STATUS_NOT_SUPPORTED, a buffer shorter than the version's table is
STATUS_BUFFER_OVERFLOW, success copies the table and sets its Context.

A provider module (one per interface) subclasses `Interface`, takes its tables from the catalogue of
member lists (interface_layouts.LAYOUTS: each version's struct members exactly as the upstream header
declares them, so every table's size is the real sizeof) and implements the members as methods named as
in C (`EvtchnOpen`, and `EvtchnUnmaskVersion4` for the old version's member with its old semantics);
Acquire and Release are `acquire`/`release` with `setup`/`teardown` overridden. The table a client
receives exposes only the members of its version, under their C names: `table.EvtchnOpen(...)` is
`If->EvtchnOpen(...)`. Two headers (SUSPEND, XENVIF's VIF) name their members without the interface
prefix (`Register`); their tables answer to the prefixed name (`table.SuspendRegister`), as every other
interface's do, and so do tables built with `table(version, members)` from short names.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

from xenpv.stack.kernel.irql import KeAcquireSpinLock, KeReleaseSpinLock, KSpinLock
from xenpv.stack.kernel.status import STATUS_BUFFER_OVERFLOW, STATUS_NOT_SUPPORTED, STATUS_SUCCESS

log = logging.getLogger("stack.drivers.interface")

POINTER_SIZE = 8
# USHORT Size, USHORT Version, (pad), PVOID Context, PINTERFACE_REFERENCE x2 on x64
INTERFACE_HEADER_SIZE = 2 + 2 + 4 + 3 * POINTER_SIZE


@dataclass(frozen=True)
class TableLayout:
    """One version's struct: the INTERFACE header, then one function pointer per member."""

    version: int
    members: tuple[str, ...]  # in C order, Acquire and Release first

    @property
    def size(self) -> int:
        """sizeof (struct _<X>_INTERFACE_V<version>) on x64."""
        return INTERFACE_HEADER_SIZE + POINTER_SIZE * len(self.members)


def member_key(prefix: str, member: str) -> str:
    """The name a table answers to for `member`: the C name when it carries the interface prefix
    (`EvtchnOpen`), else prefix + member (SUSPEND's `Register` is `SuspendRegister`)."""
    return member if member.startswith(prefix) else prefix + member


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
    TABLES: ClassVar[Mapping[int, TableLayout]]

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
        prefix = self.prefix()
        common = {prefix + "Acquire": self.acquire, prefix + "Release": self.release}
        keys = [member_key(prefix, member) for member in layout.members]
        methods = {key: common.get(key) or getattr(self, key) for key in keys}
        return STATUS_SUCCESS, InterfaceTable(layout.size, version, self, methods=methods)

    @classmethod
    def prefix(cls) -> str:
        """The members' C prefix: `SharedInfo` for SHARED_INFO."""
        return cls.NAME.title().replace("_", "")

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
    """A layout from short member names (`Open`), Acquire and Release put first."""
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
