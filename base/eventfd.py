"""Signalling an eventfd that another party may hold too."""
from __future__ import annotations

import os


def signal(fd: int) -> None:
    """Add one to the eventfd `fd` (non-blocking). A counter at its maximum already makes the eventfd
    readable, which is all a signal is: that is not an error of the signaller. The doorbells of event
    channels hand eventfds to the guest's vCPU, which may saturate them on purpose."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass
