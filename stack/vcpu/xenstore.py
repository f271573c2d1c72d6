"""The guest's xenstore connection over its ring page and store event channel.

This is the transport XENBUS's STORE interface sits on: requests and replies in order, watch events
queued as they arrive between replies, errors as the errno names of xs_wire.h. The ring protocol itself
is the guest end in xenabi/xs_ring.py (GuestRing); notifications go through the store event channel
(EVTCHNOP_send) and arrive through the upcall dispatcher.

Each request carries a req_id of its own and only the reply that echoes it is taken as its answer; any
other is stale and dropped. The driver's StoreSubmitRequest waits as long as xenstored takes; the model's
wait ends at `timeout` (scaled by XENPV_TIME_SCALE) with XenstoreTooSlow, a stack.timescale.HarnessTooSlow:
xenstored answers within milliseconds unless the harness's machine is overloaded.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable

from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.xenabi.xs_ring import GuestRing
from xenpv.stack.vcpu.hypercalls import Hypercalls
from xenpv.stack.vcpu.upcall import UpcallDispatcher
from xenpv.xenabi.xs_wire import XsdSockmsgType as T

log = logging.getLogger("stack.vcpu.xenstore")


class XenstoreError(Exception):
    """xenstored answered XS_ERROR; `errno` is the name (ENOENT, EACCES, EAGAIN...)."""

    def __init__(self, op: str, path: str, errno: str) -> None:
        self.op, self.path, self.errno = op, path, errno
        super().__init__(f"xenstore {op} {path}: {errno}")


class XenstoreTooSlow(HarnessTooSlow):
    """xenstored did not take a request, or did not answer it, in time."""


class EventChannelDoorbell:
    """A port as GuestRing's doorbell: notify sends on it, wait takes its next event."""

    def __init__(self, hypercalls: Hypercalls, dispatcher: UpcallDispatcher, port: int) -> None:
        self.hc, self.dispatcher, self.port = hypercalls, dispatcher, port
        self._event = threading.Event()
        dispatcher.bind(port, lambda _: self._event.set())

    def notify(self) -> None:
        self.hc.evtchn_send(self.port)

    def wait(self, timeout: float) -> bool:
        woke = self._event.wait(max(0.0, timeout))
        self._event.clear()
        return woke

    def drain(self) -> None:
        self._event.clear()

    def rebind(self, port: int) -> None:
        """The store event channel of a new domain (after a restore or S4): the old port is forgotten."""
        self.dispatcher.unbind(self.port)
        self.port = port
        self._event.clear()
        self.dispatcher.bind(port, lambda _: self._event.set())

    def close(self) -> None:
        self.dispatcher.unbind(self.port)


class GuestXenstore:
    def __init__(self, page: memoryview, doorbell: EventChannelDoorbell, timeout: float = 5.0) -> None:
        self.ring = GuestRing(page, doorbell)
        self.doorbell = doorbell
        self.timeout = timeout
        self.events: deque[tuple[str, str]] = deque()
        # Watches with a handler get their events delivered to it, whoever happens to read the ring;
        # the others queue for wait_event. So several users of one connection never take each other's.
        self._handlers: dict[str, Callable[[str, str], None]] = {}
        self._lock = threading.RLock()
        self._req_ids = itertools.count(1)

    def request(self, mtype: T, payload: bytes, tx: int = 0, what: str = "") -> bytes:
        timeout = scaled(self.timeout)
        with self._lock:
            req_id = next(self._req_ids) & 0xFFFFFFFF
            deadline = time.monotonic() + timeout
            try:
                self.ring.send(mtype, payload, req_id=req_id, tx_id=tx, timeout=timeout)
            except TimeoutError:
                raise XenstoreTooSlow(f"room on the full request ring for {mtype.name} {what}".rstrip(),
                                      timeout) from None
            try:
                while True:
                    rtype, rid, _, body = self.ring.read_message(max(0.0, deadline - time.monotonic()))
                    if rtype == T.WATCH_EVENT:
                        self._queue_event(body)
                        continue
                    if rid != req_id:
                        log.warning("reply of type %d to request %d dropped: waiting for the reply to request "
                                    "%d (%s %s)", rtype, rid, req_id, mtype.name, what)
                        continue
                    if rtype == T.ERROR:
                        raise XenstoreError(mtype.name, what, body.rstrip(b"\0").decode())
                    if rtype != mtype:
                        raise XenstoreError(mtype.name, what, f"reply of type {rtype}")
                    return body
            except TimeoutError:
                raise XenstoreTooSlow(f"no reply from xenstored to {mtype.name} {what}".rstrip(), timeout) from None

    def held(self) -> threading.RLock:
        """The connection's lock: whoever holds it (`with store.held():`) has the ring to itself - the
        suspend path holds it across the suspend hypercall so no other thread is inside the ring when the
        domain goes away."""
        return self._lock

    def reset(self, port: int) -> None:
        """StoreDisable/StoreResetResponse/StoreEnable after the domain was rebuilt: a partial reply and
        queued watch events belonged to the old xenstored connection; the doorbell is the new port."""
        with self._lock:
            self.ring.inbuf = b""
            self.events.clear()
            self.doorbell.rebind(port)

    def close(self) -> None:
        """Drop the ring, and with it every view of the ring page (the page may then be unmapped)."""
        with self._lock:
            del self.ring

    def _queue_event(self, body: bytes) -> None:
        parts = body.split(b"\0")
        if len(parts) < 2:
            return
        path, token = parts[0].decode(), parts[1].decode()
        handler = self._handlers.get(token)
        if handler is not None:
            handler(path, token)
        else:
            self.events.append((path, token))

    def read(self, path: str, tx: int = 0) -> bytes:
        return self.request(T.READ, path.encode() + b"\0", tx, path)

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        self.request(T.WRITE, path.encode() + b"\0" + data, tx, path)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(T.MKDIR, path.encode() + b"\0", tx, path)

    def rm(self, path: str, tx: int = 0) -> None:
        self.request(T.RM, path.encode() + b"\0", tx, path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        body = self.request(T.DIRECTORY, path.encode() + b"\0", tx, path)
        return [c.decode() for c in body.split(b"\0") if c]

    def watch(self, path: str, token: str, handler: Callable[[str, str], None] | None = None) -> None:
        """Watch `path`; with `handler`, its events (path, token) go to it, else to wait_event."""
        if handler is not None:
            # Registered first: xenstored sends the initial event right after its reply.
            self._handlers[token] = handler
        try:
            self.request(T.WATCH, f"{path}\0{token}\0".encode(), 0, path)
        except BaseException:
            self._handlers.pop(token, None)
            raise

    def forget(self, token: str) -> None:
        """Stop delivering `token`'s events without telling xenstored (a watch of a domain that is gone)."""
        self._handlers.pop(token, None)

    def unwatch(self, path: str, token: str) -> None:
        try:
            self.request(T.UNWATCH, f"{path}\0{token}\0".encode(), 0, path)
        finally:
            self._handlers.pop(token, None)

    def pump(self) -> None:
        """Deliver what the ring holds now (watch events to their handlers), without waiting."""
        with self._lock:
            while True:
                try:
                    rtype, _, _, body = self.ring.read_message(0)
                except TimeoutError:
                    return
                if rtype == T.WATCH_EVENT:
                    self._queue_event(body)

    def transaction_start(self) -> int:
        return int(self.request(T.TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(T.TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def wait_event(self, timeout: float) -> tuple[str, str] | None:
        """The next watch event (path, token), or None when none arrives in time."""
        deadline = time.monotonic() + timeout
        while not self.events:
            with self._lock:
                try:
                    rtype, _, _, body = self.ring.read_message(max(0.0, min(0.05, deadline - time.monotonic())))
                except TimeoutError:
                    rtype = None
                if rtype == T.WATCH_EVENT:
                    self._queue_event(body)
            if not self.events and time.monotonic() >= deadline:
                return None
        return self.events.popleft()
