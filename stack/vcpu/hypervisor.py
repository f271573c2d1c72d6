"""The vCPU's side of the trap protocol (backends/xenhv/wire.py): hypercalls, and port I/O that
xenhv claims. Upcalls arrive on an eventfd the vCPU hands over in HELLO.

A trap is a VM exit on Xen: it always returns. Here xenhv answers over a socket, so each exchange has a
deadline (`timeout`, scaled by XENPV_TIME_SCALE); a live xenhv that does not answer in time is
TrapTooSlow, a stack.timescale.HarnessTooSlow, and never an OSError a driver's thread would take for
the platform going away."""
from __future__ import annotations

import mmap
import os
import socket
import threading
import time
from pathlib import Path

from xenpv.xenabi.trap import HELLO_PLATFORM_PORTS, REPLY, TRAP, TrapKind
from xenpv.base.errors import HarnessError
from xenpv.stack.timescale import HarnessTooSlow, scaled
from xenpv.stack.vcpu.guestmem import close_mapping


class HypervisorError(HarnessError):
    pass


class TrapTooSlow(HarnessTooSlow):
    """xenhv did not answer a trap (or the toolstack did not create the domain's trap socket) in time."""


class HypervisorLink:
    def __init__(self, path: Path | str, domid: int, timeout: float = 10.0) -> None:
        self.domid = domid
        self._lock = threading.Lock()
        self.timeout = scaled(timeout)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:  # the toolstack may still be creating the domain (and its trap socket)
            try:
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    self.sock.close()
                    raise TrapTooSlow(f"no trap socket {path} for dom{domid}", self.timeout) from None
                time.sleep(0.01)
        self.upcall_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        theirs = os.dup(self.upcall_fd)
        try:
            socket.send_fds(self.sock, [TRAP.pack(TrapKind.HELLO, 0, domid, 0, 0, 0, 0, 0)], [theirs])
        finally:
            os.close(theirs)
        result, size, flags, fds = self._reply("HELLO", expect_fds=1)
        self.platform_ports = bool(flags & HELLO_PLATFORM_PORTS)
        if result != 0 or len(fds) != 1:
            raise HypervisorError(f"xenhv refused HELLO for dom{domid}: {result}")
        self.frames_fd = fds[0]
        self._frames = mmap.mmap(self.frames_fd, size, mmap.MAP_SHARED)
        self.frames = memoryview(self._frames)

    def _reply(self, what: str, expect_fds: int = 0) -> tuple[int, int, int, list[int]]:
        try:
            data, fds, _, _ = socket.recv_fds(self.sock, REPLY.size, max(expect_fds, 1))
        except TimeoutError:
            raise TrapTooSlow(f"no answer from xenhv to {what} for dom{self.domid}", self.timeout) from None
        if len(data) != REPLY.size:
            for fd in fds:
                os.close(fd)
            raise HypervisorError(f"xenhv closed the trap socket during {what}")
        result, v0, v1 = REPLY.unpack(data)
        return result, v0, v1, fds

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

    def wait_upcall(self, timeout: float) -> bool:
        import select

        r, _, _ = select.select([self.upcall_fd], [], [], timeout)
        if r:
            os.eventfd_read(self.upcall_fd)
            return True
        return False

    def close(self) -> None:
        self.frames.release()
        close_mapping(self._frames, f"dom{self.domid}'s hypervisor frames")
        os.close(self.frames_fd)
        os.close(self.upcall_fd)
        self.sock.close()
