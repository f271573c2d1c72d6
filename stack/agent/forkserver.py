"""A warm start for guest agents: one process imports the whole guest model once, then forks an agent per
guest. Python's start and the model's imports were about a third of a guest's boot, paid again by every
guest of every test.

`python -m xenpv.stack.agent.forkserver SOCKET` serves a unix stream socket, one connection per agent:

- the harness sends one JSON line {"argv": [...], "env": {...}, "cwd": "..."} with the slave end of the
  agent's pty as SCM_RIGHTS data;
- the server forks; the child becomes what `python -m xenpv.stack.agent ARGV` would be: session leader
  with the pty as its controlling terminal and stdio, the given environment and directory, default signal
  dispositions, a random seed of its own, killed if the server dies (PR_SET_PDEATHSIG);
- the server answers {"pid": N}, and when the agent has ended {"status": WAITSTATUS}, then closes;
- a line {"kill": SIGNAL} from the harness signals the agent: the server is its parent, so it never
  signals a pid it has already reaped (and that the kernel may have given to another process);
- a connection the harness closes while its agent runs (the harness died) gets its agent SIGKILLed.

The server is single-threaded and imports nothing that starts a thread (checked at start), so a fork
copies a consistent process. It never configures logging: each agent's main() does, for itself.
"""
from __future__ import annotations

import ctypes
import fcntl
import json
import os
import random
import selectors
import signal
import socket
import sys
import termios
import threading
import traceback

MAX_REQUEST = 1 << 20  # bytes: an argv and an environment
_PR_SET_PDEATHSIG = 1


def _recv_request(conn: socket.socket) -> tuple[dict, int]:
    """One JSON line and the one fd that came with it (with its first part)."""
    data = bytearray()
    fds: list[int] = []
    while not data.endswith(b"\n"):
        msg, got, _flags, _addr = socket.recv_fds(conn, 65536, 1)
        fds += got
        if not msg:
            break
        data += msg
        if len(data) > MAX_REQUEST:
            break
    if not data.endswith(b"\n") or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"want one JSON line of at most {MAX_REQUEST} bytes and one fd (the pty), got "
                         f"{len(data)} bytes and {len(fds)} fd(s)")
    return json.loads(data), fds[0]


def _become_agent(request: dict, slave: int, closing: list[socket.socket | int]) -> int:
    """In the forked child: turn into the agent and run it; returns its exit status."""
    signal.set_wakeup_fd(-1)
    for s in closing:  # the server's sockets and pipes are not the agent's
        if isinstance(s, int):
            os.close(s)
        else:
            s.close()
    for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    if slave > 2:
        os.close(slave)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    random.seed()
    # Stdio as a freshly started process on a terminal has it: line-buffered text on the pty.
    sys.stdin = open(0, "r", encoding="utf-8", errors="replace", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    sys.argv = ["python -m xenpv.stack.agent", *request["argv"]]
    from xenpv.stack.agent.__main__ import main

    return int(main(list(request["argv"])) or 0)


def _fork_agent(request: dict, slave: int, closing: list[socket.socket | int]) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _become_agent(request, slave, closing)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001  (the agent's last words, then its status)
            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    os.close(slave)
    return pid


def _send(conn: socket.socket, message: dict) -> None:
    try:
        conn.sendall(json.dumps(message).encode() + b"\n")
    except OSError:
        pass  # the harness went away; its agent is killed when its connection is seen closed


def serve(path: str) -> None:
    import xenpv.stack.agent.__main__  # noqa: F401  (the point of this process: imported once)
    from xenpv.stack.agent import console

    console.load_command_modules()
    if threading.active_count() != 1:
        raise SystemExit(f"forkserver: {threading.active_count()} threads after the imports; forking would copy "
                         "a process whose other threads are gone")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Listening before the socket has its name: the harness takes the name's existence for readiness, and a
    # connect between bind() and listen() is refused (CI: two `xenpv run`s at once, one refused).
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(wake_r, selectors.EVENT_READ, "wake")
    agents: dict[int, socket.socket] = {}  # pid -> its connection
    print(f"forkserver: serving {path}", flush=True)
    while not stopping:
        for key, _ in sel.select(timeout=1.0):
            if key.data == "wake":
                os.read(wake_r, 4096)
            elif key.data == "listen":
                conn, _ = listener.accept()
                conn.settimeout(10.0)
                try:
                    request, slave = _recv_request(conn)
                except (OSError, ValueError) as exc:
                    print(f"forkserver: bad request: {exc}", flush=True)
                    conn.close()
                    continue
                pid = _fork_agent(request, slave, [listener, conn, *agents.values(), wake_r, wake_w, sel.fileno()])
                agents[pid] = conn
                conn.settimeout(None)
                _send(conn, {"pid": pid})
                sel.register(conn, selectors.EVENT_READ, pid)
            else:
                pid, conn = key.data, key.fileobj
                try:
                    line = conn.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    line = b""
                if not line:
                    # The harness is gone, or done with an agent that has not ended: it goes too.
                    sel.unregister(conn)
                    if pid in agents:
                        os.kill(pid, signal.SIGKILL)
                    continue
                for raw in line.splitlines():
                    try:
                        sig = int(json.loads(raw)["kill"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if pid in agents:
                        os.kill(pid, sig)
        while True:  # reap: every ended agent's status to its connection
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = agents.pop(pid, None)
            if conn is not None:
                _send(conn, {"status": status})
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                conn.close()
    for pid in agents:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m xenpv.stack.agent.forkserver SOCKET")
    serve(sys.argv[1])
