"""The trap link's deadline: a live xenhv that does not answer is the harness too slow (a BaseException
the drivers' threads cannot mistake for the platform going away), never an OSError."""
from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenpv.stack.timescale import TIME_SCALE_ENV, HarnessTooSlow
from xenpv.stack.vcpu.hypervisor import HypervisorLink, TrapTooSlow
from xenpv.xenabi.trap import DOORBELL_TABLE_SIZE, REPLY, TRAP


@pytest.fixture
def silent_xenhv(tmp_path: Path) -> Iterator[Path]:
    """Answers HELLO (with a one-page frames memfd and a doorbell table) and then takes traps without ever
    answering."""
    path = tmp_path / "hv-7.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    done = threading.Event()
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        held.append(conn)
        _, fds, _, _ = socket.recv_fds(conn, TRAP.size, 1)
        for fd in fds:
            os.close(fd)
        frames, doorbells = os.memfd_create("frames"), os.memfd_create("doorbells")
        os.ftruncate(frames, 4096)
        os.ftruncate(doorbells, DOORBELL_TABLE_SIZE)
        socket.send_fds(conn, [REPLY.pack(0, 4096, 0)], [frames, doorbells])
        os.close(frames)
        os.close(doorbells)
        conn.recv(TRAP.size)  # the trap, never answered
        done.wait(10)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path
    done.set()
    thread.join(5)
    for conn in held:
        conn.close()
    listener.close()


def test_a_trap_xenhv_does_not_answer_in_time_is_the_harness_too_slow(silent_xenhv: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TIME_SCALE_ENV, "2")
    link = HypervisorLink(silent_xenhv, 7, timeout=0.1)
    try:
        with pytest.raises(TrapTooSlow, match=r"no answer from xenhv to HYPERCALL for dom7 within 0\.2s") as late:
            link.hypercall(17, 0)
        assert isinstance(late.value, HarnessTooSlow) and not isinstance(late.value, OSError)
    finally:
        link.close()


def test_no_trap_socket_in_time_is_the_harness_too_slow(tmp_path: Path) -> None:
    with pytest.raises(TrapTooSlow, match="no trap socket .* for dom7 within 0.05s"):
        HypervisorLink(tmp_path / "absent.sock", 7, timeout=0.05)
