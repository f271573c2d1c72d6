"""The page provider that puts xenstored on real guest rings: on INTRODUCE(domid, gfn, port) xenstored,
as a dom0 back-end, has xenhv attach it to the domain over vhost-user (guest RAM by SET_MEM_TABLE),
views the ring page at `gfn` in that memory, and binds the store event channel.

The doorbell: events on the channel arrive on the vhost-user server thread, which rings a local eventfd
the daemon's selector waits on; the daemon's notifications write the channel's call eventfd.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from xenpv.backends.xenbackend import XenBackend
from xenpv.backends.xenstored.errors import XsError
from xenpv.xenabi.xs_ring import PAGE_SIZE, Doorbell
from xenpv.backends.xenstored.ring_provider import RingEndpoint

log = logging.getLogger("xenstored.xenhv_provider")


class XenhvRingProvider:
    def __init__(self, xenhv_socket: Path, vhost_socket: Path) -> None:
        self.backend = XenBackend("xenstored", vhost_socket, xenhv_socket).start()

    def __call__(self, domid: int, gfn: int, port: int) -> RingEndpoint:
        link = self.backend.links.get(domid) or self.backend.attach(domid)
        try:
            page = link.memory.view(gfn * PAGE_SIZE, PAGE_SIZE)
        except Exception as exc:
            raise XsError("EINVAL", f"domain {domid}: store page gfn {gfn:#x} is not guest RAM: {exc}") from None
        wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            index = link.bind(port, lambda: os.eventfd_write(wake, 1))
        except Exception as exc:
            os.close(wake)
            page.release()
            raise XsError("EINVAL", f"domain {domid}: cannot bind store event channel {port}: {exc}") from None
        call_fd = os.dup(link.session.vring(index).call_fd)

        def release() -> None:
            try:
                link.unbind(index)
            except Exception as exc:  # the domain may be gone already, and its channel with it
                log.info("dom%d: unbinding the store channel: %s", domid, exc)

        log.info("dom%d: ring at gfn %#x, event channel %d (channel index %d)", domid, gfn, port, index)
        return RingEndpoint(page=page, doorbell=Doorbell(wait_fd=wake, notify_fd=call_fd), release=release)

    def close(self) -> None:
        self.backend.stop()
