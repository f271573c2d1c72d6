"""Stopping the project's own threads: a bounded join whose expiry is an error, never a silent go-on.

A thread that shares memory with its owner (a ring, a mapped page, an fd it selects on) must be gone before
the owner releases that memory; releasing it under a live thread is a use-after-free. So when a stopped
thread outlives its deadline the owner raises instead and leaves the resources in place: a leak plus a
clear error beats a crash.
"""
from __future__ import annotations

import threading

from xenpv.base.errors import WaitTimeout

# Threads are woken when told to stop and normally end within milliseconds; the deadline is for a thread
# stuck in I/O or in someone else's lock, and is generous so that a loaded machine is not reported.
THREAD_EXIT_DEADLINE = 30.0


def join_stopped(thread: threading.Thread, what: str, timeout: float | None = None) -> None:
    """Join `thread`, which has been told to stop; WaitTimeout naming `what` if it is still running after
    `timeout` seconds (default THREAD_EXIT_DEADLINE, read at the call). Joining the calling thread itself
    is refused (it would always time out)."""
    if timeout is None:
        timeout = THREAD_EXIT_DEADLINE
    if thread is threading.current_thread():
        raise RuntimeError(f"{what}: thread {thread.name} cannot wait for its own end")
    thread.join(timeout)
    if thread.is_alive():
        raise WaitTimeout(f"{what}: thread {thread.name} still running {timeout:g}s after it was told to stop; "
                          "what it uses is left in place (leaked) rather than released under it")
