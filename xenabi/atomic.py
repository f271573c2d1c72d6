"""Lock-free atomic operations on words of a shared page, for state the guest updates from another process.

Grant entries and the event channel bitmaps live in pages both xenhv and the guest map.  A Python lock
protects nothing there: the other side is a different process.  These helpers use the CPU's atomic
instructions (through the ``atomics`` package) on the page itself, so a compare-and-swap here and one in
the guest (or in C) serialise exactly as Xen's ``guest_cmpxchg`` and the guest's ``sync_cmpxchg`` do.

Bit numbering is the x86 one Xen uses: bit ``n`` of a little-endian word at ``offset`` is bit ``n % 8`` of
byte ``offset + n // 8``.

Every atomic view keeps a buffer export on the underlying mapping, and creating one costs more than the
operation, so views are cached per (offset, width).  Call :meth:`AtomicMemory.release` before the mapping
(``mmap``/``memoryview``) is closed or released; otherwise closing it fails with "exported pointers exist".
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import atomics

WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class CmpxchgResult:
    """``observed`` is the value found in memory: equal to the expected value exactly when ``success``."""

    success: bool
    observed: int


class AtomicMemory:
    """Atomic loads, stores, compare-and-swap and bit operations at naturally aligned offsets of ``buffer``."""

    def __init__(self, buffer: memoryview | bytearray) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("atomic operations need a writable buffer")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._buffer: memoryview | None = view
        self._views: dict[tuple[int, int], tuple[Any, Any]] = {}
        # An open view that is garbage-collected complains from its finaliser, so an AtomicMemory nobody
        # released (e.g. at interpreter exit) closes its views the same way release() does.
        self._finalizer = weakref.finalize(self, _close_views, self._views, view)

    def __len__(self) -> int:
        return len(self._buffer) if self._buffer is not None else 0

    def _view(self, offset: int, width: int) -> Any:
        key = (offset, width)
        cached = self._views.get(key)
        if cached is not None:
            return cached[1]
        if self._buffer is None:
            raise ValueError("atomic memory was released")
        if width not in WIDTHS:
            raise ValueError(f"no atomic operations on {width}-byte words")
        # The alignment rule is the CPU's: a locked operation across a cache line is not atomic for other
        # agents on every x86 part, and the atomics package refuses it outright.
        if offset < 0 or offset % width or offset + width > len(self._buffer):
            raise ValueError(f"{width}-byte atomic at offset {offset:#x} is unaligned or outside "
                             f"{len(self._buffer):#x} bytes")
        context = atomics.atomicview(buffer=self._buffer[offset:offset + width], atype=atomics.UINT)
        view = context.__enter__()
        self._views[key] = (context, view)
        return view

    def load(self, offset: int, width: int) -> int:
        return self._view(offset, width).load()

    def store(self, offset: int, width: int, value: int) -> None:
        self._view(offset, width).store(value)

    def exchange(self, offset: int, width: int, value: int) -> int:
        return self._view(offset, width).exchange(value)

    def cmpxchg(self, offset: int, width: int, expected: int, desired: int) -> CmpxchgResult:
        result = self._view(offset, width).cmpxchg_strong(expected, desired)
        return CmpxchgResult(result.success, result.expected)

    def fetch_and(self, offset: int, width: int, mask: int) -> int:
        """Atomically ``*p &= mask``; returns the old value."""
        return self._view(offset, width).bin_fetch_and(mask & ((1 << 8 * width) - 1))

    def fetch_or(self, offset: int, width: int, bits: int) -> int:
        """Atomically ``*p |= bits``; returns the old value."""
        return self._view(offset, width).bin_fetch_or(bits)

    def test_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        return bool(self._view(offset, width).load() >> bit & 1)

    def test_and_set_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        """Set ``bit`` of the word at ``offset``; returns whether it was already set."""
        return bool(self._view(offset, width).bit_test_set(bit))

    def test_and_clear_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        """Clear ``bit`` of the word at ``offset``; returns whether it was set."""
        return bool(self._view(offset, width).bit_test_reset(bit))

    def release(self) -> None:
        """Drop every cached view (and the buffer export each holds).  Further operations raise ValueError."""
        self._finalizer()
        self._buffer = None

    def __enter__(self) -> "AtomicMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _close_views(views: dict[tuple[int, int], tuple[Any, Any]], buffer: memoryview) -> None:
    for context, _view in views.values():
        context.__exit__(None, None, None)
        context.release()
    views.clear()
    buffer.release()
