"""The xenstore ring transport (xs_wire.h xenstore_domain_interface, docs/misc/xenstore-ring.txt).

`RingServer` is xenstored's side of one guest's page, `GuestRing` the guest's side (used by tests now and
by the guest model later). Both only see a 4 KiB memoryview and a `Doorbell`; who maps the page (a file
now, guest RAM later) and what carries the notifications (eventfds, FIFOs, event channels) is not their
business.

Memory ordering: every index and data access is a separate aligned 32-bit load/store or a memcpy done by
CPython in program order; on x86 (TSO) that gives the read-indexes / copy / bump-index ordering the ring
protocol requires, so no explicit barrier is needed from Python.
"""
from __future__ import annotations

import logging
import os
import select
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from xenpv.xenabi.xs_wire import (
    MASK_XENSTORE_IDX, XENSTORE_CONNECTED, XENSTORE_ERROR_NONE, XENSTORE_ERROR_PROTO, XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX, XENSTORE_RECONNECT, XENSTORE_RING_SIZE, XSD_SOCKMSG, XenstoreDomainInterface,
)

log = logging.getLogger("xenstored.ring")

_REQ = XenstoreDomainInterface.req.offset
_RSP = XenstoreDomainInterface.rsp.offset
_HDR = XSD_SOCKMSG.size
_U32 = 0xFFFFFFFF
_ONE = (1).to_bytes(8, "little")
PAGE_SIZE = 4096


class RingError(Exception):
    """The peer corrupted the ring; `code` is the XENSTORE_ERROR_* value written to the page."""

    def __init__(self, code: int, detail: str) -> None:
        self.code = code
        super().__init__(detail)


@dataclass
class Doorbell:
    """A notification pair: `wait_fd` becomes readable when the peer rings, `notify()` rings the peer.

    Works over an eventfd pair or a FIFO pair: writes are 8-byte counters, reads drain whatever is there.
    """

    wait_fd: int
    notify_fd: int

    def fileno(self) -> int:
        return self.wait_fd

    def notify(self) -> None:
        try:
            os.write(self.notify_fd, _ONE)
        except BlockingIOError:
            pass  # a wake-up is already pending

    def drain(self) -> None:
        try:
            while os.read(self.wait_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def wait(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.wait_fd], [], [], max(0.0, timeout))
        if ready:
            self.drain()
        return bool(ready)

    def close(self) -> None:
        for fd in {self.wait_fd, self.notify_fd}:
            try:
                os.close(fd)
            except OSError:
                pass


def eventfd_doorbells() -> tuple[Doorbell, Doorbell]:
    """A connected (server, guest) pair of doorbells over two eventfds."""
    to_server = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    to_guest = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    return Doorbell(to_server, to_guest), Doorbell(to_guest, to_server)


def _check(prod: int, cons: int, which: str) -> int:
    used = (prod - cons) & _U32
    if used > XENSTORE_RING_SIZE:
        raise RingError(XENSTORE_ERROR_RINGIDX, f"{which} prod {prod:#x} cons {cons:#x}")
    return used


class _Page:
    def __init__(self, page: memoryview) -> None:
        if len(page) < PAGE_SIZE:
            raise ValueError(f"xenstore ring page is {len(page)} bytes, need {PAGE_SIZE}")
        self.mem = page
        self.intf = XenstoreDomainInterface.from_buffer(page)

    def copy_in(self, base: int, prod: int, cons: int, limit: int) -> tuple[bytes, int]:
        """Up to `limit` bytes from ring `base` between cons and prod (wrapping); returns (data, new cons)."""
        avail = min((prod - cons) & _U32, limit)
        out = b""
        while avail:
            idx = MASK_XENSTORE_IDX(cons)
            n = min(XENSTORE_RING_SIZE - idx, avail)
            out += bytes(self.mem[base + idx:base + idx + n])
            cons = (cons + n) & _U32
            avail -= n
        return out, cons

    def copy_out(self, base: int, prod: int, cons: int, data: memoryview) -> tuple[int, int]:
        """Write as much of `data` as fits; returns (bytes written, new prod)."""
        done = 0
        while done < len(data):
            space = XENSTORE_RING_SIZE - ((prod - cons) & _U32)
            if space <= 0:
                break
            idx = MASK_XENSTORE_IDX(prod)
            n = min(XENSTORE_RING_SIZE - idx, space, len(data) - done)
            self.mem[base + idx:base + idx + n] = data[done:done + n]
            prod = (prod + n) & _U32
            done += n
        return done, prod


class RingServer:
    """xenstored's end of a guest's ring: frames requests out of `req`, writes replies and events to `rsp`.

    `on_message(type, req_id, tx_id, payload)` handles one request; `on_reset()` is called when the guest
    reconnects (the daemon then drops the connection's watches and transactions). A corrupt ring is marked
    in `error` and ignored until the guest reconnects.
    """

    def __init__(self, name: str, page: memoryview, doorbell: Doorbell, features: int,
                 on_message: Callable[[int, int, int, bytes], None], on_reset: Callable[[], None],
                 max_outstanding: int | None, max_output_bytes: int) -> None:
        self.name = name
        self.page = _Page(page)
        self.doorbell = doorbell
        self.on_message = on_message
        self.on_reset = on_reset
        self.max_outstanding = max_outstanding
        self.max_output_bytes = max_output_bytes
        self.inbuf = b""
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.broken = False
        self.page.intf.server_features = features

    def send(self, msg: bytes) -> None:
        if self.broken:
            return
        if self.out_bytes + len(msg) > self.max_output_bytes:
            log.warning("%s: guest is not consuming replies; dropping a %d-byte message", self.name, len(msg))
            return
        self.out.append(memoryview(msg))
        self.out_bytes += len(msg)

    def service(self) -> None:
        """Called on every notification and after queuing output: re-scan both directions until idle."""
        intf = self.page.intf
        if intf.connection == XENSTORE_RECONNECT:
            self.reset()
            return
        if self.broken:
            return
        try:
            _check(intf.req_prod, intf.req_cons, "req")
            _check(intf.rsp_prod, intf.rsp_cons, "rsp")
            notify = False
            while True:
                progress = self._produce()
                progress |= self._consume()
                if not progress:
                    break
                notify = True
                progress = self._produce()  # replies to what was just consumed
            if notify:
                self.doorbell.notify()
        except RingError as exc:
            self.broken = True
            intf.error = exc.code
            self.out.clear()
            self.out_bytes = 0
            log.warning("%s: ring error %d (%s); connection ignored until the guest reconnects",
                        self.name, exc.code, exc)
            self.doorbell.notify()

    def _produce(self) -> bool:
        intf = self.page.intf
        progress = False
        while self.out:
            cons, prod = intf.rsp_cons, intf.rsp_prod
            _check(prod, cons, "rsp")
            chunk = self.out[0]
            n, prod = self.page.copy_out(_RSP, prod, cons, chunk)
            if n == 0:
                break
            intf.rsp_prod = prod
            progress = True
            self.out_bytes -= n
            if n == len(chunk):
                self.out.popleft()
            else:
                self.out[0] = chunk[n:]
                break
        return progress

    def _consume(self) -> bool:
        if self.max_outstanding is not None and len(self.out) >= self.max_outstanding:
            return False  # back-pressure: leave requests in the ring until the guest reads replies
        intf = self.page.intf
        cons, prod = intf.req_cons, intf.req_prod
        _check(prod, cons, "req")
        data, cons = self.page.copy_in(_REQ, prod, cons, XENSTORE_RING_SIZE)
        if not data:
            return False
        intf.req_cons = cons
        buf = self.inbuf + data
        pos = 0
        while len(buf) - pos >= _HDR:
            mtype, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(buf, pos)
            if length > XENSTORE_PAYLOAD_MAX:
                raise RingError(XENSTORE_ERROR_PROTO, f"message length {length}")
            end = pos + _HDR + length
            if end > len(buf):
                break
            self.on_message(mtype, req_id, tx_id, buf[pos + _HDR:end])
            pos = end
            if self.broken or self.page.intf.connection == XENSTORE_RECONNECT:
                break
        self.inbuf = buf[pos:]
        return True

    def reset(self, drop_state: bool = True) -> None:
        """The reconnect protocol: drop everything in flight, zero the indexes, say CONNECTED, notify.

        With `drop_state` (a guest-requested reconnection) the connection's watches and transactions go
        too; a re-INTRODUCE only restarts the ring and keeps them.
        """
        log.info("%s: ring reset (%s)", self.name, "reconnection" if drop_state else "re-introduced")
        self.inbuf = b""
        self.out.clear()
        self.out_bytes = 0
        if drop_state:
            self.on_reset()
        intf = self.page.intf
        intf.req_cons = intf.req_prod = intf.rsp_cons = intf.rsp_prod = 0
        intf.error = XENSTORE_ERROR_NONE
        self.broken = False
        intf.connection = XENSTORE_CONNECTED
        self.doorbell.notify()


class GuestRing:
    """The guest's end of a xenstore ring (what xenbus_comms.c does), with deadlines on every wait."""

    def __init__(self, page: memoryview, doorbell: Doorbell) -> None:
        self.page = _Page(page)
        self.doorbell = doorbell
        self.inbuf = b""

    @property
    def intf(self) -> XenstoreDomainInterface:
        return self.page.intf

    def write(self, data: bytes, timeout: float = 5.0, notify: bool = True) -> None:
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        while view:
            intf = self.intf
            n, prod = self.page.copy_out(_REQ, intf.req_prod, intf.req_cons, view)
            if n:
                intf.req_prod = prod
                view = view[n:]
                if notify:
                    self.doorbell.notify()
            elif not self.doorbell.wait(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise TimeoutError("xenstore request ring stayed full")

    def send(self, mtype: int, payload: bytes, req_id: int = 0, tx_id: int = 0, timeout: float = 5.0) -> None:
        self.write(XSD_SOCKMSG.pack(mtype, req_id, tx_id, len(payload)) + payload, timeout)

    def read_message(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.inbuf) >= _HDR:
                mtype, req_id, tx_id, length = XSD_SOCKMSG.unpack_from(self.inbuf)
                if len(self.inbuf) >= _HDR + length:
                    payload = self.inbuf[_HDR:_HDR + length]
                    self.inbuf = self.inbuf[_HDR + length:]
                    return mtype, req_id, tx_id, payload
            intf = self.intf
            data, cons = self.page.copy_in(_RSP, intf.rsp_prod, intf.rsp_cons, XENSTORE_RING_SIZE)
            if data:
                intf.rsp_cons = cons
                self.inbuf += data
                self.doorbell.notify()
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no xenstore reply on the ring")
            self.doorbell.wait(min(remaining, 0.05))  # poll too: a notification may predate our wait

    def reconnect(self, timeout: float = 5.0) -> None:
        intf = self.intf
        intf.connection = XENSTORE_RECONNECT
        self.doorbell.notify()
        deadline = time.monotonic() + timeout
        while intf.connection != XENSTORE_CONNECTED:
            if time.monotonic() >= deadline:
                raise TimeoutError("xenstored did not complete the reconnection")
            self.doorbell.wait(0.05)
        self.inbuf = b""
