"""xenabi.atomic's operations through the C helper: each width, the value each returns, the checks on
offsets, widths and values, and atomicity against another process doing the same operations."""
from __future__ import annotations

import ctypes
import mmap
import os
import struct

import pytest

from xenpv.xenabi import native
from xenpv.xenabi.atomic import AtomicMemory

FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


@pytest.fixture
def page() -> mmap.mmap:
    buf = mmap.mmap(-1, 4096)
    yield buf
    buf.close()


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_every_operation_at_every_width(page: mmap.mmap, width: int) -> None:
    fmt, top = FORMATS[width], (1 << 8 * width) - 1
    off = 8 * width  # beside words of other widths, which must stay untouched
    with AtomicMemory(memoryview(page)) as mem:
        mem.store(off, width, top)
        assert struct.unpack_from(fmt, page, off)[0] == top and mem.load(off, width) == top
        assert page[off - 1] == 0 and page[off + width] == 0
        assert mem.exchange(off, width, 5) == top and mem.load(off, width) == 5
        r = mem.cmpxchg(off, width, 4, 9)
        assert (r.success, r.observed, mem.load(off, width)) == (False, 5, 5)
        r = mem.cmpxchg(off, width, 5, top)
        assert (r.success, r.observed, mem.load(off, width)) == (True, 5, top)
        assert mem.fetch_and(off, width, ~1) == top and mem.load(off, width) == top - 1
        assert mem.fetch_or(off, width, 1) == top - 1 and mem.load(off, width) == top
        high = 8 * width - 1
        assert mem.test_and_clear_bit(off, high, width) is True and mem.load(off, width) == top >> 1
        assert mem.test_and_clear_bit(off, high, width) is False
        assert mem.test_bit(off, high, width) is False and mem.test_bit(off, 0, width) is True
        assert mem.test_and_set_bit(off, high, width) is False and mem.load(off, width) == top
        assert mem.test_and_set_bit(off, high, width) is True


def test_bit_numbering_is_x86(page: mmap.mmap) -> None:
    with AtomicMemory(memoryview(page)) as mem:
        mem.test_and_set_bit(16, 9, 8)
    assert page[17] == 0b10 and page[16] == 0


@pytest.mark.parametrize("offset,width,what", [(3, 4, "unaligned"), (4096, 1, "outside"), (4092, 8, "unaligned"),
                                               (-8, 8, "unaligned"), (0, 3, "3-byte"), (4088, 16, "16-byte")])
def test_bad_words_are_refused(page: mmap.mmap, offset: int, width: int, what: str) -> None:
    with AtomicMemory(memoryview(page)) as mem:
        with pytest.raises(ValueError, match=what):
            mem.load(offset, width)


def test_bad_values_and_bits_are_refused(page: mmap.mmap) -> None:
    with AtomicMemory(memoryview(page)) as mem:
        with pytest.raises(ValueError, match="does not fit"):
            mem.store(0, 2, 0x10000)
        with pytest.raises(ValueError, match="does not fit"):
            mem.exchange(0, 4, -1)
        with pytest.raises(ValueError, match="bit 32"):
            mem.test_and_set_bit(0, 32, 4)
    assert page[:8] == bytes(8)


def test_read_only_buffers_are_refused() -> None:
    with pytest.raises(ValueError, match="writable"):
        AtomicMemory(memoryview(b"\0" * 64))


def test_increments_from_two_processes_are_not_lost(page: mmap.mmap) -> None:
    """A read-modify-write that is not one locked instruction loses increments when another process
    does the same: 2 x 20,000 cmpxchg increments must all land."""
    rounds = 20000

    def increment(mem: AtomicMemory) -> None:
        for _ in range(rounds):
            while True:
                old = mem.load(64, 8)
                if mem.cmpxchg(64, 8, old, old + 1).success:
                    break
            mem.fetch_or(128, 8, 0)  # a locked no-op between, so the two interleave finely

    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            increment(AtomicMemory(memoryview(page)))
            code = 0
        finally:
            os._exit(code)
    with AtomicMemory(memoryview(page)) as mem:
        increment(mem)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert struct.unpack_from("<Q", page, 64)[0] == 2 * rounds


def test_the_helper_is_rebuilt_when_missing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout without the built helper builds it at first use (bootstrap normally has)."""
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "_atomic_ops.so")
    lib = native.load_atomic_ops()
    assert (tmp_path / "_atomic_ops.so").exists()
    buf = (8 * ctypes.c_uint64)()
    address = ctypes.addressof(buf)
    assert lib.xpv_fetch_or(address, 8, 6) == 0 and lib.xpv_load(address, 8) == 6


def test_no_compiler_is_a_clear_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "LIBRARY", tmp_path / "_atomic_ops.so")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeHelperMissing, match="cannot run"):
        native.build()
