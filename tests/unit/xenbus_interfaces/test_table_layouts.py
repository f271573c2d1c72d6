"""Every version of every interface table against the upstream headers, member by member and byte by byte.

The expected lists below are copied from the structs of the headers (not from the model): win-xenbus
1087a8d include/<name>_interface.h `struct _XENBUS_<NAME>_INTERFACE_V<n>`, include/emulated_interface.h
`struct _XENFILT_EMULATED_INTERFACE_V<n>`, and win-xenvif 14892e7 include/vif_interface.h
`struct _XENVIF_VIF_INTERFACE_V<n>`; the version range is each header's
`#define ..._INTERFACE_VERSION_MIN/MAX`. A struct is the INTERFACE header (USHORT Size, USHORT Version,
PVOID Context, two PINTERFACE_(DE)REFERENCE: 32 bytes on x64) followed by one pointer per member.
"""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.interface import member_key
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenfilt.emulated import Emulated
from xenpv.stack.drivers.xenvif.vif import VifInterface
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, PASSIVE_LEVEL, KeGetCurrentIrql
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_UNBOUND
from xenpv.stack.kernel.status import STATUS_BUFFER_OVERFLOW, STATUS_SUCCESS, STATUS_TIMEOUT

from .stack_of import interfaces, table_of

INTERFACE = 2 + 2 + 4 + 8 + 8 + 8  # the INTERFACE header on x64, padding after Version included

_EV_V8 = ["EvtchnAcquire", "EvtchnRelease", "EvtchnOpen", "EvtchnBind", "EvtchnUnmask", "EvtchnSend",
          "EvtchnTrigger", "EvtchnGetCount", "EvtchnWait", "EvtchnGetPort", "EvtchnClose"]
_SI_V2 = ["SharedInfoAcquire", "SharedInfoRelease", "SharedInfoUpcallPending", "SharedInfoEvtchnPoll",
          "SharedInfoEvtchnAck", "SharedInfoEvtchnMask", "SharedInfoEvtchnUnmask"]
_GT_V3 = ["GnttabAcquire", "GnttabRelease", "GnttabCreateCacheVersion1", "GnttabPermitForeignAccess",
          "GnttabRevokeForeignAccess", "GnttabGetReference", "GnttabQueryReference", "GnttabDestroyCache",
          "GnttabMapForeignPages", "GnttabUnmapForeignPages"]
_VIF = ["Disable", "QueryStatistic", "QueryRingCount", "UpdateHashMapping", "ReceiverReturnPacket",
        "ReceiverSetOffloadOptions", "ReceiverSetBackfillSize", "ReceiverQueryRingSize", "ReceiverSetHashAlgorithm",
        "ReceiverQueryHashCapabilities", "ReceiverUpdateHashParameters", "TransmitterQueuePacket",
        "TransmitterQueryOffloadOptions", "TransmitterQueryLargePacketSize", "TransmitterQueryRingSize",
        "MacQueryState", "MacQueryMaximumFrameSize", "MacQueryPermanentAddress", "MacQueryCurrentAddress",
        "MacQueryMulticastAddresses", "MacSetMulticastAddresses", "MacSetFilterLevel", "MacQueryFilterLevel"]

# name -> version -> (members in the header's order, sizeof on x64)
HEADERS: dict[str, dict[int, tuple[list[str], int]]] = {
    "DEBUG": {1: (["DebugAcquire", "DebugRelease", "DebugRegister", "DebugPrintf", "DebugTrigger",
                   "DebugDeregister"], 80)},
    "SUSPEND": {1: (["Acquire", "Release", "Register", "Deregister", "Trigger", "GetCount"], 80)},
    "SHARED_INFO": {2: (_SI_V2 + ["SharedInfoGetTimeVersion2"], 96),
                    3: (_SI_V2 + ["SharedInfoGetTime"], 96),
                    4: (_SI_V2[:2] + ["SharedInfoUpcallSupported"] + _SI_V2[2:] + ["SharedInfoGetTime"], 104)},
    "EVTCHN": {5: (["EvtchnAcquire", "EvtchnRelease", "EvtchnOpen", "EvtchnBind", "EvtchnUnmaskVersion4",
                    "EvtchnSendVersion1", "EvtchnTrigger", "EvtchnWaitVersion5", "EvtchnGetPort", "EvtchnClose"], 112),
               6: (["EvtchnAcquire", "EvtchnRelease", "EvtchnOpen", "EvtchnBind", "EvtchnUnmaskVersion4",
                    "EvtchnSend", "EvtchnTrigger", "EvtchnWaitVersion5", "EvtchnGetPort", "EvtchnClose"], 112),
               7: ([m if m != "EvtchnUnmask" else "EvtchnUnmaskVersion4" for m in _EV_V8], 120),
               8: (_EV_V8, 120),
               9: (_EV_V8, 120)},
    "STORE": {2: (["StoreAcquire", "StoreRelease", "StoreFree", "StoreRead", "StorePrintf", "StorePermissionsSet",
                   "StoreRemove", "StoreDirectory", "StoreTransactionStart", "StoreTransactionEnd", "StoreWatchAdd",
                   "StoreWatchRemove", "StorePoll"], 136)},
    "RANGE_SET": {1: (["RangeSetAcquire", "RangeSetRelease", "RangeSetCreate", "RangeSetPut", "RangeSetPop",
                       "RangeSetGet", "RangeSetDestroy"], 88)},
    "CACHE": {1: (["CacheAcquire", "CacheRelease", "CacheCreateVersion1", "CacheGet", "CachePut", "CacheDestroy"], 80),
              2: (["CacheAcquire", "CacheRelease", "CacheCreate", "CacheGet", "CachePut", "CacheDestroy"], 80)},
    "GNTTAB": {2: ([m for m in _GT_V3 if m != "GnttabQueryReference"], 104),
               3: (_GT_V3, 112),
               4: ([m if m != "GnttabCreateCacheVersion1" else "GnttabCreateCache" for m in _GT_V3], 112)},
    "UNPLUG": {1: (["UnplugAcquire", "UnplugRelease", "UnplugRequest"], 56),
               2: (["UnplugAcquire", "UnplugRelease", "UnplugRequest", "UnplugIsRequested"], 64),
               3: (["UnplugAcquire", "UnplugRelease", "UnplugRequest", "UnplugIsRequested", "UnplugBootEmulated",
                    "UnplugReboot"], 80)},
    "CONSOLE": {1: (["ConsoleAcquire", "ConsoleRelease", "ConsoleCanRead", "ConsoleRead", "ConsoleCanWrite",
                     "ConsoleWrite", "ConsoleWakeupAdd", "ConsoleWakeupRemove"], 96)},
    "EMULATED": {1: (["EmulatedAcquire", "EmulatedRelease", "EmulatedIsDevicePresentVersion1",
                      "EmulatedIsDiskPresentVersion1"], 64),
                 2: (["EmulatedAcquire", "EmulatedRelease", "EmulatedIsDevicePresentVersion1",
                      "EmulatedIsDiskPresent"], 64),
                 3: (["EmulatedAcquire", "EmulatedRelease", "EmulatedIsDevicePresent", "EmulatedIsDiskPresent"], 64)},
    "VIF": {8: (["Acquire", "Release", "EnableVersion8"] + _VIF, 240),
            9: (["Acquire", "Release", "EnableVersion9"] + _VIF, 240),
            10: (["Acquire", "Release", "Enable"] + _VIF, 240)},
}

XENBUS_PROVIDERS = {"DEBUG": "debug", "SUSPEND": "suspend", "SHARED_INFO": "shared_info", "EVTCHN": "evtchn",
                    "STORE": "store", "RANGE_SET": "range_set", "CACHE": "cache", "GNTTAB": "gnttab",
                    "CONSOLE": "console"}


@pytest.mark.parametrize("name", sorted(HEADERS))
def test_catalogue_matches_the_header(name: str) -> None:
    layouts = LAYOUTS[name]
    assert sorted(layouts) == sorted(HEADERS[name])  # VERSION_MIN..VERSION_MAX, every one
    for version, (members, size) in HEADERS[name].items():
        assert list(layouts[version].members) == members, f"{name} v{version}"
        assert len(members) * 8 + INTERFACE == size  # the header's arithmetic, checked once more
        assert layouts[version].size == size, f"{name} v{version}"


@pytest.mark.parametrize("name", sorted(XENBUS_PROVIDERS))
def test_xenbus_providers_serve_every_member_of_every_version(name: str, platform) -> None:
    interface = getattr(interfaces(platform), XENBUS_PROVIDERS[name])
    assert interface.TABLES is LAYOUTS[name]
    for version, (members, size) in HEADERS[name].items():
        # A client that sizes its buffer from the real header gets the table; one byte less does not.
        assert interface.get_interface(version, size - 1) == (STATUS_BUFFER_OVERFLOW, None)
        status, tbl = interface.get_interface(version, size)
        assert status == STATUS_SUCCESS and tbl.Size == size
        keys = [member_key(interface.prefix(), m) for m in members]
        assert list(tbl.methods) == keys and all(callable(tbl.methods[k]) for k in keys)


def test_unplug_and_the_providers_of_other_drivers_have_the_header_sizes() -> None:
    from xenpv.stack.drivers.xenbus.unplug import UnplugInterface

    assert UnplugInterface.TABLES is LAYOUTS["UNPLUG"]
    # XENFILT's EMULATED and XENVIF's VIF keep their own short member lists; their sizes must still be real.
    for provider, name in ((Emulated, "EMULATED"), (VifInterface, "VIF")):
        assert {v: layout.size for v, layout in provider.TABLES.items()} == \
            {v: size for v, (_, size) in HEADERS[name].items()}


def test_evtchn_v5_and_v6_clients_see_the_old_members(platform, cpu) -> None:
    """evtchn.c: EvtchnUnmaskVersion4 forces the unmask and returns nothing, EvtchnSendVersion1 raises to
    DISPATCH_LEVEL itself, EvtchnWaitVersion5 waits for GetCount + 1; v5/v6 have no GetCount."""
    with cpu.lock:
        ifs = interfaces(platform)
        v5 = table_of(ifs.evtchn, 5)
        for missing in ("EvtchnGetCount", "EvtchnWait", "EvtchnUnmask", "EvtchnSend"):
            with pytest.raises(AttributeError):
                getattr(v5, missing)
        assert v5.EvtchnAcquire() == STATUS_SUCCESS
        channel = v5.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, True)
        port = v5.EvtchnGetPort(channel)
        assert KeGetCurrentIrql() == PASSIVE_LEVEL
        v5.EvtchnSendVersion1(channel)  # from PASSIVE_LEVEL: legal for v5
        assert platform.vcpu.evtchn.sent == [port] and KeGetCurrentIrql() == PASSIVE_LEVEL
        v5.EvtchnTrigger(channel)
        assert ifs.evtchn.EvtchnGetCount(channel) == 1
        # WaitVersion5 waits for the event after the call: the one already counted does not satisfy it.
        assert v5.EvtchnWaitVersion5(channel, 0.05) == STATUS_TIMEOUT
        # The Mask channel's port is masked and pending again: UnmaskVersion4 forces delivery, returns None.
        ifs.shared_info.SharedInfoEvtchnMask(port)
        ifs.shared_info.mem.test_and_set_bit(2048, port)
        assert v5.EvtchnUnmaskVersion4(channel, False) is None
        assert ifs.evtchn.EvtchnGetCount(channel) == 2
        v6 = table_of(ifs.evtchn, 6)
        assert not hasattr(v6, "EvtchnGetCount") and not hasattr(v6, "EvtchnSendVersion1")
        v5.EvtchnClose(channel)
        v5.EvtchnRelease()


def test_evtchn_v6_send_expects_its_caller_at_dispatch(platform, cpu) -> None:
    """v6+ EvtchnSend does not raise the IRQL: it ASSERTs the caller did (a free build sends anyway)."""
    from xenpv.stack.kernel.irql import KeLowerIrql, KeRaiseIrql

    with cpu.lock:
        ifs = interfaces(platform)
        v6 = table_of(ifs.evtchn, 6)
        assert v6.EvtchnAcquire() == STATUS_SUCCESS
        channel = v6.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
        seen: list[int] = []
        ifs.evtchn._hypercall, real = (lambda op, arg: (seen.append(KeGetCurrentIrql()), real(op, arg))[1],
                                       ifs.evtchn._hypercall)
        old = KeRaiseIrql(DISPATCH_LEVEL)
        v6.EvtchnSend(channel)
        KeLowerIrql(old)
        v6.EvtchnSend(channel)  # free build: the ASSERT is compiled out
        assert seen == [DISPATCH_LEVEL, PASSIVE_LEVEL]
        del ifs.evtchn._hypercall
        v6.EvtchnClose(channel)
        v6.EvtchnRelease()


def test_shared_info_v2_get_time_returns_the_time_alone(platform) -> None:
    si = table_of(interfaces(platform).shared_info, 2)
    assert si.SharedInfoAcquire() == STATUS_SUCCESS
    with pytest.raises(AttributeError):
        si.SharedInfoGetTime
    assert si.SharedInfoGetTimeVersion2() == 116_444_736_000_000_000  # an all-zero clock: the 1970 epoch
    si.SharedInfoRelease()


def test_gnttab_v2_creates_caches_without_a_cap(platform) -> None:
    ifs = interfaces(platform)
    v2 = table_of(ifs.gnttab, 2)
    assert v2.GnttabAcquire() == STATUS_SUCCESS
    with pytest.raises(AttributeError):
        v2.GnttabCreateCache
    status, cache = v2.GnttabCreateCacheVersion1("v2", 0, lambda _a: None, lambda _a: None, None)
    assert status == STATUS_SUCCESS and cache.cache.Cap == 0xFFFFFFFF  # gnttab.c: Cap 0, cache.c: ULONG_MAX
    v2.GnttabDestroyCache(cache)
    v2.GnttabRelease()
