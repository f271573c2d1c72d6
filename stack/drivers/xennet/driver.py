"""xennet.sys DriverEntry, AddDevice and the adapter (XN src/xennet/adapter.c, transmitter.c, receiver.c).

The INF binds `XENVIF\\VEN_<VendorName>&DEV_NET&REV_<XENNET_BINDS_XENVIF_REVISION>`; AddDevice queries
VIF at that revision's version (10) from the XENVIF PDO at PASSIVE_LEVEL. START_DEVICE acquires VIF and
Enables it with the adapter's callback: TX_RETURN completes sends, RX_QUEUE hands a frame to the IPv4
layer (and returns it), MAC_STATE_CHANGE announces the address three times (gratuitous ARP), which is
XV's after-resume advertisement. REMOVE_DEVICE disables and releases.

The adapter object (`XennetAdapter`) is what the agent's `net` commands and tests drive: send/receive
Ethernet frames, and the IPv4 layer in `ip.py`. Every entry point expects the kernel lock held.

As XN's adapter.c, the adapter also takes SUSPEND (delegated by the XENVIF PDO to XENBUS) while enabled
and registers a LATE callback with it (AdapterSetDistribution). The NDIS side of power is modelled where
it calls the miniport: a system power IRP below S0 pauses the miniport (MiniportPause, AdapterDisable)
before it reaches the bus, S0 restarts it (MiniportRestart, AdapterEnable), and S5 then shuts it down
(MiniportShutdownEx, AdapterDisable again: NDIS may call it in any state, Paused included). A second
AdapterDisable returns at once; before 0e04a15 (switch `xennet-0e04a15`) it went on and deregistered the
callback handle the first one had set to NULL.
"""
from __future__ import annotations

import logging
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers import bugs
from xenpv.stack.drivers.interface import InterfaceTable
from xenpv.stack.drivers.revision import XENNET_BINDS_XENVIF_REVISION, XENVIF_REVISIONS
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_LATE, SUSPEND_GUID
from xenpv.stack.drivers.xenvif.vif import (GUID_XENVIF_VIF_INTERFACE, ReceiverQueueParameters, XenvifCallbackType,
                                      XenvifOffloadOptions, XenvifTransmitterPacketStatus)
from xenpv.stack.kernel import (IRP_MJ, IRP_MN_PNP, IRP_MN_POWER, POWER_STATE_TYPE, S0, S5, DeviceKind, DeviceObject,
                          DriverObject, Irp, IoAttachDeviceToDeviceStack, IoCompleteRequest, IoCreateDevice,
                          IoDeleteDevice, IoDetachDevice, IoSynchronousCallDriver, QueryInterfaceParameters, forward)
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_SUCCESS, STATUS_UNSUCCESSFUL, status_name

from .ip import Ipv4

log = logging.getLogger("stack.drivers.xennet")

GRATUITOUS_ARP_COUNT = 3
RAW_QUEUE_LIMIT = 256


def flow_hash(frame: bytes) -> int:
    """The hash XENVIF picks a transmit queue by (NDIS's RSS hash in XN): IPv4 addresses and protocol,
    plus the ports of an unfragmented TCP/UDP datagram, so one flow stays on one queue; 0 otherwise."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return 0
    ihl = (frame[14] & 0x0F) * 4
    key = frame[26:34] + frame[23:24]
    if int.from_bytes(frame[20:22], "big") & 0x3FFF == 0 and frame[23] in (6, 17):
        key += frame[14 + ihl:18 + ihl]
    return zlib.crc32(key)


@dataclass
class XennetAdapter:
    device: DeviceObject
    lower: DeviceObject
    vif: InterfaceTable
    instance: str
    suspend: InterfaceTable | None = None
    ip: Ipv4 | None = None
    enabled: bool = False
    initialized: bool = False  # MiniportInitializeEx succeeded: only then does NDIS halt the miniport
    paused: bool = False  # by NDIS for a system power transition, until MiniportRestart
    suspend_callback_late: Any = None
    statistics: dict[str, int] = field(default_factory=lambda: {
        "tx_queued": 0, "tx_ok": 0, "tx_dropped": 0, "tx_error": 0, "rx_frames": 0, "rx_octets": 0,
        "state_changes": 0, "announcements": 0})
    # Frames nobody above consumed, for callers that want raw Ethernet (bounded; the oldest go first).
    raw: deque[bytes] = field(default_factory=lambda: deque(maxlen=RAW_QUEUE_LIMIT))
    capture_raw: bool = False

    @property
    def mac(self) -> bytes:
        return self.vif.VifMacQueryCurrentAddress()

    @property
    def permanent_mac(self) -> bytes:
        return self.vif.VifMacQueryPermanentAddress()

    def AdapterEnable(self, seed: int) -> int:
        status = self.vif.VifAcquire()
        if not NT_SUCCESS(status):
            return status
        if self.suspend is not None:
            status = self.suspend.SuspendAcquire()
            if not NT_SUCCESS(status):
                self.vif.VifRelease()
                return status
            status = self.AdapterSetDistribution()
            if not NT_SUCCESS(status):
                self.suspend.SuspendRelease()
                self.vif.VifRelease()
                return status
        if self.ip is None:  # kept across a pause, with the address and the ARP cache
            self.ip = Ipv4(self.mac, self.send_frame, self.vif.VifMacQueryMaximumFrameSize() - 14, seed)
        status = self.vif.VifEnable(self._callback, self)
        if not NT_SUCCESS(status):
            if self.suspend is not None:
                self.AdapterClearDistribution()
                self.suspend.SuspendRelease()
            self.vif.VifRelease()
            return status
        self.enabled = True
        log.info("%s: enabled, mac %s", self.instance, self.mac.hex(":"))
        return STATUS_SUCCESS

    def AdapterDisable(self) -> None:
        if not self.enabled and not bugs.enabled("xennet-0e04a15"):
            return  # 0e04a15: `if (!Adapter->Enabled) return;` (it was ASSERT(Adapter->Enabled))
        self.enabled = False
        self.vif.VifDisable()
        if self.suspend is not None:
            self.AdapterClearDistribution()
            self.suspend.SuspendRelease()
        self.vif.VifRelease()

    def AdapterSetDistribution(self) -> int:
        assert self.suspend is not None
        status, self.suspend_callback_late = self.suspend.SuspendRegister(SUSPEND_CALLBACK_LATE,
                                                                          self._suspend_late, self)
        return status

    def AdapterClearDistribution(self) -> None:
        assert self.suspend is not None
        self.suspend.SuspendDeregister(self.suspend_callback_late)
        self.suspend_callback_late = None

    def _suspend_late(self, _argument: Any) -> None:
        """AdapterSuspendCallbackLate: the receive-side scaling distribution is set again after a resume;
        the model has one processor and no RSS, so there is nothing to redistribute."""

    def send_frame(self, frame: bytes) -> bool:
        status = self.vif.VifTransmitterQueuePacket(frame, XenvifOffloadOptions(), 0, 0, flow_hash(frame), False,
                                                    frame)
        self.statistics["tx_queued"] += 1
        if not NT_SUCCESS(status):
            self.statistics["tx_dropped"] += 1
            return False
        return True

    def _callback(self, _argument: Any, kind: int, parameters: Any) -> None:
        if kind == XenvifCallbackType.XENVIF_TRANSMITTER_RETURN_PACKET:
            name = {XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_OK: "tx_ok",
                    XenvifTransmitterPacketStatus.XENVIF_TRANSMITTER_PACKET_DROPPED: "tx_dropped"}.get(
                parameters.Status, "tx_error")
            self.statistics[name] += 1
        elif kind == XenvifCallbackType.XENVIF_RECEIVER_QUEUE_PACKET:
            self._receive(parameters)
        elif kind == XenvifCallbackType.XENVIF_MAC_STATE_CHANGE:
            self.statistics["state_changes"] += 1
            self.announce()

    def _receive(self, packet: ReceiverQueueParameters) -> None:
        try:
            self.statistics["rx_frames"] += 1
            self.statistics["rx_octets"] += len(packet.Data)
            if self.capture_raw:
                self.raw.append(packet.Data)
            if self.ip is not None:
                self.ip.on_frame(packet.Data)
                if not packet.More:
                    self.ip.end_of_batch()
        finally:
            self.vif.VifReceiverReturnPacket(packet.Cookie)

    def announce(self) -> None:
        """Gratuitous ARP, as XV does for the adapter's addresses after a resume."""
        online, _, _ = self.vif.VifMacQueryState()
        if online and self.ip is not None and self.ip.interface is not None:
            for _ in range(GRATUITOUS_ARP_COUNT):
                self.ip.gratuitous_arp()
            self.statistics["announcements"] += 1


@dataclass
class XennetDriver:
    seed: int = 0
    adapters: list[XennetAdapter] = field(default_factory=list)

    def add_device(self, driver: DriverObject, pdo: DeviceObject) -> int:
        device = IoCreateDevice(driver, DeviceKind.FDO, name="XENNET adapter")
        lower = IoAttachDeviceToDeviceStack(device, pdo)
        version = XENVIF_REVISIONS[XENNET_BINDS_XENVIF_REVISION]["VIF"]
        irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(GUID_XENVIF_VIF_INTERFACE, 4096, version,
                                                                           None))
        status = IoSynchronousCallDriver(lower, irp)
        if not NT_SUCCESS(status) or irp.parameters.interface is None:
            log.error("AdapterInitialize: VIF v%d: %s", version, status_name(status))
            IoDetachDevice(lower)
            IoDeleteDevice(device)
            return status if not NT_SUCCESS(status) else STATUS_UNSUCCESSFUL
        instance = str(pdo.device_node.instance_id) if pdo.device_node is not None else "?"
        suspend_version = XENVIF_REVISIONS[XENNET_BINDS_XENVIF_REVISION]["SUSPEND"]
        query = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(SUSPEND_GUID, 4096, suspend_version,
                                                                             None))
        status = IoSynchronousCallDriver(lower, query)
        if not NT_SUCCESS(status) or query.parameters.interface is None:
            log.error("AdapterInitialize: SUSPEND v%d: %s", suspend_version, status_name(status))
            IoDetachDevice(lower)
            IoDeleteDevice(device)
            return status if not NT_SUCCESS(status) else STATUS_UNSUCCESSFUL
        device.extension = XennetAdapter(device, lower, irp.parameters.interface, instance,
                                         suspend=query.parameters.interface)
        self.adapters.append(device.extension)
        return STATUS_SUCCESS

    def dispatch_pnp(self, device: DeviceObject, irp: Irp) -> int:
        adapter: XennetAdapter = device.extension
        if irp.minor == IRP_MN_PNP.START_DEVICE:
            status = IoSynchronousCallDriver(adapter.lower, irp)
            if NT_SUCCESS(status):
                status = irp.io_status.status = adapter.AdapterEnable(self.seed)
                adapter.initialized = NT_SUCCESS(status)
            IoCompleteRequest(irp)
            return status
        # A miniport whose START failed below it (XENVIF's STATUS_PNP_REBOOT_REQUIRED) was never
        # initialized: NDIS neither halts nor shuts it down.
        if irp.minor in (IRP_MN_PNP.REMOVE_DEVICE, IRP_MN_PNP.SURPRISE_REMOVAL) and adapter.initialized:
            adapter.AdapterDisable()
        if irp.minor == IRP_MN_PNP.REMOVE_DEVICE:
            if adapter in self.adapters:
                self.adapters.remove(adapter)
            status = forward(irp, adapter.lower)
            IoDetachDevice(adapter.lower)
            IoDeleteDevice(device)
            return status
        return forward(irp, adapter.lower)

    def dispatch_power(self, device: DeviceObject, irp: Irp) -> int:
        """NDIS's part of a system power transition, before the IRP goes down: MiniportPause below S0
        (and MiniportShutdownEx after it for S5), MiniportRestart back at S0."""
        adapter: XennetAdapter = device.extension
        params = irp.parameters
        if (irp.minor == IRP_MN_POWER.SET_POWER and params is not None
                and params.type == POWER_STATE_TYPE.SystemPowerState):
            if params.state != S0 and adapter.enabled:
                adapter.AdapterDisable()  # MiniportPause
                adapter.paused = True
            if params.state == S5:
                adapter.AdapterDisable()  # MiniportShutdownEx, in whatever state the miniport is
            elif params.state == S0 and adapter.paused:
                adapter.paused = False
                status = adapter.AdapterEnable(self.seed)  # MiniportRestart
                if not NT_SUCCESS(status):
                    log.error("%s: MiniportRestart: %s", adapter.instance, status_name(status))
        return forward(irp, device.extension.lower)


def DriverEntry(driver: DriverObject, registry_path: str) -> int:
    xennet = XennetDriver()
    driver.major_function[IRP_MJ.PNP] = xennet.dispatch_pnp
    driver.major_function[IRP_MJ.POWER] = xennet.dispatch_power
    driver.add_device = xennet.add_device
    driver.extension = xennet
    return STATUS_SUCCESS
