"""A minimal NBD client (fixed newstyle handshake, simple replies) for the images QEMU's tools export.

Only what blkback needs: one export by name, READ, WRITE, FLUSH, TRIM.  Requests are serialised under a lock,
so several queue threads may share one connection.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("blkback.nbd")

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
NBD_FLAG_FIXED_NEWSTYLE = 1
NBD_FLAG_NO_ZEROES = 2
NBD_FLAG_C_FIXED_NEWSTYLE = 1
NBD_FLAG_C_NO_ZEROES = 2
NBD_OPT_EXPORT_NAME = 1

NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_TRIM = 1 << 5

NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4

_REQUEST = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPTION = struct.Struct(">QII")


class NbdError(OSError):
    """The server refused a request or broke the protocol; ``errno`` is the server's error when it sent one."""


@dataclass(frozen=True)
class NbdExport:
    size: int
    flags: int

    @property
    def can_trim(self) -> bool:
        return bool(self.flags & NBD_FLAG_SEND_TRIM)

    @property
    def can_flush(self) -> bool:
        return bool(self.flags & NBD_FLAG_SEND_FLUSH)


class NbdClient:
    def __init__(self, path: Path, export: str = "", timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._lock = threading.Lock()
        self._handle = 0
        try:
            self._sock.connect(str(path))
            self.export = self._handshake(export)
        except BaseException:
            self._sock.close()
            raise

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                raise NbdError(f"NBD server closed the connection ({len(buf)} of {n} bytes read)")
            buf += chunk
        return bytes(buf)

    def _recv_into(self, views: list[memoryview]) -> None:
        for v in views:
            got = 0
            while got < len(v):
                n = self._sock.recv_into(v[got:])
                if not n:
                    raise NbdError("NBD server closed the connection in the middle of a read reply")
                got += n

    def _handshake(self, export: str) -> NbdExport:
        hello = self._recv(18)
        if hello[:8] != NBDMAGIC or struct.unpack(">Q", hello[8:16])[0] != IHAVEOPT:
            raise NbdError(f"not a newstyle NBD server (greeting {hello!r})")
        (server_flags,) = struct.unpack(">H", hello[16:18])
        if not server_flags & NBD_FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"NBD server is not fixed-newstyle (flags {server_flags:#x})")
        client_flags = NBD_FLAG_C_FIXED_NEWSTYLE | (server_flags & NBD_FLAG_NO_ZEROES)
        name = export.encode()
        self._sock.sendall(struct.pack(">I", client_flags) + _OPTION.pack(IHAVEOPT, NBD_OPT_EXPORT_NAME, len(name))
                           + name)
        size, flags = struct.unpack(">QH", self._recv(10))
        if not client_flags & NBD_FLAG_C_NO_ZEROES:
            self._recv(124)
        log.debug("export %r: %d bytes, flags %#x", export, size, flags)
        return NbdExport(size, flags)

    def _request(self, cmd: int, offset: int, length: int, payload: list[memoryview] | None = None,
                 into: list[memoryview] | None = None) -> None:
        with self._lock:
            self._handle += 1
            handle = self._handle
            self._sock.sendall(_REQUEST.pack(NBD_REQUEST_MAGIC, 0, cmd, handle, offset, length))
            for p in payload or ():
                self._sock.sendall(p)
            magic, error, got_handle = _REPLY.unpack(self._recv(_REPLY.size))
            if magic != NBD_SIMPLE_REPLY_MAGIC or got_handle != handle:
                raise NbdError(f"bad NBD reply (magic {magic:#x}, handle {got_handle} for {handle})")
            if error:
                # A read's error reply carries no data; the connection stays usable.
                raise NbdError(error, f"NBD command {cmd} at {offset}+{length} failed")
            if into is not None:
                self._recv_into(into)

    def read_into(self, offset: int, views: list[memoryview]) -> None:
        self._request(NBD_CMD_READ, offset, sum(len(v) for v in views), into=views)

    def write(self, offset: int, views: list[memoryview]) -> None:
        self._request(NBD_CMD_WRITE, offset, sum(len(v) for v in views), payload=views)

    def flush(self) -> None:
        self._request(NBD_CMD_FLUSH, 0, 0)

    def trim(self, offset: int, length: int) -> None:
        self._request(NBD_CMD_TRIM, offset, length)

    def close(self) -> None:
        try:
            with self._lock:
                self._sock.sendall(_REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC, 0, 0, 0))
        except OSError:
            pass  # the server is already gone: nothing to say goodbye to
        finally:
            self._sock.close()
