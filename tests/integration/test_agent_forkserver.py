"""Agents forked from a server that has the guest model imported (harness.forkserver): the same guest as a
spawned agent, and nothing outlives what it belongs to."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pexpect
import pytest

from xenpv.base.owner import ENV, Owner
from xenpv.base.process import wait_for
from xenpv.harness.forkserver import ENABLE_ENV, AgentForkServer, ForkedAgent

pytestmark = pytest.mark.integration


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie has ended
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between open and read
        return True


def test_a_forked_agent_is_a_session_leader_on_its_pty_with_our_owner_mark(boot_guest) -> None:
    g = boot_guest("default")
    child = g.console.child
    assert isinstance(child, ForkedAgent)
    assert os.getsid(child.pid) == child.pid
    # The reaper reads /proc/PID/environ: the mark must be there, not only in os.environ.
    marks = [e for e in Path(f"/proc/{child.pid}/environ").read_bytes().split(b"\0") if e.startswith(ENV.encode())]
    assert marks == [f"{ENV}={Owner.current()}".encode()]
    assert "XENBUS" in g.console.run("devices")


def test_with_the_server_switched_off_the_agent_is_spawned(boot_guest, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENABLE_ENV, "0")
    g = boot_guest("default")
    assert type(g.console.child) is pexpect.spawn
    assert "XENBUS" in g.console.run("devices")


def test_agents_die_with_the_server(boot_guest) -> None:
    g = boot_guest("default")
    pid = g.console.child.pid
    AgentForkServer.shared().process.signal_group(signal.SIGKILL)
    wait_for(lambda: _gone(pid), timeout=10, what=f"agent {pid} to die with its fork server")
    with pytest.raises(Exception, match="exited"):
        g.console.run("devices")
    assert g.console.child.signalstatus == signal.SIGKILL


@pytest.fixture
def mute_qtest(tmp_path: Path):
    """A qtest socket that accepts and never answers: an agent connected to it waits."""
    path = tmp_path / "qtest.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.settimeout(20)
    yield server
    server.close()


def test_an_agent_whose_harness_connection_closes_is_killed(mute_qtest: socket.socket, tmp_path: Path) -> None:
    server = AgentForkServer()
    try:
        with open(tmp_path / "ram", "wb") as ram:  # the guest's 128 MiB (sparse): the agent maps it, then waits on qtest
            ram.truncate(128 << 20)
        argv = ["--guest", str(Path(__file__).resolve().parents[2] / "guests" / "default.yaml"),
                "--qtest", mute_qtest.getsockname(), "--ram", str(tmp_path / "ram"), "--registry", str(tmp_path / "reg.json"),
                "--dump-dir", str(tmp_path), "--transcript", str(tmp_path / "qtest.log"), "--log", str(tmp_path / "a.log")]
        with open(tmp_path / "console.log", "w") as log:
            child = server.spawn(argv, logfile=log, timeout=5)
            waiting, _ = mute_qtest.accept()  # the agent is up, and waits on its qtest connection
            assert child.isalive()
            child._conn.close()  # the harness is gone
            wait_for(lambda: _gone(child.pid), timeout=10, what="the orphaned agent to be killed")
            os.close(child.child_fd)
            waiting.close()
    finally:
        server.close()
    assert not server.process.alive()


def test_a_request_without_its_pty_is_refused_and_the_server_serves_on(tmp_path: Path) -> None:
    """A request must carry exactly one fd, the agent's pty: without it nothing is forked, the connection is
    closed, and the next request is served."""
    server = AgentForkServer()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as bad:
            bad.settimeout(10)
            bad.connect(str(server.socket_path))
            bad.sendall(b'{"argv": ["--help"], "env": {}, "cwd": "/"}\n')
            assert bad.recv(4096) == b""  # closed, no {"pid": ...}
        with open(tmp_path / "console.log", "w") as log:
            child = server.spawn(["--help"], logfile=log, timeout=10)
            assert child.wait() == 0  # argparse's help, then exit 0
            child.close()
        assert "bad request: want one JSON line" in server.process.log_tail()
    finally:
        server.close()
