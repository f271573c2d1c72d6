"""Node permissions (xenstore-common.h, core.c perm_for_conn)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import IntFlag

from xenpv.backends.xenstored.errors import XsError
from xenpv.xenabi.xs_wire import DOMID_ANY


class Access(IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = 3
    OWNER = 4  # may change permissions


_LETTERS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_BY_ACCESS = {v: k for k, v in _LETTERS.items()}


@dataclass(frozen=True, slots=True)
class Perm:
    domid: int
    access: Access

    def encode(self) -> bytes:
        return f"{_BY_ACCESS[self.access]}{self.domid}".encode("ascii")


Perms = tuple[Perm, ...]


def parse_perm(raw: bytes) -> Perm:
    """`<letter><domid>`, domid as C strtol(base 0) over the whole rest: the wire format of SET_PERMS."""
    try:
        text = raw.decode("ascii")
        access = _LETTERS[text[0]]
        domid = _strtol0(text[1:])
    except (UnicodeDecodeError, IndexError, KeyError, ValueError):
        raise XsError("EINVAL", f"bad permission {raw[:32]!r}") from None
    if not 0 <= domid <= 0xFFFF:
        raise XsError("EINVAL", f"permission domid out of range: {raw[:32]!r}")
    return Perm(domid, access)


def _strtol0(text: str) -> int:
    """C strtol(base 0) over the whole string: 0x.. hex, 0.. octal, else decimal."""
    if text[:2] in ("0x", "0X"):
        return int(text[2:], 16)
    if len(text) > 1 and text[0] == "0":
        return int(text[1:], 8)
    if not text.isdigit():
        raise ValueError(text)
    return int(text)


def encode_perms(perms: Perms) -> bytes:
    return b"".join(p.encode() + b"\0" for p in perms)


def access_for(perms: Perms, domid: int, target: int | None = None) -> Access:
    """What an unprivileged domain (acting also for `target`, see SET_TARGET) may do on a node."""
    owner = perms[0].domid
    if owner == domid or (target is not None and owner == target):
        return Access.BOTH | Access.OWNER
    for p in perms[1:]:
        if p.domid == domid or p.domid == DOMID_ANY or (target is not None and p.domid == target):
            return p.access
    return perms[0].access
