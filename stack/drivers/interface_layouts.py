"""Every version of every interface table the model provides, member by member as the headers declare them.

The member lists are those of the structs `_XENBUS_<NAME>_INTERFACE_V<n>` in win-xenbus 1087a8d
include/<name>_interface.h (EMULATED: `_XENFILT_EMULATED_INTERFACE_V<n>`, include/emulated_interface.h;
VIF: `_XENVIF_VIF_INTERFACE_V<n>` in win-xenvif 14892e7 include/vif_interface.h), in their order, after
the INTERFACE header. A table's size is therefore the real sizeof on x64, which is what GetInterface
compares the caller's buffer with: a client of a version gets STATUS_BUFFER_OVERFLOW exactly when the
real driver would refuse it.

A member an old version keeps under its old signature has its own name in the header (`UnmaskVersion4`,
`WaitVersion5`, `GetTimeVersion2`...): the providers implement those names with the old semantics, so a
client of that version sees what it would see on Windows.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from xenpv.stack.drivers.interface import TableLayout


def _versions(prefix: str, rows: dict[int, tuple[str, ...]]) -> Mapping[int, TableLayout]:
    """Each row: the members after Acquire and Release, without the prefix the header gives them."""
    return MappingProxyType({version: TableLayout(version, tuple(prefix + m for m in ("Acquire", "Release") + row))
                             for version, row in rows.items()})


_EVTCHN_V7 = ("Open", "Bind", "UnmaskVersion4", "Send", "Trigger", "GetCount", "Wait", "GetPort", "Close")
_EVTCHN_V8 = ("Open", "Bind", "Unmask", "Send", "Trigger", "GetCount", "Wait", "GetPort", "Close")
_SHARED_INFO_V2 = ("UpcallPending", "EvtchnPoll", "EvtchnAck", "EvtchnMask", "EvtchnUnmask")
_GNTTAB_V3 = ("CreateCacheVersion1", "PermitForeignAccess", "RevokeForeignAccess", "GetReference", "QueryReference",
              "DestroyCache", "MapForeignPages", "UnmapForeignPages")
_VIF_COMMON = ("Disable", "QueryStatistic", "QueryRingCount", "UpdateHashMapping", "ReceiverReturnPacket",
               "ReceiverSetOffloadOptions", "ReceiverSetBackfillSize", "ReceiverQueryRingSize",
               "ReceiverSetHashAlgorithm", "ReceiverQueryHashCapabilities", "ReceiverUpdateHashParameters",
               "TransmitterQueuePacket", "TransmitterQueryOffloadOptions", "TransmitterQueryLargePacketSize",
               "TransmitterQueryRingSize", "MacQueryState", "MacQueryMaximumFrameSize", "MacQueryPermanentAddress",
               "MacQueryCurrentAddress", "MacQueryMulticastAddresses", "MacSetMulticastAddresses",
               "MacSetFilterLevel", "MacQueryFilterLevel")

LAYOUTS: Mapping[str, Mapping[int, TableLayout]] = MappingProxyType({
    "DEBUG": _versions("Debug", {1: ("Register", "Printf", "Trigger", "Deregister")}),
    # The one header whose members carry no prefix.
    "SUSPEND": _versions("", {1: ("Register", "Deregister", "Trigger", "GetCount")}),
    "SHARED_INFO": _versions("SharedInfo", {
        2: _SHARED_INFO_V2 + ("GetTimeVersion2",),
        3: _SHARED_INFO_V2 + ("GetTime",),
        4: ("UpcallSupported",) + _SHARED_INFO_V2 + ("GetTime",),
    }),
    "EVTCHN": _versions("Evtchn", {
        5: ("Open", "Bind", "UnmaskVersion4", "SendVersion1", "Trigger", "WaitVersion5", "GetPort", "Close"),
        6: ("Open", "Bind", "UnmaskVersion4", "Send", "Trigger", "WaitVersion5", "GetPort", "Close"),
        7: _EVTCHN_V7,
        8: _EVTCHN_V8,
        9: _EVTCHN_V8,  # v9 changed Open's VIRQ arguments, not the members
    }),
    "STORE": _versions("Store", {2: ("Free", "Read", "Printf", "PermissionsSet", "Remove", "Directory",
                                     "TransactionStart", "TransactionEnd", "WatchAdd", "WatchRemove", "Poll")}),
    "RANGE_SET": _versions("RangeSet", {1: ("Create", "Put", "Pop", "Get", "Destroy")}),
    "CACHE": _versions("Cache", {1: ("CreateVersion1", "Get", "Put", "Destroy"),
                                 2: ("Create", "Get", "Put", "Destroy")}),
    "GNTTAB": _versions("Gnttab", {
        2: tuple(m for m in _GNTTAB_V3 if m != "QueryReference"),
        3: _GNTTAB_V3,
        4: ("CreateCache",) + _GNTTAB_V3[1:],
    }),
    "UNPLUG": _versions("Unplug", {1: ("Request",), 2: ("Request", "IsRequested"),
                                   3: ("Request", "IsRequested", "BootEmulated", "Reboot")}),
    "CONSOLE": _versions("Console", {1: ("CanRead", "Read", "CanWrite", "Write", "WakeupAdd", "WakeupRemove")}),
    "EMULATED": _versions("Emulated", {1: ("IsDevicePresentVersion1", "IsDiskPresentVersion1"),
                                       2: ("IsDevicePresentVersion1", "IsDiskPresent"),
                                       3: ("IsDevicePresent", "IsDiskPresent")}),
    # Also unprefixed in its header.
    "VIF": _versions("", {8: ("EnableVersion8",) + _VIF_COMMON, 9: ("EnableVersion9",) + _VIF_COMMON,
                          10: ("Enable",) + _VIF_COMMON}),
})
