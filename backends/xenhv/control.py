"""A client of xenhv's control socket (used by the toolstack and the harness)."""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenpv.base.errors import HarnessError


class XenhvError(HarnessError):
    def __init__(self, op: str, message: str, errno: int | None, gntst: int | None = None) -> None:
        self.op = op
        self.errno = errno
        self.gntst = gntst  # a grant operation's GNTST_* status
        super().__init__(f"xenhv {op}: {message}")


# File descriptors one reply may carry, and the ops whose replies carry them.
MAX_REPLY_FDS = 4
FD_OPS = frozenset({"gnttab_share"})


@dataclass
class FdReply:
    """What a control op returns when its answer includes file descriptors (xenhv's, not handed over: the
    server sends copies).  The client sees ``ok`` with ``"fds"``: the received descriptors, its own."""

    ok: dict[str, Any]
    fds: list[int]


class XenhvControl:
    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")

    def _reply(self, op: str) -> tuple[bytes, list[int]]:
        """One reply line and the descriptors that came with it.  Only FD_OPS read the socket directly:
        the buffered reader is empty between calls (one reply per request, nothing unasked)."""
        if op not in FD_OPS:
            return self._file.readline(), []
        fds: list[int] = []
        buf = bytearray()
        while (nl := buf.find(b"\n")) < 0:
            data, got, flags, _ = socket.recv_fds(self.sock, 1 << 16, MAX_REPLY_FDS)
            fds += got
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise XenhvError(op, "xenhv sent more descriptors than a reply may carry", None)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise XenhvError(op, "xenhv closed the control connection", None)
            buf += data
        if nl + 1 != len(buf):
            for fd in fds:
                os.close(fd)
            raise XenhvError(op, "xenhv sent more than one reply", None)
        return bytes(buf[:nl]), fds

    def call(self, op: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line, fds = self._reply(op)
        if not line:
            raise XenhvError(op, "xenhv closed the control connection", None)
        try:
            reply = json.loads(line)
            if "error" in reply:
                raise XenhvError(op, reply["error"], reply.get("errno"), reply.get("gntst"))
            if reply.get("fds", 0) != len(fds):
                raise XenhvError(op, f"reply announced {reply.get('fds')} descriptors, {len(fds)} came", None)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        if fds:
            return {**reply["ok"], "fds": fds}
        return reply["ok"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()
