"""A synchronous dom0 xenstore client over the unix socket (for backends, the toolstack, the CLI and tests).

One request at a time, replies in order as libxenstore expects; watch events that arrive in between are
queued and read with `read_event`. Every wait has a deadline.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections import deque
from pathlib import Path
from typing import Callable, TypeVar

from xenpv.xenabi.xs_wire import XSD_SOCKMSG, XsdSockmsgType as T

log = logging.getLogger("xenstored.client")

DEFAULT_SOCKET = "/var/run/xenstored/socket"
R = TypeVar("R")


class XsRequestError(Exception):
    """The daemon answered XS_ERROR; `errno_name` is the wire error (ENOENT, EACCES, EAGAIN...)."""

    def __init__(self, errno_name: str, op: str, path: str = "") -> None:
        self.errno_name = errno_name
        self.op = op
        self.path = path
        super().__init__(f"{op} {path}: {errno_name}" if path else f"{op}: {errno_name}")


class XsConnectionError(Exception):
    """The socket failed, closed, or a reply did not come before the deadline."""


def default_socket_path() -> str:
    return os.environ.get("XENSTORED_PATH") or DEFAULT_SOCKET


class XsClient:
    def __init__(self, path: str | Path | None = None, timeout: float = 10.0) -> None:
        self.path = str(path or default_socket_path())
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(self.path)
        except OSError as exc:
            self.sock.close()
            raise XsConnectionError(f"cannot connect to xenstored at {self.path}: {exc}") from exc
        self.buf = b""
        self.events: deque[tuple[str, str]] = deque()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "XsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- framing -------------------------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise XsConnectionError(f"send to xenstored failed: {exc}") from exc

    def read_message(self, timeout: float | None = None) -> tuple[int, int, int, bytes]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        hdr = XSD_SOCKMSG.size
        while True:
            if len(self.buf) >= hdr:
                mtype, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(self.buf)
                if len(self.buf) >= hdr + length:
                    payload = self.buf[hdr:hdr + length]
                    self.buf = self.buf[hdr + length:]
                    return mtype, req_id, tx_id, payload
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.sock], [], [], remaining)[0]:
                raise XsConnectionError("timed out waiting for xenstored")
            try:
                data = self.sock.recv(65536)
            except OSError as exc:
                raise XsConnectionError(f"recv from xenstored failed: {exc}") from exc
            if not data:
                raise XsConnectionError("xenstored closed the connection")
            self.buf += data

    def _queue_event(self, payload: bytes) -> None:
        parts = payload.split(b"\0")
        if len(parts) >= 2:
            self.events.append((parts[0].decode("ascii", "replace"), parts[1].decode("ascii", "replace")))

    def request(self, mtype: int, payload: bytes, tx: int = 0, *, what: str = "") -> bytes:
        """Send one request and return the reply payload; raise XsRequestError on XS_ERROR."""
        self.send_raw(XSD_SOCKMSG.pack(mtype, 0, tx, len(payload)) + payload)
        while True:
            rtype, _, _, body = self.read_message()
            if rtype == T.WATCH_EVENT:
                self._queue_event(body)
                continue
            if rtype == T.ERROR:
                raise XsRequestError(body.rstrip(b"\0").decode("ascii", "replace"), T(mtype).name, what)
            if rtype != mtype:
                raise XsConnectionError(f"reply type {rtype} to a request of type {mtype}")
            return body

    # ---- operations ----------------------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(T.READ, path.encode() + b"\0", tx, what=path)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.request(T.WRITE, path.encode() + b"\0" + data, tx, what=path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(T.MKDIR, path.encode() + b"\0", tx, what=path)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(T.RM, path.encode() + b"\0", tx, what=path)

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.read(path, tx)
        except XsRequestError as exc:
            if exc.errno_name == "ENOENT":
                return False
            raise
        return True

    def directory(self, path: str, tx: int = 0) -> list[str]:
        """Child names; a list too big for one reply is fetched with DIRECTORY_PART, as libxenstore does."""
        try:
            body = self.request(T.DIRECTORY, path.encode() + b"\0", tx, what=path)
        except XsRequestError as exc:
            if exc.errno_name != "E2BIG":
                raise
            return self._directory_part(path, tx)
        return [c.decode() for c in body.split(b"\0")[:-1]]

    def _directory_part(self, path: str, tx: int, attempts: int = 100) -> list[str]:
        for _ in range(attempts):
            data = b""
            gen = None
            while True:
                body = self.request(T.DIRECTORY_PART, b"%s\0%d\0" % (path.encode(), len(data)), tx, what=path)
                g, chunk = body.split(b"\0", 1)
                if gen is None:
                    gen = g
                elif g != gen:
                    break  # the directory changed under us: start again
                if chunk.endswith(b"\0\0") or chunk == b"\0":
                    data += chunk[:-1]
                    return [c.decode() for c in data.split(b"\0")[:-1]]
                data += chunk
        raise XsRequestError("EAGAIN", "DIRECTORY_PART", path)

    def get_perms(self, path: str, tx: int = 0) -> list[str]:
        body = self.request(T.GET_PERMS, path.encode() + b"\0", tx, what=path)
        return [p.decode() for p in body.split(b"\0")[:-1]]

    def set_perms(self, path: str, perms: list[str], tx: int = 0) -> None:
        payload = path.encode() + b"\0" + b"".join(p.encode() + b"\0" for p in perms)
        self.request(T.SET_PERMS, payload, tx, what=path)

    def watch(self, path: str, token: str, depth: int | None = None) -> None:
        payload = path.encode() + b"\0" + token.encode() + b"\0"
        if depth is not None:
            payload += str(depth).encode() + b"\0"
        self.request(T.WATCH, payload, what=path)

    def unwatch(self, path: str, token: str) -> None:
        self.request(T.UNWATCH, path.encode() + b"\0" + token.encode() + b"\0", what=path)

    def read_event(self, timeout: float | None = None) -> tuple[str, str]:
        """The next watch event (path, token), waiting up to `timeout`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not self.events:
            rtype, _, _, body = self.read_message(max(0.0, deadline - time.monotonic()))
            if rtype != T.WATCH_EVENT:
                raise XsConnectionError(f"unsolicited message of type {rtype}")
            self._queue_event(body)
        return self.events.popleft()

    def wait_event(self, timeout: float, wake: int | None = None) -> tuple[str, str] | None:
        """The next watch event, or None when none came within `timeout` or `wake` (an fd the caller
        drains) became readable first.

        The recv that brings a reply can bring the events that followed it too: they sit whole in the
        buffer while the socket is no longer readable, so the buffer is looked at before the socket is
        waited on (waiting on the socket alone leaves them there until xenstored sends something else)."""
        if self.events:
            return self.events.popleft()
        if not self._message_buffered():
            ready = select.select([self.sock] if wake is None else [self.sock, wake], [], [], timeout)[0]
            if self.sock not in ready:
                return None
        return self.read_event()

    def _message_buffered(self) -> bool:
        if len(self.buf) < XSD_SOCKMSG.size:
            return False
        return len(self.buf) >= XSD_SOCKMSG.size + XSD_SOCKMSG.unpack_from(self.buf)[3]

    def transaction_start(self) -> int:
        return int(self.request(T.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> bool:
        """True if committed (or aborted as asked); False if the commit conflicted (EAGAIN)."""
        try:
            self.request(T.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)
        except XsRequestError as exc:
            if exc.errno_name == "EAGAIN":
                return False
            raise
        return True

    def transact(self, body: Callable[[int], R], attempts: int = 100) -> R:
        """Run `body(tx)` in a transaction, retrying on EAGAIN; an exception aborts the transaction."""
        for _ in range(attempts):
            tx = self.transaction_start()
            try:
                result = body(tx)
            except BaseException:
                self.transaction_end(tx, commit=False)
                raise
            if self.transaction_end(tx):
                return result
        raise XsRequestError("EAGAIN", "TRANSACTION_END", f"after {attempts} attempts")

    def get_domain_path(self, domid: int) -> str:
        return self.request(T.GET_DOMAIN_PATH, b"%d\0" % domid).rstrip(b"\0").decode()

    def introduce(self, domid: int, gfn: int, port: int) -> None:
        self.request(T.INTRODUCE, b"%d\0%d\0%d\0" % (domid, gfn, port))

    def release(self, domid: int) -> None:
        self.request(T.RELEASE, b"%d\0" % domid)
