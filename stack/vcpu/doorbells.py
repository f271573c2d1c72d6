"""The vCPU's doorbells: event channels to a dom0 back-end without xenhv on the path (the KVM
ioeventfd/irqfd pattern; xenabi/trap.py DOORBELL).

For a port bound to a back-end's channel, xenhv hands the vCPU the channel's kick and call eventfds:

- EVTCHNOP_send on the port is an eventfd write to the back-end, as a KVM ioeventfd turns a guest's
  doorbell write into one without leaving the kernel;
- the back-end's write to the call eventfd is delivered by the vCPU itself with Xen's 2-level rule on
  the shared_info page (xenabi/evtchn_2l.py), as KVM's irqfd injects an interrupt; the vCPU's interrupt
  thread waits on the call eventfds beside its upcall eventfd (one epoll set, HypervisorLink).

xenhv keeps bind, close and revocation. A doorbell is used only while its port's generation in the
domain's doorbell table (mapped read-only here) is the one xenhv gave with it; otherwise it is dropped
and xenhv asked again. Which ports have no doorbell is remembered per generation too, so a port that is
not a back-end's costs one extra trap until xenhv binds it to one.

A send that races a revocation may kick the old channel once: a spurious notification of a ring whose
back-end is stopping, which back-ends and drivers tolerate, as they do on Xen.
"""
from __future__ import annotations

import logging
import mmap
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass

from xenpv.base import eventfd
from xenpv.xenabi import evtchn_2l
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.trap import DOORBELL_GENERATION, DOORBELL_PORTS, DOORBELL_TABLE_SIZE
from xenpv.xenabi.xen import XEN_ENOENT

log = logging.getLogger("stack.vcpu.doorbells")

# DOORBELL as HypervisorLink traps it: port -> (result, generation, vcpu, fds).
AskDoorbell = Callable[[int], "tuple[int, int, int, list[int]]"]


@dataclass
class Doorbell:
    port: int
    generation: int
    vcpu: int
    kick: int
    call: int
    set_pending: Callable[[], int]  # evtchn_2l.set_pending of this port and vCPU, prepared once


class Doorbells:
    def __init__(self, table_fd: int, shared_info: memoryview, epoll: select.epoll, ask: AskDoorbell) -> None:
        self._epoll = epoll
        self._ask = ask
        self._page = AtomicMemory(shared_info)
        self._lock = threading.Lock()
        self._ports: dict[int, Doorbell] = {}
        self._by_call: dict[int, Doorbell] = {}
        self._absent: dict[int, int] = {}  # port -> the generation at which xenhv had no doorbell for it
        self._table: mmap.mmap | None = None
        self._generations: memoryview | None = None
        self.sends = 0  # sends that went through a doorbell, not a trap
        self.deliveries = 0  # events the vCPU delivered from a call eventfd
        self.attach_table(table_fd)

    def attach_table(self, table_fd: int) -> None:
        """Use the doorbell table `table_fd` (a new domain's, after a relink): every doorbell is dropped.
        The fd is the caller's to close."""
        table = mmap.mmap(table_fd, DOORBELL_TABLE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
        with self._lock:
            self._drop_all()
            if self._generations is not None:
                self._generations.release()
                self._table.close()
            self._table = table
            # Aligned 32-bit loads: each sees one whole value of xenhv's atomic stores.
            self._generations = memoryview(table).cast(DOORBELL_GENERATION.format[-1])

    def generation(self, port: int) -> int:
        """`port`'s current generation in the doorbell table."""
        return self._generations[port]

    def holds(self, port: int) -> bool:
        """Whether the vCPU holds a doorbell of `port` (current or not yet found revoked)."""
        with self._lock:
            return port in self._ports

    def send(self, port: int) -> bool:
        """EVTCHNOP_send through `port`'s doorbell; False when the port has none (the caller traps). The kick
        is written under the lock: the interrupt thread may drop a revoked doorbell and close its fds, and a
        write to a closed fd number could land in whatever file reused it."""
        if not 0 <= port < DOORBELL_PORTS:
            return False
        for asked_already in (False, True):
            with self._lock:
                bell = self._current(port)
                if bell is not None:
                    eventfd.signal(bell.kick)
                    self.sends += 1
                    return True
                generation = self._generations[port]
                if asked_already or self._absent.get(port) == generation:
                    return False
            # Not under the lock: the interrupt thread delivers while this thread traps.
            self._acquire(port, generation)
        return False

    def forget(self, port: int) -> None:
        """The guest is closing `port`: its doorbell goes before xenhv frees the port."""
        with self._lock:
            if (bell := self._ports.get(port)) is not None:
                self._drop(bell)
            self._absent.pop(port, None)

    def deliver(self, call_fd: int) -> bool:
        """`call_fd` is readable: deliver its event (True when the vCPU must take its upcall)."""
        with self._lock:
            bell = self._by_call.get(call_fd)
            if bell is None:
                return False
            if self._generations[bell.port] != bell.generation:
                # Revoked: xenhv reads what the back-end sent before its channel went, and delivers it.
                self._drop(bell)
                return False
            try:
                os.eventfd_read(call_fd)
            except BlockingIOError:
                return False  # xenhv read it first (revoking), and delivers it
            self.deliveries += 1
            return bool(bell.set_pending())

    def close(self) -> None:
        with self._lock:
            self._drop_all()
            if self._generations is not None:
                self._generations.release()
                self._generations = None
                self._table.close()
            self._page.release()

    def _current(self, port: int) -> Doorbell | None:
        bell = self._ports.get(port)
        if bell is not None and self._generations[port] != bell.generation:
            self._drop(bell)
            return None
        return bell

    def _acquire(self, port: int, asked: int) -> None:
        """Ask xenhv for `port`'s doorbell (`asked`: its generation before asking) and keep it if it is still
        current, or remember that there is none."""
        result, generation, vcpu, fds = self._ask(port)
        if result != 0 or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            with self._lock:
                # -ENOENT comes with the generation it holds for: a later binding changes it.
                self._absent[port] = generation if result == -XEN_ENOENT else asked
            log.debug("port %d has no doorbell: %d", port, result)
            return
        try:
            prepared = evtchn_2l.prepare_set_pending(self._page, port, vcpu)
        except ValueError as exc:  # xenhv named a vCPU the 2-level ABI has no vcpu_info for
            for fd in fds:
                os.close(fd)
            log.warning("port %d: doorbell refused: %s", port, exc)
            return
        bell = Doorbell(port, generation, vcpu, *fds, prepared)
        with self._lock:
            if self._generations[port] != generation or port in self._ports:  # revoked, or another thread won
                os.close(bell.kick)
                os.close(bell.call)
                return
            self._ports[port] = bell
            self._by_call[bell.call] = bell
            self._epoll.register(bell.call, select.EPOLLIN)
            self._absent.pop(port, None)
        log.debug("port %d: doorbell (generation %d, vcpu %d)", port, generation, vcpu)

    def _drop(self, bell: Doorbell) -> None:
        del self._ports[bell.port]
        del self._by_call[bell.call]
        self._epoll.unregister(bell.call)
        os.close(bell.kick)
        os.close(bell.call)

    def _drop_all(self) -> None:
        for bell in list(self._ports.values()):
            self._drop(bell)
        self._absent.clear()
