"""The daemon: one selectors loop over the unix socket, its clients, and introduced domains' doorbells.

Hot path (a dom0 client pipelining small requests): one recv() takes many requests, each is handled and
its reply appended to the connection's output list, and one send() per loop iteration writes them all.

Containment: the core contains a defect to its request; anything else a channel raises (framing, the
ring, flushing) is logged with the channel and its domain, counted as an internal error, and ends that
channel only (a socket client is disconnected, a guest's ring is ignored until the guest reconnects).
"""
from __future__ import annotations

import logging
import os
import selectors
import socket
from pathlib import Path

from xenpv.backends.xenstored.connection import Connection
from xenpv.backends.xenstored.core import SERVER_FEATURES, XenstoreCore
from xenpv.backends.xenstored.errors import XsError
from xenpv.backends.xenstored.quotas import Quotas
from xenpv.xenabi.xs_ring import RingServer
from xenpv.backends.xenstored.ring_provider import PageProvider, RingEndpoint
from xenpv.xenabi.xs_wire import XENSTORE_PAYLOAD_MAX, XSD_SOCKMSG

log = logging.getLogger("xenstored.daemon")

_HDR = XSD_SOCKMSG.size
_RECV = 256 * 1024
# Stop reading from a socket client whose replies pile up unread; resume once they drain.
_SOCKET_OUTPUT_HIGH = 4 * 1024 * 1024


class SocketChannel:
    """One dom0 client on the unix socket (privileged, implicit path /local/domain/0)."""

    def __init__(self, daemon: "Daemon", sock: socket.socket, number: int) -> None:
        self.daemon = daemon
        self.sock = sock
        self.inbuf = b""
        self.out: list[bytes] = []
        self.pending = b""  # written partially by the last send()
        self.scheduled = False
        self.closed = False
        self.reading = True
        self.conn = Connection(f"socket{number}", 0, True, self._queue)

    def _queue(self, msg: bytes) -> None:
        self.out.append(msg)
        if not self.scheduled:
            self.scheduled = True
            self.daemon.dirty.append(self)

    def on_event(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            self._read()
        if mask & selectors.EVENT_WRITE and not self.closed:
            self.flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"recv failed: {exc}")
            return
        if not data:
            self.close("peer closed")
            return
        buf = self.inbuf + data if self.inbuf else data
        pos, n = 0, len(buf)
        handle, conn, unpack = self.daemon.core.handle, self.conn, XSD_SOCKMSG.unpack_from
        while n - pos >= _HDR:
            mtype, req_id, tx_id, length = unpack(buf, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                self.close(f"message length {length} > {XENSTORE_PAYLOAD_MAX}")
                return
            end = pos + _HDR + length
            if end > n:
                break
            handle(conn, mtype, req_id, tx_id, buf[pos + _HDR:end])
            pos = end
        self.inbuf = buf[pos:] if pos < n else b""

    def flush(self) -> None:
        self.scheduled = False
        if self.closed:
            return
        data = self.pending + b"".join(self.out) if self.out else self.pending
        self.out.clear()
        if data:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.close(f"send failed: {exc}")
                return
            self.pending = data[sent:]
        want_read = len(self.pending) < _SOCKET_OUTPUT_HIGH
        events = (selectors.EVENT_READ if want_read else 0) | (selectors.EVENT_WRITE if self.pending else 0)
        if want_read != self.reading or bool(self.pending) != self._writing:
            self.reading = want_read
            self._writing = bool(self.pending)
            self.daemon.sel.modify(self.sock, events, self)

    _writing = False

    def close(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        log.info("%s: disconnected: %s", self.conn.name, why)
        self.daemon.core.drop_connection(self.conn)
        try:
            self.daemon.sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()


class RingChannel:
    """An introduced domain: its ring server, registered on its doorbell."""

    def __init__(self, daemon: "Daemon", domid: int, endpoint: RingEndpoint) -> None:
        self.daemon = daemon
        self.endpoint = endpoint
        self.scheduled = False
        self.closed = False
        privileged = domid == 0
        self.conn = Connection(f"dom{domid}", domid, privileged, self._queue)
        quotas = daemon.core.quotas
        self.ring = RingServer(
            f"dom{domid}", endpoint.page, endpoint.doorbell, SERVER_FEATURES,
            on_message=lambda t, r, x, p: daemon.core.handle(self.conn, t, r, x, p),
            on_reset=lambda: daemon.core.drop_connection(self.conn),
            max_outstanding=None if privileged else quotas.outstanding,
            max_output_bytes=quotas.output_bytes,
        )

    def _queue(self, msg: bytes) -> None:
        if self.closed:
            return
        self.ring.send(msg)
        self.schedule()

    def schedule(self) -> None:
        if not self.scheduled and not self.closed:
            self.scheduled = True
            self.daemon.dirty.append(self)

    def on_event(self, mask: int) -> None:
        self.endpoint.doorbell.drain()
        if not self.closed:
            self.ring.service()

    def flush(self) -> None:
        self.scheduled = False
        if not self.closed:
            self.ring.service()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.daemon.sel.unregister(self.endpoint.doorbell.wait_fd)
        del self.ring  # drops the ctypes view of the page so it can be unmapped
        self.endpoint.close()


class _Wakeup:
    def __init__(self, daemon: "Daemon", rfd: int) -> None:
        self.daemon = daemon
        self.rfd = rfd

    def on_event(self, mask: int) -> None:
        try:
            os.read(self.rfd, 4096)
        except BlockingIOError:
            pass


class Daemon:
    def __init__(self, socket_path: Path, provider: PageProvider | None = None, quotas: Quotas | None = None) -> None:
        self.socket_path = Path(socket_path)
        self.provider = provider
        self.core = XenstoreCore(quotas, attacher=self if provider is not None else None)
        self.sel = selectors.DefaultSelector()
        self.dirty: list[SocketChannel | RingChannel] = []
        self.rings: dict[int, RingChannel] = {}
        self._stopping = False
        self._accepted = 0
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.sel.register(self.wake_r, selectors.EVENT_READ, _Wakeup(self, self.wake_r))
        if self.socket_path.is_socket():
            self.socket_path.unlink()  # a stale socket from a daemon that was killed
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket_path))
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, self)

    # The listener's selector callback: accept new dom0 clients.
    def on_event(self, mask: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self._accepted += 1
            ch = SocketChannel(self, sock, self._accepted)
            self.sel.register(sock, selectors.EVENT_READ, ch)
            log.info("%s: connected", ch.conn.name)

    # ---- RingAttacher ---------------------------------------------------------------------------------

    def attach(self, domid: int, gfn: int, port: int) -> Connection:
        assert self.provider is not None
        endpoint = self.provider(domid, gfn, port)
        try:
            ch = RingChannel(self, domid, endpoint)
        except ValueError as exc:
            endpoint.close()
            raise XsError("EINVAL", f"domain {domid}: {exc}") from exc
        self.sel.register(endpoint.doorbell.wait_fd, selectors.EVENT_READ, ch)
        self.rings[domid] = ch
        ch.schedule()  # the guest may have queued requests before it was introduced
        return ch.conn

    def rebind(self, conn: Connection, port: int) -> None:
        ch = self.rings.get(conn.domid)
        if ch is not None and not ch.closed:
            ch.ring.reset(drop_state=False)

    def detach(self, conn: Connection) -> None:
        ch = self.rings.pop(conn.domid, None)
        if ch is not None:
            ch.close()

    # ---- loop ---------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to exit; safe from a signal handler or another thread."""
        self._stopping = True
        try:
            os.write(self.wake_w, b"x")
        except BlockingIOError:
            pass

    def serve_forever(self) -> None:
        log.info("listening on %s", self.socket_path)
        sel, dirty = self.sel, self.dirty
        try:
            while not self._stopping:
                self._dispatch(sel.select(None if not dirty else 0))
                while dirty:
                    batch = dirty[:]
                    dirty.clear()
                    for ch in batch:
                        try:
                            ch.flush()
                        except Exception as exc:
                            self._contain(ch, "flush", exc)
        finally:
            self.close()

    def _dispatch(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            if self.sel.get_map().get(key.fd) is not key:
                continue  # closed by an earlier event of this batch (a released domain's ring, a client)
            try:
                key.data.on_event(mask)
            except Exception as exc:
                self._contain(key.data, "event", exc)

    def _contain(self, target: object, what: str, exc: Exception) -> None:
        """A defect outside any one request: it ends the channel it happened on, nothing else."""
        if isinstance(target, SocketChannel):
            self.core.internal_error(f"{target.conn.name} (dom0 socket client): {what}", exc)
            target.close(f"internal error: {exc!r}")
        elif isinstance(target, RingChannel):
            self.core.internal_error(f"dom{target.conn.domid}'s ring: {what}", exc)
            if not target.closed:
                target.ring.broken = True  # ignored until the guest reconnects (the ring reset clears it)
        else:
            self.core.internal_error(f"{type(target).__name__}: {what}", exc)

    def close(self) -> None:
        for ch in list(self.rings.values()):
            ch.close()
        self.rings.clear()
        for key in list(self.sel.get_map().values()):
            if isinstance(key.data, SocketChannel):
                key.data.close("daemon stopping")
        self.sel.close()
        self.listener.close()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.wake_r)
        os.close(self.wake_w)
        log.info("stopped")
