"""What a dom0 back-end process (blkback, netback, test peers) uses to reach its guests.

The back-end serves vhost-user; xenhv connects once per domain it attaches the back-end to, writes the
domain id into the config space and hands over the domain's RAM. Event channels are bound through
xenhv's control socket (dom0's hypercalls) and arrive as kick/call eventfd pairs on the vhost-user
connection; `DomainLink.on_event` hooks run on the vhost-user server thread.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from xenpv.backends.vhost_user.backend import BackendDevice, BackendSession, VhostUserBackend
from xenpv.backends.vhost_user.messages import ProtocolFeature, Request, VhostUserRequestFailed
from xenpv.backends.xenhv.control import XenhvControl
from xenpv.xenabi.trap import BACKEND_CONFIG
from xenpv.base.errors import HarnessError, WaitTimeout

log = logging.getLogger("xenbackend")

# Control operations whose result belongs to the calling back-end (named by `backend`).
OWNED_OPS = frozenset({"gnttab_map", "gnttab_unmap"})


class BackendError(HarnessError):
    pass


class DomainLink:
    """One guest domain as this back-end sees it: its memory, its channels."""

    def __init__(self, backend: "XenBackend", session: BackendSession, domid: int) -> None:
        self.backend = backend
        self.session = session
        self.domid = domid
        self.ports: dict[int, int] = {}  # channel index -> dom0 port
        self._handlers: dict[int, Callable[[], None]] = {}

    @property
    def memory(self) -> Any:
        """Guest-physical memory of the domain (backends/vhost_user/memory.py GuestMemory)."""
        return self.session.memory

    def bind(self, remote_port: int, handler: Callable[[], None]) -> int:
        """bind_interdomain to the guest's unbound `remote_port`; `handler` runs on each event. Returns
        the channel index, which `notify` takes."""
        r = self.backend.call("evtchn_bind_interdomain", remote_dom=self.domid, remote_port=remote_port,
                              backend=self.backend.name)
        index = r["index"]
        self.ports[index] = r["port"]
        self._handlers[index] = handler
        # xenhv marks dom0's end pending at bind time (Xen's lost-notification fixup), which may have
        # kicked before the handler existed: run it once so nothing is missed.
        handler()
        return index

    def notify(self, index: int) -> None:
        if not self.session.notify(index):
            raise BackendError(f"dom{self.domid}: channel {index} cannot notify (stopped or unbound)")

    def unbind(self, index: int) -> None:
        port = self.ports.pop(index)
        self._handlers.pop(index, None)
        self.backend.call("evtchn_close", port=port)

    def kicked(self, index: int) -> None:
        handler = self._handlers.get(index)
        if handler is not None:
            handler()


class _Device(BackendDevice):
    protocol_features = (ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS
                         | ProtocolFeature.CONFIG)

    def __init__(self, backend: "XenBackend") -> None:
        self.backend = backend
        self.link: DomainLink | None = None

    def set_config(self, session: BackendSession, offset: int, data: bytes, flags: int) -> None:
        if offset != 0 or len(data) != BACKEND_CONFIG.size or self.link is not None:
            raise VhostUserRequestFailed(Request.SET_CONFIG, f"bad back-end config ({offset}, {len(data)} bytes)")
        domid, reserved = BACKEND_CONFIG.unpack(data)
        if reserved:
            raise VhostUserRequestFailed(Request.SET_CONFIG, "reserved config bits set")
        self.link = DomainLink(self.backend, session, domid)
        self.backend._connected(self.link)

    def on_kick(self, session: BackendSession, index: int) -> None:
        if self.link is not None:
            self.link.kicked(index)

    def on_disconnect(self, session: BackendSession, reason: str) -> None:
        if self.link is not None:
            self.backend._disconnected(self.link, reason)


class XenBackend:
    def __init__(self, name: str, socket_path: Path, xenhv_socket: Path) -> None:
        self.name = name
        self.socket_path = socket_path
        self.vhost = VhostUserBackend(socket_path, lambda: _Device(self), name=name)
        self._ctl = XenhvControl(xenhv_socket)
        self._ctl_lock = threading.Lock()
        self._cond = threading.Condition()
        self.links: dict[int, DomainLink] = {}

    def start(self) -> "XenBackend":
        self.vhost.start()
        return self

    def call(self, op: str, **args: Any) -> Any:
        if op in OWNED_OPS:
            # xenhv ties the mapping to this back-end's link: released if we die, unmappable by nobody else.
            args.setdefault("backend", self.name)
        with self._ctl_lock:
            return self._ctl.call(op, **args)

    def _connected(self, link: DomainLink) -> None:
        with self._cond:
            self.links[link.domid] = link
            self._cond.notify_all()

    def _disconnected(self, link: DomainLink, reason: str) -> None:
        log.info("%s: dom%d link closed: %s", self.name, link.domid, reason)
        with self._cond:
            if self.links.get(link.domid) is link:
                del self.links[link.domid]

    def attach(self, domid: int, timeout: float = 5.0) -> DomainLink:
        """Ask xenhv to connect this back-end to `domid` and wait until the link is configured."""
        self.call("attach_backend", domid=domid, name=self.name, socket=str(self.socket_path))
        deadline = time.monotonic() + timeout
        with self._cond:
            while domid not in self.links:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout(f"{self.name}: xenhv did not connect for dom{domid} within {timeout:.1f}s")
                self._cond.wait(remaining)
            return self.links[domid]

    def stop(self) -> None:
        self.vhost.stop()
        self._ctl.close()
