"""Moving the vCPU to another machine: what loading a saved vCPU context into a new domain (Xen restore,
local migration) or powering on after hibernation (S4) means for the model.

The agent process is the guest's vCPU and, beyond QEMU's RAM file, its memory too (the Python state of the
kernel and the drivers). A guest that loses its domain therefore keeps its process: a vCPU parked in
SCHEDOP_shutdown(SHUTDOWN_suspend), or powered off after S4, waits for the harness to name the machine it
runs on next (`MachineContext`: the new QEMU's qtest socket and RAM file, the new domain's trap socket and
domid) through its `Relocation` line, then `relocate()` moves it: qtest to the new QEMU, guest RAM and the
hypervisor frames remapped at the same addresses (every view the drivers hold stays valid, as guest-physical
addresses do), the trap link to the new domain with the same upcall eventfd. Nothing else changes here: what
the drivers do about their new domain (EARLY/LATE callbacks, D3 -> D0) is theirs.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from xenpv.base.errors import HarnessError
from xenpv.stack.timescale import HarnessTooSlow, scaled

log = logging.getLogger("stack.vcpu.relocation")

CONNECT_SECONDS = 5.0
# How long a vCPU stays parked in the suspend hypercall, or powered off after S4, waiting for the toolstack
# to resume or restore it (a save and a restore run by hand are minutes apart, not hours).
PARK_SECONDS = 3600.0

WAITING_SUSPENDED = "suspended"  # parked in SCHEDOP_shutdown(SHUTDOWN_suspend)
WAITING_POWERED_OFF = "powered off"  # after S4: the machine is gone


class MovableVcpu(Protocol):
    """What moving needs of a vCPU (stack.vcpu.cpu.Vcpu, which gives each vCPU its Relocation line; a
    Protocol because cpu.py imports this module)."""

    memory: Any
    hv: Any
    qtest: Any
    relocation: "Relocation"

    def forget_hypervisor_pages(self) -> None: ...


class RelocationError(HarnessError):
    """The vCPU could not move to the machine it was given (it stays where it was)."""


@dataclass(frozen=True)
class MachineContext:
    """Where the vCPU runs next."""

    qtest_socket: Path
    ram_path: Path
    hv_socket: Path | None = None
    domid: int | None = None

    def describe(self) -> str:
        where = f"dom{self.domid}" if self.domid is not None else "no domain"
        return f"{where} on the QEMU at {self.qtest_socket}"


class Relocation:
    """The line the harness uses to hand a parked or powered-off vCPU its next machine, and to hear back.

    `post` (any thread) makes `fd` readable; the vCPU's thread `take`s the context, moves, and `report`s
    the outcome, which `post`'s caller gets from `wait_result`."""

    def __init__(self) -> None:
        self._pipe: tuple[int, int] | None = None  # made on first use: most vCPUs never move
        self._lock = threading.Lock()
        self._pending: MachineContext | None = None
        self._done = threading.Event()
        self._outcome: str | None = None
        # Why the vCPU is not running driver code (WAITING_*), or None: the agent's console then runs
        # no deferred driver work, which would wait for a processor that is not there.
        self.waiting: str | None = None

    @property
    def fd(self) -> int:
        with self._lock:
            if self._pipe is None:
                self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            return self._pipe[0]

    def post(self, context: MachineContext) -> None:
        fd = self.fd
        with self._lock:
            self._pending = context
            self._done.clear()
            self._outcome = None
            assert self._pipe is not None and fd == self._pipe[0]
            os.write(self._pipe[1], b"x")

    def take(self) -> MachineContext | None:
        try:
            while os.read(self.fd, 64):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            context, self._pending = self._pending, None
        return context

    def report(self, error: str | None) -> None:
        """The move's outcome: None when the vCPU runs on the new machine, else why it did not."""
        self._outcome = error
        self._done.set()

    def wait_result(self, timeout: float) -> str | None:
        """What `report` said; HarnessTooSlow if nothing was reported within `timeout` (scaled)."""
        timeout = scaled(timeout)
        if not self._done.wait(timeout):
            raise HarnessTooSlow("the vCPU taking the machine it was given", timeout)
        return self._outcome

    def close(self) -> None:
        with self._lock:
            if self._pipe is not None:
                os.close(self._pipe[0])
                os.close(self._pipe[1])
                self._pipe = None


def _connect_qtest(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    timeout = scaled(CONNECT_SECONDS)
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                sock.close()
                raise RelocationError(f"no QEMU listens on {path}: {exc}") from None
            time.sleep(0.01)
        except OSError as exc:
            sock.close()
            raise RelocationError(f"cannot connect to {path}: {exc}") from None


def relocate(vcpu: MovableVcpu, context: MachineContext, *, trap_lock_held: bool = False) -> None:
    """Move `vcpu` to `context`'s machine (see the module docstring). With `trap_lock_held` the caller is
    inside the trap link's parked hypercall; otherwise the link is taken here. RelocationError (the vCPU
    unchanged, or - after the RAM was remapped - its machine gone for good) names what failed."""
    if (context.hv_socket is None) != (vcpu.hv is None):
        raise RelocationError(f"{context.describe()}: a {'Xen' if vcpu.hv else 'non-Xen'} vCPU cannot move there")
    sock = _connect_qtest(context.qtest_socket)
    try:
        vcpu.memory.remap(context.ram_path)
        if vcpu.hv is not None:
            assert context.hv_socket is not None and context.domid is not None
            if trap_lock_held:
                vcpu.hv._relink_locked(context.hv_socket, context.domid)
            else:
                vcpu.hv.relink(context.hv_socket, context.domid)
    except HarnessError as exc:
        sock.close()
        raise RelocationError(f"moving to {context.describe()}: {exc}") from exc
    except BaseException:
        sock.close()
        raise
    vcpu.qtest.rebind(sock)
    vcpu.forget_hypervisor_pages()
    log.info("vCPU moved to %s (RAM %s)", context.describe(), context.ram_path)


def parked_hypercall(vcpu: MovableVcpu, nr: int, args: tuple[int, ...], timeout: float = PARK_SECONDS) -> int:
    """The suspend hypercall as the vCPU sees it: its return value when the domain resumed in place (1:
    cancelled), or 0 when the vCPU was moved into another domain (what a restored domain sees). A move
    that fails is reported to whoever asked and the vCPU stays parked."""
    if vcpu.hv is None:
        raise RelocationError("a vCPU without a hypervisor cannot suspend its domain")
    line = vcpu.relocation

    def move() -> MachineContext:
        context = line.take()
        if context is None:
            raise RelocationError("woken with no machine to move to")
        try:
            relocate(vcpu, context, trap_lock_held=True)
        except RelocationError as exc:
            log.warning("staying parked: %s", exc)
            line.report(str(exc))
            raise
        return context

    line.waiting = WAITING_SUSPENDED
    try:
        result, moved = vcpu.hv.parked_hypercall(nr, args, line.fd, timeout, move)
    finally:
        line.waiting = None
    return 0 if moved is not None else int(result)
