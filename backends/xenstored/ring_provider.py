"""Page providers: how INTRODUCE(domid, gfn, port) becomes a mapped ring page and a doorbell.

The daemon takes any callable `(domid, gfn, port) -> RingEndpoint`; the hypervisor issue plugs in one
that maps the gfn out of guest RAM and uses the event channel. `FileRingProvider` is the stand-in used
until then: one page file and two FIFOs per domain in a directory shared with the guest side.
"""
from __future__ import annotations

import logging
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from xenpv.backends.xenstored.errors import XsError
from xenpv.xenabi.xs_ring import PAGE_SIZE, Doorbell

log = logging.getLogger("xenstored.ring_provider")


@dataclass
class RingEndpoint:
    page: memoryview
    doorbell: Doorbell
    release: Callable[[], None] = field(default=lambda: None)  # unmap and close, once the daemon is done

    def close(self) -> None:
        self.doorbell.close()
        try:
            self.page.release()
            self.release()
        except BufferError:
            # Something still views the page; the mapping goes when that is collected.
            log.warning("ring page still referenced at close; leaving it to the garbage collector")


class PageProvider(Protocol):
    def __call__(self, domid: int, gfn: int, port: int) -> RingEndpoint: ...


@dataclass
class GuestSide:
    """What the guest (or a test standing in for it) holds: the mapped page and its doorbell."""
    mapping: mmap.mmap
    page: memoryview
    doorbell: Doorbell

    def close(self) -> None:
        self.doorbell.close()
        try:
            self.page.release()
            self.mapping.close()
        except BufferError:
            # A ctypes view of the page is still alive; the mapping goes when that is collected.
            log.warning("guest ring page still referenced at close")


class FileRingProvider:
    """dom<N>.page (4 KiB, shared mmap), dom<N>.kick (guest -> xenstored) and dom<N>.call (xenstored -> guest)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _paths(self, domid: int) -> tuple[Path, Path, Path]:
        d = self.directory
        return d / f"dom{domid}.page", d / f"dom{domid}.kick", d / f"dom{domid}.call"

    def create_guest(self, domid: int) -> GuestSide:
        page, kick, call = self._paths(domid)
        with open(page, "wb") as f:
            f.truncate(PAGE_SIZE)
        for fifo in (kick, call):
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)
        mapping = _map(page)
        # O_RDWR on a FIFO never blocks on Linux and keeps it open for both ends.
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
        doorbell = Doorbell(wait_fd=os.open(call, flags), notify_fd=os.open(kick, flags))
        return GuestSide(mapping, memoryview(mapping), doorbell)

    def __call__(self, domid: int, gfn: int, port: int) -> RingEndpoint:
        page, kick, call = self._paths(domid)
        try:
            mapping = _map(page)
            flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
            wait_fd = os.open(kick, flags)
            try:
                notify_fd = os.open(call, flags)
            except OSError:
                os.close(wait_fd)
                raise
        except (OSError, ValueError) as exc:
            raise XsError("EINVAL", f"cannot map the ring of domain {domid}: {exc}") from exc
        view = memoryview(mapping)
        return RingEndpoint(view, Doorbell(wait_fd, notify_fd), release=mapping.close)


def _map(path: Path) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < PAGE_SIZE:
            raise ValueError(f"{path} is smaller than a page")
        return mmap.mmap(fd, PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
