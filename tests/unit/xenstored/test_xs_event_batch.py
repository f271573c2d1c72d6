"""xenstored's event loop skips an event whose channel an earlier event of the same select() batch closed
(a client that left, a released domain's ring): handling it read a closed socket, and the EBADF was
counted as an internal error, which the fuzzers and the stress run treat as a defect."""
from __future__ import annotations

import mmap
import os
import selectors
from pathlib import Path

from xenpv.backends.xenstored.daemon import Daemon
from xenpv.backends.xenstored.ring_provider import RingEndpoint
from xenpv.xenabi.xs_ring import eventfd_doorbells


def test_a_released_rings_stale_event_does_not_drain_the_fd_that_reused_its_number(tmp_path: Path) -> None:
    """The worse case: the released ring's doorbell fd number is reused at once (by the next domain's
    doorbell); draining it through the stale event would swallow that domain's wake-up for good."""
    server_bell, guest_bell = eventfd_doorbells()
    page = mmap.mmap(-1, 4096)
    daemon = Daemon(tmp_path / "xs.sock", provider=lambda domid, gfn, port: RingEndpoint(memoryview(page), server_bell))
    try:
        daemon.attach(5, 0, 1)
        channel = daemon.rings[5]
        key = daemon.sel.get_key(server_bell.wait_fd)
        guest_bell.notify()
        old_fd = server_bell.wait_fd
        channel.close()  # the domain is released by an earlier event of the batch
        reused = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            assert reused == old_fd, "the kernel gives the lowest free number: the doorbell's"
            os.eventfd_write(reused, 1)
            daemon._dispatch([(key, selectors.EVENT_READ)])
            assert os.eventfd_read(reused) == 1, "the stale event drained another channel's wake-up"
            assert daemon.core.internal_errors == 0
        finally:
            os.close(reused)
    finally:
        daemon.close()
