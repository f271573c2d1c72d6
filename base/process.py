"""Supervised child processes: one process group each, logs to a file, soft then hard stop.

Every wait in the harness goes through `wait_for`, which checks the processes it depends on at each
poll so that a dead peer is reported with its exit status and log tail instead of as a timeout.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

from xenpv.base.errors import ProcessDied, WaitTimeout
from xenpv.base.owner import child_env

log = logging.getLogger("harness.process")

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)

T = TypeVar("T")

# Every process the harness started and has not reaped; the pytest plugin checks it is empty at the end.
_running: "set[Supervised]" = set()


def running() -> list["Supervised"]:
    return [p for p in list(_running) if p.alive()]


def _child_setup() -> None:
    # Dies with the harness even when the harness is SIGKILLed and no teardown runs.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def read_tail(path: Path, lines: int = 20, max_bytes: int = 16384) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


@dataclass(eq=False)
class Supervised:
    """A child process in its own session and process group, with stdout+stderr in `log_path`; its
    environment names its owner (base.owner), so a reaper finds it and its children if we die."""

    name: str
    argv: Sequence[str]
    log_path: Path
    pass_fds: Sequence[int] = ()
    env: dict[str, str] | None = None
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> "Supervised":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            self.popen = subprocess.Popen(
                list(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(self.pass_fds),
                env=child_env(self.env),
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        _running.add(self)
        log.debug("%s started, pid %d: %s", self.name, self.popen.pid, " ".join(self.argv))
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log_path, lines)

    def died(self, during: str = "") -> ProcessDied:
        return ProcessDied(self.name, self.returncode, self.log_tail(), during)

    def check_alive(self, during: str = "") -> None:
        if not self.alive():
            raise self.died(during)

    def signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, soft: Callable[[], None] | None = None, timeout: float = 2.0) -> int | None:
        """Ask politely (`soft`, else SIGTERM), then SIGKILL the whole group; always reaps."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            try:
                if soft is not None:
                    soft()
                else:
                    self.signal_group(signal.SIGTERM)
            except Exception as exc:  # a soft stop that fails falls through to the hard one
                log.debug("%s: soft stop failed: %s", self.name, exc)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.1fs; killing its process group", self.name, timeout)
        # Kill the group even after the leader exited: a helper it forked must not survive it.
        self.signal_group(signal.SIGKILL)
        status = self.popen.wait()
        _running.discard(self)
        return status


# The signals that end a run (harness.cleanup); a shielded command never sees them.
_SHIELDED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def run_shielded(argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a short command that a signal must not cut short (`ip netns del` half done leaves a namespace).

    It gets a session of its own, so a terminal's Ctrl-C or hang-up is not sent to it, and it starts with
    SIGINT, SIGTERM and SIGHUP blocked: subprocess may vfork, and its child resets every handler to the
    default before setsid(), so a signal to our process group in that instant would kill it. Blocked
    here, they wait for us until the command is done; the command inherits the mask and never sees them.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SHIELDED)
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, start_new_session=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def unix_socket_accepting(path: Path) -> bool:
    """True once something accepts connections on the unix socket `path` (a readiness probe)."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def wait_for(
    condition: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    alive: Iterable[Supervised] = (),
    interval: float = 0.002,
    max_interval: float = 0.05,
) -> T:
    """Poll `condition` until it returns a truthy value; fail fast if a process in `alive` dies."""
    deadline = time.monotonic() + timeout
    procs = list(alive)
    delay = interval
    while True:
        result = condition()
        if result:
            return result
        for p in procs:
            p.check_alive(during=what)
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, max_interval)
