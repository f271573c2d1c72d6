"""Revision tables (XB include/revision.h, XV include/revision.h; reference windows-pv-drivers.md 3).

A revision names the interface versions a bus driver offers its children; a child's INF binds one
exact revision (its hardware ID ends in REV_%08X). Numbering is MAJOR << 24 | sequence. XENBUS reports
every revision newest first in its children's hardware IDs; the last row equals the interfaces' maxima.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

XENBUS_INTERFACES = ("SUSPEND", "SHARED_INFO", "EVTCHN", "DEBUG", "STORE", "RANGE_SET", "CACHE", "GNTTAB",
                     "UNPLUG", "CONSOLE", "EMULATED")


def _table(interfaces: tuple[str, ...], rows: dict[int, tuple[int, ...]]) -> Mapping[int, Mapping[str, int]]:
    return MappingProxyType({rev: MappingProxyType(dict(zip(interfaces, versions)))
                             for rev, versions in rows.items()})


XENBUS_REVISIONS = _table(XENBUS_INTERFACES, {
    0x09000008: (1, 3, 9, 1, 2, 1, 2, 4, 1, 1, 2),
    0x09000009: (1, 4, 9, 1, 2, 1, 2, 4, 1, 1, 2),
    0x0900000A: (1, 4, 9, 1, 2, 1, 2, 4, 2, 1, 2),
    0x0900000B: (1, 4, 9, 1, 2, 1, 2, 4, 3, 1, 2),
    0x0900000C: (1, 4, 9, 1, 2, 1, 2, 4, 3, 1, 3),
})

# Retired revisions stay documented: a child bound to one of them no longer finds its bus driver.
XENBUS_DEPRECATED_REVISIONS = _table(XENBUS_INTERFACES, {
    0x09000000: (1, 2, 5, 1, 2, 1, 1, 2, 1, 0, 1),  # CONSOLE 0: absent
})

XENVIF_INTERFACES = ("CACHE", "VIF", "STORE", "SUSPEND", "UNPLUG")
XENVIF_REVISIONS = _table(XENVIF_INTERFACES, {
    0x09000001: (2, 8, 2, 1, 1),
    0x09000002: (2, 9, 2, 1, 1),
    0x09000003: (2, 10, 2, 1, 1),
    0x09000004: (2, 10, 2, 1, 2),
    0x09000005: (2, 10, 2, 1, 3),
})

# What the current INFs bind (reference 3, "INF binding").
CHILD_BINDS_XENBUS_REVISION = 0x0900000B
XENNET_BINDS_XENVIF_REVISION = 0x09000005

VENDOR_PREFIX = "XP"


def vendor_name(pci_device_id: int, prefix: str = VENDOR_PREFIX) -> str:
    return f"{prefix}{pci_device_id:04X}"


def newest_first(table: Mapping[int, Mapping[str, int]]) -> list[int]:
    return sorted(table, reverse=True)
