"""Every interface: GUID, version range, table sizes, GetInterface's rules and Acquire/Release counting."""
from __future__ import annotations

import uuid

import pytest

from xenpv.stack.drivers.interface import INTERFACE_HEADER_SIZE, POINTER_SIZE, member_key
from xenpv.stack.drivers.revision import XENBUS_REVISIONS, newest_first
from xenpv.stack.kernel.status import STATUS_BUFFER_OVERFLOW, STATUS_NOT_SUPPORTED, STATUS_SUCCESS

from .stack_of import interfaces

REFERENCE = {  # reference windows-pv-drivers.md 1
    "DEBUG": ("0DF600AE-6B20-4227-BF94-03DA9A26A114", 1, 1),
    "SUSPEND": ("0554F2AF-B510-4C71-AC03-1C503E394238", 1, 1),
    "SHARED_INFO": ("7E73C34F-1640-4649-A8F3-263BC930A004", 2, 4),
    "EVTCHN": ("BE2440AC-1098-4150-AF4D-452FADCEF923", 5, 9),
    "STORE": ("86824C3B-D34E-4753-B281-2F1E3AD214D7", 2, 2),
    "RANGE_SET": ("EE7E78A2-6847-48C5-B123-BB012F0EABF4", 1, 1),
    "CACHE": ("A98DFD78-416A-4949-92A5-E084F2F4B44E", 1, 2),
    "GNTTAB": ("763679C5-E5C2-4A6D-8B88-6BB02EC42D8E", 2, 4),
    "CONSOLE": ("04C4F738-034A-4268-BD20-A92AC90D4F82", 1, 1),
}
ATTRS = {"DEBUG": "debug", "SUSPEND": "suspend", "SHARED_INFO": "shared_info", "EVTCHN": "evtchn", "STORE": "store",
         "RANGE_SET": "range_set", "CACHE": "cache", "GNTTAB": "gnttab", "CONSOLE": "console"}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_guid_versions_and_revision_maximum(name: str, platform) -> None:
    interface = getattr(interfaces(platform), ATTRS[name])
    guid, low, high = REFERENCE[name]
    assert interface.NAME == name and interface.GUID == uuid.UUID(guid)
    assert interface.versions() == range(low, high + 1)
    assert XENBUS_REVISIONS[newest_first(XENBUS_REVISIONS)[0]][name] == high


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_get_interface_rules_for_every_version(name: str, platform) -> None:
    interface = getattr(interfaces(platform), ATTRS[name])
    prefix = name.title().replace("_", "")
    for version in interface.versions():
        layout = interface.TABLES[version]
        assert layout.size == INTERFACE_HEADER_SIZE + POINTER_SIZE * len(layout.members)
        assert interface.get_interface(version, layout.size - 1) == (STATUS_BUFFER_OVERFLOW, None)
        status, tbl = interface.get_interface(version, layout.size + 64)
        assert status == STATUS_SUCCESS and tbl.Size == layout.size and tbl.Version == version
        assert tbl.Context is interface and tbl.InterfaceReference is None
        for member in layout.members:
            assert callable(getattr(tbl, member_key(prefix, member)))
    assert interface.get_interface(interface.max_version() + 1, 4096)[0] == STATUS_NOT_SUPPORTED
    assert interface.get_interface(interface.min_version() - 1, 4096)[0] == STATUS_NOT_SUPPORTED
    assert interface.references == 0  # taking a table takes no reference


def test_old_versions_lack_later_members(platform) -> None:
    ifs = interfaces(platform)
    v2 = ifs.shared_info.get_interface(2, 4096)[1]
    v3 = ifs.shared_info.get_interface(3, 4096)[1]
    with pytest.raises(AttributeError):
        v2.SharedInfoGetTime
    with pytest.raises(AttributeError):
        v3.SharedInfoUpcallSupported
    assert callable(v3.SharedInfoGetTime)
    with pytest.raises(AttributeError):
        ifs.gnttab.get_interface(2, 4096)[1].GnttabQueryReference


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_acquire_counts_and_sets_up_once(name: str, platform) -> None:
    ifs = interfaces(platform)
    interface = getattr(ifs, ATTRS[name])
    tbl = interface.get_interface(interface.max_version(), 4096)[1]
    prefix = name.title().replace("_", "")
    assert getattr(tbl, prefix + "Acquire")() == STATUS_SUCCESS
    debug_refs = ifs.debug.references
    assert debug_refs >= 1  # every setup takes DEBUG, directly or through its dependencies
    assert getattr(tbl, prefix + "Acquire")() == STATUS_SUCCESS
    assert interface.references == 2
    if interface is not ifs.debug:
        assert ifs.debug.references == debug_refs  # no second setup
    getattr(tbl, prefix + "Release")()
    getattr(tbl, prefix + "Release")()
    assert interface.references == 0 and ifs.debug.references == 0
    assert ifs.suspend.references == 0 and ifs.shared_info.references == 0
