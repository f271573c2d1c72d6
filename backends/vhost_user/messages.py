"""vhost-user wire format (QEMU docs/interop/vhost-user.rst): header, payload layouts, request ids,
feature bits, and message framing with file descriptors passed by SCM_RIGHTS.

Everything here is shared by the front-end and the back-end so the two roles cannot drift apart.
Byte order is the host's (the protocol is local to one machine), hence the "=" struct prefixes.
"""
from __future__ import annotations

import enum
import logging
import os
import select
import socket
import struct
import time
from dataclasses import dataclass, field

log = logging.getLogger("vhost_user")

# --- header ------------------------------------------------------------------------------------
HEADER = struct.Struct("=III")  # u32 request, u32 flags, u32 size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# --- payload layouts ---------------------------------------------------------------------------
U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # index, num
VRING_ADDR = struct.Struct("=IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
MEM_REGION = struct.Struct("=QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
MEM_TABLE_HEADER = struct.Struct("=II")  # nregions, padding; followed by MEM_REGION[nregions]
SINGLE_MEM_REGION = struct.Struct("=Q" + MEM_REGION.format[1:])  # padding, then one region
CONFIG_HEADER = struct.Struct("=III")  # offset, size, flags; followed by `size` config bytes

MAX_MEM_TABLE_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: the SET_MEM_TABLE array length
MAX_CONFIG_SIZE = 256  # QEMU's VHOST_USER_MAX_CONFIG_SIZE
MAX_FDS = MAX_MEM_TABLE_REGIONS  # no request carries more fds than SET_MEM_TABLE
MAX_PAYLOAD = 512  # above every payload we accept; larger sizes are refused before buffering
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 0x100
MAX_VRINGS = VRING_INDEX_MASK + 1
U64_LIMIT = 1 << 64


class Request(enum.IntEnum):
    """Front-end to back-end request ids."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES, a virtio feature bit

# Requests whose answer is a reply message of their own (so NEED_REPLY adds no separate ack).
REPLYING = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
    }
)


# --- errors ------------------------------------------------------------------------------------
class VhostUserError(Exception):
    """Base of the errors of this package."""


class VhostUserProtocolError(VhostUserError):
    """The peer broke the protocol; the connection must be dropped."""

    def __init__(self, reason: str, request: int | None = None) -> None:
        self.reason = reason
        self.request = request
        where = f" ({request_name(request)})" if request is not None else ""
        super().__init__(f"{reason}{where}")


class VhostUserDisconnected(VhostUserError):
    """The peer closed the connection."""


class VhostUserTimeout(VhostUserError):
    """A deadline passed while waiting on the peer."""


class VhostUserRequestFailed(VhostUserError):
    """A well-formed request could not be carried out; it is answered with a non-zero ack."""

    def __init__(self, request: int, reason: str, code: int = 1) -> None:
        self.request = request
        self.reason = reason
        self.code = code
        super().__init__(f"{request_name(request)} failed: {reason} (code {code})")


def request_name(request: int | None) -> str:
    try:
        return Request(request).name  # type: ignore[arg-type]
    except ValueError:
        return f"request {request}"


# --- messages ----------------------------------------------------------------------------------
@dataclass
class Message:
    """One message; `fds` are owned by whoever holds the message until `take_fds` hands them on."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return request_name(self.request)

    def take_fds(self) -> list[int]:
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        close_fds(self.take_fds())


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_message(
    sock: socket.socket, request: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (), flags: int = VERSION
) -> None:
    data = HEADER.pack(int(request), flags, len(payload)) + payload
    # The fds ride on the first byte so the receiver sees them with the header.
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class MessageReader:
    """Incremental reader: never reads past the current message, so the fds received while reading it
    are exactly the ones its sender attached. Usable from a selector loop (call `feed` when readable)
    or blocking (`read`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()
        self._fds: list[int] = []
        self._size: int | None = None  # payload size once the header is complete
        self.started_at: float | None = None  # monotonic time of the first byte of a partial message

    def feed(self) -> Message | None:
        """Reads what is available of the current message; returns it once complete."""
        need = HEADER.size - len(self._buf) if self._size is None else HEADER.size + self._size - len(self._buf)
        try:
            data, fds, msg_flags, _ = socket.recv_fds(self.sock, need, MAX_FDS)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return None
        self._fds.extend(fds)
        if msg_flags & socket.MSG_CTRUNC:
            self.discard()
            raise VhostUserProtocolError(f"too many fds or truncated control data (more than {MAX_FDS} fds)")
        if not data:
            partial = bool(self._buf)
            self.discard()
            raise VhostUserDisconnected("peer closed the connection" + (" mid-message" if partial else ""))
        if not self._buf:
            self.started_at = time.monotonic()
        self._buf += data
        if self._size is None and len(self._buf) == HEADER.size:
            request, flags, size = HEADER.unpack(self._buf)
            if flags & VERSION_MASK != VERSION or flags & ~KNOWN_FLAGS:
                self.discard()
                raise VhostUserProtocolError(f"bad flags {flags:#x} (version must be 1, no unknown bits)", request)
            if size > MAX_PAYLOAD:
                self.discard()
                raise VhostUserProtocolError(f"payload size {size} too big (limit {MAX_PAYLOAD})", request)
            self._size = size
        if self._size is not None and len(self._buf) == HEADER.size + self._size:
            request, flags, _ = HEADER.unpack_from(self._buf)
            msg = Message(request, flags, bytes(self._buf[HEADER.size :]), self._fds)
            self._fds = []
            self._reset()
            return msg
        return None

    def read(self, deadline: float) -> Message:
        """Blocking read of one whole message, bounded by `deadline` (time.monotonic())."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.discard()
                raise VhostUserTimeout("timed out waiting for a vhost-user message")
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if readable:
                msg = self.feed()
                if msg is not None:
                    return msg

    def discard(self) -> None:
        close_fds(self._fds)
        self._fds = []
        self._reset()

    def _reset(self) -> None:
        self._buf.clear()
        self._size = None
        self.started_at = None
