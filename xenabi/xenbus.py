"""io/xenbus.h: the state each end of a split device writes, as a decimal string, to its ``state`` node."""

from __future__ import annotations

import enum


class XenbusState(enum.IntEnum):
    """Members are the C enumerators without the ``XenbusState`` prefix."""

    Unknown = 0
    Initialising = 1
    InitWait = 2
    Initialised = 3
    Connected = 4
    Closing = 5
    Closed = 6
    Reconfiguring = 7
    Reconfigured = 8

    @classmethod
    def parse(cls, text: str | bytes | None) -> XenbusState:
        """A ``state`` node's value; a missing or malformed node counts as Unknown, like the drivers do."""
        if text is None:
            return cls.Unknown
        try:
            return cls(int(text))
        except ValueError:
            return cls.Unknown

    def wire(self) -> str:
        """The value written to the ``state`` node."""
        return str(int(self))
