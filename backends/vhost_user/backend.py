"""vhost-user back-end server library.

`VhostUserBackend` listens on a unix socket and runs one event-loop thread (an epoll set) for every
connection and every kick eventfd. Device logic plugs in as a `BackendDevice` (one instance per
connection) whose hooks run on that thread. The Xen back-ends use vring indexes as event-channel slots: a kick/call
eventfd pair per index, independent of virtqueues; the virtqueue messages are still accepted (and
recorded) so QEMU's own front-end completes its handshake.

Anything malformed drops that connection with the reason logged on logger "vhost_user"; the
server and its other connections carry on.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xenpv.base import eventfd
from xenpv.backends.vhost_user.memory import GuestMemory, RegionDescriptor
from xenpv.backends.vhost_user.messages import (
    CONFIG_HEADER,
    F_PROTOCOL_FEATURES,
    FLAG_REPLY,
    MAX_CONFIG_SIZE,
    MAX_MEM_TABLE_REGIONS,
    MAX_VRINGS,
    MEM_REGION,
    MEM_TABLE_HEADER,
    REPLYING,
    SINGLE_MEM_REGION,
    U64,
    VERSION,
    VRING_ADDR,
    VRING_INDEX_MASK,
    VRING_NOFD,
    VRING_STATE,
    Message,
    MessageReader,
    ProtocolFeature,
    Request,
    VhostUserDisconnected,
    VhostUserProtocolError,
    VhostUserRequestFailed,
    close_fds,
    log,
    send_message,
)

MAX_VRING_NUM = 32768  # virtio's largest queue size
_TICK = 0.1  # how often partial-message deadlines are checked
# What a watched fd is, the first item of its entry in VhostUserBackend._watched.
_LISTEN, _WAKE, _SOCK, _KICK = "listen", "wake", "sock", "kick"


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass
class Vring:
    """One vring index: a virtqueue for QEMU devices, an event-channel slot for the Xen back-ends."""

    index: int
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    started: bool = False  # by SET_VRING_KICK; GET_VRING_BASE stops it
    enabled: bool = False

    @property
    def polling(self) -> bool:
        """Started without a kick fd: the device must poll instead of waiting for kicks."""
        return self.started and self.kick_fd is None


class BackendDevice:
    """Device logic for one connection. Override the attributes and the hooks you need; hooks run
    on the server's event-loop thread, so they must not block for long."""

    features: int = 0  # virtio feature bits offered; F_PROTOCOL_FEATURES is added by the library
    protocol_features: ProtocolFeature = (
        ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.MQ
    )
    num_queues: int = 1
    max_mem_slots: int = 32

    def on_connect(self, session: "BackendSession") -> None:
        pass

    def on_memory_changed(self, session: "BackendSession") -> None:
        pass

    def on_kick(self, session: "BackendSession", index: int) -> None:
        pass

    def on_disconnect(self, session: "BackendSession", reason: str) -> None:
        pass

    def get_config(self, session: "BackendSession", offset: int, size: int) -> bytes:
        raise VhostUserRequestFailed(Request.GET_CONFIG, "device has no config space")

    def set_config(self, session: "BackendSession", offset: int, data: bytes, flags: int) -> None:
        raise VhostUserRequestFailed(Request.SET_CONFIG, "device config space is read-only")


class BackendSession:
    """The state of one front-end connection."""

    def __init__(self, server: "VhostUserBackend", sock: socket.socket, device: BackendDevice, number: int) -> None:
        self.server = server
        self.name = f"{server.name}#{number}"
        self.sock = sock
        self.reader = MessageReader(sock)
        self.device = device
        self.offered_features = device.features | F_PROTOCOL_FEATURES
        self.acked_features: int | None = None
        self.protocol_features = ProtocolFeature(0)
        self.owner = False
        self.memory = GuestMemory(device.max_mem_slots)
        self.vrings: dict[int, Vring] = {}
        # The request ids received, in order (conformance tests and post-mortems read it); bounded
        # because a connection to xenhv lives as long as the domain.
        self.requests: collections.deque[int] = collections.deque(maxlen=4096)
        self.closed_reason: str | None = None
        self._lock = threading.RLock()

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def vring(self, index: int) -> Vring:
        if not 0 <= index < MAX_VRINGS:
            raise VhostUserProtocolError(f"vring index {index} out of range (limit {MAX_VRINGS})")
        return self.vrings.setdefault(index, Vring(index))

    def notify(self, index: int) -> bool:
        """Signals the call eventfd of `index`; False when there is none or the ring is stopped
        (a stopped ring must not notify)."""
        with self._lock:
            vr = self.vrings.get(index)
            if self.closed_reason is not None or vr is None or not vr.started or vr.call_fd is None:
                return False
            eventfd.signal(vr.call_fd)  # the guest's vCPU may hold it too (a doorbell)
            return True

    def has_protocol_feature(self, feature: ProtocolFeature) -> bool:
        return bool(self.protocol_features & feature)


# Payload sizes of the fixed-size requests; SET_MEM_TABLE and GET/SET_CONFIG are checked by their handlers.
_FIXED_SIZES: dict[Request, int] = {
    Request.GET_FEATURES: 0,
    Request.SET_FEATURES: U64.size,
    Request.SET_OWNER: 0,
    Request.RESET_OWNER: 0,
    Request.SET_VRING_NUM: VRING_STATE.size,
    Request.SET_VRING_ADDR: VRING_ADDR.size,
    Request.SET_VRING_BASE: VRING_STATE.size,
    Request.GET_VRING_BASE: VRING_STATE.size,
    Request.SET_VRING_KICK: U64.size,
    Request.SET_VRING_CALL: U64.size,
    Request.SET_VRING_ERR: U64.size,
    Request.GET_PROTOCOL_FEATURES: 0,
    Request.SET_PROTOCOL_FEATURES: U64.size,
    Request.GET_QUEUE_NUM: 0,
    Request.SET_VRING_ENABLE: VRING_STATE.size,
    Request.GET_MAX_MEM_SLOTS: 0,
    Request.ADD_MEM_REG: SINGLE_MEM_REGION.size,
    Request.REM_MEM_REG: SINGLE_MEM_REGION.size,
}


def _allowed_fds(req: Request, msg: Message) -> tuple[int, ...]:
    if req is Request.SET_MEM_TABLE:
        (nregions, _) = MEM_TABLE_HEADER.unpack_from(msg.payload)
        if nregions > MAX_MEM_TABLE_REGIONS:
            raise VhostUserProtocolError(f"{nregions} regions (limit {MAX_MEM_TABLE_REGIONS})", req)
        return (nregions,)
    if req is Request.ADD_MEM_REG:
        return (1,)
    if req is Request.REM_MEM_REG:
        return (0, 1)  # QEMU before 7.1 sent the region's fd; accepted and closed for compatibility
    if req in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
        (value,) = U64.unpack(msg.payload)
        return (0,) if value & VRING_NOFD else (1,)
    return (0,)


class VhostUserBackend:
    """A vhost-user back-end server: `VhostUserBackend(path, MyDevice).start()`, then `stop()`."""

    def __init__(
        self,
        socket_path: str | Path,
        device_factory: Callable[[], BackendDevice],
        *,
        name: str = "vhost-user",
        max_sessions: int = 16,
        message_timeout: float = 2.0,
        send_timeout: float = 2.0,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.device_factory = device_factory
        self.name = name
        self.max_sessions = max_sessions
        self.message_timeout = message_timeout
        self.send_timeout = send_timeout
        self.sessions: list[BackendSession] = []
        self.closed_sessions: collections.deque[BackendSession] = collections.deque(maxlen=64)
        # The event loop's epoll set, and what each fd in it is: (_LISTEN,), (_WAKE,), (_SOCK, session) or
        # (_KICK, session, vring index). epoll directly rather than `selectors`: a kick is every event's
        # path, and the selector's key objects and bookkeeping were a good part of its cost.
        self._epoll = select.epoll()
        self._watched: dict[int, tuple] = {}
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._count = 0
        self._handlers: dict[Request, Callable[[BackendSession, Message], bytes | None]] = {
            Request.GET_FEATURES: self._get_features,
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_fd,
            Request.SET_VRING_CALL: self._set_vring_fd,
            Request.SET_VRING_ERR: self._set_vring_fd,
            Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: self._get_queue_num,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
        }

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "VhostUserBackend":
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(8)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._watch(listener.fileno(), (_LISTEN,))
        self._watch(self._wake_r, (_WAKE,))
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        log.info("%s: listening on %s", self.name, self.socket_path)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("%s: event loop did not stop within %.1fs", self.name, timeout)
                return
        os.close(self._wake_r)
        os.close(self._wake_w)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "VhostUserBackend":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- event loop --------------------------------------------------------------------------
    def _watch(self, fd: int, entry: tuple) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._watched[fd] = entry

    def _unwatch(self, fd: int) -> None:
        del self._watched[fd]
        self._epoll.unregister(fd)

    def _run(self) -> None:
        try:
            expire_at = time.monotonic() + _TICK
            while not self._stopping:
                events = self._epoll.poll(_TICK)
                # What each fd was when it became readable, taken before any handler runs: a handler may
                # close a watched fd and its number be reused within this batch.
                for fd, entry in [(fd, self._watched[fd]) for fd, _ in events]:
                    kind = entry[0]
                    try:
                        if kind is _KICK:
                            self._on_kick(entry[1], entry[2], fd)
                        elif kind is _SOCK:
                            self._on_readable(entry[1])
                        elif kind is _LISTEN:
                            self._accept()
                    except Exception as exc:
                        # Per-session errors are guarded; this is a defect of the library. It ends that
                        # session (if it was one), not the server and every other connection.
                        log.exception("%s: internal error handling a %s event", self.name, kind)
                        if kind is _SOCK or kind is _KICK:
                            self._force_drop(entry[1], f"internal error: {exc!r}")
                # Partial-message deadlines on a timer of their own, not at every wake-up: kicks can
                # wake the loop many thousand times a second, and a deadline is checked within _TICK.
                now = time.monotonic()
                if now >= expire_at:
                    self._expire_partial_messages(now)
                    expire_at = now + _TICK
        except Exception:
            log.exception("%s: event loop failed", self.name)
        finally:
            for s in list(self.sessions):
                self._drop(s, "server stopping", quiet=True)
            if self._listener is not None:
                self._unwatch(self._listener.fileno())
                self._listener.close()
                try:
                    self.socket_path.unlink()
                except FileNotFoundError:
                    pass
            self._epoll.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if len(self.sessions) >= self.max_sessions:
            log.warning("%s: refusing a connection: %d sessions already", self.name, len(self.sessions))
            sock.close()
            return
        sock.settimeout(self.send_timeout)  # reads happen only when readable; this bounds replies
        self._count += 1
        try:
            device = self.device_factory()
        except Exception:
            log.exception("%s: device factory failed; connection refused", self.name)
            sock.close()
            return
        session = BackendSession(self, sock, device, self._count)
        self.sessions.append(session)
        self._watch(sock.fileno(), (_SOCK, session))
        log.info("%s: front-end connected", session.name)
        self._guard(session, device.on_connect, session)

    def _on_readable(self, session: BackendSession) -> None:
        if not session.closed:
            self._guard(session, self._read_message, session)

    def _read_message(self, session: BackendSession) -> None:
        msg = session.reader.feed()
        if msg is not None:
            self._dispatch(session, msg)

    def _guard(self, session: BackendSession, action: Callable[..., None], *args: object) -> None:
        """Runs `action(*args)` for `session`; whatever it raises ends that session only."""
        try:
            action(*args)
        except Exception as exc:
            self._failed(session, exc)

    def _failed(self, session: BackendSession, exc: Exception) -> None:
        """What `exc`, raised by work for `session` and being handled, does: it ends that session only."""
        if isinstance(exc, VhostUserProtocolError):
            self._drop(session, f"protocol error: {exc}")
        elif isinstance(exc, VhostUserDisconnected):
            self._drop(session, str(exc), quiet=True)
        elif isinstance(exc, OSError):
            self._drop(session, f"socket or fd error: {exc}")
        else:
            log.exception("%s: device logic failed", session.name)
            self._drop(session, f"internal error: {exc!r}")

    def _expire_partial_messages(self, now: float) -> None:
        for s in list(self.sessions):
            started = s.reader.started_at
            if started is not None and now - started > self.message_timeout:
                s.reader.discard()
                self._drop(s, f"protocol error: timed out after {self.message_timeout:.1f}s mid-message")

    def _force_drop(self, session: BackendSession, reason: str) -> None:
        try:
            self._drop(session, reason)
        except Exception:
            log.exception("%s: dropping the session failed too", session.name)
            if session in self.sessions:
                self.sessions.remove(session)

    def _drop(self, session: BackendSession, reason: str, quiet: bool = False) -> None:
        with session._lock:
            if session.closed:
                return
            session.closed_reason = reason
            for vr in session.vrings.values():
                self._close_vring_fds(vr)
            session.reader.discard()
            self._unwatch(session.sock.fileno())
            session.sock.close()
            session.memory.clear()
        self.sessions.remove(session)
        self.closed_sessions.append(session)
        if quiet:
            log.info("%s: connection closed: %s", session.name, reason)
        else:
            log.warning("%s: dropping connection: %s", session.name, reason)
        try:
            session.device.on_disconnect(session, reason)
        except Exception:
            log.exception("%s: on_disconnect failed", session.name)

    # --- kicks -------------------------------------------------------------------------------
    def _on_kick(self, session: BackendSession, index: int, fd: int) -> None:
        """Every event's path: written out rather than through _guard and the `closed` property."""
        vr = session.vrings.get(index)
        if session.closed_reason is not None or vr is None or vr.kick_fd != fd:
            return  # an event for an fd replaced earlier in the same batch
        try:
            data = os.read(fd, 8)
        except BlockingIOError:
            return
        if not data:
            # Not an eventfd (a pipe whose writer went away): stop watching it rather than spin.
            self._unwatch_kick(vr)
            log.warning("%s: kick fd of vring %d reached EOF; no longer watched", session.name, index)
            return
        if vr.started and vr.enabled:
            try:
                session.device.on_kick(session, index)
            except Exception as exc:
                self._failed(session, exc)

    def _watch_kick(self, session: BackendSession, vr: Vring, fd: int) -> None:
        """Watch `fd` (ours now) as the kick of `vr`; an fd epoll cannot watch is the peer's error."""
        try:
            os.set_blocking(fd, False)
            self._watch(fd, (_KICK, session, vr.index))
        except OSError as exc:
            # A regular file (memfd) cannot be polled: EPERM. Only a registered fd becomes the kick fd,
            # so the session's cleanup never unregisters what was never registered.
            os.close(fd)
            raise VhostUserProtocolError(f"kick fd of vring {vr.index} cannot be watched: {exc}",
                                         Request.SET_VRING_KICK) from None
        vr.kick_fd = fd

    def _unwatch_kick(self, vr: Vring) -> None:
        if vr.kick_fd is not None:
            try:
                self._unwatch(vr.kick_fd)
            except (KeyError, OSError):
                log.error("kick fd %d of vring %d was not watched", vr.kick_fd, vr.index)
            os.close(vr.kick_fd)
            vr.kick_fd = None

    def _close_vring_fds(self, vr: Vring) -> None:
        self._unwatch_kick(vr)
        close_fds([fd for fd in (vr.call_fd, vr.err_fd) if fd is not None])
        vr.call_fd = vr.err_fd = None
        vr.started = False

    # --- dispatch ----------------------------------------------------------------------------
    def _dispatch(self, session: BackendSession, msg: Message) -> None:
        session.requests.append(msg.request)
        try:
            try:
                req = Request(msg.request)
            except ValueError:
                raise VhostUserProtocolError("unknown request", msg.request) from None
            handler = self._handlers.get(req)
            if handler is None:
                raise VhostUserProtocolError("unsupported request (its feature was not offered)", req)
            if msg.flags & FLAG_REPLY:
                raise VhostUserProtocolError("REPLY flag set on a request", req)
            expected = _FIXED_SIZES.get(req)
            if expected is not None and len(msg.payload) != expected:
                raise VhostUserProtocolError(f"payload size {len(msg.payload)}, expected {expected}", req)
            if req is Request.SET_MEM_TABLE and len(msg.payload) < MEM_TABLE_HEADER.size:
                raise VhostUserProtocolError(f"payload size {len(msg.payload)} shorter than its header", req)
            allowed = _allowed_fds(req, msg)
            if len(msg.fds) not in allowed:
                raise VhostUserProtocolError(
                    f"carries {len(msg.fds)} fds, expected {' or '.join(map(str, allowed))}", req
                )
            log.debug("%s: %s %s", session.name, req.name, msg.payload.hex())
            code = 0
            try:
                reply = handler(session, msg)
            except VhostUserRequestFailed as exc:
                log.warning("%s: %s", session.name, exc)
                reply, code = b"", exc.code
            if req in REPLYING:
                send_message(session.sock, req, reply or b"", flags=VERSION | FLAG_REPLY)
            elif msg.need_reply and session.has_protocol_feature(ProtocolFeature.REPLY_ACK):
                send_message(session.sock, req, U64.pack(code), flags=VERSION | FLAG_REPLY)
        finally:
            msg.close_fds()

    # --- handlers (each returns the reply payload of a replying request, else None) ----------
    def _get_features(self, s: BackendSession, msg: Message) -> bytes:
        return U64.pack(s.offered_features)

    def _set_features(self, s: BackendSession, msg: Message) -> None:
        (features,) = U64.unpack(msg.payload)
        if features & ~s.offered_features:
            raise VhostUserProtocolError(
                f"features {features:#x} include bits not offered ({s.offered_features:#x})", msg.request
            )
        s.acked_features = features
        if not features & F_PROTOCOL_FEATURES:
            for vr in s.vrings.values():  # without protocol features rings are enabled by starting
                vr.enabled = True
        return None

    def _get_protocol_features(self, s: BackendSession, msg: Message) -> bytes:
        return U64.pack(int(s.device.protocol_features))

    def _set_protocol_features(self, s: BackendSession, msg: Message) -> None:
        (features,) = U64.unpack(msg.payload)
        if features & ~int(s.device.protocol_features):
            raise VhostUserProtocolError(
                f"protocol features {features:#x} include bits not offered ({int(s.device.protocol_features):#x})",
                msg.request,
            )
        s.protocol_features = ProtocolFeature(features)
        return None

    def _set_owner(self, s: BackendSession, msg: Message) -> None:
        s.owner = True
        return None

    def _reset_owner(self, s: BackendSession, msg: Message) -> None:
        with s._lock:
            for vr in s.vrings.values():
                self._close_vring_fds(vr)
            s.vrings.clear()
            s.memory.clear()
            s.owner = False
            s.acked_features = None
            s.protocol_features = ProtocolFeature(0)
        s.device.on_memory_changed(s)
        return None

    def _set_mem_table(self, s: BackendSession, msg: Message) -> None:
        nregions, _ = MEM_TABLE_HEADER.unpack_from(msg.payload)
        body = len(msg.payload) - MEM_TABLE_HEADER.size
        # Front-ends send either exactly nregions entries or the whole array.
        if body % MEM_REGION.size or not nregions <= body // MEM_REGION.size <= MAX_MEM_TABLE_REGIONS:
            raise VhostUserProtocolError(f"payload size {len(msg.payload)} does not fit {nregions} regions", msg.request)
        fresh = GuestMemory(s.device.max_mem_slots)
        try:
            for i in range(nregions):
                desc = RegionDescriptor.unpack(msg.payload, MEM_TABLE_HEADER.size + i * MEM_REGION.size)
                fresh.add(desc, msg.fds[i])
        except Exception:
            fresh.clear()
            raise
        with s._lock:
            old, s.memory = s.memory, fresh
        old.clear()
        log.info("%s: memory table: %s", s.name, _describe(fresh.regions))
        s.device.on_memory_changed(s)
        return None

    def _get_max_mem_slots(self, s: BackendSession, msg: Message) -> bytes:
        return U64.pack(s.device.max_mem_slots)

    def _add_mem_reg(self, s: BackendSession, msg: Message) -> None:
        desc = RegionDescriptor.unpack(msg.payload, U64.size)
        s.memory.add(desc, msg.fds[0])
        log.info("%s: added region %s", s.name, _describe([desc]))
        s.device.on_memory_changed(s)
        return None

    def _rem_mem_reg(self, s: BackendSession, msg: Message) -> None:
        desc = RegionDescriptor.unpack(msg.payload, U64.size)
        if not s.memory.remove(desc.gpa, desc.size):
            raise VhostUserRequestFailed(msg.request, f"no region {desc.gpa:#x}+{desc.size:#x} to remove")
        log.info("%s: removed region %s", s.name, _describe([desc]))
        s.device.on_memory_changed(s)
        return None

    def _get_queue_num(self, s: BackendSession, msg: Message) -> bytes:
        return U64.pack(s.device.num_queues)

    def _set_vring_num(self, s: BackendSession, msg: Message) -> None:
        index, num = VRING_STATE.unpack(msg.payload)
        if num > MAX_VRING_NUM:
            raise VhostUserProtocolError(f"vring {index} size {num} above {MAX_VRING_NUM}", msg.request)
        s.vring(index).num = num
        return None

    def _set_vring_addr(self, s: BackendSession, msg: Message) -> None:
        addr = VringAddr(*VRING_ADDR.unpack(msg.payload))
        s.vring(addr.index).addr = addr
        return None

    def _set_vring_base(self, s: BackendSession, msg: Message) -> None:
        index, base = VRING_STATE.unpack(msg.payload)
        s.vring(index).base = base
        return None

    def _get_vring_base(self, s: BackendSession, msg: Message) -> bytes:
        index, _ = VRING_STATE.unpack(msg.payload)
        vr = s.vring(index)
        with s._lock:
            vr.started = False
            self._unwatch_kick(vr)
        return VRING_STATE.pack(index, vr.base)

    def _set_vring_fd(self, s: BackendSession, msg: Message) -> None:
        (value,) = U64.unpack(msg.payload)
        if value & ~(VRING_INDEX_MASK | VRING_NOFD):
            raise VhostUserProtocolError(f"reserved bits set in {value:#x}", msg.request)
        vr = s.vring(value & VRING_INDEX_MASK)
        fds = msg.take_fds()
        fd = fds[0] if fds else None
        with s._lock:
            if msg.request == Request.SET_VRING_KICK:
                self._unwatch_kick(vr)
                if fd is not None:
                    self._watch_kick(s, vr, fd)
                vr.started = True
                if s.acked_features is not None and not s.acked_features & F_PROTOCOL_FEATURES:
                    vr.enabled = True
            elif msg.request == Request.SET_VRING_CALL:
                close_fds([vr.call_fd] if vr.call_fd is not None else [])
                vr.call_fd = fd
            else:
                close_fds([vr.err_fd] if vr.err_fd is not None else [])
                vr.err_fd = fd
        return None

    def _set_vring_enable(self, s: BackendSession, msg: Message) -> None:
        index, enable = VRING_STATE.unpack(msg.payload)
        if enable not in (0, 1):
            raise VhostUserProtocolError(f"vring {index} enable value {enable} is not 0 or 1", msg.request)
        s.vring(index).enabled = bool(enable)
        return None

    def _parse_config(self, msg: Message) -> tuple[int, int, int]:
        if not CONFIG_HEADER.size <= len(msg.payload) <= CONFIG_HEADER.size + MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(f"config payload size {len(msg.payload)} out of range", msg.request)
        offset, size, flags = CONFIG_HEADER.unpack_from(msg.payload)
        if len(msg.payload) != CONFIG_HEADER.size + size or offset + size > MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(
                f"config offset {offset} size {size} does not match payload {len(msg.payload)}", msg.request
            )
        return offset, size, flags

    def _get_config(self, s: BackendSession, msg: Message) -> bytes:
        offset, size, flags = self._parse_config(msg)
        data = s.device.get_config(s, offset, size)
        if len(data) != size:
            raise VhostUserRequestFailed(msg.request, f"device returned {len(data)} config bytes, not {size}")
        return CONFIG_HEADER.pack(offset, size, flags) + data

    def _set_config(self, s: BackendSession, msg: Message) -> None:
        offset, _, flags = self._parse_config(msg)
        s.device.set_config(s, offset, msg.payload[CONFIG_HEADER.size :], flags)
        return None


def _describe(regions: list[RegionDescriptor]) -> str:
    return ", ".join(f"gpa {r.gpa:#x}+{r.size:#x} (offset {r.mmap_offset:#x})" for r in regions) or "empty"


__all__ = ["BackendDevice", "BackendSession", "VhostUserBackend", "Vring", "VringAddr"]
