"""UpcallDispatcher.close(): the interrupt thread is woken and gone before the shared_info page and the
stop pipe are released; a thread that does not end leaves both in place and the error says so."""
from __future__ import annotations

import mmap
import os
import threading

import pytest

from xenpv.base.errors import WaitTimeout
from xenpv.stack.vcpu.upcall import _VCPU0, UpcallDispatcher
from xenpv.xenabi.xen import SharedInfo, VcpuInfo


@pytest.fixture
def page() -> mmap.mmap:
    return mmap.mmap(-1, 4096)


class _Interrupts:
    """The vCPU's interrupt source as the dispatcher uses it (HypervisorLink), reduced to its upcall eventfd."""

    def __init__(self, upcall_fd: int) -> None:
        self.interrupt_fd = upcall_fd

    def take_interrupt(self) -> bool:
        try:
            os.eventfd_read(self.interrupt_fd)
        except BlockingIOError:
            return False
        return True


def _dispatcher(page: mmap.mmap) -> tuple[UpcallDispatcher, int, memoryview]:
    upcall_fd = os.eventfd(0, os.EFD_NONBLOCK)
    view = memoryview(page)
    return UpcallDispatcher(_Interrupts(upcall_fd), view), upcall_fd, view


def _raise_port(view: memoryview, upcall_fd: int, port: int) -> None:
    """What xenhv does: pending bit, selector bit, upcall pending, then the eventfd."""
    view[SharedInfo.evtchn_pending.offset] = 1 << port
    view[_VCPU0 + VcpuInfo.evtchn_pending_sel.offset] = 1
    view[_VCPU0 + VcpuInfo.evtchn_upcall_pending.offset] = 1
    os.eventfd_write(upcall_fd, 1)


def test_close_stops_the_thread_then_gives_the_page_back(page: mmap.mmap) -> None:
    dispatcher, upcall_fd, view = _dispatcher(page)
    seen = threading.Event()
    dispatcher.bind(3, lambda _port: seen.set())
    _raise_port(view, upcall_fd, 3)
    assert seen.wait(5)
    dispatcher.close()
    assert not dispatcher._thread.is_alive()
    view.release()
    page.close()  # no view of the page is left
    os.close(upcall_fd)


def test_a_thread_that_does_not_end_keeps_the_page_mapped_and_close_says_so(page: mmap.mmap) -> None:
    dispatcher, upcall_fd, view = _dispatcher(page)
    entered, gate = threading.Event(), threading.Event()
    dispatcher.bind(3, lambda _port: (entered.set(), gate.wait(10)))
    _raise_port(view, upcall_fd, 3)
    assert entered.wait(5)  # the thread is inside scan(), working on the page
    with pytest.raises(WaitTimeout, match="closing the upcall dispatcher: thread upcall still running"):
        dispatcher.close(timeout=0.2)
    view.release()
    with pytest.raises(BufferError):
        page.close()  # the scan's page is still mapped under it
    os.fstat(dispatcher._stop_r)  # and its stop pipe still open
    gate.set()
    dispatcher.close()  # the thread has ended now: close finishes the job
    assert not dispatcher._thread.is_alive()
    page.close()
    os.close(upcall_fd)
