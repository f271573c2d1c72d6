"""The vCPU's side of the trap protocol (backends/xenhv/wire.py): hypercalls, and port I/O that
xenhv claims. Upcalls arrive on an eventfd the vCPU hands over in HELLO.

A trap is a VM exit on Xen: it always returns. Here xenhv answers over a socket, so each exchange has a
deadline (`timeout`, scaled by XENPV_TIME_SCALE); a live xenhv that does not answer in time is
TrapTooSlow, a stack.timescale.HarnessTooSlow, and never an OSError a driver's thread would take for
the platform going away.

Interrupts: the upcall eventfd and the call eventfds of the vCPU's doorbells (stack/vcpu/doorbells.py)
sit in one epoll set, `interrupt_fd`; `take_interrupt()` drains it and says whether the vCPU must take its
event channel upcall."""
from __future__ import annotations

import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenpv.xenabi.trap import HELLO_FDS, HELLO_PLATFORM_PORTS, REPLY, SHARED_INFO_FRAME, TRAP, TrapKind
from xenpv.base.errors import HarnessError
from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.stack.vcpu.doorbells import Doorbells
from xenpv.stack.vcpu.guestmem import PAGE_SIZE, close_mapping, remap_shared


class HypervisorError(HarnessError):
    pass


class TrapTooSlow(HarnessTooSlow):
    """xenhv did not answer a trap (or the toolstack did not create the domain's trap socket) in time."""


class HypervisorLink:
    def __init__(self, path: Path | str, domid: int, timeout: float = 10.0) -> None:
        self.domid = domid
        self._lock = threading.Lock()
        self.timeout = scaled(timeout)
        self.upcall_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._interrupts = select.epoll()
        try:
            self._interrupts.register(self.upcall_fd, select.EPOLLIN)
            self.sock, size, flags, self.frames_fd, table_fd = self._hello(path, domid)
        except BaseException:
            self._interrupts.close()
            os.close(self.upcall_fd)
            raise
        try:
            self.platform_ports = bool(flags & HELLO_PLATFORM_PORTS)
            self._frames = mmap.mmap(self.frames_fd, size, mmap.MAP_SHARED)
            self.frames = memoryview(self._frames)
            shared_info = self.frames[SHARED_INFO_FRAME * PAGE_SIZE:(SHARED_INFO_FRAME + 1) * PAGE_SIZE]
            self.doorbells = Doorbells(table_fd, shared_info, self._interrupts, self.doorbell)
        finally:
            os.close(table_fd)

    @property
    def interrupt_fd(self) -> int:
        """Readable when the vCPU has an interrupt to take (see take_interrupt)."""
        return self._interrupts.fileno()

    def take_interrupt(self) -> bool:
        """Drain what made interrupt_fd readable: the upcall eventfd (xenhv raised the upcall) and the call
        eventfds of doorbells (delivered here). True when the vCPU must run its upcall handler."""
        return self._take(self._interrupts.poll(0))

    def _take(self, events: list[tuple[int, int]]) -> bool:
        """take_interrupt for the (fd, events) that the interrupt epoll set reported."""
        upcall = False
        for fd, _ in events:
            if fd == self.upcall_fd:
                try:
                    os.eventfd_read(fd)
                    upcall = True
                except BlockingIOError:
                    pass
            elif self.doorbells.deliver(fd):
                upcall = True
        return upcall

    def _hello(self, path: Path | str, domid: int) -> tuple[socket.socket, int, int, int, int]:
        """Connect to a domain's trap socket and say HELLO with this vCPU's upcall eventfd: (socket, size
        of the frames memfd, HELLO flags, the memfd, the doorbell table's memfd)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            deadline = time.monotonic() + self.timeout
            while True:  # the toolstack may still be creating the domain (and its trap socket)
                try:
                    sock.connect(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if time.monotonic() >= deadline:
                        raise TrapTooSlow(f"no trap socket {path} for dom{domid}", self.timeout) from None
                    time.sleep(0.01)
            theirs = os.dup(self.upcall_fd)
            try:
                socket.send_fds(sock, [TRAP.pack(TrapKind.HELLO, 0, domid, 0, 0, 0, 0, 0)], [theirs])
            finally:
                os.close(theirs)
            result, size, flags, fds = _reply(sock, f"HELLO for dom{domid}", self.timeout,
                                              expect_fds=len(HELLO_FDS))
            if result != 0 or len(fds) != len(HELLO_FDS):
                for fd in fds:
                    os.close(fd)
                raise HypervisorError(f"xenhv refused HELLO for dom{domid}: {result}, {len(fds)} fds "
                                      f"({len(HELLO_FDS)} expected)")
            return sock, size, flags, fds[0], fds[1]
        except BaseException:
            sock.close()
            raise

    def _relink_locked(self, path: Path | str, domid: int) -> None:
        """The vCPU now belongs to domain `domid` (trap socket `path`): HELLO there with the same upcall
        eventfd, and its hypervisor frames replace the old domain's at the same address (remap_shared), so
        the views of shared_info and the grant frames stay valid. The caller holds the trap lock."""
        sock, size, flags, frames_fd, table_fd = self._hello(path, domid)
        try:
            remap_shared(self._frames, frames_fd, size, f"dom{domid}'s hypervisor frames")
            self.doorbells.attach_table(table_fd)  # the old domain's doorbells go with it
        except BaseException:
            os.close(frames_fd)
            sock.close()
            raise
        finally:
            os.close(table_fd)
        old_sock, old_fd = self.sock, self.frames_fd
        self.sock, self.frames_fd, self.domid = sock, frames_fd, domid
        self.platform_ports = bool(flags & HELLO_PLATFORM_PORTS)
        old_sock.close()
        os.close(old_fd)

    def relink(self, path: Path | str, domid: int) -> None:
        """_relink_locked for a vCPU that is not in a hypercall (powered on after hibernation)."""
        with self._lock:
            self._relink_locked(path, domid)

    def parked_hypercall(self, nr: int, args: tuple[int, ...], relocation_fd: int, timeout: float,
                         relocate: Callable[[], Any]) -> tuple[int | None, Any]:
        """A hypercall that parks the vCPU (SCHEDOP_shutdown(SHUTDOWN_suspend)): xenhv answers it only
        when the domain resumes in place; a domain destroyed instead closes the socket unanswered, and the
        vCPU then waits for its saved state to be loaded into another domain, which `relocation_fd`
        (readable) announces. `relocate()` then moves the vCPU (with the trap lock held: no other thread
        traps on a half-moved link) and its value is returned as (None, value); an answer is (result,
        None). The wait ends with TrapTooSlow after `timeout` seconds (scaled); a relocation that fails
        keeps the vCPU parked, waiting for another one."""
        if len(args) > 5:
            raise HypervisorError(f"hypercall {nr} takes at most 5 arguments")
        regs = list(args) + [0] * (5 - len(args))
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        with self._lock:
            try:
                self.sock.sendall(TRAP.pack(TrapKind.HYPERCALL, 0, nr, *regs))
            except TimeoutError:
                raise TrapTooSlow(f"xenhv taking the suspend hypercall of dom{self.domid}", self.timeout) from None
            watching = [self.sock, relocation_fd]
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TrapTooSlow(f"dom{self.domid} parked in the suspend hypercall: neither resumed "
                                      "nor restored", timeout)
                ready, _, _ = select.select(watching, [], [], remaining)
                if self.sock in ready:
                    try:
                        data = self.sock.recv(REPLY.size)
                    except OSError:
                        data = b""
                    if len(data) == REPLY.size:
                        return REPLY.unpack(data)[0], None
                    # The domain was destroyed with the vCPU in it: what runs next is a restore.
                    watching = [relocation_fd]
                if relocation_fd in ready:
                    try:
                        return None, relocate()
                    except HarnessError:
                        continue  # relocate() reported it to whoever asked; the vCPU stays parked

    def _reply(self, what: str, expect_fds: int = 0) -> tuple[int, int, int, list[int]]:
        return _reply(self.sock, f"{what} for dom{self.domid}", self.timeout, expect_fds)

    def _trap(self, kind: TrapKind, *args: int) -> tuple[int, int]:
        regs = list(args) + [0] * (6 - len(args))
        with self._lock:  # driver code traps from the vCPU thread and the interrupt thread alike
            try:
                self.sock.sendall(TRAP.pack(kind, 0, *regs))
            except TimeoutError:
                raise TrapTooSlow(f"xenhv taking the {kind.name} trap for dom{self.domid}", self.timeout) from None
            result, v0, _, fds = self._reply(kind.name)
        for fd in fds:
            os.close(fd)
        return result, v0

    def hypercall(self, nr: int, *args: int) -> int:
        if len(args) > 5:
            raise HypervisorError(f"hypercall {nr} takes at most 5 arguments")
        return self._trap(TrapKind.HYPERCALL, nr, *args)[0]

    def pio_read(self, port: int, size: int) -> int:
        result, value = self._trap(TrapKind.PIO_READ, port, size)
        if result:
            raise HypervisorError(f"xenhv refused a {size}-byte read of port {port:#x}: {result}")
        return value

    def pio_write(self, port: int, size: int, value: int) -> None:
        result, _ = self._trap(TrapKind.PIO_WRITE, port, size, value)
        if result:
            raise HypervisorError(f"xenhv refused a {size}-byte write of {value:#x} to port {port:#x}: {result}")

    def frame_offset(self, gfn: int) -> int | None:
        """Where the hypervisor frame mapped at `gfn` lies in the frames memfd, or None for RAM."""
        result, offset = self._trap(TrapKind.FRAME_OF, gfn)
        return None if result else offset

    def doorbell(self, port: int) -> tuple[int, int, int, list[int]]:
        """DOORBELL for `port`: (result, generation, vcpu, [kick, call] or no fds)."""
        with self._lock:
            try:
                self.sock.sendall(TRAP.pack(TrapKind.DOORBELL, 0, port, 0, 0, 0, 0, 0))
            except TimeoutError:
                raise TrapTooSlow(f"xenhv taking the DOORBELL trap for dom{self.domid}", self.timeout) from None
            return self._reply("DOORBELL", expect_fds=2)

    def wait_upcall(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for an interrupt that needs the upcall handler (take_interrupt)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            # The epoll set itself, not select() on its fd and then a poll: one system call per wake-up.
            if self._take(self._interrupts.poll(max(remaining, 0))):
                return True
            if remaining <= 0:
                return False

    def close(self) -> None:
        self.doorbells.close()
        self._interrupts.close()
        self.frames.release()
        close_mapping(self._frames, f"dom{self.domid}'s hypervisor frames")
        os.close(self.frames_fd)
        os.close(self.upcall_fd)
        self.sock.close()


def _reply(sock: socket.socket, what: str, timeout: float, expect_fds: int = 0) -> tuple[int, int, int, list[int]]:
    try:
        data, fds, _, _ = socket.recv_fds(sock, REPLY.size, max(expect_fds, 1))
    except TimeoutError:
        raise TrapTooSlow(f"no answer from xenhv to {what}", timeout) from None
    if len(data) != REPLY.size:
        for fd in fds:
            os.close(fd)
        raise HypervisorError(f"xenhv closed the trap socket during {what}")
    result, v0, v1 = REPLY.unpack(data)
    return result, v0, v1, fds
