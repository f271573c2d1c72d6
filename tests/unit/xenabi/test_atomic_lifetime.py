"""xenabi.atomic's hold on shared memory: AtomicMemory.release() waits for an operation in progress and
refuses every later one; AtomicU32 pins its mapping and exchanges through objects it keeps alive."""

from __future__ import annotations

import mmap
import struct
import threading

import pytest

from xenpv.xenabi.atomic import AtomicMemory, AtomicMemoryReleasedError, AtomicU32


class _SlowValue(int):
    """A value whose conversion for the store blocks: holds a thread inside AtomicMemory.store."""

    entered = threading.Event()
    release = threading.Event()

    def to_bytes(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
        self.entered.set()
        assert self.release.wait(10), "the test never opened the gate"
        return int(self).to_bytes(*args, **kwargs)  # type: ignore[arg-type]


def test_release_waits_for_an_operation_in_progress() -> None:
    buf = mmap.mmap(-1, 4096)
    mem = AtomicMemory(memoryview(buf))
    _SlowValue.entered.clear()
    _SlowValue.release.clear()
    failures: list[BaseException] = []

    def store() -> None:
        try:
            mem.store(8, 4, _SlowValue(0x1234))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            failures.append(exc)

    user = threading.Thread(target=store)
    user.start()
    assert _SlowValue.entered.wait(5)
    releaser = threading.Thread(target=mem.release)
    releaser.start()
    releaser.join(0.3)
    assert releaser.is_alive(), "release() returned while an atomic operation was still on the page"
    _SlowValue.release.set()
    user.join(5)
    releaser.join(5)
    assert not user.is_alive() and not releaser.is_alive() and failures == []
    assert struct.unpack_from("<I", buf, 8)[0] == 0x1234
    buf.close()  # every view was given back


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
