"""The harness's side of the agent fork server (stack/agent/forkserver.py): one server per harness process,
started on the first guest and stopped with the process (or the pytest session), and `ForkedAgent`, the
pexpect object GuestConsole drives, as it drives a spawned agent.

XENPV_AGENT_FORKSERVER=0 starts every agent as a new Python process instead (pexpect.spawn), e.g. to
rule the fork server out when a guest misbehaves.
"""
from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import pty
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time

import pexpect.fdpexpect

from xenpv.base.errors import HarnessError
from xenpv.base.owner import child_env
from xenpv.base.process import Supervised, wait_for
from xenpv.base.rundir import make_run_dir, remove_run_dir

log = logging.getLogger("harness.forkserver")

ENABLE_ENV = "XENPV_AGENT_FORKSERVER"
START_TIMEOUT = 30.0  # seconds for the server to import the model and listen
PTY_ROWS, PTY_COLS = 24, 80  # what pexpect.spawn gives a child's pty


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") != "0"


class ForkedAgent(pexpect.fdpexpect.fdspawn):
    """An agent forked by the server: pexpect's expect/send on the pty's master end; liveness, exit status
    and signals through the server, its parent."""

    def __init__(self, master: int, conn: socket.socket, pid: int, **kwargs: object) -> None:
        super().__init__(master, **kwargs)  # type: ignore[arg-type]
        self.pid = pid
        self._conn = conn
        self._buf = b""
        self.status: int | None = None
        self.exitstatus: int | None = None
        self.signalstatus: int | None = None

    def _poll(self, timeout: float | None) -> bool:
        """Whether the agent has ended (its status read), waiting up to `timeout` (None: for ever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._conn], [], [], left)[0]:
                return False
            chunk = self._conn.recv(4096)
            if not chunk:
                # The server is gone; so is the agent (PR_SET_PDEATHSIG), status unknown.
                self.status = -1
                self.signalstatus = signal.SIGKILL
                return True
            self._buf += chunk
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                message = json.loads(line)
                if "status" in message:
                    self.status = int(message["status"])
                    if os.WIFEXITED(self.status):
                        self.exitstatus = os.WEXITSTATUS(self.status)
                    elif os.WIFSIGNALED(self.status):
                        self.signalstatus = os.WTERMSIG(self.status)
        return True

    def isalive(self) -> bool:
        return not self._poll(0)

    def wait(self) -> int | None:
        self._poll(None)
        return self.exitstatus

    def kill(self, sig: int) -> None:
        if self.status is None:
            try:
                self._conn.sendall(json.dumps({"kill": int(sig)}).encode() + b"\n")
            except OSError:
                pass

    def terminate(self, force: bool = False) -> bool:
        for sig in (signal.SIGHUP, signal.SIGINT) + ((signal.SIGKILL,) if force else ()):
            self.kill(sig)
            if self._poll(0.1 if sig != signal.SIGKILL else 5.0):
                return True
        return not self.isalive()

    def close(self, force: bool = True) -> None:
        """Close the pty; the agent ends (SIGHUP from its terminal, SIGKILL after a moment with `force`),
        and its status is read, as pexpect.spawn.close() does."""
        if not self.closed:
            super().close()
        if not self._poll(1.0) and force:
            self.terminate(force=True)
        self._conn.close()


class AgentForkServer:
    _instance: "AgentForkServer | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.run_dir = make_run_dir("fork")
        self.socket_path = self.run_dir / "forkserver.sock"
        self.process = Supervised("agent forkserver",
                                  [sys.executable, "-m", "xenpv.stack.agent.forkserver", str(self.socket_path)],
                                  self.run_dir / "forkserver.log")
        try:
            self.process.start()
            wait_for(self.socket_path.exists, timeout=START_TIMEOUT, what="the agent fork server's socket",
                     alive=[self.process])
        except BaseException:
            self.close()
            raise

    @classmethod
    def shared(cls) -> "AgentForkServer":
        """This process's server, started on first use (and again if it died)."""
        with cls._lock:
            if cls._instance is None or not cls._instance.process.alive():
                if cls._instance is not None:
                    log.warning("the agent fork server had died (%s); starting another",
                                cls._instance.process.log_tail(5))
                    cls._instance.close()
                cls._instance = cls()
            return cls._instance

    def spawn(self, argv: list[str], *, logfile: object, timeout: float) -> ForkedAgent:
        """`python -m xenpv.stack.agent ARGV` as a fork of the server, on a new pty with echo off."""
        master, slave = pty.openpty()
        try:
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", PTY_ROWS, PTY_COLS, 0, 0))
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                conn.settimeout(10.0)
                conn.connect(str(self.socket_path))
                request = json.dumps({"argv": argv, "env": child_env(), "cwd": os.getcwd()}).encode()
                socket.send_fds(conn, [request + b"\n"], [slave])
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        raise HarnessError(f"the agent fork server closed the connection without forking "
                                           f"({self.process.log_tail(5)})")
                    reply += chunk
                pid = int(json.loads(reply.split(b"\n", 1)[0])["pid"])
                conn.settimeout(None)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return ForkedAgent(master, conn, pid, encoding="utf-8", codec_errors="replace", logfile=logfile,
                           timeout=timeout)

    def close(self) -> None:
        try:
            self.process.stop(timeout=5)
        finally:
            remove_run_dir(self.run_dir)


@atexit.register
def stop_shared() -> None:
    """Stop this process's server (the pytest plugin does at the session's end, before it checks that
    nothing is left running); a later guest starts a new one."""
    with AgentForkServer._lock:
        server, AgentForkServer._instance = AgentForkServer._instance, None
    if server is not None:
        server.close()
