"""A client of xenhv's control socket (used by the toolstack and the harness)."""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

from xenpv.base.errors import HarnessError


class XenhvError(HarnessError):
    def __init__(self, op: str, message: str, errno: int | None, gntst: int | None = None) -> None:
        self.op = op
        self.errno = errno
        self.gntst = gntst  # a grant operation's GNTST_* status
        super().__init__(f"xenhv {op}: {message}")


class XenhvControl:
    def __init__(self, path: Path | str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")

    def call(self, op: str, **args: Any) -> Any:
        self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line = self._file.readline()
        if not line:
            raise XenhvError(op, "xenhv closed the control connection", None)
        reply = json.loads(line)
        if "error" in reply:
            raise XenhvError(op, reply["error"], reply.get("errno"), reply.get("gntst"))
        return reply["ok"]

    def close(self) -> None:
        self._file.close()
        self.sock.close()
