"""xenabi.atomic's hold on shared memory: AtomicMemory.release() waits for an operation in progress and
refuses every later one; AtomicU32 pins its mapping and exchanges through objects it keeps alive."""

from __future__ import annotations

import mmap
import struct
from typing import TYPE_CHECKING

import pytest

from xenpv.xenabi import atomic, evtchn_2l
from xenpv.xenabi.atomic import AtomicMemory, AtomicMemoryReleasedError, AtomicU32

if TYPE_CHECKING:  # fixtures of conftest.py
    from conftest import Gate, ReleaseCheck


class _GatedOps:
    """The C helper with its store held at the gate: holds a thread inside AtomicMemory.store, after it
    computed the word's address and before the store."""

    def __init__(self, ops: object, gate: Gate) -> None:
        self._ops, self._gate = ops, gate

    def xpv_store(self, *args: object) -> None:
        self._gate.enter()
        self._ops.xpv_store(*args)  # type: ignore[attr-defined]


def test_release_waits_for_an_operation_in_progress(gate: Gate, release_waits_for_user: ReleaseCheck,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    buf = mmap.mmap(-1, 4096)
    mem = AtomicMemory(memoryview(buf))
    monkeypatch.setattr(atomic, "_OPS", _GatedOps(atomic._OPS, gate))
    release_waits_for_user(lambda: mem.store(8, 4, 0x1234), mem.release, "AtomicMemory.release()")
    assert struct.unpack_from("<I", buf, 8)[0] == 0x1234
    buf.close()  # the export was given back


@pytest.mark.parametrize("op", ["load", "store", "exchange", "cmpxchg", "fetch_or", "test_and_set_bit"])
def test_every_operation_after_release_is_refused(op: str) -> None:
    buf = mmap.mmap(-1, 4096)
    mem = AtomicMemory(memoryview(buf))
    mem.store(0, 8, 1)  # a cached view exists for this word
    mem.release()
    buf.close()
    calls = {"load": lambda: mem.load(0, 8), "store": lambda: mem.store(0, 8, 2),
             "exchange": lambda: mem.exchange(0, 8, 2), "cmpxchg": lambda: mem.cmpxchg(0, 8, 1, 2),
             "fetch_or": lambda: mem.fetch_or(0, 8, 2), "test_and_set_bit": lambda: mem.test_and_set_bit(0, 3)}
    with pytest.raises(AtomicMemoryReleasedError, match="released"):
        calls[op]()


def test_atomic_u32_exchanges_and_pins_its_mapping() -> None:
    buf = mmap.mmap(-1, 4096)
    word = AtomicU32(buf, 12)
    struct.pack_into("<I", buf, 12, 0xDEADBEEF)
    assert word.load() == 0xDEADBEEF
    assert word.exchange(5) == 0xDEADBEEF
    assert struct.unpack_from("<I", buf, 8) == (0,) and struct.unpack_from("<I", buf, 16) == (0,)
    assert word.load() == 5 and word.exchange(0xFFFFFFFF) == 5
    with pytest.raises(BufferError):
        buf.close()
    del word
    buf.close()


def test_atomic_u32_refuses_a_misaligned_word() -> None:
    buf = mmap.mmap(-1, 4096)
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        AtomicU32(buf, 6)
    buf.close()


def test_memory_pins_its_mapping_until_released() -> None:
    buf = mmap.mmap(-1, 4096)
    mem = AtomicMemory(memoryview(buf))
    with pytest.raises(BufferError):
        buf.close()
    mem.release()
    buf.close()


def test_a_prepared_call_does_what_call_does_until_the_memory_is_released() -> None:
    m = mmap.mmap(-1, 4096)
    page = AtomicMemory(memoryview(m))
    args = (evtchn_2l.SHARED_INFO_SIZE, 9, evtchn_2l.PENDING, evtchn_2l.MASK,
            evtchn_2l.vcpu_offset(0, evtchn_2l.PENDING_SEL), evtchn_2l.vcpu_offset(0, evtchn_2l.UPCALL_PENDING))
    prepared = page.prepare("xpv_evtchn_2l_set_pending", *args)
    assert prepared() == 1 and page.test_bit(evtchn_2l.PENDING, 9)
    assert prepared() == page.call("xpv_evtchn_2l_set_pending", *args) == 0
    with pytest.raises(TypeError, match="takes 5 arguments after the address, 4 given"):
        page.prepare("xpv_evtchn_2l_set_pending", *args[:-1])
    with pytest.raises(TypeError, match="takes 5 arguments after the address, 6 given"):
        page.prepare("xpv_evtchn_2l_set_pending", *args, 0)
    with pytest.raises(ValueError, match="on 4097 bytes of a 4096-byte buffer"):
        page.prepare("xpv_evtchn_2l_set_pending", 4097, *args[1:])
    page.release()
    with pytest.raises(AtomicMemoryReleasedError):
        prepared()  # not a write through the address of a page that may be unmapped
    with pytest.raises(AtomicMemoryReleasedError):
        page.prepare("xpv_evtchn_2l_set_pending", *args)
    m.close()  # the prepared call holds no export: the mapping can go
