"""2-level event channels with Xen's semantics (shared/reference/xen-abi.md section 8).

Model
-----
:class:`EventChannelHub` holds every domain's :class:`EventChannels` (domid -> port table) and one re-entrant
lock that serialises all port-table changes, so interdomain operations see both ends consistently.  An
operation is a method of the *calling* domain's table, as a hypercall runs in its caller's context::

    hub = EventChannelHub()
    dom0 = hub.create(0, privileged=True)
    guest = hub.create(1, shared_info=page_view, upcall=domain.upcall, max_ports=1023)
    port = guest.alloc_unbound(DOMID_SELF, 0)
    backend_port = dom0.bind_interdomain(1, port)
    dom0.send(backend_port)          # sets `port` pending in the guest's shared_info, may call upcall()
    hub.destroy(1)                   # closes every port; dom0's end reverts to UNBOUND

Failures raise :class:`~backends.xenhv.errors.XenError` with Xen's errno; the hypercall layer returns
``-errno``.  Every port, vcpu, virq and domid is checked before use: they come from the guest.

Delivery
--------
A port is delivered in one of two ways:

* Through the 2-level bitmaps of the domain's shared_info page, the guest's ABI: the port's pending bit, its
  mask bit, the notified vcpu's ``evtchn_pending_sel`` and ``evtchn_upcall_pending``.  The guest changes the
  same words from its own process, so every update is a real atomic operation (:mod:`xenabi.atomic`).
  When ``evtchn_upcall_pending`` goes from 0 to 1 the domain's ``upcall`` hook runs (it wakes the guest's
  interrupt thread, e.g. by writing an eventfd).  The guest clears ``evtchn_upcall_pending`` before it scans,
  so the next event raises it, and calls the hook, again.
* Out of band, when a notifier is set on the port (:meth:`EventChannels.set_port_notifier`): for example
  dom0's end of a channel to a vhost-user back-end, whose kick eventfd is the notification.  Such a port
  bypasses the bitmaps: every set-pending calls the notifier.  An eventfd coalesces like a pending bit, and
  its reader consumes it; a bit nobody clears would instead swallow every later event.

A domain created without a shared_info page (dom0-style, or a guest that has not mapped it yet) keeps its
bits in a private page; :meth:`EventChannels.attach_shared_info` moves to the real page, carrying over what
is pending.  Hooks run with the hub lock held: they must not block.
"""
from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xenpv.xenabi import evtchn_2l
from xenpv.xenabi.evtchn_2l import (MASK, PENDING, PENDING_SEL, PENDING_SEL_BYTES, SHARED_INFO_SIZE, UPCALL_PENDING,
                                   UPCALL_PENDING_BYTES, WORD_BYTES, vcpu_offset)
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.backends.xenhv.errors import XenError
from xenpv.xenabi.event_channel import (
    DOMID_FIRST_RESERVED,
    DOMID_SELF,
    EVTCHN_2L_NR_CHANNELS,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
    NR_VIRQS,
    VIRQ_DEBUG,
    VIRQ_TIMER,
    VIRQ_XENOPROF,
    VIRQ_XENPMU,
    EvtchnStatus,
)
from xenpv.xenabi.xen import (
    EVTCHN_WORD_BITS,
    EVTCHN_WORDS,
    XEN_EEXIST,
    XEN_EINVAL,
    XEN_ENOENT,
    XEN_ENOSPC,
    XEN_EPERM,
    XEN_ESRCH,
    XEN_LEGACY_MAX_VCPUS,
)

log = logging.getLogger("xenhv.evtchn")

_PAGE_SIZE = 4096

# Xen binds these per vcpu; every other VIRQ is global and may only be bound on vcpu 0.
PER_VCPU_VIRQS = frozenset({VIRQ_TIMER, VIRQ_DEBUG, VIRQ_XENOPROF, VIRQ_XENPMU})


class PortState(enum.IntEnum):
    """Port states, numbered as EVTCHNSTAT_* (pirq is not modelled: HVM guests here have no pirqs)."""

    CLOSED = EVTCHNSTAT_closed
    UNBOUND = EVTCHNSTAT_unbound
    INTERDOMAIN = EVTCHNSTAT_interdomain
    VIRQ = EVTCHNSTAT_virq
    IPI = EVTCHNSTAT_ipi


@dataclass
class _Channel:
    state: PortState
    vcpu: int = 0
    # UNBOUND: the domain allowed to bind; INTERDOMAIN: the peer domain and its port.
    remote_dom: int = 0
    remote_port: int = 0
    virq: int = 0
    notifier: Callable[[], None] | None = None


@dataclass(frozen=True)
class PortStatus:
    """The EVTCHNOP_status answer; fields that do not apply to ``state`` are None."""

    state: PortState
    vcpu: int
    remote_dom: int | None = None
    remote_port: int | None = None
    virq: int | None = None

    def fill(self, out: EvtchnStatus) -> None:
        """Write the OUT fields of an ``evtchn_status`` structure."""
        out.status = int(self.state)
        out.vcpu = self.vcpu
        if self.state is PortState.UNBOUND:
            out.u.unbound.dom = self.remote_dom or 0
        elif self.state is PortState.INTERDOMAIN:
            out.u.interdomain.dom = self.remote_dom or 0
            out.u.interdomain.port = self.remote_port or 0
        elif self.state is PortState.VIRQ:
            out.u.virq = self.virq or 0


class EventChannelHub:
    """Every domain's port table, so interdomain operations can find the peer, and the lock they share."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._domains: dict[int, EventChannels] = {}

    def create(self, domid: int, *, privileged: bool = False, upcall: Callable[[], None] | None = None,
               shared_info: memoryview | None = None, max_ports: int = EVTCHN_2L_NR_CHANNELS,
               max_vcpus: int = 1) -> EventChannels:
        """Register a domain's port table.  ``max_ports`` bounds port numbers (ports 0..max_ports-1)."""
        with self.lock:
            if not 0 <= domid < DOMID_FIRST_RESERVED:
                raise ValueError(f"domid {domid} is reserved or out of range")
            if domid in self._domains:
                raise ValueError(f"dom{domid} already has event channels")
            channels = EventChannels(self, domid, privileged=privileged, upcall=upcall,
                                     shared_info=shared_info, max_ports=max_ports, max_vcpus=max_vcpus)
            self._domains[domid] = channels
            return channels

    def get(self, domid: int) -> EventChannels | None:
        return self._domains.get(domid)

    def destroy(self, domid: int) -> None:
        """Domain destruction: close every port (peers' ends revert to UNBOUND), then forget the domain."""
        with self.lock:
            channels = self._domains.get(domid)
            if channels is None:
                return
            channels.close_all()
            del self._domains[domid]
            channels.release()

    def __iter__(self) -> Iterator[EventChannels]:
        return iter(list(self._domains.values()))


class EventChannels:
    """One domain's event channel ports.  Create through :meth:`EventChannelHub.create`."""

    def __init__(self, hub: EventChannelHub, domid: int, *, privileged: bool,
                 upcall: Callable[[], None] | None, shared_info: memoryview | None,
                 max_ports: int, max_vcpus: int) -> None:
        if not 1 <= max_ports <= EVTCHN_2L_NR_CHANNELS:
            raise ValueError(f"max_ports {max_ports} is not in 1..{EVTCHN_2L_NR_CHANNELS}")
        # vcpu_info beyond the legacy array needs VCPUOP_register_vcpu_info, which is not modelled.
        if not 1 <= max_vcpus <= XEN_LEGACY_MAX_VCPUS:
            raise ValueError(f"max_vcpus {max_vcpus} is not in 1..{XEN_LEGACY_MAX_VCPUS}")
        self._hub = hub
        self.domid = domid
        self.privileged = privileged
        self.max_ports = max_ports
        self.max_vcpus = max_vcpus
        self._upcall = upcall
        self._ports: dict[int, _Channel] = {}
        self._virq_ports: dict[tuple[int, int], int] = {}  # (vcpu, virq) -> port
        self._shared_info = self._atomic_page(shared_info if shared_info is not None else bytearray(_PAGE_SIZE))
        self._private_page = shared_info is None

    # ---- the hypercall operations ------------------------------------------------------------------------

    def alloc_unbound(self, dom: int, remote_dom: int) -> int:
        """EVTCHNOP_alloc_unbound: a port of ``dom`` that ``remote_dom`` may bind.  Returns the port."""
        with self._hub.lock:
            target = self._domain_any(dom, "alloc_unbound")
            self._check_control(target, "alloc_unbound")
            port = target._allocate("alloc_unbound")
            # DOMID_SELF names the caller, which differs from `dom` when a privileged domain allocates.
            remote = self.domid if remote_dom == DOMID_SELF else remote_dom
            target._ports[port] = _Channel(PortState.UNBOUND, remote_dom=remote)
            log.debug("dom%d: alloc_unbound dom%d port %d for dom%d", self.domid, target.domid, port, remote)
            return port

    def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain: connect a new local port to ``remote_port`` of ``remote_dom``."""
        with self._hub.lock:
            rdom = self.domid if remote_dom == DOMID_SELF else remote_dom
            remote = self._hub.get(rdom) if 0 <= rdom < DOMID_FIRST_RESERVED else None
            if remote is None:
                raise XenError(XEN_ESRCH, f"bind_interdomain: remote_dom {remote_dom} does not exist")
            local_port = self._allocate("bind_interdomain")
            rchan = remote._ports.get(remote_port) if remote._valid(remote_port) else None
            if rchan is None or rchan.state is not PortState.UNBOUND or rchan.remote_dom != self.domid:
                raise XenError(XEN_EINVAL, f"bind_interdomain: dom{rdom} port {remote_port} is not unbound "
                                           f"for dom{self.domid}")
            self._ports[local_port] = _Channel(PortState.INTERDOMAIN, remote_dom=rdom, remote_port=remote_port)
            rchan.state = PortState.INTERDOMAIN
            rchan.remote_dom = self.domid
            rchan.remote_port = local_port
            log.debug("dom%d: port %d bound to dom%d port %d", self.domid, local_port, rdom, remote_port)
            # The peer may have sent while the port was unbound (dropped), so the binder always starts with
            # an event and re-checks the shared ring.
            self._set_pending(local_port)
            return local_port

    def bind_virq(self, virq: int, vcpu: int) -> int:
        """EVTCHNOP_bind_virq."""
        with self._hub.lock:
            if not 0 <= virq < NR_VIRQS:
                raise XenError(XEN_EINVAL, f"bind_virq: virq {virq} is not in 0..{NR_VIRQS - 1}")
            if virq not in PER_VCPU_VIRQS and vcpu != 0:
                raise XenError(XEN_EINVAL, f"bind_virq: global virq {virq} can only bind on vcpu 0, not {vcpu}")
            self._check_vcpu(vcpu, "bind_virq")
            if (vcpu, virq) in self._virq_ports:
                raise XenError(XEN_EEXIST, f"bind_virq: virq {virq} of vcpu {vcpu} is already bound to port "
                                           f"{self._virq_ports[(vcpu, virq)]}")
            port = self._allocate("bind_virq")
            self._ports[port] = _Channel(PortState.VIRQ, vcpu=vcpu, virq=virq)
            self._virq_ports[(vcpu, virq)] = port
            log.debug("dom%d: virq %d vcpu %d on port %d", self.domid, virq, vcpu, port)
            return port

    def bind_ipi(self, vcpu: int) -> int:
        """EVTCHNOP_bind_ipi: a port whose sends notify ``vcpu`` of this domain."""
        with self._hub.lock:
            self._check_vcpu(vcpu, "bind_ipi")
            port = self._allocate("bind_ipi")
            self._ports[port] = _Channel(PortState.IPI, vcpu=vcpu)
            log.debug("dom%d: ipi vcpu %d on port %d", self.domid, vcpu, port)
            return port

    def send(self, port: int) -> None:
        """EVTCHNOP_send.  A send on an UNBOUND port is dropped without error, as Xen does."""
        with self._hub.lock:
            chan = self._ports.get(port) if self._valid(port) else None
            if chan is None:
                raise XenError(XEN_EINVAL, f"send: port {port} is not open")
            if chan.state is PortState.INTERDOMAIN:
                remote = self._hub.get(chan.remote_dom)
                if remote is None:
                    # Unreachable while destruction closes ports under the hub lock; dropping is the safe answer.
                    log.warning("dom%d: send on port %d: peer dom%d is gone", self.domid, port, chan.remote_dom)
                    return
                remote._set_pending(chan.remote_port)
            elif chan.state is PortState.IPI:
                self._set_pending(port)
            elif chan.state is PortState.UNBOUND:
                log.debug("dom%d: send on unbound port %d dropped", self.domid, port)
            else:
                raise XenError(XEN_EINVAL, f"send: port {port} is {chan.state.name}, not sendable")

    def close(self, port: int) -> None:
        """EVTCHNOP_close.  An INTERDOMAIN peer reverts to UNBOUND, bindable again by this domain."""
        with self._hub.lock:
            chan = self._ports.get(port) if self._valid(port) else None
            if chan is None:
                raise XenError(XEN_EINVAL, f"close: port {port} is not open")
            if chan.state is PortState.VIRQ:
                del self._virq_ports[(chan.vcpu, chan.virq)]
            elif chan.state is PortState.INTERDOMAIN:
                remote = self._hub.get(chan.remote_dom)
                rchan = remote._ports.get(chan.remote_port) if remote is not None else None
                if rchan is not None:
                    rchan.state = PortState.UNBOUND
                    rchan.remote_dom = self.domid
                    rchan.remote_port = 0
            # A stale pending bit would fire on whatever binds this port next.
            self._clear_pending(port)
            del self._ports[port]
            log.debug("dom%d: closed port %d (%s)", self.domid, port, chan.state.name)

    def status(self, dom: int, port: int) -> PortStatus:
        """EVTCHNOP_status of ``port`` in ``dom`` (DOMID_SELF or another domain if privileged)."""
        with self._hub.lock:
            target = self._domain_any(dom, "status")
            if not target._valid(port):
                raise XenError(XEN_EINVAL, f"status: port {port} is outside dom{target.domid}'s "
                                           f"{target.max_ports} ports")
            self._check_control(target, "status")
            chan = target._ports.get(port)
            if chan is None:
                return PortStatus(PortState.CLOSED, vcpu=0)
            if chan.state is PortState.UNBOUND:
                return PortStatus(chan.state, chan.vcpu, remote_dom=chan.remote_dom)
            if chan.state is PortState.INTERDOMAIN:
                return PortStatus(chan.state, chan.vcpu, remote_dom=chan.remote_dom, remote_port=chan.remote_port)
            if chan.state is PortState.VIRQ:
                return PortStatus(chan.state, chan.vcpu, virq=chan.virq)
            return PortStatus(chan.state, chan.vcpu)

    def unmask(self, port: int) -> None:
        """EVTCHNOP_unmask: clear the mask bit and deliver an event that arrived while it was masked."""
        with self._hub.lock:
            if not self._valid(port):
                raise XenError(XEN_EINVAL, f"unmask: port {port} is outside the domain's {self.max_ports} ports")
            chan = self._ports.get(port)
            vcpu = chan.vcpu if chan is not None else 0
            if evtchn_2l.unmask(self._shared_info, port, vcpu):
                self._interrupt()

    # ---- for xenhv itself --------------------------------------------------------------------------------

    def raise_virq(self, virq: int, vcpu: int = 0) -> bool:
        """Send a VIRQ the hypervisor raises (global VIRQs live on vcpu 0).  False if nothing is bound."""
        with self._hub.lock:
            port = self._virq_ports.get((vcpu if virq in PER_VCPU_VIRQS else 0, virq))
            if port is None:
                return False
            self._set_pending(port)
            return True

    def set_port_notifier(self, port: int, notifier: Callable[[], None] | None) -> None:
        """Deliver ``port`` out of band: each set-pending calls ``notifier`` instead of touching the bitmaps.

        An event already pending in the bitmap (e.g. the one bind_interdomain raises) moves to the notifier.
        """
        with self._hub.lock:
            chan = self._ports.get(port) if self._valid(port) else None
            if chan is None:
                raise XenError(XEN_EINVAL, f"set_port_notifier: dom{self.domid} port {port} is not open")
            chan.notifier = notifier
            word, bit = divmod(port, EVTCHN_WORD_BITS)
            if notifier is not None and self._shared_info.test_and_clear_bit(PENDING + word * WORD_BYTES, bit,
                                                                             WORD_BYTES):
                notifier()

    def attach_shared_info(self, shared_info: memoryview) -> None:
        """Move from the private page to the guest's shared_info page, merging in pending events."""
        with self._hub.lock:
            if not self._private_page:
                raise ValueError(f"dom{self.domid} already has its shared_info page")
            old, new = self._shared_info, self._atomic_page(shared_info)
            for word in range(EVTCHN_WORDS):
                bits = old.load(PENDING + word * WORD_BYTES, WORD_BYTES)
                if bits:
                    new.fetch_or(PENDING + word * WORD_BYTES, WORD_BYTES, bits)
            raised = []
            for vcpu in range(self.max_vcpus):
                sel = old.load(vcpu_offset(vcpu, PENDING_SEL), PENDING_SEL_BYTES)
                if sel:
                    new.fetch_or(vcpu_offset(vcpu, PENDING_SEL), PENDING_SEL_BYTES, sel)
                if old.test_bit(vcpu_offset(vcpu, UPCALL_PENDING), 0, UPCALL_PENDING_BYTES):
                    raised.append(vcpu)
            self._shared_info = new
            self._private_page = False
            old.release()
            for vcpu in raised:
                if evtchn_2l.mark_events_pending(new, vcpu):
                    self._interrupt()

    def is_pending(self, port: int) -> bool:
        word, bit = divmod(self._checked(port), EVTCHN_WORD_BITS)
        return self._shared_info.test_bit(PENDING + word * WORD_BYTES, bit, WORD_BYTES)

    def is_masked(self, port: int) -> bool:
        word, bit = divmod(self._checked(port), EVTCHN_WORD_BITS)
        return self._shared_info.test_bit(MASK + word * WORD_BYTES, bit, WORD_BYTES)

    def open_ports(self) -> list[int]:
        with self._hub.lock:
            return sorted(self._ports)

    def close_all(self) -> None:
        """Close every open port, as domain destruction does."""
        with self._hub.lock:
            for port in sorted(self._ports):
                self.close(port)

    def release(self) -> None:
        """Drop the atomic views of the shared_info page; call before that mapping is closed."""
        self._shared_info.release()

    # ---- internals ---------------------------------------------------------------------------------------

    @staticmethod
    def _atomic_page(page: memoryview | bytearray) -> AtomicMemory:
        if len(page) < SHARED_INFO_SIZE:
            raise ValueError(f"shared_info page has {len(page)} bytes, needs {SHARED_INFO_SIZE}")
        return AtomicMemory(page)

    def _valid(self, port: object) -> bool:
        return isinstance(port, int) and 0 <= port < self.max_ports

    def _checked(self, port: int) -> int:
        if not self._valid(port):
            raise XenError(XEN_EINVAL, f"port {port} is outside dom{self.domid}'s {self.max_ports} ports")
        return port

    def _allocate(self, op: str) -> int:
        # Port 0 is reserved: guests treat 0 as "no port".
        for port in range(1, self.max_ports):
            if port not in self._ports:
                return port
        raise XenError(XEN_ENOSPC, f"{op}: dom{self.domid} has no free port below {self.max_ports}")

    def _domain_any(self, dom: int, op: str) -> EventChannels:
        if dom == DOMID_SELF or dom == self.domid:
            return self
        target = self._hub.get(dom) if isinstance(dom, int) and 0 <= dom < DOMID_FIRST_RESERVED else None
        if target is None:
            raise XenError(XEN_ESRCH, f"{op}: dom {dom} does not exist")
        return target

    def _check_control(self, target: EventChannels, op: str) -> None:
        if target is not self and not self.privileged:
            raise XenError(XEN_EPERM, f"{op}: dom{self.domid} may not act on dom{target.domid}")

    def _check_vcpu(self, vcpu: int, op: str) -> None:
        if not 0 <= vcpu < self.max_vcpus:
            raise XenError(XEN_ENOENT, f"{op}: vcpu {vcpu} does not exist (dom{self.domid} has {self.max_vcpus})")

    def _set_pending(self, port: int) -> None:
        chan = self._ports.get(port)
        if chan is not None and chan.notifier is not None:
            chan.notifier()
            return
        vcpu = chan.vcpu if chan is not None else 0
        if evtchn_2l.set_pending(self._shared_info, port, vcpu):
            self._interrupt()

    def _interrupt(self) -> None:
        """Raise the domain's upcall (one hook for all its vCPUs: it wakes the guest's interrupt thread)."""
        if self._upcall is not None:
            self._upcall()

    def _clear_pending(self, port: int) -> None:
        word, bit = divmod(port, EVTCHN_WORD_BITS)
        self._shared_info.test_and_clear_bit(PENDING + word * WORD_BYTES, bit, WORD_BYTES)
