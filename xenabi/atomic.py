"""Lock-free atomic operations on words of a shared page, for state the guest updates from another process.

Grant entries and the event channel bitmaps live in pages both xenhv and the guest map.  A Python lock
protects nothing there: the other side is a different process.  These helpers use the CPU's atomic
instructions (``__atomic`` builtins in a small C helper, xenabi/_atomic_ops.c, called through ctypes) on
the page itself, so a compare-and-swap here and one in the guest (or in C) serialise exactly as Xen's
``guest_cmpxchg`` and the guest's ``sync_cmpxchg`` do.  A call costs about 0.5 us; the ``atomics``
package used before cost 5-11 us in its per-call checks.

Bit numbering is the x86 one Xen uses: bit ``n`` of a little-endian word at ``offset`` is bit ``n % 8`` of
byte ``offset + n // 8``.

Lifetime
--------
The C helper takes addresses, so an :class:`AtomicMemory` holds a buffer export on its mapping (a ctypes
array made with ``from_buffer``) for as long as it may compute one: the mapping cannot be closed under it
(``mmap.close()`` raises ``BufferError``).  Another thread could still release the AtomicMemory between
the address computation and the C call, so one lock covers both, and :meth:`AtomicMemory.release` takes
the same lock: it waits for an operation in progress, gives the export back, and every later operation
raises :class:`AtomicMemoryReleasedError`.  Call :meth:`AtomicMemory.release` before the mapping is closed.
A native operation on two buffers (:meth:`AtomicMemory.call_with`, a grant pin: the pin table and the grant
frame) holds both locks, the caller's buffer first.

:class:`AtomicU32` is the fast path for one word (ring indexes, published at every request): a ctypes
word made with ``from_buffer``, which holds the export for as long as the object exists.
"""
from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

from xenpv.xenabi.native import load_atomic_ops

WIDTHS = (1, 2, 4, 8)
_MAX = {w: (1 << 8 * w) - 1 for w in WIDTHS}

# The helper's functions, looked up at each call through this name (tests hold a thread inside one).
_OPS = load_atomic_ops()


def helper() -> ctypes.CDLL:
    """The loaded helper, for its functions that take no buffer (xenabi.grant_pins' layout check and hook)."""
    return _OPS


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
    be closed (``mmap.close()`` raises ``BufferError``) while anyone can still reach it, and the address
    kept beside it stays valid.  Drop every reference to it to give the export back.
    """

    __slots__ = ("_word", "_address")

    def __init__(self, buffer: Any, offset: int) -> None:
        word = ctypes.c_uint32.from_buffer(buffer, offset)
        if ctypes.addressof(word) % 4:
            # A locked operation across a cache line is not atomic for other agents on every x86 part.
            raise ValueError(f"32-bit word at offset {offset:#x} is not 4-byte aligned in memory")
        self._word = word
        self._address = ctypes.addressof(word)

    def load(self) -> int:
        """One aligned 32-bit load (atomic on x86; under TSO ordered before later loads)."""
        return self._word.value

    def exchange(self, value: int) -> int:
        """``xchg``: store ``value`` and return the old one; a full barrier on x86."""
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"{value:#x} does not fit a 32-bit word")
        return _OPS.xpv_exchange(self._address, 4, value)


class AtomicMemory:
    """Atomic loads, stores, compare-and-swap and bit operations at naturally aligned offsets of ``buffer``.

    Thread-safe, including against :meth:`release` (see the module docstring)."""

    def __init__(self, buffer: memoryview | bytearray) -> None:
        view = memoryview(buffer)
        if view.readonly:
            raise ValueError("atomic operations need a writable buffer")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self._view: memoryview | None = view
        self._size = len(view)
        # The export that keeps the mapping (and so every address computed from `_base`) in place.
        self._anchor: Any = (ctypes.c_ubyte * self._size).from_buffer(view) if self._size else None
        self._base = ctypes.addressof(self._anchor) if self._size else 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._size if self._view is not None else 0

    def _address(self, offset: int, width: int) -> int:
        """The word's address; the caller holds ``_lock`` until its operation on it is done."""
        if self._view is None:
            raise AtomicMemoryReleasedError(f"atomic memory was released ({width}-byte word at {offset:#x})")
        if width not in _MAX:
            raise ValueError(f"no atomic operations on {width}-byte words")
        address = self._base + offset
        # The alignment rule is the CPU's: a locked operation across a cache line is not atomic for other
        # agents on every x86 part.
        if offset < 0 or address % width or offset + width > self._size:
            raise ValueError(f"{width}-byte atomic at offset {offset:#x} is unaligned or outside "
                             f"{self._size:#x} bytes")
        return address

    @staticmethod
    def _value(value: int, width: int) -> int:
        if not 0 <= value <= _MAX[width]:
            raise ValueError(f"{value:#x} does not fit a {width}-byte word")
        return value

    def load(self, offset: int, width: int) -> int:
        with self._lock:
            return _OPS.xpv_load(self._address(offset, width), width)

    def store(self, offset: int, width: int, value: int) -> None:
        with self._lock:
            _OPS.xpv_store(self._address(offset, width), width, self._value(value, width))

    def exchange(self, offset: int, width: int, value: int) -> int:
        with self._lock:
            return _OPS.xpv_exchange(self._address(offset, width), width, self._value(value, width))

    def cmpxchg(self, offset: int, width: int, expected: int, desired: int) -> CmpxchgResult:
        with self._lock:
            observed = _OPS.xpv_cmpxchg(self._address(offset, width), width, self._value(expected, width),
                                        self._value(desired, width))
        return CmpxchgResult(observed == expected, observed)

    def fetch_and(self, offset: int, width: int, mask: int) -> int:
        """Atomically ``*p &= mask``; returns the old value."""
        with self._lock:
            return _OPS.xpv_fetch_and(self._address(offset, width), width, mask & _MAX[width])

    def fetch_or(self, offset: int, width: int, bits: int) -> int:
        """Atomically ``*p |= bits``; returns the old value."""
        with self._lock:
            return _OPS.xpv_fetch_or(self._address(offset, width), width, self._value(bits, width))

    def _bit(self, offset: int, bit: int, width: int) -> int:
        address = self._address(offset, width)
        if not 0 <= bit < 8 * width:
            raise ValueError(f"bit {bit} is outside a {width}-byte word")
        return address

    def test_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        with self._lock:
            return bool(_OPS.xpv_load(self._bit(offset, bit, width), width) >> bit & 1)

    def test_and_set_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        """Set ``bit`` of the word at ``offset``; returns whether it was already set."""
        with self._lock:
            return bool(_OPS.xpv_test_and_set_bit(self._bit(offset, bit, width), width, bit))

    def test_and_clear_bit(self, offset: int, bit: int, width: int = 8) -> bool:
        """Clear ``bit`` of the word at ``offset``; returns whether it was set."""
        with self._lock:
            return bool(_OPS.xpv_test_and_clear_bit(self._bit(offset, bit, width), width, bit))

    def call(self, name: str, length: int, *args: int) -> int:
        """The helper's function ``name`` called as ``name(address of byte 0, *args)`` with the buffer held: a
        native operation on several words of the first ``length`` bytes, at offsets the caller has checked
        to lie within them, naturally aligned."""
        with self._lock:
            if self._view is None:
                raise AtomicMemoryReleasedError(f"atomic memory was released ({name} on {length} bytes)")
            if length > self._size:
                raise ValueError(f"{name} on {length} bytes of a {self._size}-byte buffer")
            return getattr(_OPS, name)(self._base, *args)

    def prepare(self, name: str, length: int, *args: int) -> "PreparedCall":
        """:meth:`call` with its arguments fixed now: the same call, checked once, for a path that makes it
        over and over (each event's delivery). Its arguments are converted to C once, which is most of a
        native call's cost from Python."""
        with self._lock:
            if self._view is None:
                raise AtomicMemoryReleasedError(f"atomic memory was released (preparing {name})")
            if length > self._size:
                raise ValueError(f"{name} on {length} bytes of a {self._size}-byte buffer")
            function = getattr(_OPS, name)
            if len(args) + 1 != len(function.argtypes):
                raise TypeError(f"{name} takes {len(function.argtypes) - 1} arguments after the address, "
                                f"{len(args)} given")
            converted = tuple(kind(value) for kind, value in zip(function.argtypes, (self._base, *args)))
        return PreparedCall(self, function, converted)

    def call_with(self, name: str, length: int, other: "AtomicMemory", offset: int, width: int, *args: int) -> int:
        """:meth:`call` over two buffers: ``name(address of byte 0, address of other's word at offset, *args)``
        with both held (this one first: callers that nest them keep that order).  The helper works on the
        first ``length`` bytes of this buffer and on the naturally aligned ``width`` bytes at ``offset`` of
        ``other``."""
        if other is self:
            raise ValueError(f"{name}: call_with needs two different buffers")
        with self._lock, other._lock:
            if self._view is None:
                raise AtomicMemoryReleasedError(f"atomic memory was released ({name} on {length} bytes)")
            if length > self._size:
                raise ValueError(f"{name} on {length} bytes of a {self._size}-byte buffer")
            return getattr(_OPS, name)(self._base, other._address(offset, width), *args)

    def release(self) -> None:
        """Give the buffer export back, after any operation in progress.  Further operations raise
        :class:`AtomicMemoryReleasedError`."""
        with self._lock:
            self._anchor = None
            if self._view is not None:
                self._view.release()
            self._view = None

    def __enter__(self) -> "AtomicMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PreparedCall:
    """One native call on an :class:`AtomicMemory` with its arguments already in C form (see
    :meth:`AtomicMemory.prepare`); calling it holds the memory as :meth:`AtomicMemory.call` does, so it
    raises :class:`AtomicMemoryReleasedError` after a release instead of touching an unmapped page."""

    __slots__ = ("_memory", "_function", "_args")

    def __init__(self, memory: AtomicMemory, function: Any, args: tuple) -> None:
        self._memory, self._function, self._args = memory, function, args

    def __call__(self) -> int:
        memory = self._memory
        with memory._lock:
            if memory._view is None:
                raise AtomicMemoryReleasedError(f"atomic memory was released ({self._function.__name__})")
            return self._function(*self._args)

