"""XENBUS SHARED_INFO interface v2-v4 (reference windows-pv-drivers.md 1): the 2-level event channel
helpers over the shared_info page, and the wall clock.

The page is the one XEN put at the start of the platform BAR hole with XENMEM_add_to_physmap
(XenPlatform did that at start-up); Acquire maps it and every bitmap operation is a CPU atomic on the
page itself (AtomicMemory), because xenhv sets pending bits from another process.

On this platform the UpcallDispatcher's interrupt thread owns the upcall scan (it clears
evtchn_upcall_pending and pending_sel); `EvtchnPoll` is the same scan as the driver's, for callers that
poll (and for tests), and - as in the driver - it leaves acknowledging each port to the Event callback.
The real Acquire also masks every port; here the store and console ports of the platform are live
before XENBUS loads, so masking them all would cut the platform's own xenstore connection.

SUSPEND EARLY callback (SharedInfoSuspendCallbackEarly): after a resume in a new domain, shared_info is
mapped again (XENMEM_add_to_physmap at the same frame) and every port masked (SharedInfoEvtchnMaskAll):
the ports are the old domain's; whoever opens a channel in the new one unmasks it (the platform's store
port included, in the STORE LATE callback).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.stack.drivers.interface import Interface
from xenpv.stack.drivers.interface_layouts import LAYOUTS
from xenpv.stack.drivers.xenbus.debug import DebugCallback, DebugInterface
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_EARLY, SuspendCallback, SuspendInterface
from xenpv.stack.kernel.status import NT_SUCCESS, STATUS_SUCCESS
from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi.xen import EVTCHN_WORD_BITS, EVTCHN_WORDS, XEN_LEGACY_MAX_VCPUS, SharedInfo, VcpuInfo, VcpuTimeInfo

log = logging.getLogger("stack.drivers.xenbus.shared_info")

SHARED_INFO_GUID = uuid.UUID("7E73C34F-1640-4649-A8F3-263BC930A004")

_WORD = SharedInfo.evtchn_pending.size // EVTCHN_WORDS
_PENDING = SharedInfo.evtchn_pending.offset
_MASK = SharedInfo.evtchn_mask.offset
_VCPU_INFO_SIZE = SharedInfo.vcpu_info.size // XEN_LEGACY_MAX_VCPUS
# 100 ns intervals between 1601-01-01 (the Windows epoch) and 1970-01-01 (Xen's wall clock epoch).
_EPOCH_1601_TO_1970 = 116_444_736_000_000_000
# The driver retries a torn read of the time records for as long as it takes: the hypervisor's update is
# over in microseconds. xenhv is another process the host may deschedule mid-update, so the model retries
# until this deadline (scaled) and then gives up with HarnessTooSlow.
SEQLOCK_DEADLINE_SECONDS = 1.0

# Event(Argument, Port) -> handled something
SharedInfoEvent = Callable[[Any, int], bool]


def shared_info_gfn(platform: XenPlatform) -> int:
    """Where the platform mapped shared_info: the first frame of the platform BAR (its hole)."""
    bar = next(b for b in platform.device.bars if b.kind == "mem")
    return bar.address >> 12


class SharedInfoInterface(Interface):
    NAME = "SHARED_INFO"
    GUID = SHARED_INFO_GUID
    # v2's GetTimeVersion2 returns the time alone; v3 made it GetTime (Time, Local); v4 added UpcallSupported.
    TABLES = LAYOUTS["SHARED_INFO"]

    def __init__(self, platform: XenPlatform, debug: DebugInterface, suspend: SuspendInterface | None = None) -> None:
        super().__init__()
        self.platform = platform
        self.debug = debug
        self.suspend = suspend
        self._page: memoryview | None = None
        self._mem: AtomicMemory | None = None
        self._debug_callback: DebugCallback | None = None
        self._suspend_callback: SuspendCallback | None = None

    def setup(self) -> int:
        status = self.debug.acquire()
        if not NT_SUCCESS(status):
            return status
        if self.suspend is not None:
            status = self.suspend.acquire()
            if not NT_SUCCESS(status):
                self.debug.release()
                return status
            _, self._suspend_callback = self.suspend.SuspendRegister(SUSPEND_CALLBACK_EARLY, self._suspend_early,
                                                                     None)
        self._page = self.platform.vcpu.page(shared_info_gfn(self.platform))
        self._mem = AtomicMemory(self._page)
        _, self._debug_callback = self.debug.DebugRegister("XENBUS|SHARED_INFO", self._dump, None)
        return STATUS_SUCCESS

    def teardown(self) -> None:
        assert self._debug_callback is not None and self._mem is not None and self._page is not None
        self.debug.DebugDeregister(self._debug_callback)
        self._mem.release()
        self._page.release()
        self._mem = self._page = self._debug_callback = None
        if self.suspend is not None and self._suspend_callback is not None:
            self.suspend.SuspendDeregister(self._suspend_callback)
            self._suspend_callback = None
            self.suspend.release()
        self.debug.release()

    def _suspend_early(self, _argument: Any) -> None:
        """SharedInfoMap + SharedInfoEvtchnMaskAll in the new domain."""
        self.platform.map_shared_info()
        for word in range(EVTCHN_WORDS):
            self.mem.store(_MASK + word * _WORD, _WORD, (1 << EVTCHN_WORD_BITS) - 1)
        log.info("SHARED_INFO: EARLY: mapped again at gfn %#x, every port masked", shared_info_gfn(self.platform))

    @property
    def mem(self) -> AtomicMemory:
        if self._mem is None:
            raise RuntimeError("SHARED_INFO used without Acquire")
        return self._mem

    def _dump(self, _argument: Any, _crashing: bool) -> None:
        for word in range(EVTCHN_WORDS):
            pending = self.mem.load(_PENDING + word * _WORD, _WORD)
            mask = self.mem.load(_MASK + word * _WORD, _WORD)
            if pending:
                self.debug.DebugPrintf("PENDING[%02d] = %016x MASK[%02d] = %016x", word, pending, word, mask)

    @staticmethod
    def _vcpu(index: int) -> int:
        if not 0 <= index < XEN_LEGACY_MAX_VCPUS:
            raise ValueError(f"vCPU index {index} is beyond the {XEN_LEGACY_MAX_VCPUS} legacy vcpu_info slots")
        return SharedInfo.vcpu_info.offset + index * _VCPU_INFO_SIZE

    # -- members ----------------------------------------------------------------------------------

    def SharedInfoUpcallSupported(self, Index: int) -> bool:
        """Whether vCPU Index can take a per-vCPU upcall vector (HVMOP_set_evtchn_upcall_vector): xenhv
        delivers every upcall through the platform callback only, so no vCPU can."""
        self._vcpu(Index)
        return False

    def SharedInfoUpcallPending(self, Index: int) -> bool:
        return bool(self.mem.load(self._vcpu(Index) + VcpuInfo.evtchn_upcall_pending.offset, 1))

    def SharedInfoEvtchnPoll(self, Index: int, Event: SharedInfoEvent, Argument: Any) -> bool:
        """One 2-level scan: clear upcall_pending, take pending_sel, call Event for each pending and
        unmasked port of the selected words. Returns whether any Event reported doing something."""
        vcpu = self._vcpu(Index)
        self.mem.store(vcpu + VcpuInfo.evtchn_upcall_pending.offset, 1, 0)
        selector = self.mem.exchange(vcpu + VcpuInfo.evtchn_pending_sel.offset, 8, 0)
        done_something = False
        for word in range(EVTCHN_WORDS):
            if not selector >> word & 1:
                continue
            bits = (self.mem.load(_PENDING + word * _WORD, _WORD)
                    & ~self.mem.load(_MASK + word * _WORD, _WORD))
            for bit in range(EVTCHN_WORD_BITS):
                if bits >> bit & 1:
                    done_something |= bool(Event(Argument, word * EVTCHN_WORD_BITS + bit))
        return done_something

    def SharedInfoEvtchnAck(self, Port: int) -> None:
        word, bit = divmod(Port, EVTCHN_WORD_BITS)
        self.mem.test_and_clear_bit(_PENDING + word * _WORD, bit, _WORD)

    def SharedInfoEvtchnMask(self, Port: int) -> None:
        word, bit = divmod(Port, EVTCHN_WORD_BITS)
        self.mem.test_and_set_bit(_MASK + word * _WORD, bit, _WORD)

    def SharedInfoEvtchnUnmask(self, Port: int) -> bool:
        """Clear the mask bit; returns whether the port is pending (the caller must then deliver it)."""
        word, bit = divmod(Port, EVTCHN_WORD_BITS)
        self.mem.test_and_clear_bit(_MASK + word * _WORD, bit, _WORD)
        return self.mem.test_bit(_PENDING + word * _WORD, bit, _WORD)

    def SharedInfoGetTime(self) -> tuple[int, bool]:
        """(Time, Local): the wall clock in 100 ns units since 1601 (a Windows LARGE_INTEGER) from
        shared_info's wc_* plus vCPU 0's system_time, read under both seqlocks; Local is FALSE because
        Xen's wall clock is UTC."""
        time_info = self._vcpu(0) + VcpuInfo.time.offset
        timeout = scaled(SEQLOCK_DEADLINE_SECONDS)
        deadline = time.monotonic() + timeout
        while True:
            wc_version = self.mem.load(SharedInfo.wc_version.offset, 4)
            time_version = self.mem.load(time_info + VcpuTimeInfo.version.offset, 4)
            seconds = (self.mem.load(SharedInfo.wc_sec_hi.offset, 4) << 32
                       | self.mem.load(SharedInfo.wc_sec.offset, 4))
            nanoseconds = self.mem.load(SharedInfo.wc_nsec.offset, 4)
            system_time = self.mem.load(time_info + VcpuTimeInfo.system_time.offset, 8)
            if (wc_version & 1 or time_version & 1
                    or wc_version != self.mem.load(SharedInfo.wc_version.offset, 4)
                    or time_version != self.mem.load(time_info + VcpuTimeInfo.version.offset, 4)):
                if time.monotonic() >= deadline:
                    raise HarnessTooSlow("a consistent read of the shared_info time records (xenhv still "
                                         "updating them)", timeout)
                time.sleep(0)  # let the writer finish
                continue
            total_ns = seconds * 1_000_000_000 + nanoseconds + system_time
            return _EPOCH_1601_TO_1970 + total_ns // 100, False

    def SharedInfoGetTimeVersion2(self) -> int:
        """v2: the LARGE_INTEGER alone (shared_info.c SharedInfoGetTimeVersion2)."""
        time_value, _local = self.SharedInfoGetTime()
        return time_value
