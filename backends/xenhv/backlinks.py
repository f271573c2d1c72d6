"""xenhv as the vhost-user front-end of the dom0 back-ends.

One connection per (back-end, domain): after the handshake xenhv writes the domain id into the
back-end's config space, hands over the domain's RAM (its RAM-file fd, at guest-physical 0) with
SET_MEM_TABLE, and gives each event channel the back-end binds one kick/call eventfd pair, at a
vring index of its own ("channel index"). A guest's send to the channel sets dom0's end pending, which
writes the kick eventfd; the back-end's write to the call eventfd is a send from dom0's end.

Once the guest's vCPU has asked for the channel's doorbell (xenabi/trap.py DOORBELL), it writes the kick
eventfd and reads the call eventfd itself, and xenhv stops watching the call eventfd. Whenever the
channel's binding changes, xenhv revokes the doorbell through the domain's doorbell table first
(backends/xenhv/doorbells.py); an event the back-end sent before its channel went is delivered exactly
once, by whichever of the vCPU and xenhv reads the call eventfd first.

The link's socket sits in xenhv's selector too: a back-end sends nothing unasked, so the socket turns
readable outside a request only when the back-end closed it (it died or restarted). `on_gone` then tells
the hypervisor, which detaches the link: its channels close and the grant mappings the back-end held are
released, as Xen releases a dying driver domain's, so the guest can revoke and reuse its pages.
"""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from xenpv.base import eventfd
from xenpv.backends.vhost_user.frontend import Region, VhostUserFrontend
from xenpv.backends.vhost_user.messages import ProtocolFeature
from xenpv.backends.xenhv.errors import XenError
from xenpv.xenabi.trap import BACKEND_CONFIG
from xenpv.xenabi.xen import XEN_EBUSY, XEN_ENOSPC

if TYPE_CHECKING:
    from xenpv.backends.xenhv.domain import Domain
    from xenpv.backends.xenhv.evtchn import EventChannels

log = logging.getLogger("xenhv.backlinks")

MAX_CHANNELS = 256  # vring indexes a back-end accepts
PROTOCOL_FEATURES = ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIGURE_MEM_SLOTS | ProtocolFeature.CONFIG


@dataclass
class Channel:
    port: int  # dom0's end
    guest_port: int  # the guest's end: the port it was bound to, then the one its doorbell went to
    index: int
    kick: int
    call: int
    handed_over: bool = False  # the guest's vCPU holds its doorbell: xenhv does not watch `call`


@dataclass
class BackendLink:
    name: str
    domain: "Domain"
    frontend: VhostUserFrontend
    dom0: "EventChannels"
    register_fd: Callable[[int, Callable[[], None]], None]
    unregister_fd: Callable[[int], None]
    on_gone: Callable[["BackendLink"], None] | None = None
    channels: dict[int, Channel] = field(default_factory=dict)  # by dom0 port
    _watched_fd: int | None = None
    closed: bool = False

    @classmethod
    def connect(cls, name: str, socket_path: str, domain: "Domain", dom0: "EventChannels",
                register_fd: Callable[[int, Callable[[], None]], None],
                unregister_fd: Callable[[int], None],
                on_gone: Callable[["BackendLink"], None] | None = None) -> "BackendLink":
        """Connect and configure the link; with `on_gone`, the back-end closing its end is reported to it
        (on the selector's thread) as soon as xenhv sees it."""
        fe = VhostUserFrontend.connect(socket_path)
        try:
            fe.negotiate(protocol_features=PROTOCOL_FEATURES)
            fe.set_config(0, BACKEND_CONFIG.pack(domain.domid, 0))
            fe.set_mem_table([Region(0, domain.memory.ram_pages << 12, domain.memory.ram_fd)])
        except BaseException:
            fe.close()
            raise
        log.info("back-end %s attached to dom%d over %s", name, domain.domid, socket_path)
        link = cls(name, domain, fe, dom0, register_fd, unregister_fd, on_gone)
        if on_gone is not None:
            link._watched_fd = fe.sock.fileno()
            register_fd(link._watched_fd, link._socket_readable)
        return link

    def _socket_readable(self) -> None:
        """The selector saw the link's socket readable: the back-end is gone, or it broke the protocol by
        sending unasked; either way the link ends (never raises: this runs in xenhv's main loop)."""
        if self.closed:
            return
        try:
            gone = self.peer_gone()
            if not gone:
                log.warning("back-end %s of dom%d sent a message nobody asked for; dropping its link",
                            self.name, self.domain.domid)
        except Exception as exc:
            log.warning("back-end %s of dom%d: link socket: %s", self.name, self.domain.domid, exc)
        else:
            log.info("back-end %s of dom%d closed its link", self.name, self.domain.domid)
        self._stop_watching()
        if self.on_gone is not None:
            try:
                self.on_gone(self)
            except Exception:
                log.exception("back-end %s of dom%d: detaching the closed link failed", self.name,
                              self.domain.domid)

    def _stop_watching(self) -> None:
        if self._watched_fd is not None:
            self.unregister_fd(self._watched_fd)
            self._watched_fd = None

    def peer_gone(self) -> bool:
        """The back-end closed its end (it died or restarted). A front-end socket is readable outside a
        request only then: a back-end sends nothing unasked (no BACKEND_REQ channel is negotiated)."""
        try:
            data = self.frontend.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b""

    def bind(self, port: int, guest_port: int) -> int:
        """Give dom0's `port`, bound to the guest's `guest_port`, a kick/call pair on this link; returns its
        channel index."""
        if port in self.channels:
            raise XenError(XEN_EBUSY, f"dom0 port {port} already has a channel to {self.name}")
        used = {c.index for c in self.channels.values()}
        index = next((i for i in range(MAX_CHANNELS) if i not in used), None)
        if index is None:
            raise XenError(XEN_ENOSPC, f"{self.name} has all {MAX_CHANNELS} channels in use for dom{self.domain.domid}")
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.frontend.set_channel(index, kick, call)
        except BaseException:
            os.close(kick)
            os.close(call)
            raise
        ch = Channel(port, guest_port, index, kick, call)
        self.channels[port] = ch
        self.dom0.set_port_notifier(port, lambda: eventfd.signal(kick))
        self.register_fd(call, lambda: self._called(ch))
        # A vCPU that asked before the port had a back-end asks again.
        self.domain.doorbells.revoke(guest_port)
        return index

    def hand_over(self, ch: Channel, guest_port: int) -> None:
        """The guest's vCPU now reads `ch.call` itself (DOORBELL), for `guest_port`: the port bound to the
        channel now, which is the one to revoke, even if the guest closed the first and bound dom0's port
        again from another."""
        ch.guest_port = guest_port
        if not ch.handed_over:
            self.unregister_fd(ch.call)
            ch.handed_over = True

    def take_back(self, guest_port: int) -> None:
        """The guest closed `guest_port`: xenhv watches the call eventfd of its channel again (the back-end
        may still notify until it closes its end; dom0's send then finds the port unbound)."""
        for ch in self.channels.values():
            if ch.guest_port == guest_port and ch.handed_over:
                ch.handed_over = False
                self.register_fd(ch.call, lambda ch=ch: self._called(ch))

    def _called(self, ch: Channel) -> None:
        if self.channels.get(ch.port) is not ch:
            return  # unbound earlier in this selector round: its fd is closed (or already another's)
        try:
            os.eventfd_read(ch.call)
        except OSError:  # nothing to read, or the channel was closed earlier in this selector round
            return
        try:
            self.dom0.send(ch.port)
        except XenError as exc:
            log.info("%s: notify on dom0 port %d: %s", self.name, ch.port, exc)

    def unbind(self, port: int) -> None:
        """End dom0 `port`'s channel; dom0's port is still open (the caller closes it next)."""
        ch = self.channels.pop(port, None)
        if ch is None:
            return
        if not ch.handed_over:
            self.unregister_fd(ch.call)
        try:
            self.frontend.set_vring_enable(ch.index, False)
            self.frontend.get_vring_base(ch.index)  # stops the ring: no more notifications
        except Exception as exc:  # the back-end may be gone; the channel is ours to close regardless
            log.info("%s: stopping channel %d: %s", self.name, ch.index, exc)
        # What the back-end sent before it stopped is delivered (unless the vCPU read it first), then the
        # vCPU's doorbell is revoked: from here on the call eventfd can carry nothing.
        try:
            os.eventfd_read(ch.call)
        except OSError:
            pass
        else:
            try:
                self.dom0.send(ch.port)
            except XenError as exc:
                log.info("%s: last notify on dom0 port %d: %s", self.name, ch.port, exc)
        self.domain.doorbells.revoke(ch.guest_port)
        os.close(ch.kick)
        os.close(ch.call)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_watching()
        for port in list(self.channels):
            self.unbind(port)
        self.frontend.close()
        log.info("back-end %s detached from dom%d", self.name, self.domain.domid)
