"""harness.remote's connection failures against peers that are not sshd (plain sockets on loopback): each
is a RemoteUnreachable naming the host and the reason, and is reported to the pool."""
from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.harness.hosts import HostSpec
from xenpv.harness.remote import RemoteHost, RemoteUnreachable


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    yield s
    s.close()


def spec(tmp_path: Path, port: int) -> HostSpec:
    (tmp_path / "known_hosts").write_text("")
    return HostSpec(host="127.0.0.1", user="u", key_file=tmp_path / "key", known_hosts=tmp_path / "known_hosts",
                    run_dir="/r", port=port)


def serve(listener: socket.socket, reply: bytes | None) -> threading.Thread:
    """Accept one connection; send `reply` and close, or (None) hold it open until the listener closes."""
    def run() -> None:
        conn, _ = listener.accept()
        with conn:
            if reply is not None:
                conn.sendall(reply)
            else:
                conn.settimeout(10)
                try:
                    conn.recv(1)
                except OSError:
                    pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_refused(tmp_path: Path, listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    failures: list[str] = []
    with pytest.raises(RemoteUnreachable, match=r"^u@127.0.0.1:\d+: cannot connect: .*[Rr]efused"):
        RemoteHost.connect(spec(tmp_path, port), timeout=5, on_failure=lambda s, why: failures.append(why))
    assert len(failures) == 1 and "cannot connect" in failures[0]


def test_closed_before_the_banner(tmp_path: Path, listener: socket.socket) -> None:
    t = serve(listener, b"")
    with pytest.raises(RemoteUnreachable, match=r"SSH handshake failed: Error reading SSH protocol banner"):
        RemoteHost.connect(spec(tmp_path, listener.getsockname()[1]), timeout=5)
    t.join(5)


def test_closed_after_the_banner(tmp_path: Path, listener: socket.socket) -> None:
    """A banner, then the connection ends: what a client sees of an sshd killed mid-handshake (paramiko
    raises a bare EOFError)."""
    t = serve(listener, b"SSH-2.0-OpenSSH_9.2p1\r\n")
    with pytest.raises(RemoteUnreachable, match=r"the connection closed during the SSH handshake"):
        RemoteHost.connect(spec(tmp_path, listener.getsockname()[1]), timeout=5)
    t.join(5)


def test_no_banner_in_time(tmp_path: Path, listener: socket.socket) -> None:
    t = serve(listener, None)
    with pytest.raises(RemoteUnreachable, match=r"SSH handshake failed: Error reading SSH protocol banner"):
        RemoteHost.connect(spec(tmp_path, listener.getsockname()[1]), timeout=0.5)
    listener.close()
    t.join(15)


def test_not_ssh(tmp_path: Path, listener: socket.socket) -> None:
    t = serve(listener, b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(RemoteUnreachable, match=r"^u@127.0.0.1:\d+: "):
        RemoteHost.connect(spec(tmp_path, listener.getsockname()[1]), timeout=5)
    t.join(5)
