from __future__ import annotations

import threading

import pytest

from xenpv.stack.drivers.xenbus import shared_info as shared_info_module
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_FIXED, EVTCHN_UNBOUND, EVTCHN_VIRQ
from xenpv.stack.kernel.bugcheck import BugCheck
from xenpv.stack.kernel.irql import DIRQL, HIGH_LEVEL, KeGetCurrentIrql, KeLowerIrql, KeRaiseIrql
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_TIMEOUT
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.vcpu.hypervisor import TrapTooSlow
from xenpv.xenabi.xen import SharedInfo, VcpuInfo, VcpuTimeInfo

from .stack_of import interfaces, table_of


def test_shared_info_poll_ack_mask_unmask_over_the_page(platform) -> None:
    si = table_of(interfaces(platform).shared_info)
    assert si.SharedInfoAcquire() == STATUS_SUCCESS
    mem = si.Context.mem
    # Xen raises port 65 (word 1, bit 1) and port 3, and port 3 is masked.
    mem.test_and_set_bit(2048 + 8, 1)
    mem.test_and_set_bit(2048, 3)
    si.SharedInfoEvtchnMask(3)
    mem.store(0, 1, 1)
    mem.store(8, 8, 0b11)
    assert si.SharedInfoUpcallPending(0) and not si.SharedInfoUpcallSupported(0)
    seen: list[int] = []
    assert si.SharedInfoEvtchnPoll(0, lambda arg, port: (seen.append(port), si.SharedInfoEvtchnAck(port), True)[2], None)
    assert seen == [65] and not si.SharedInfoUpcallPending(0)
    assert si.SharedInfoEvtchnUnmask(3) is True  # still pending: the caller must deliver it
    si.SharedInfoEvtchnAck(3)
    assert si.SharedInfoEvtchnUnmask(3) is False
    time, local = si.SharedInfoGetTime()
    assert time == 116_444_736_000_000_000 and local is False  # an all-zero clock is the 1970 epoch
    si.SharedInfoRelease()


def test_an_event_runs_the_callback_at_dirql_through_the_kernel_interrupt(platform, cpu) -> None:
    with cpu.lock:  # driver code owns the CPU; waits hand it to the interrupt line
        ifs = interfaces(platform)
        ev = table_of(ifs.evtchn)
        assert ev.EvtchnAcquire() == STATUS_SUCCESS
        assert ifs.suspend.references == ifs.shared_info.references == 1
        calls: list[tuple[int, str, int]] = []
        channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda intr, arg: calls.append((KeGetCurrentIrql(), arg, 0)) or True,
                                "ctx", 0, False)
        port = ev.EvtchnGetPort(channel)
        assert port == 10 and ev.EvtchnGetCount(channel) == 0
        platform.upcalls.raise_event(port)
        assert ev.EvtchnWait(channel, 1, 2.0) == STATUS_SUCCESS
        assert calls == [(DIRQL, "ctx", 0)] and ev.EvtchnGetCount(channel) == 1
        assert ev.EvtchnWait(channel, 2, 0.05) == STATUS_TIMEOUT
        ev.EvtchnTrigger(channel)  # local: synchronous at PASSIVE
        assert ev.EvtchnGetCount(channel) == 2
        ev.EvtchnSend(channel)
        assert platform.vcpu.evtchn.sent == [port]
        ev.EvtchnClose(channel)
        assert platform.vcpu.evtchn.closed == [port] and port not in platform.upcalls.handlers
        ev.EvtchnRelease()
        assert ifs.suspend.references == ifs.shared_info.references == ifs.debug.references == 0


def test_a_masked_channel_is_masked_before_its_callback_and_a_forced_unmask_redelivers(platform, cpu) -> None:
    with cpu.lock:  # driver code owns the CPU; waits hand it to the interrupt line
        ifs = interfaces(platform)
        ev = table_of(ifs.evtchn)
        ev.EvtchnAcquire()
        si = ifs.shared_info
        masked: list[bool] = []
        word_mask = 2048 + 64 * 8

        def callback(_intr: object, _arg: object) -> bool:
            masked.append(si.mem.test_bit(word_mask, 10))
            return True

        channel = ev.EvtchnOpen(EVTCHN_UNBOUND, callback, None, 0, True)
        platform.upcalls.raise_event(10)
        assert ev.EvtchnWait(channel, 1, 2.0) == STATUS_SUCCESS and masked == [True]
        si.mem.test_and_set_bit(2048, 10)  # another event arrives while masked
        assert ev.EvtchnUnmask(channel, False, False) is True  # pending: not forced, so the caller's job
        si.SharedInfoEvtchnMask(10)
        assert ev.EvtchnUnmask(channel, False, True) is False  # forced: delivered again through the ISR
        assert ev.EvtchnGetCount(channel) == 2 and masked == [True, True]
        ev.EvtchnClose(channel)
        ev.EvtchnRelease()


def test_trigger_at_or_above_dirql_waits_until_the_irql_drops_and_send_is_legal_at_high(platform) -> None:
    ev = table_of(interfaces(platform).evtchn)
    ev.EvtchnAcquire()
    channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    old = KeRaiseIrql(HIGH_LEVEL)
    ev.EvtchnTrigger(channel)
    ev.EvtchnSend(channel)
    assert ev.EvtchnGetCount(channel) == 0
    KeLowerIrql(old)
    assert ev.EvtchnGetCount(channel) == 1 and platform.vcpu.evtchn.sent == [10]
    ev.EvtchnClose(channel)
    ev.EvtchnRelease()


def test_fixed_ports_are_not_closed_and_virq_processor_arguments_are_v9_only(platform) -> None:
    ifs = interfaces(platform)
    ev = table_of(ifs.evtchn)
    ev.EvtchnAcquire()
    fixed = ev.EvtchnOpen(EVTCHN_FIXED, lambda _i, _a: True, None, 5, False)
    assert ev.EvtchnGetPort(fixed) == 5
    assert ev.EvtchnOpen(EVTCHN_FIXED, lambda _i, _a: True, None, 5, False) is None  # port taken
    virq = ev.EvtchnOpen(EVTCHN_VIRQ, lambda _i, _a: True, None, 0, 0, 0)
    assert virq is not None and ev.EvtchnBind(virq, 0, 1) != STATUS_SUCCESS
    v8 = ifs.evtchn.get_interface(8, 4096)[1]
    with pytest.raises(TypeError):
        v8.EvtchnOpen(EVTCHN_VIRQ, lambda _i, _a: True, None, 0, 0, 0)
    ev.EvtchnClose(fixed)
    ev.EvtchnClose(virq)
    assert platform.vcpu.evtchn.closed == [ev.EvtchnGetPort(virq)]
    ev.EvtchnRelease()


def test_suspend_makes_channels_inactive_and_release_with_channels_is_a_bug(platform) -> None:
    ifs = interfaces(platform)
    ev = table_of(ifs.evtchn)
    ev.EvtchnAcquire()
    channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda _i, _a: True, None, 0, False)
    assert ifs.suspend.SuspendTrigger() == STATUS_SUCCESS
    ev.EvtchnTrigger(channel)
    ev.EvtchnSend(channel)
    assert ev.EvtchnGetCount(channel) == 0 and platform.vcpu.evtchn.sent == []
    assert 10 not in platform.upcalls.handlers
    with pytest.raises(BugCheck) as stop:
        ev.EvtchnRelease()
    assert stop.value.message == "BUG: OUTSTANDING EVENT CHANNELS"  # evtchn.c EvtchnRelease


def _time_version_odd_for(si, seconds: float) -> threading.Timer:
    """xenhv descheduled in the middle of updating vCPU 0's time record: its version stays odd a while."""
    offset = SharedInfo.vcpu_info.offset + VcpuInfo.time.offset + VcpuTimeInfo.version.offset
    si.Context.mem.store(offset, 4, 1)
    done = threading.Timer(seconds, si.Context.mem.store, args=(offset, 4, 2))
    done.start()
    return done


def test_get_time_waits_out_a_writer_that_was_descheduled_mid_update(platform) -> None:
    si = table_of(interfaces(platform).shared_info)
    assert si.SharedInfoAcquire() == STATUS_SUCCESS
    done = _time_version_odd_for(si, 0.05)
    try:
        assert si.SharedInfoGetTime() == (116_444_736_000_000_000, False)
    finally:
        done.join()
        si.SharedInfoRelease()


def test_get_time_against_a_record_that_never_settles_is_the_harness_too_slow(platform, monkeypatch) -> None:
    monkeypatch.setattr(shared_info_module, "SEQLOCK_DEADLINE_SECONDS", 0.05)
    si = table_of(interfaces(platform).shared_info)
    assert si.SharedInfoAcquire() == STATUS_SUCCESS
    done = _time_version_odd_for(si, 5.0)
    try:
        with pytest.raises(HarnessTooSlow, match="shared_info time records"):
            si.SharedInfoGetTime()
    finally:
        done.cancel()
        si.SharedInfoRelease()


def test_a_deadline_passed_in_the_isr_stops_the_processor_and_wakes_the_waiter_without_a_stop(platform, cpu) -> None:
    """A trap xenhv does not answer in time inside an ISR: no 0x1E blamed on the driver, no interrupt line
    dying quietly while the main thread waits for an event that cannot come."""
    late = TrapTooSlow("no answer from xenhv to HYPERCALL for dom7", 10.0)

    def callback(_intr: object, _arg: object) -> bool:
        raise late

    with cpu.lock:
        ev = table_of(interfaces(platform).evtchn)
        ev.EvtchnAcquire()
        channel = ev.EvtchnOpen(EVTCHN_UNBOUND, callback, None, 0, False)
        platform.upcalls.raise_event(ev.EvtchnGetPort(channel))
        with pytest.raises(HarnessTooSlow) as woken:
            ev.EvtchnWait(channel, 1, 3.0)
    assert woken.value is late and cpu.too_slow is late and cpu.crashed is None
    ev.EvtchnClose(channel)
    ev.EvtchnRelease()
