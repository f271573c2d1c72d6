"""The 2-level event channel delivery rule on a shared_info page (Xen's evtchn_2l_set_pending and
evtchn_2l_unmask; xen-abi.md section 8), stated once for every agent that delivers an event.

xenhv delivers through it for ports it raises itself; a guest's vCPU delivers through it for a port
whose back-end notifies it directly over a call eventfd (the KVM irqfd pattern, stack/vcpu/doorbells.py).
Both work on the same page with the CPU's atomic instructions, so they serialise with each other and
with the guest's own scan exactly as Xen's set-pending does with the guest.
"""
from __future__ import annotations

import ctypes
from collections.abc import Callable

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.xen import EVTCHN_WORD_BITS, EVTCHN_WORDS, XEN_LEGACY_MAX_VCPUS, SharedInfo, VcpuInfo

WORD_BYTES = SharedInfo.evtchn_pending.size // EVTCHN_WORDS
PENDING = SharedInfo.evtchn_pending.offset
MASK = SharedInfo.evtchn_mask.offset
VCPU_INFO = SharedInfo.vcpu_info.offset
VCPU_INFO_SIZE = ctypes.sizeof(VcpuInfo)
PENDING_SEL = VcpuInfo.evtchn_pending_sel.offset
PENDING_SEL_BYTES = VcpuInfo.evtchn_pending_sel.size
UPCALL_PENDING = VcpuInfo.evtchn_upcall_pending.offset
UPCALL_PENDING_BYTES = VcpuInfo.evtchn_upcall_pending.size
SHARED_INFO_SIZE = ctypes.sizeof(SharedInfo)
if (WORD_BYTES, PENDING_SEL_BYTES, UPCALL_PENDING_BYTES) != (8, 8, 1):  # what _atomic_ops.c's set-pending uses
    raise ImportError(f"shared_info widths {WORD_BYTES, PENDING_SEL_BYTES, UPCALL_PENDING_BYTES} are not (8, 8, 1)")


def vcpu_offset(vcpu: int, field_offset: int) -> int:
    """Offset in shared_info of a field of ``vcpu``'s vcpu_info (the legacy array)."""
    return VCPU_INFO + vcpu * VCPU_INFO_SIZE + field_offset


def prepare_set_pending(page: AtomicMemory, port: int, vcpu: int) -> Callable[[], int]:
    """:func:`set_pending` of this port and vCPU made ready once (its checks and its arguments' conversion),
    for an agent that delivers the same port's events again and again (a doorbell): call the result for
    each event; it returns what :func:`set_pending` does, as an int."""
    _check(port, vcpu)
    return page.prepare("xpv_evtchn_2l_set_pending", SHARED_INFO_SIZE, port, PENDING, MASK,
                        vcpu_offset(vcpu, PENDING_SEL), vcpu_offset(vcpu, UPCALL_PENDING))


def _check(port: int, vcpu: int) -> None:
    if not 0 <= port < EVTCHN_WORDS * EVTCHN_WORD_BITS:
        raise ValueError(f"port {port} is outside the 2-level ABI's {EVTCHN_WORDS * EVTCHN_WORD_BITS} ports")
    if not 0 <= vcpu < XEN_LEGACY_MAX_VCPUS:
        raise ValueError(f"vcpu {vcpu} has no vcpu_info in shared_info")


def set_pending(page: AtomicMemory, port: int, vcpu: int) -> bool:
    """Mark ``port`` pending for ``vcpu``. True when the vCPU must be interrupted: the event is new (its
    pending bit was clear), the port unmasked, its word newly selected in ``evtchn_pending_sel``, and
    ``evtchn_upcall_pending`` went from 0 to 1 (the guest clears it before it scans, so only that transition
    needs an interrupt). One native call (xenabi/_atomic_ops.c): this is every event's path."""
    _check(port, vcpu)
    return bool(page.call("xpv_evtchn_2l_set_pending", SHARED_INFO_SIZE, port, PENDING, MASK,
                          vcpu_offset(vcpu, PENDING_SEL), vcpu_offset(vcpu, UPCALL_PENDING)))


def mark_events_pending(page: AtomicMemory, vcpu: int) -> bool:
    """Raise ``vcpu``'s evtchn_upcall_pending; True if it was clear (the vCPU must be interrupted)."""
    return not page.test_and_set_bit(vcpu_offset(vcpu, UPCALL_PENDING), 0, UPCALL_PENDING_BYTES)


def unmask(page: AtomicMemory, port: int, vcpu: int) -> bool:
    """Clear ``port``'s mask bit and select an event that arrived while it was masked. True when the vCPU
    must be interrupted (see :func:`set_pending`)."""
    word, bit = divmod(port, EVTCHN_WORD_BITS)
    if (page.test_and_clear_bit(MASK + word * WORD_BYTES, bit, WORD_BYTES)
            and page.test_bit(PENDING + word * WORD_BYTES, bit, WORD_BYTES)
            and not page.test_and_set_bit(vcpu_offset(vcpu, PENDING_SEL), word, PENDING_SEL_BYTES)):
        return mark_events_pending(page, vcpu)
    return False
