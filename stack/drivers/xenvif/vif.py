"""The XENVIF VIF interface v8-v10 (XV include/vif_interface.h; reference windows-pv-drivers.md 1).

One context per NET PDO, wrapping that PDO's frontend. Members of every version, in C order after Acquire
and Release: Enable, Disable, QueryStatistic, QueryRingCount, UpdateHashMapping, the Receiver*,
Transmitter* and Mac* groups (26 in all). The versions differ in the callback the client passes to
Enable: v8 is variadic `Callback(Argument, Type, *args)`, v9 passes one parameters object
`Callback(Argument, Type, Parameters)`, v10 adds the receiver's `Pause` (the client sets it to ask the
receiver to stop handing up packets for this DPC pass).

Simplifications: packets travel as bytes (the receiver has already copied them out of its granted pages,
so ReturnPacket only balances the outstanding count Disable waits on); hashing (UpdateHashMapping,
SetHashAlgorithm, UpdateHashParameters) is accepted but not negotiated with the backend (no control ring).

The context sits below its frontend (frontend.py builds one and calls it to hand packets up); what the
members call back on the frontend is `VifFrontend` here, as XV's vif.c sees frontend.h/transmitter.h.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from enum import IntEnum
from collections.abc import Callable, Mapping, Sized
from typing import Any, Protocol

from xenpv.stack.drivers.interface import Interface, InterfaceTable, table
from xenpv.stack.kernel.bugcheck import BUG
from xenpv.stack.kernel.event import KEvent, KeWaitForSingleObject
from xenpv.stack.kernel.irql import assert_passive
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_NOT_SUPPORTED, STATUS_SUCCESS,
                                 STATUS_TIMEOUT, NTSTATUS)
from xenpv.stack.timescale import scaled

log = logging.getLogger("stack.drivers.xenvif.vif")

GUID_XENVIF_VIF_INTERFACE = uuid.UUID("76F279CD-CA11-418B-92E8-C57F77DE0E2E")
XENVIF_VIF_INTERFACE_VERSION_MIN = 8
XENVIF_VIF_INTERFACE_VERSION_MAX = 10

_MEMBERS = ("Enable", "Disable", "QueryStatistic", "QueryRingCount", "UpdateHashMapping",
            "ReceiverReturnPacket", "ReceiverSetOffloadOptions", "ReceiverSetBackfillSize", "ReceiverQueryRingSize",
            "ReceiverSetHashAlgorithm", "ReceiverQueryHashCapabilities", "ReceiverUpdateHashParameters",
            "TransmitterQueuePacket", "TransmitterQueryOffloadOptions", "TransmitterQueryLargePacketSize",
            "TransmitterQueryRingSize",
            "MacQueryState", "MacQueryMaximumFrameSize", "MacQueryPermanentAddress", "MacQueryCurrentAddress",
            "MacQueryMulticastAddresses", "MacSetMulticastAddresses", "MacSetFilterLevel", "MacQueryFilterLevel")

# How long Disable waits for the client to return packets it still holds.
DISABLE_WAIT_SECONDS = 5.0


class XenvifCallbackType(IntEnum):
    XENVIF_TRANSMITTER_RETURN_PACKET = 0
    XENVIF_RECEIVER_QUEUE_PACKET = 1
    XENVIF_MAC_STATE_CHANGE = 2


class XenvifTransmitterPacketStatus(IntEnum):
    XENVIF_TRANSMITTER_PACKET_OK = 2
    XENVIF_TRANSMITTER_PACKET_DROPPED = 3
    XENVIF_TRANSMITTER_PACKET_ERROR = 4


class XenvifMacFilterLevel(IntEnum):
    XENVIF_MAC_FILTER_NONE = 0
    XENVIF_MAC_FILTER_MATCHING = 1
    XENVIF_MAC_FILTER_ALL = 2


class XenvifVifStatistic(IntEnum):
    """XENVIF_VIF_STATISTIC names (the model keeps the counters it can observe)."""

    XENVIF_TRANSMITTER_PACKETS_DROPPED = 0
    XENVIF_TRANSMITTER_BACKEND_ERRORS = 1
    XENVIF_TRANSMITTER_FRONTEND_ERRORS = 2
    XENVIF_TRANSMITTER_UNICAST_PACKETS = 3
    XENVIF_TRANSMITTER_UNICAST_OCTETS = 4
    XENVIF_TRANSMITTER_MULTICAST_PACKETS = 5
    XENVIF_TRANSMITTER_MULTICAST_OCTETS = 6
    XENVIF_TRANSMITTER_BROADCAST_PACKETS = 7
    XENVIF_TRANSMITTER_BROADCAST_OCTETS = 8
    XENVIF_RECEIVER_PACKETS_DROPPED = 9
    XENVIF_RECEIVER_BACKEND_ERRORS = 10
    XENVIF_RECEIVER_FRONTEND_ERRORS = 11
    XENVIF_RECEIVER_UNICAST_PACKETS = 12
    XENVIF_RECEIVER_UNICAST_OCTETS = 13
    XENVIF_RECEIVER_MULTICAST_PACKETS = 14
    XENVIF_RECEIVER_MULTICAST_OCTETS = 15
    XENVIF_RECEIVER_BROADCAST_PACKETS = 16
    XENVIF_RECEIVER_BROADCAST_OCTETS = 17


@dataclass(frozen=True)
class XenvifOffloadOptions:
    """XENVIF_VIF_OFFLOAD_OPTIONS: what the client asks of a transmitted packet / accepts on receive."""

    OffloadIpVersion4HeaderChecksum: bool = False
    OffloadIpVersion4TcpChecksum: bool = False
    OffloadIpVersion4UdpChecksum: bool = False
    OffloadIpVersion4LargePacket: bool = False


@dataclass(frozen=True)
class XenvifPacketChecksumFlags:
    """XENVIF_PACKET_CHECKSUM_FLAGS of a received packet."""

    TcpChecksumSucceeded: bool = False
    UdpChecksumSucceeded: bool = False
    # NETRXF_csum_blank: the sender left the L4 checksum to offload (a local peer); it is not filled in.
    ChecksumBlank: bool = False


@dataclass
class TransmitterReturnParameters:
    Cookie: Any
    Status: XenvifTransmitterPacketStatus


@dataclass
class ReceiverQueueParameters:
    Index: int
    Data: bytes
    Flags: XenvifPacketChecksumFlags
    MaximumSegmentSize: int
    TagControlInformation: int
    More: bool
    Cookie: Any
    Pause: bool = False  # v10: set by the client


VifCallback = Callable[..., None]


class VifFrontend(Protocol):
    """What the VIF members use of the frontend they wrap (frontend.Frontend)."""

    @property
    def statistics(self) -> Mapping[XenvifVifStatistic, int]: ...
    @property
    def queues(self) -> Sized: ...
    @property
    def online(self) -> bool: ...
    @property
    def speed(self) -> int: ...
    @property
    def mtu(self) -> int: ...
    @property
    def permanent_address(self) -> bytes: ...
    @property
    def current_address(self) -> bytes: ...
    @property
    def rx_ring_size(self) -> int: ...
    @property
    def tx_ring_size(self) -> int: ...
    @property
    def transmitter_offload(self) -> XenvifOffloadOptions: ...
    @property
    def large_packet_size(self) -> int: ...

    def FrontendEnable(self) -> NTSTATUS: ...

    def FrontendDisable(self) -> None: ...

    def TransmitterQueuePacket(self, data: bytes, offload: XenvifOffloadOptions, mss: int, hash_value: int,
                               more: bool, cookie: Any) -> NTSTATUS: ...


class VifInterface(Interface):
    NAME = "VIF"
    GUID = GUID_XENVIF_VIF_INTERFACE
    TABLES = {version: table(version, *_MEMBERS)
              for version in range(XENVIF_VIF_INTERFACE_VERSION_MIN, XENVIF_VIF_INTERFACE_VERSION_MAX + 1)}

    def __init__(self, frontend: VifFrontend) -> None:
        super().__init__()
        self.frontend = frontend
        self.callback: VifCallback | None = None
        self.argument: Any = None
        self.version = XENVIF_VIF_INTERFACE_VERSION_MAX
        self.outstanding = 0
        self.returned = KEvent("vif packets returned")
        self.filter_level = XenvifMacFilterLevel.XENVIF_MAC_FILTER_MATCHING
        self.multicast: list[bytes] = []
        self.receiver_offload = XenvifOffloadOptions()
        self.backfill = 0

    def get_interface(self, version: int, size: int) -> tuple[int, InterfaceTable | None]:
        status, found = super().get_interface(version, size)
        if found is not None:
            # The client's version decides the callback form; one client per PDO (XENNET).
            self.version = version
        return status, found

    # -- what the frontend calls --------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.callback is not None

    def _call(self, kind: XenvifCallbackType, parameters: Any) -> None:
        assert self.callback is not None
        if self.version == 8:
            self.callback(self.argument, kind, *vars(parameters).values())
        else:
            self.callback(self.argument, kind, parameters)

    def transmitter_return(self, cookie: Any, status: XenvifTransmitterPacketStatus) -> None:
        if self.callback is not None:
            self._call(XenvifCallbackType.XENVIF_TRANSMITTER_RETURN_PACKET, TransmitterReturnParameters(cookie, status))

    def receiver_queue(self, parameters: ReceiverQueueParameters) -> bool:
        """Hand a packet up; False if the client (v10) asked the receiver to pause."""
        if self.callback is None:
            return True
        self.outstanding += 1
        self.returned.clear()
        self._call(XenvifCallbackType.XENVIF_RECEIVER_QUEUE_PACKET, parameters)
        return not (self.version >= 10 and parameters.Pause)

    def mac_state_change(self) -> None:
        if self.callback is not None:
            self._call(XenvifCallbackType.XENVIF_MAC_STATE_CHANGE, None)

    # -- members --------------------------------------------------------------------------------------

    def VifEnable(self, Callback: VifCallback, Argument: Any) -> NTSTATUS:
        assert_passive("VifEnable")
        if self.callback is not None:
            return STATUS_INVALID_PARAMETER
        self.callback, self.argument = Callback, Argument
        status = self.frontend.FrontendEnable()
        if not NT_SUCCESS(status):
            self.callback = self.argument = None
        return status

    def VifDisable(self) -> None:
        assert_passive("VifDisable")
        if self.callback is None:
            return  # vif.c VifDisable: `if (!Context->Enabled) goto done`
        self.frontend.FrontendDisable()
        if self.outstanding and KeWaitForSingleObject(self.returned, scaled(DISABLE_WAIT_SECONDS)) == STATUS_TIMEOUT:
            log.warning("VifDisable: %d packet(s) still with the client", self.outstanding)
        self.callback = self.argument = None

    def VifQueryStatistic(self, Index: int) -> tuple[NTSTATUS, int]:
        try:
            return STATUS_SUCCESS, self.frontend.statistics[XenvifVifStatistic(Index)]
        except ValueError:
            return STATUS_INVALID_PARAMETER, 0

    def VifQueryRingCount(self) -> int:
        return len(self.frontend.queues)

    def VifUpdateHashMapping(self, Mapping: list[int], Order: int) -> NTSTATUS:
        return STATUS_NOT_SUPPORTED

    def VifReceiverReturnPacket(self, Cookie: Any) -> None:
        if self.outstanding == 0:
            BUG("RECEIVER PACKET RETURNED TWICE")
        self.outstanding -= 1
        if self.outstanding == 0:
            self.returned.set()

    def VifReceiverSetOffloadOptions(self, Options: XenvifOffloadOptions) -> None:
        self.receiver_offload = Options

    def VifReceiverSetBackfillSize(self, Size: int) -> None:
        self.backfill = Size

    def VifReceiverQueryRingSize(self) -> int:
        return self.frontend.rx_ring_size

    def VifReceiverSetHashAlgorithm(self, Algorithm: int) -> NTSTATUS:
        return STATUS_NOT_SUPPORTED

    def VifReceiverQueryHashCapabilities(self) -> tuple[NTSTATUS, int]:
        return STATUS_NOT_SUPPORTED, 0

    def VifReceiverUpdateHashParameters(self, Types: int, Key: bytes) -> NTSTATUS:
        return STATUS_NOT_SUPPORTED

    def VifTransmitterQueuePacket(self, Data: bytes, OffloadOptions: XenvifOffloadOptions, MaximumSegmentSize: int,
                                  TagControlInformation: int, Hash: int, More: bool, Cookie: Any) -> NTSTATUS:
        return self.frontend.TransmitterQueuePacket(Data, OffloadOptions, MaximumSegmentSize, Hash, More, Cookie)

    def VifTransmitterQueryOffloadOptions(self) -> XenvifOffloadOptions:
        return self.frontend.transmitter_offload

    def VifTransmitterQueryLargePacketSize(self, Version: int) -> int:
        return self.frontend.large_packet_size if Version == 4 else 0

    def VifTransmitterQueryRingSize(self) -> int:
        return self.frontend.tx_ring_size

    def VifMacQueryState(self) -> tuple[bool, int, str]:
        """(MediaConnected, LinkSpeed in bits/s, Duplex)."""
        return self.frontend.online, self.frontend.speed, "FULL"

    def VifMacQueryMaximumFrameSize(self) -> int:
        return self.frontend.mtu + 14

    def VifMacQueryPermanentAddress(self) -> bytes:
        return self.frontend.permanent_address

    def VifMacQueryCurrentAddress(self) -> bytes:
        return self.frontend.current_address

    def VifMacQueryMulticastAddresses(self) -> list[bytes]:
        return list(self.multicast)

    def VifMacSetMulticastAddresses(self, Addresses: list[bytes]) -> NTSTATUS:
        self.multicast = list(Addresses)
        return STATUS_SUCCESS

    def VifMacSetFilterLevel(self, Type: int, Level: int) -> NTSTATUS:
        try:
            self.filter_level = XenvifMacFilterLevel(Level)
        except ValueError:
            return STATUS_INVALID_PARAMETER
        return STATUS_SUCCESS

    def VifMacQueryFilterLevel(self, Type: int) -> int:
        return self.filter_level
