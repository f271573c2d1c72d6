"""xenabi.evtchn_2l: Xen's 2-level set-pending and unmask on a shared_info page, which xenhv and the vCPU's
doorbell delivery share; its port and vcpu bounds guard the one native call that does the work."""
from __future__ import annotations

import mmap

import pytest

from xenpv.xenabi import evtchn_2l
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.xen import EVTCHN_WORD_BITS, EVTCHN_WORDS, XEN_LEGACY_MAX_VCPUS

PORTS = EVTCHN_WORDS * EVTCHN_WORD_BITS


@pytest.fixture
def page():
    mapping = mmap.mmap(-1, 4096)
    mem = AtomicMemory(mapping)
    yield mem
    mem.release()
    mapping.close()


def _bit(mem: AtomicMemory, base: int, port: int) -> bool:
    word, bit = divmod(port, EVTCHN_WORD_BITS)
    return mem.test_bit(base + word * evtchn_2l.WORD_BYTES, bit, evtchn_2l.WORD_BYTES)


def _upcall_pending(mem: AtomicMemory, vcpu: int) -> int:
    return mem.load(evtchn_2l.vcpu_offset(vcpu, evtchn_2l.UPCALL_PENDING), 1)


def test_every_port_of_the_2_level_abi_and_every_legacy_vcpu_can_be_set_pending(page: AtomicMemory) -> None:
    """Ports 0..4095 and vcpus 0..31 are the 2-level ABI's (port 0 is reserved by convention, not by the rule):
    the first and last of each are delivered, with the pending bit, the selector bit and upcall_pending."""
    for port, vcpu in ((0, 0), (PORTS - 1, XEN_LEGACY_MAX_VCPUS - 1), (65, 3)):
        assert evtchn_2l.set_pending(page, port, vcpu), (port, vcpu)
        assert _bit(page, evtchn_2l.PENDING, port)
        assert page.test_bit(evtchn_2l.vcpu_offset(vcpu, evtchn_2l.PENDING_SEL), port // EVTCHN_WORD_BITS)
        assert _upcall_pending(page, vcpu) == 1


@pytest.mark.parametrize("port, vcpu", [(-1, 0), (PORTS, 0), (PORTS + 1, 0), (0, -1), (0, XEN_LEGACY_MAX_VCPUS),
                                        (0, XEN_LEGACY_MAX_VCPUS + 1)])
def test_a_port_or_vcpu_outside_the_abi_is_refused_before_the_page_is_touched(page: AtomicMemory, port: int,
                                                                             vcpu: int) -> None:
    with pytest.raises(ValueError):
        evtchn_2l.set_pending(page, port, vcpu)
    assert page.load(0, 8) == 0 and all(page.load(off, 8) == 0 for off in range(0, 4096, 8))


def test_only_the_first_event_interrupts_and_a_masked_port_waits_for_its_unmask(page: AtomicMemory) -> None:
    assert evtchn_2l.set_pending(page, 5, 0)
    assert not evtchn_2l.set_pending(page, 5, 0), "a port already pending interrupted again"
    assert not evtchn_2l.set_pending(page, 6, 0), "upcall_pending was already set"

    masked = 130
    page.fetch_or(evtchn_2l.MASK + (masked // EVTCHN_WORD_BITS) * evtchn_2l.WORD_BYTES, 8, 1 << masked % 64)
    page.store(evtchn_2l.vcpu_offset(0, evtchn_2l.UPCALL_PENDING), 1, 0)
    assert not evtchn_2l.set_pending(page, masked, 0)
    assert _bit(page, evtchn_2l.PENDING, masked) and _upcall_pending(page, 0) == 0
    assert evtchn_2l.unmask(page, masked, 0), "the unmask did not deliver the event that waited"
    assert not _bit(page, evtchn_2l.MASK, masked) and _upcall_pending(page, 0) == 1
