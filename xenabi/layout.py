"""Shared machinery for describing Xen ABI layouts with ctypes.

Every layout in xenabi is a little-endian ctypes Structure named after its C type.  ctypes computes the
offsets with the C alignment rules, so the ctypes class *is* the single source of truth: code that needs an
offset reads ``Layout.field.offset`` (or :func:`field_offsets`), never a literal.  Each class records the C
type it mirrors in ``_xen_name_`` (and, for foreign ABIs, ``_xen_abi_``) so the conformance test can compare
it against the real headers compiled by gcc.

Ring entries are (de)serialised with :class:`struct.Struct`; :func:`struct_of` derives that format from the
ctypes layout so the two can never disagree.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterator
from typing import Any, TypeVar

# Only little-endian hosts (x86) run the harness, but pinning the byte order keeps the layouts honest if
# someone imports them elsewhere.
XenStruct = ctypes.LittleEndianStructure
XenUnion = ctypes.LittleEndianUnion

_S = TypeVar("_S", bound=ctypes.Structure)

_SCALAR_CODES: dict[type, str] = {
    ctypes.c_uint8: "B",
    ctypes.c_int8: "b",
    ctypes.c_uint16: "H",
    ctypes.c_int16: "h",
    ctypes.c_uint32: "I",
    ctypes.c_int32: "i",
    ctypes.c_uint64: "Q",
    ctypes.c_int64: "q",
}


def _scalar_code(ctype: Any) -> str | None:
    return _SCALAR_CODES.get(ctype) if isinstance(ctype, type) else None


def _is_aggregate(ctype: Any) -> bool:
    return isinstance(ctype, type) and issubclass(ctype, (ctypes.Structure, ctypes.Union))


def field_offsets(layout: type[ctypes.Structure] | type[ctypes.Union]) -> dict[str, tuple[int, int]]:
    """Every field of ``layout`` by C member designator (``seg[0].gref``, ``u.gso.size``) -> (offset, size).

    Arrays appear once as a whole and, when their element is an aggregate, element 0's members are listed
    too (the other elements follow at the element stride, which the whole-array size pins down).
    """
    result: dict[str, tuple[int, int]] = {}
    for path, offset, ctype in _walk(layout, "", 0):
        result[path] = (offset, ctypes.sizeof(ctype))
    return result


def _walk(layout: Any, prefix: str, base: int) -> Iterator[tuple[str, int, Any]]:
    for entry in layout._fields_:
        name, ctype = entry[0], entry[1]
        descriptor = getattr(layout, name)
        path = f"{prefix}{name}"
        offset = base + descriptor.offset
        yield path, offset, ctype
        element = getattr(ctype, "_type_", None)
        if isinstance(ctype, type) and issubclass(ctype, ctypes.Array) and _is_aggregate(element):
            yield from _walk(element, f"{path}[0].", offset)
        elif _is_aggregate(ctype):
            yield from _walk(ctype, f"{path}.", offset)


def struct_of(layout: type[ctypes.Structure]) -> struct.Struct:
    """A flat :class:`struct.Struct` with exactly the byte layout of ``layout``.

    Scalars become their integer codes, uint8 arrays become ``Ns`` bytes, arrays of other scalars and of
    structures are flattened element by element, unions become raw bytes, and holes become pad bytes.
    """
    fmt = "<" + _format_of(layout)
    result = struct.Struct(fmt)
    if result.size != ctypes.sizeof(layout):
        raise AssertionError(f"{layout.__name__}: struct format {fmt!r} is {result.size} bytes, "
                             f"ctypes says {ctypes.sizeof(layout)}")
    return result


def _format_of(layout: Any) -> str:
    parts: list[str] = []
    cursor = 0
    for entry in layout._fields_:
        name, ctype = entry[0], entry[1]
        offset = getattr(layout, name).offset
        if offset > cursor:
            parts.append(f"{offset - cursor}x")
        parts.append(_format_of_type(ctype))
        cursor = offset + ctypes.sizeof(ctype)
    if ctypes.sizeof(layout) > cursor:
        parts.append(f"{ctypes.sizeof(layout) - cursor}x")
    return "".join(parts)


def _format_of_type(ctype: Any) -> str:
    code = _scalar_code(ctype)
    if code is not None:
        return code
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Array):
        element = ctype._type_
        element_code = _scalar_code(element)
        if element_code == "B":
            return f"{ctype._length_}s"
        if element_code is not None:
            return f"{ctype._length_}{element_code}"
        return _format_of_type(element) * ctype._length_
    if isinstance(ctype, type) and issubclass(ctype, ctypes.Union):
        return f"{ctypes.sizeof(ctype)}s"
    if _is_aggregate(ctype):
        return _format_of(ctype)
    raise TypeError(f"no struct code for {ctype!r}")


def from_bytes(layout: type[_S], data: bytes | bytearray | memoryview) -> _S:
    """A private copy of ``layout`` parsed from exactly ``sizeof(layout)`` bytes (no aliasing of ``data``)."""
    size = ctypes.sizeof(layout)
    if len(data) != size:
        raise ValueError(f"{layout.__name__} needs {size} bytes, got {len(data)}")
    return layout.from_buffer_copy(data)


def to_dict(value: ctypes.Structure | ctypes.Union) -> dict[str, Any]:
    """Field values as plain Python data (nested aggregates as dicts, arrays as lists) for logs and asserts."""
    return {entry[0]: _plain(getattr(value, entry[0])) for entry in value._fields_}


def _plain(value: Any) -> Any:
    if isinstance(value, (ctypes.Structure, ctypes.Union)):
        return to_dict(value)
    if isinstance(value, ctypes.Array):
        return [_plain(item) for item in value]
    return value
