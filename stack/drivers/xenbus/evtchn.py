"""XENBUS EVTCHN interface v5-v9 (reference windows-pv-drivers.md 1 and 7).

Channels are opened by type - FIXED (a port someone else allocated), UNBOUND (a new port a remote
domain may bind), INTER_DOMAIN (bind a remote domain's unbound port) or VIRQ - with a KSERVICE_ROUTINE
`Callback(Interrupt, Argument)` that runs at device IRQL.

Dispatch follows the driver's EvtchnPoll: the platform's UpcallDispatcher (the 2-level scan on its
interrupt thread) hands each pending, unmasked port to this interface; a delivery thread - the
platform interrupt line - fires the FDO's kernel interrupt, whose ISR then, per channel, masks the port
(if the channel was opened with Mask), acknowledges it, increments Count and calls the callback at
DIRQL. The hand-off exists because the upcall thread must never wait for the kernel lock: it also
carries the xenstore ring's notifications, which the thread holding the kernel lock may be waiting for.

Trigger and a forced Unmask of a pending port deliver locally through the same ISR path, synchronously
when the IRQL allows. On the SUSPEND EARLY callback every channel becomes inactive (its port belongs to
the old domain): children must close and re-open their channels after resume, as on Windows.

Simplifications: one vCPU, so Bind only accepts group 0 / processor 0; the FIFO ABI is not modelled
(xenhv has 2-level channels only); Wait's Timeout is in seconds (None = for ever) instead of a relative
LARGE_INTEGER of 100 ns units.
"""
from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from xenpv.stack.drivers import bugs
from xenpv.stack.drivers.interface import Interface, InterfaceTable, acquire_all
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.drivers.xenbus.shared_info import SharedInfoInterface
from xenpv.stack.drivers.xenbus.suspend import (SUSPEND_CALLBACK_EARLY, SUSPEND_CALLBACK_LATE, SuspendCallback,
                                                SuspendInterface)
from xenpv.stack.kernel.assertion import ASSERT
from xenpv.stack.kernel.bugcheck import BUG, BugCheck
from xenpv.stack.kernel.dpc import (KDpc, IoConnectInterrupt, IoDisconnectInterrupt, KeInitializeDpc, KeInsertQueueDpc,
                                    KeRemoveQueueDpc, KInterrupt)
from xenpv.stack.kernel.event import KEvent, KeWaitForSingleObject, wait_for_thread
from xenpv.stack.kernel.irql import DIRQL, DISPATCH_LEVEL, KeGetCurrentIrql, KeLowerIrql, KeRaiseIrql, current_processor
from xenpv.stack.kernel.pool import POOL_TYPE, ExAllocatePoolWithTag, ExFreePoolWithTag, PoolBlock, pool_tag
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_INVALID_PARAMETER, STATUS_SUCCESS, STATUS_TIMEOUT, NTSTATUS
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import xen as X

log = logging.getLogger("stack.drivers.xenbus.evtchn")

EVTCHN_GUID = uuid.UUID("BE2440AC-1098-4150-AF4D-452FADCEF923")
HASH_TABLE_TAG = pool_tag("HTab")  # hash_table.c: one node per hashed port
HASH_TABLE_NODE_SIZE = 32

# KSERVICE_ROUTINE: Callback(Interrupt, Argument) -> BOOLEAN
ServiceRoutine = Callable[[KInterrupt | None, Any], bool]

_addresses = itertools.count(0xFFFFE000_01200000, 0x80)

class EvtchnType(IntEnum):
    EVTCHN_FIXED = 1
    EVTCHN_UNBOUND = 2
    EVTCHN_INTER_DOMAIN = 3
    EVTCHN_VIRQ = 4


EVTCHN_FIXED = EvtchnType.EVTCHN_FIXED
EVTCHN_UNBOUND = EvtchnType.EVTCHN_UNBOUND
EVTCHN_INTER_DOMAIN = EvtchnType.EVTCHN_INTER_DOMAIN
EVTCHN_VIRQ = EvtchnType.EVTCHN_VIRQ


@dataclass(eq=False)
class EvtchnChannel:
    """XENBUS_EVTCHN_CHANNEL."""

    Type: EvtchnType
    Callback: ServiceRoutine
    Argument: Any
    LocalPort: int
    Mask: bool = False
    RemoteDomain: int | None = None
    RemotePort: int | None = None
    Index: int | None = None
    Count: int = 0
    Active: bool = True
    address: int = field(default_factory=lambda: next(_addresses))
    delivered: KEvent = field(default_factory=lambda: KEvent("evtchn delivered", synchronization=True))

    def __str__(self) -> str:
        return f"EVTCHN_CHANNEL({self.Type.name} port {self.LocalPort})"


class EvtchnInterface(Interface):
    """v5 and v6 have no GetCount and wait for the next event (WaitVersion5); v5-v7 unmask with
    UnmaskVersion4 (always forced, no result); v5 sends with SendVersion1 (which raises to DISPATCH_LEVEL
    itself); before v9 Open takes a VIRQ's Index alone (evtchn.c EvtchnOpen: `Interface->Version < 9`)."""

    NAME = "EVTCHN"
    GUID = EVTCHN_GUID
    TABLES = LAYOUTS["EVTCHN"]

    def __init__(self, platform: XenPlatform, debug: DebugInterface, suspend: SuspendInterface,
                 shared_info: SharedInfoInterface) -> None:
        super().__init__()
        self.platform = platform
        self.debug = debug
        self.suspend = suspend
        self.shared_info = shared_info
        self.channels: list[EvtchnChannel] = []
        self._ports: dict[int, EvtchnChannel] = {}
        # The port hash table's nodes (hash_table.c). A removed node is freed by a DPC, not in place:
        # removal happens in the EARLY callback, at HIGH_LEVEL, where no pool may be freed (55384e7).
        self._nodes: dict[int, PoolBlock] = {}
        self._removed_nodes: list[PoolBlock] = []
        self._hash_table_dpc: KDpc = KeInitializeDpc(self._free_removed_nodes, None, module="xenbus.sys")
        self._pending: deque[int] = deque()
        self._pending_lock = threading.Lock()
        self._line_wake = threading.Event()
        self._line: threading.Thread | None = None
        self._stopping = False
        self._interrupt: KInterrupt | None = None
        self._hypercalls: Hypercalls | None = None
        self._scratch: list[int] = []
        self._hypercall_lock = threading.Lock()
        self._debug_callback: DebugCallback | None = None
        self._suspend_callback: SuspendCallback | None = None
        self._suspend_callback_late: SuspendCallback | None = None

    # -- Acquire/Release --------------------------------------------------------------------------

    def setup(self) -> int:
        status = acquire_all((self.suspend, self.debug, self.shared_info))
        if not NT_SUCCESS(status):
            return status
        # Hypercall arguments travel through a page of guest RAM; this interface gets its own so that
        # the interrupt thread's Send cannot overwrite the argument of another thread's hypercall.
        self._scratch = self.platform.pages.alloc()
        self._hypercalls = Hypercalls(self.platform.vcpu, self._scratch[0] << 12)
        self._interrupt = IoConnectInterrupt(self._service, None, irql=DIRQL, module="xenbus.sys")
        self._stopping = False
        self._line = threading.Thread(target=self._run_line, name="xenbus-evtchn-line", daemon=True)
        self._line.start()
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|EVTCHN", self._dump, None)
        _, self._suspend_callback = self.suspend.SuspendRegister(SUSPEND_CALLBACK_EARLY, self._suspend_early,
                                                                 None)
        _, self._suspend_callback_late = self.suspend.SuspendRegister(SUSPEND_CALLBACK_LATE, self._suspend_late,
                                                                      None)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        if self.channels:
            BUG("OUTSTANDING EVENT CHANNELS")  # evtchn.c EvtchnRelease
        assert self._suspend_callback is not None and self._debug_callback is not None
        assert self._interrupt is not None and self._line is not None
        assert self._suspend_callback_late is not None
        self.suspend.SuspendDeregister(self._suspend_callback_late)
        self.suspend.SuspendDeregister(self._suspend_callback)
        self.debug.DebugDeregister(self._debug_callback)
        IoDisconnectInterrupt(self._interrupt)
        self._stopping = True
        self._line_wake.set()
        # The line may be firing (waiting for the kernel lock): wait_for_thread gives the lock away. The
        # scratch page is its hypercall argument page, so it is freed only once the line has ended.
        wait_for_thread(self._line, "XENBUS EVTCHN teardown")
        KeRemoveQueueDpc(self._hash_table_dpc)
        self._free_removed_nodes(self._hash_table_dpc, None, None, None)
        self.platform.pages.free(self._scratch)
        self._scratch, self._hypercalls, self._interrupt, self._line = [], None, None, None
        self._suspend_callback = self._suspend_callback_late = self._debug_callback = None
        for dependency in (self.shared_info, self.debug, self.suspend):
            dependency.release()

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        for channel in self.channels:
            self.debug.DebugPrintf("%s: Count = %u Mask = %s Active = %s", channel, channel.Count, channel.Mask,
                                   channel.Active)

    def _suspend_early(self, _argument: Any) -> None:
        # The ports belonged to the old domain: stop delivering them. Closing is left to the owners.
        for channel in self.channels:
            if channel.Active:
                channel.Active = False
                self._unhash(channel)

    def _suspend_late(self, _argument: Any) -> None:
        """EvtchnSuspendCallbackLate: the 2-level ABI has nothing of its own to set up again (the FIFO ABI's
        control blocks would be re-initialised here); the upcall (EvtchnInterruptDisable/Enable) is the vCPU's
        eventfd, which followed it into the new domain, so an upcall that came before this point is
        looked for once more."""
        self.platform.upcalls.scan()
        log.info("EVTCHN: LATE: 2-level ABI, upcall re-enabled")

    # -- delivery ---------------------------------------------------------------------------------

    def _upcall(self, port: int) -> None:
        """On the platform's upcall thread: hand the port to the interrupt line, never blocking."""
        with self._pending_lock:
            self._pending.append(port)
        self._line_wake.set()

    def _run_line(self) -> None:
        while True:
            self._line_wake.wait()
            self._line_wake.clear()
            if self._stopping:
                return
            interrupt = self._interrupt
            if interrupt is None:
                continue
            try:
                interrupt.fire()
            except BugCheck as stop:
                # The guest stopped (in this ISR's DPC or elsewhere): the STOP reaches the main thread
                # through the processor; an interrupt line of a stopped machine delivers nothing more.
                log.info("interrupt line ends: %s", stop.describe())
                return
            except HarnessTooSlow as late:
                # A deadline of the harness passed in the ISR or a DPC (a trap xenhv did not answer, say):
                # the processor stops and the main thread reports it; nothing more is delivered.
                current_processor().give_up(late)
                log.info("interrupt line ends: %s", late)
                return
            except Exception:
                # The ISR and DPCs turn their own exceptions into a STOP (dpc.py), so this is the model's
                # own failure: report it and keep the line alive, or every later event would be lost.
                log.exception("interrupt line: delivering the XENBUS interrupt failed")

    def _service(self, interrupt: KInterrupt, _context: Any) -> bool:
        """The ISR: mask (if Mask) -> ack -> Count++ -> callback, for each queued port."""
        claimed = False
        while True:
            with self._pending_lock:
                if not self._pending:
                    return claimed
                port = self._pending.popleft()
            channel = self._ports.get(port)
            if channel is None or not channel.Active:
                log.debug("event on port %d with no active channel dropped", port)
                continue
            if channel.Mask:
                self.shared_info.SharedInfoEvtchnMask(port)
            self.shared_info.SharedInfoEvtchnAck(port)
            channel.Count = (channel.Count + 1) & 0xFFFFFFFF
            channel.Callback(interrupt, channel.Argument)
            channel.delivered.set()
            claimed = True

    def _deliver_locally(self, channel: EvtchnChannel) -> None:
        with self._pending_lock:
            self._pending.append(channel.LocalPort)
        assert self._interrupt is not None
        self._interrupt.fire()

    def _hash(self, channel: EvtchnChannel) -> None:
        self._nodes[channel.LocalPort] = ExAllocatePoolWithTag(POOL_TYPE.NonPagedPool, HASH_TABLE_NODE_SIZE,
                                                               HASH_TABLE_TAG, contents=channel)
        self._ports[channel.LocalPort] = channel
        self.platform.upcalls.bind(channel.LocalPort, self._upcall)

    def _unhash(self, channel: EvtchnChannel) -> None:
        if self._ports.get(channel.LocalPort) is channel:
            del self._ports[channel.LocalPort]
            self.platform.upcalls.unbind(channel.LocalPort)
            self.HashTableRemove(channel.LocalPort)

    def HashTableRemove(self, port: int) -> None:
        """Unlink the port's node; its memory goes to the DPC (55384e7: it was freed right here)."""
        node = self._nodes.pop(port, None)
        if node is None:
            return
        if bugs.enabled("xenbus-55384e7"):
            ExFreePoolWithTag(node, HASH_TABLE_TAG)
        else:
            self._removed_nodes.append(node)
            KeInsertQueueDpc(self._hash_table_dpc)

    def _free_removed_nodes(self, _dpc: Any, _context: Any, _argument1: Any, _argument2: Any) -> None:
        """HashTableDpc: free the nodes removed since it last ran (at DISPATCH_LEVEL)."""
        while self._removed_nodes:
            ExFreePoolWithTag(self._removed_nodes.pop(), HASH_TABLE_TAG)

    def _hypercall(self, op: int, argument: Any) -> tuple[int, Any]:
        assert self._hypercalls is not None
        with self._hypercall_lock:
            return self._hypercalls.op(X.HYPERCALL_NUMBERS["event_channel_op"], op, argument)

    # -- members ----------------------------------------------------------------------------------

    def get_interface(self, version: int, size: int) -> tuple[int, InterfaceTable | None]:
        status, interface = super().get_interface(version, size)
        if interface is not None and version < 9:
            interface.methods["EvtchnOpen"] = self._open_v8
        return status, interface

    def _open_v8(self, Type: int, Callback: ServiceRoutine, Argument: Any, *Parameters: Any) -> EvtchnChannel | None:
        if Type == EVTCHN_VIRQ and len(Parameters) != 1:
            raise TypeError("EVTCHN before v9: a VIRQ channel takes its Index only")
        return self.EvtchnOpen(Type, Callback, Argument, *Parameters)

    def EvtchnOpen(self, Type: int, Callback: ServiceRoutine, Argument: Any, *Parameters: Any) -> EvtchnChannel | None:
        """FIXED (LocalPort, Mask); UNBOUND (RemoteDomain, Mask); INTER_DOMAIN (RemoteDomain, RemotePort,
        Mask); VIRQ (Index[, Group, Number]). Returns the channel, or None (NULL) on failure."""
        kind = EvtchnType(Type)
        channel = EvtchnChannel(kind, Callback, Argument, LocalPort=-1)
        if kind == EVTCHN_FIXED:
            channel.LocalPort, channel.Mask = Parameters
        elif kind == EVTCHN_UNBOUND:
            channel.RemoteDomain, channel.Mask = Parameters
            rc, out = self._hypercall(E.EVTCHNOP_alloc_unbound,
                                      E.EvtchnAllocUnbound(dom=E.DOMID_SELF, remote_dom=channel.RemoteDomain))
            channel.LocalPort = out.port
        elif kind == EVTCHN_INTER_DOMAIN:
            channel.RemoteDomain, channel.RemotePort, channel.Mask = Parameters
            rc, out = self._hypercall(E.EVTCHNOP_bind_interdomain,
                                      E.EvtchnBindInterdomain(remote_dom=channel.RemoteDomain,
                                                              remote_port=channel.RemotePort))
            channel.LocalPort = out.local_port
        else:
            channel.Index = Parameters[0]
            group, number = Parameters[1:] if len(Parameters) == 3 else (0, 0)
            if (group, number) != (0, 0):
                log.warning("VIRQ %d: no processor %d:%d (one vCPU)", channel.Index, group, number)
                return None
            rc, out = self._hypercall(E.EVTCHNOP_bind_virq, E.EvtchnBindVirq(virq=channel.Index, vcpu=0))
            channel.LocalPort = out.port
        if kind != EVTCHN_FIXED and rc:
            log.warning("open %s %s failed: %d", kind.name, Parameters, rc)
            return None
        if channel.LocalPort in self._ports:
            log.warning("open %s: port %d already has a channel", kind.name, channel.LocalPort)
            return None
        self.channels.append(channel)
        self._hash(channel)
        log.info("opened %s", channel)
        return channel

    def EvtchnBind(self, Channel: EvtchnChannel, Group: int, Number: int) -> NTSTATUS:
        if (Group, Number) != (0, 0):
            return STATUS_INVALID_PARAMETER
        return STATUS_SUCCESS

    def EvtchnUnmask(self, Channel: EvtchnChannel, InCallback: bool, Force: bool) -> bool:
        """Unmask the port. If an event arrived while it was masked: with Force it is delivered through
        the ISR again (FALSE: nothing left pending); without, TRUE tells the caller to handle it."""
        if not Channel.Active:
            return False
        pending = self.shared_info.SharedInfoEvtchnUnmask(Channel.LocalPort)
        if not pending or not Force:
            return pending
        self.shared_info.SharedInfoEvtchnAck(Channel.LocalPort)
        # From inside the callback (at DIRQL) the re-delivery stays pending until the callback returns;
        # InCallback needs no other handling because the kernel lock stands in for the channel lock.
        self._deliver_locally(Channel)
        return False

    def EvtchnUnmaskVersion4(self, Channel: EvtchnChannel, InCallback: bool) -> None:
        """v5-v7: EvtchnUnmask with Force, its result dropped (evtchn.c EvtchnUnmaskVersion4)."""
        self.EvtchnUnmask(Channel, InCallback, True)

    def EvtchnSend(self, Channel: EvtchnChannel) -> None:
        """Notify the remote end. The caller keeps the domain from suspending by being at DISPATCH_LEVEL
        or above (evtchn.c EvtchnSend: an ASSERT, so only a checked build stops a caller below it)."""
        ASSERT(KeGetCurrentIrql() >= DISPATCH_LEVEL, "KeGetCurrentIrql() >= DISPATCH_LEVEL")
        if Channel.Active:
            rc, _ = self._hypercall(E.EVTCHNOP_send, E.EvtchnSend(port=Channel.LocalPort))
            if rc:
                log.warning("send on %s failed: %d", Channel, rc)

    def EvtchnSendVersion1(self, Channel: EvtchnChannel) -> None:
        """v5: raises to DISPATCH_LEVEL itself, so it may be called from any IRQL up to there."""
        old = KeRaiseIrql(DISPATCH_LEVEL)
        try:
            self.EvtchnSend(Channel)
        finally:
            KeLowerIrql(old)

    def EvtchnTrigger(self, Channel: EvtchnChannel) -> None:
        """Deliver an event locally, as if the remote end had sent one."""
        if Channel.Active:
            self._deliver_locally(Channel)

    def EvtchnGetCount(self, Channel: EvtchnChannel) -> int:
        return Channel.Count

    def EvtchnWait(self, Channel: EvtchnChannel, Count: int, Timeout: float | None) -> NTSTATUS:
        """Wait until the channel's Count reaches Count (modulo 2^32, as the ULONG compare does). Up to
        DISPATCH_LEVEL (evtchn.c EvtchnWait: an ASSERT)."""
        ASSERT(KeGetCurrentIrql() <= DISPATCH_LEVEL, "KeGetCurrentIrql() <= DISPATCH_LEVEL")
        while ((Channel.Count - Count) & 0xFFFFFFFF) >= 0x80000000:
            if KeWaitForSingleObject(Channel.delivered, Timeout) == STATUS_TIMEOUT:
                return STATUS_TIMEOUT
        return STATUS_SUCCESS

    def EvtchnWaitVersion5(self, Channel: EvtchnChannel, Timeout: float | None) -> NTSTATUS:
        """v5/v6: wait for the next event after the call (evtchn.c EvtchnWaitVersion5: Count + 1)."""
        return self.EvtchnWait(Channel, (self.EvtchnGetCount(Channel) + 1) & 0xFFFFFFFF, Timeout)

    def EvtchnGetPort(self, Channel: EvtchnChannel) -> int:
        """evtchn.c EvtchnGetPort: ASSERT(Channel->Active); a free build returns the old domain's port."""
        ASSERT(Channel.Active, "Channel->Active")
        return Channel.LocalPort

    def EvtchnClose(self, Channel: EvtchnChannel) -> None:
        # evtchn.c EvtchnClose: ASSERT3U(Channel->Magic, ==, XENBUS_EVTCHN_CHANNEL_MAGIC) stops a checked build
        # on a channel closed before; the free build's use of freed pool is the model's BUG.
        ASSERT(Channel in self.channels, "Channel->Magic == XENBUS_EVTCHN_CHANNEL_MAGIC")
        if Channel not in self.channels:
            BUG("UNKNOWN CHANNEL")
        self.channels.remove(Channel)
        if Channel.Active:
            self._unhash(Channel)
            # A FIXED port was allocated by someone else (the toolstack, say): it is not ours to close.
            if Channel.Type != EVTCHN_FIXED:
                rc, _ = self._hypercall(E.EVTCHNOP_close, E.EvtchnClose(port=Channel.LocalPort))
                if rc:
                    log.warning("close of %s failed: %d", Channel, rc)
            Channel.Active = False
        log.info("closed %s", Channel)

