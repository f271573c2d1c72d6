"""Peers that talk to an in-process xenstored core directly (no transport)."""
from __future__ import annotations

from dataclasses import dataclass, field

from xenpv.backends.xenstored.connection import Connection
from xenpv.backends.xenstored.core import XenstoreCore
from xenpv.xenabi.xs_wire import XSD_SOCKMSG, XsdSockmsgType as T


@dataclass
class Peer:
    """One connection to an in-process core; replies are returned, watch events are collected."""
    core: XenstoreCore
    domid: int = 0
    privileged: bool = True
    out: list[bytes] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conn = Connection(f"test-dom{self.domid}", self.domid, self.privileged, self.out.append)

    def _collect(self) -> list[tuple[int, int, int, bytes]]:
        msgs = []
        for m in self.out:
            mtype, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(m)
            assert length == len(m) - XSD_SOCKMSG.size
            msgs.append((mtype, req_id, tx_id, m[XSD_SOCKMSG.size:]))
        self.out.clear()
        return msgs

    def _drain(self) -> list[tuple[int, int, int, bytes]]:
        """Move watch events to `events`; return the other messages."""
        others = []
        for m in self._collect():
            if m[0] == T.WATCH_EVENT:
                assert m[1] == 0 and m[2] == 0
                parts = m[3].split(b"\0")
                assert len(parts) == 3 and parts[2] == b"", m
                self.events.append((parts[0].decode(), parts[1].decode()))
            else:
                others.append(m)
        return others

    def call(self, mtype: int, payload: bytes, tx: int = 0, req_id: int = 7) -> tuple[int, bytes]:
        assert not self._drain(), "unsolicited message"
        self.core.handle(self.conn, mtype, req_id, tx, payload)
        replies = self._drain()
        assert len(replies) == 1, replies
        assert replies[0][1] == req_id and replies[0][2] == tx, "reply must echo req_id and tx_id"
        return replies[0][0], replies[0][3]

    def ok(self, mtype: int, payload: bytes, tx: int = 0) -> bytes:
        rtype, body = self.call(mtype, payload, tx)
        assert rtype == mtype, f"expected success, got {body!r}"
        return body

    def err(self, mtype: int, payload: bytes, tx: int = 0) -> str:
        rtype, body = self.call(mtype, payload, tx)
        assert rtype == T.ERROR, f"expected an error, got {body!r}"
        assert body.endswith(b"\0")
        return body[:-1].decode()

    def take_events(self) -> list[tuple[str, str]]:
        assert not self._drain(), "unsolicited message"
        ev, self.events = self.events, []
        return ev

    # conveniences
    def read(self, path: str, tx: int = 0) -> bytes:
        return self.ok(T.READ, path.encode() + b"\0", tx)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        v = value.encode() if isinstance(value, str) else value
        assert self.ok(T.WRITE, path.encode() + b"\0" + v, tx) == b"OK\0"

    def mkdir(self, path: str, tx: int = 0) -> None:
        assert self.ok(T.MKDIR, path.encode() + b"\0", tx) == b"OK\0"

    def rm(self, path: str, tx: int = 0) -> None:
        assert self.ok(T.RM, path.encode() + b"\0", tx) == b"OK\0"

    def directory(self, path: str, tx: int = 0) -> list[str]:
        body = self.ok(T.DIRECTORY, path.encode() + b"\0", tx)
        return [c.decode() for c in body.split(b"\0")[:-1]]

    def watch(self, path: str, token: str, depth: int | None = None) -> None:
        payload = path.encode() + b"\0" + token.encode() + b"\0"
        if depth is not None:
            payload += str(depth).encode() + b"\0"
        assert self.ok(T.WATCH, payload) == b"OK\0"

    def unwatch_err(self, path: str, token: str) -> str:
        return self.err(T.UNWATCH, path.encode() + b"\0" + token.encode() + b"\0")

    def set_perms(self, path: str, *perms: str, tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        assert self.ok(T.SET_PERMS, payload, tx) == b"OK\0"

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        return [p.decode() for p in self.ok(T.GET_PERMS, path.encode() + b"\0", tx).split(b"\0")[:-1]]

    def tx_start(self) -> int:
        body = self.ok(T.TRANSACTION_START, b"\0")
        assert body.endswith(b"\0")
        return int(body[:-1])

    def tx_end(self, tx: int, commit: bool = True) -> str:
        rtype, body = self.call(T.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)
        return "OK" if rtype == T.TRANSACTION_END else body[:-1].decode()


def peer(core: XenstoreCore, domid: int) -> Peer:
    return Peer(core, domid, privileged=domid == 0)
