"""Introduced domains and the injectable way their ring pages are mapped."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from xenpv.backends.xenstored.errors import XsError

if TYPE_CHECKING:
    from xenpv.backends.xenstored.connection import Connection

DOMID_MAX = 65535


@dataclass(eq=False)
class Domain:
    domid: int
    gfn: int
    port: int
    conn: "Connection | None"
    shutdown: bool = False  # the latch RESUME clears


class RingAttacher(Protocol):
    """How the daemon gives an introduced domain a ring connection (daemon.py provides the real one)."""

    def attach(self, domid: int, gfn: int, port: int) -> "Connection": ...

    def rebind(self, conn: "Connection", port: int) -> None: ...

    def detach(self, conn: "Connection") -> None: ...


def parse_domid(raw: bytes) -> int:
    """strtoul base 10 over the whole string, at most 65535 (domain.c parse_domid)."""
    if not raw or not raw.isdigit() or len(raw) > 10:
        raise XsError("EINVAL", f"bad domid {raw[:16]!r}")
    v = int(raw)
    if v > DOMID_MAX:
        raise XsError("EINVAL", f"domid out of range {v}")
    return v


def parse_uint(raw: bytes, what: str) -> int:
    if not raw or not raw.isdigit() or len(raw) > 20:
        raise XsError("EINVAL", f"bad {what} {raw[:24]!r}")
    return int(raw)
