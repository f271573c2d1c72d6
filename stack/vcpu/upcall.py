"""The guest's event channel upcall: an interrupt thread that waits on the vCPU's interrupts (the upcall
eventfd xenhv writes, and the call eventfds of its doorbells, which the vCPU delivers itself), then does
what a guest's 2-level handler does on the shared_info page (xen-abi.md section 8): clear
evtchn_upcall_pending, take evtchn_pending_sel with an atomic exchange, and for each selected word
handle the pending, unmasked ports, clearing each pending bit (atomically) before calling its handler.

Handlers run on the interrupt thread and must not block or touch the vCPU's qtest connection; they
signal whoever waits (the kernel model's ISR/DPC dispatch sits on top of this in the driver stack).

The thread works on the shared_info page through AtomicMemory and selects on the stop pipe, so close()
wakes it through the pipe and releases neither before it has ended: if it does not end in time, close()
raises WaitTimeout and leaves both in place (a leak and an error, not an unmap under a running scan).
close() may be called again once the thread is gone.
"""
from __future__ import annotations

import logging
import os
import select
import threading
from typing import Callable

from xenpv.base.threads import join_stopped
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.stack.vcpu.hypervisor import HypervisorLink
from xenpv.xenabi.xen import EVTCHN_WORD_BITS, EVTCHN_WORDS, SharedInfo, VcpuInfo

log = logging.getLogger("stack.vcpu.upcall")

_WORD = SharedInfo.evtchn_pending.size // EVTCHN_WORDS
_VCPU0 = SharedInfo.vcpu_info.offset


class UpcallDispatcher:
    def __init__(self, link: HypervisorLink, shared_info: memoryview) -> None:
        self.link = link
        self._mem = AtomicMemory(shared_info)
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._closed = False
        self.upcalls = 0
        self._thread = threading.Thread(target=self._run, name="upcall", daemon=True)
        self._thread.start()

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        with self._lock:
            self._handlers[port] = handler

    def unbind(self, port: int) -> None:
        with self._lock:
            self._handlers.pop(port, None)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self.link.interrupt_fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            if not self.link.take_interrupt():
                continue
            self.upcalls += 1
            self.scan()

    def scan(self) -> None:
        """One pass of the 2-level handler; also safe to call from elsewhere (e.g. after unmasking)."""
        self._mem.store(_VCPU0 + VcpuInfo.evtchn_upcall_pending.offset, 1, 0)
        sel = self._mem.exchange(_VCPU0 + VcpuInfo.evtchn_pending_sel.offset, 8, 0)
        for word in range(EVTCHN_WORDS):
            if not sel >> word & 1:
                continue
            pending_off = SharedInfo.evtchn_pending.offset + word * _WORD
            bits = self._mem.load(pending_off, _WORD) & ~self._mem.load(SharedInfo.evtchn_mask.offset + word * _WORD, _WORD)
            for bit in range(EVTCHN_WORD_BITS):
                if bits >> bit & 1 and self._mem.test_and_clear_bit(pending_off, bit, _WORD):
                    self._dispatch(word * EVTCHN_WORD_BITS + bit)

    def _dispatch(self, port: int) -> None:
        with self._lock:
            handler = self._handlers.get(port)
        if handler is None:
            log.debug("event on unbound port %d dropped", port)
            return
        try:
            handler(port)
        except Exception:  # a handler's bug must not kill the interrupt thread
            log.exception("handler of port %d failed", port)

    def close(self, timeout: float | None = None) -> None:
        """Stop the interrupt thread, then release the page and the pipe (see the module docstring)."""
        if self._closed:
            return
        if self._thread.is_alive():
            os.write(self._stop_w, b"x")  # the pipe stays readable: a retry needs no second byte
            join_stopped(self._thread, "closing the upcall dispatcher", timeout)
        self._closed = True
        os.close(self._stop_r)
        os.close(self._stop_w)
        self._mem.release()
