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

Lifetime
--------
The ``atomics`` package's checked calls read the word's address as a Python int and then call C; the GIL
can pass to another thread in between.  If that thread released the view and the mapping was closed, the
C call would write to unmapped memory.  So one lock covers looking a view up *and* the operation on it,
and :meth:`AtomicMemory.release` takes the same lock: it waits for an operation in progress, and every
later one raises :class:`AtomicMemoryReleasedError`.

:class:`AtomicU32` is the fast path for one word (ring indexes, published at every request): a ctypes
word made with ``from_buffer`` (it holds a buffer export, so the mapping cannot be closed while the word
exists) handed to the atomics package's C function by ``ctypes.byref`` of objects it keeps, never by an
address held as a plain int.
"""
from __future__ import annotations

import ctypes
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import atomics

try:
    # The package's own C function for a 32-bit exchange: its public methods wrap the same call in
    # per-call Python checks that cost ~15 times the operation (see AtomicU32).
    from atomics._impl.patomic import Patomic as _Patomic

    _XCHG32 = _Patomic.ops(4).xchg_ops.fp_exchange
except (ImportError, AttributeError) as _exc:  # pragma: no cover - only with an atomics release we do not know
    raise ImportError(f"atomics {getattr(atomics, '__version__', '?')} has no patomic exchange function "
                      "(xenpv needs atomics 1.0.x, see pyproject.toml)") from _exc
if not _XCHG32:  # pragma: no cover - a NULL function pointer: the CPU has no 32-bit exchange
    raise ImportError("atomics' patomic has no 32-bit exchange on this CPU")
_SEQ_CST = atomics.MemoryOrder.SEQ_CST.value

WIDTHS = (1, 2, 4, 8)


@dataclass(frozen=True)
class CmpxchgResult:
    """``observed`` is the value found in memory: equal to the expected value exactly when ``success``."""

    success: bool
    observed: int


class AtomicMemoryReleasedError(ValueError):
    """An operation on atomic memory after :meth:`AtomicMemory.release`: its mapping may already be gone."""


class AtomicU32:
    """One naturally aligned 32-bit word of a writable buffer: plain loads and a locked ``xchg``.

    The word keeps a buffer export on ``buffer`` for as long as it exists, so the mapping under it cannot
    be closed (``mmap.close()`` raises ``BufferError``) while anyone can still reach it.  The scratch words
    of the exchange belong to this object, so it must not be used by two threads at once: its owner (a
    ring) serialises its users.  Drop every reference to it to give the export back.
    """

    __slots__ = ("_word", "_word_ref", "_desired", "_desired_ref", "_result", "_result_ref")

    def __init__(self, buffer: Any, offset: int) -> None:
        word = ctypes.c_uint32.from_buffer(buffer, offset)
        if ctypes.addressof(word) % 4:
            # A locked operation across a cache line is not atomic for other agents on every x86 part.
            raise ValueError(f"32-bit word at offset {offset:#x} is not 4-byte aligned in memory")
        self._word = word
        self._desired = ctypes.c_uint32()
        self._result = ctypes.c_uint32()
        # byref() objects keep what they point at alive: the C call below can never see a freed block.
        self._word_ref = ctypes.byref(word)
        self._desired_ref = ctypes.byref(self._desired)
        self._result_ref = ctypes.byref(self._result)

    def load(self) -> int:
        """One aligned 32-bit load (atomic on x86; under TSO ordered before later loads)."""
        return self._word.value

    def exchange(self, value: int) -> int:
        """``xchg``: store ``value`` and return the old one; a full barrier on x86."""
        self._desired.value = value
        _XCHG32(self._word_ref, self._desired_ref, _SEQ_CST, self._result_ref)
        return self._result.value


class AtomicMemory:
    """Atomic loads, stores, compare-and-swap and bit operations at naturally aligned offsets of ``buffer``.

    Thread-safe, including against :meth:`release` (see the module docstring)."""

    def __init__(self, buffer: memoryview | bytearray) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("atomic operations need a writable buffer")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._buffer: memoryview | None = view
        self._views: dict[tuple[int, int], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        # An open view that is garbage-collected complains from its finaliser, so an AtomicMemory nobody
        # released (e.g. at interpreter exit) closes its views the same way release() does.
        self._finalizer = weakref.finalize(self, _close_views, self._views, view)

    def __len__(self) -> int:
        return len(self._buffer) if self._buffer is not None else 0

    def _view(self, offset: int, width: int) -> Any:
        """The cached view of a word; the caller holds ``_lock`` until its operation on it is done."""
        if self._buffer is None:
            raise AtomicMemoryReleasedError(f"atomic memory was released ({width}-byte word at {offset:#x})")
        key = (offset, width)
        cached = self._views.get(key)
        if cached is not None:
            return cached[1]
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
        with self._lock:
            return self._view(offset, width).load()

    def store(self, offset: int, width: int, value: int) -> None:
        with self._lock:
            self._view(offset, width).store(value)

    def exchange(self, offset: int, width: int, value: int) -> int:
        with self._lock:
            return self._view(offset, width).exchange(value)

    def cmpxchg(self, offset: int, width: int, expected: int, desired: int) -> CmpxchgResult:
        with self._lock:
            result = self._view(offset, width).cmpxchg_strong(expected, desired)
        return CmpxchgResult(result.success, result.expected)

    def fetch_and(self, offset: int, width: int, mask: int) -> int:
        """Atomically ``*p &= mask``; returns the old value."""
        with self._lock:
            return self._view(offset, width).bin_fetch_and(mask & ((1 << 8 * width) - 1))

    def fetch_or(self, offset: int, width: int, bits: int) -> int:
        """Atomically ``*p |= bits``; returns the old value."""
        with self._lock:
            return self._view(offset, width).bin_fetch_or(bits)

    def test_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        with self._lock:
            return bool(self._view(offset, width).load() >> bit & 1)

    def test_and_set_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        """Set ``bit`` of the word at ``offset``; returns whether it was already set."""
        with self._lock:
            return bool(self._view(offset, width).bit_test_set(bit))

    def test_and_clear_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        """Clear ``bit`` of the word at ``offset``; returns whether it was set."""
        with self._lock:
            return bool(self._view(offset, width).bit_test_reset(bit))

    def release(self) -> None:
        """Drop every cached view (and the buffer export each holds), after any operation in progress.
        Further operations raise :class:`AtomicMemoryReleasedError`."""
        with self._lock:
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
