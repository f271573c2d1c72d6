"""vhost-user front-end: gives a back-end guest memory and event-channel kick/call eventfds.

Every wait for a reply or an ack is bounded by the client's timeout; a back-end that dies shows up
as `VhostUserDisconnected` at once (its socket reaches EOF), not as a timeout.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

from xenpv.backends.vhost_user.memory import RegionDescriptor
from xenpv.backends.vhost_user.messages import (
    CONFIG_HEADER,
    F_PROTOCOL_FEATURES,
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    MAX_MEM_TABLE_REGIONS,
    MEM_TABLE_HEADER,
    REPLYING,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_NOFD,
    VRING_STATE,
    MessageReader,
    ProtocolFeature,
    Request,
    VhostUserError,
    VhostUserProtocolError,
    VhostUserRequestFailed,
    log,
    send_message,
)

DEFAULT_PROTOCOL_FEATURES = ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.MQ


@dataclass(frozen=True)
class Region:
    """Guest memory to hand over: `size` bytes of `fd` from `mmap_offset`, at guest-physical `gpa`.
    `uva` is the front-end's own address of it; it defaults to `gpa` when the front-end does not map
    the memory itself (the Xen back-ends address everything by gpa)."""

    gpa: int
    size: int
    fd: int
    mmap_offset: int = 0
    uva: int | None = None

    def descriptor(self) -> RegionDescriptor:
        return RegionDescriptor(self.gpa, self.size, self.gpa if self.uva is None else self.uva, self.mmap_offset)


class VhostUserFrontend:
    """A connection to one back-end. Typical use::

        fe = VhostUserFrontend.connect(path)
        fe.negotiate()
        fe.set_mem_table([Region(0, ram_size, ram_fd)])
        fe.set_channel(port_slot, kick_fd, call_fd)
    """

    def __init__(self, sock: socket.socket, *, timeout: float = 5.0, name: str = "vhost-user front-end") -> None:
        self.sock = sock
        self.timeout = timeout
        self.name = name
        self._reader = MessageReader(sock)
        self.backend_features: int | None = None
        self.features: int | None = None  # acked by SET_FEATURES
        self.backend_protocol_features = ProtocolFeature(0)
        self.protocol_features = ProtocolFeature(0)

    @classmethod
    def connect(cls, path: str | Path, *, timeout: float = 5.0) -> "VhostUserFrontend":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return cls(sock, timeout=timeout, name=f"vhost-user front-end to {path}")

    def close(self) -> None:
        self._reader.discard()
        self.sock.close()

    def __enter__(self) -> "VhostUserFrontend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ---------------------------------------------------------------------------
    def request(
        self, request: Request, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (), *, ack: bool = True
    ) -> bytes | None:
        """Sends one request. A replying request returns its reply payload; any other request asks
        for an ack (when REPLY_ACK is negotiated and `ack`) and raises `VhostUserRequestFailed` on a
        non-zero one."""
        want_ack = ack and request not in REPLYING and bool(self.protocol_features & ProtocolFeature.REPLY_ACK)
        flags = VERSION | (FLAG_NEED_REPLY if want_ack else 0)
        send_message(self.sock, request, payload, fds, flags)
        if request in REPLYING:
            return self._reply(request)
        if want_ack:
            reply = self._reply(request)
            if len(reply) != U64.size:
                raise VhostUserProtocolError(f"ack of {len(reply)} bytes, expected {U64.size}", request)
            (code,) = U64.unpack(reply)
            if code:
                raise VhostUserRequestFailed(request, "back-end answered with a non-zero ack", code)
        return None

    def _reply(self, request: Request) -> bytes:
        msg = self._reader.read(time.monotonic() + self.timeout)
        if msg.fds:
            msg.close_fds()
            raise VhostUserProtocolError("reply carries fds", request)
        if msg.request != request or not msg.flags & FLAG_REPLY:
            raise VhostUserProtocolError(f"expected a reply to {request.name}, got {msg.name} flags {msg.flags:#x}")
        return msg.payload

    def _get_u64(self, request: Request) -> int:
        reply = self.request(request)
        assert reply is not None
        if len(reply) != U64.size:
            raise VhostUserProtocolError(f"reply of {len(reply)} bytes, expected {U64.size}", request)
        return U64.unpack(reply)[0]

    # --- handshake ---------------------------------------------------------------------------
    def negotiate(
        self, features: int = 0, protocol_features: ProtocolFeature = DEFAULT_PROTOCOL_FEATURES
    ) -> None:
        """GET_FEATURES; with protocol features, GET/SET_PROTOCOL_FEATURES (the intersection with
        `protocol_features`); SET_FEATURES (the intersection with `features`, plus protocol features);
        SET_OWNER."""
        self.backend_features = self._get_u64(Request.GET_FEATURES)
        acked = self.backend_features & features
        if self.backend_features & F_PROTOCOL_FEATURES:
            acked |= F_PROTOCOL_FEATURES
            self.backend_protocol_features = ProtocolFeature(self._get_u64(Request.GET_PROTOCOL_FEATURES))
            chosen = self.backend_protocol_features & protocol_features
            # The ack for SET_PROTOCOL_FEATURES itself is only defined once REPLY_ACK is in force.
            self.request(Request.SET_PROTOCOL_FEATURES, U64.pack(int(chosen)), ack=False)
            self.protocol_features = chosen
        self.request(Request.SET_FEATURES, U64.pack(acked))
        self.features = acked
        self.request(Request.SET_OWNER)
        log.info(
            "%s: features %#x, protocol features %s", self.name, acked, self.protocol_features.name or "none"
        )

    def get_queue_num(self) -> int:
        self._require(ProtocolFeature.MQ, Request.GET_QUEUE_NUM)
        return self._get_u64(Request.GET_QUEUE_NUM)

    def get_max_mem_slots(self) -> int:
        self._require(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.GET_MAX_MEM_SLOTS)
        return self._get_u64(Request.GET_MAX_MEM_SLOTS)

    def _require(self, feature: ProtocolFeature, request: Request) -> None:
        if not self.protocol_features & feature:
            raise VhostUserError(f"{request.name} needs protocol feature {feature.name}, not negotiated")

    # --- memory ------------------------------------------------------------------------------
    def set_mem_table(self, regions: list[Region]) -> None:
        if len(regions) > MAX_MEM_TABLE_REGIONS:
            raise VhostUserError(f"{len(regions)} regions; SET_MEM_TABLE carries at most {MAX_MEM_TABLE_REGIONS}")
        payload = MEM_TABLE_HEADER.pack(len(regions), 0) + b"".join(r.descriptor().pack() for r in regions)
        self.request(Request.SET_MEM_TABLE, payload, [r.fd for r in regions])

    def add_mem_region(self, region: Region) -> None:
        self._require(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.ADD_MEM_REG)
        self.request(Request.ADD_MEM_REG, _single(region), [region.fd])

    def remove_mem_region(self, region: Region) -> None:
        self._require(ProtocolFeature.CONFIGURE_MEM_SLOTS, Request.REM_MEM_REG)
        self.request(Request.REM_MEM_REG, _single(region))

    # --- vrings / event channels -------------------------------------------------------------
    def set_vring_num(self, index: int, num: int) -> None:
        self.request(Request.SET_VRING_NUM, VRING_STATE.pack(index, num))

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(Request.SET_VRING_BASE, VRING_STATE.pack(index, base))

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0, log_addr: int = 0) -> None:
        self.request(Request.SET_VRING_ADDR, VRING_ADDR.pack(index, flags, desc, used, avail, log_addr))

    def get_vring_base(self, index: int) -> int:
        """Stops the ring and returns its base."""
        reply = self.request(Request.GET_VRING_BASE, VRING_STATE.pack(index, 0))
        assert reply is not None
        if len(reply) != VRING_STATE.size:
            raise VhostUserProtocolError(f"reply of {len(reply)} bytes", Request.GET_VRING_BASE)
        got_index, base = VRING_STATE.unpack(reply)
        if got_index != index:
            raise VhostUserProtocolError(f"reply for vring {got_index}, asked {index}", Request.GET_VRING_BASE)
        return base

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        """`fd` None puts the ring in polling mode."""
        self._set_vring_fd(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> None:
        self._set_vring_fd(Request.SET_VRING_ERR, index, fd)

    def _set_vring_fd(self, request: Request, index: int, fd: int | None) -> None:
        if not 0 <= index <= 0xFF:
            raise VhostUserError(f"vring index {index} does not fit the 8-bit index field")
        value = index | (VRING_NOFD if fd is None else 0)
        self.request(request, U64.pack(value), [] if fd is None else [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(Request.SET_VRING_ENABLE, VRING_STATE.pack(index, int(enable)))

    def set_channel(self, index: int, kick_fd: int, call_fd: int) -> None:
        """Binds one event channel: the back-end is kicked through `kick_fd` and notifies through
        `call_fd`. The caller keeps its copies of both fds."""
        self.set_vring_call(index, call_fd)
        self.set_vring_kick(index, kick_fd)
        if self.features is not None and self.features & F_PROTOCOL_FEATURES:
            self.set_vring_enable(index, True)

    # --- config ------------------------------------------------------------------------------
    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        reply = self.request(Request.GET_CONFIG, CONFIG_HEADER.pack(offset, size, flags) + bytes(size))
        assert reply is not None
        if len(reply) != CONFIG_HEADER.size + size:
            raise VhostUserRequestFailed(Request.GET_CONFIG, f"reply of {len(reply)} bytes (an error)")
        return reply[CONFIG_HEADER.size :]

    def set_config(self, offset: int, data: bytes, flags: int = 0) -> None:
        self.request(Request.SET_CONFIG, CONFIG_HEADER.pack(offset, len(data), flags) + data)


def _single(region: Region) -> bytes:
    d = region.descriptor()
    return SINGLE_MEM_REGION.pack(0, d.gpa, d.size, d.uva, d.mmap_offset)


__all__ = ["DEFAULT_PROTOCOL_FEATURES", "Region", "VhostUserFrontend"]
