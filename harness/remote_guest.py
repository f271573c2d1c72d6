"""A guest whose machine side runs on a leased pool host, reached over SSH (issue 17).

What runs where: this process keeps the test, the lease and the console's transcript; the host runs this
project's own `xenpv run --console --no-checks` — dom0 services, QEMU and the guest agent, exactly as a
local run has them — in a directory of its own under the host's run_dir, inside one SSH session with a
pty. The console is that session's stdin/stdout, driven with pexpect like a local guest's.

How the project gets there: `Wheelhouse.build` makes wheels of this checkout and of everything it
depends on (pip wheel, from pip's cache after the first time); `install` sends them and ci/bootstrap.sh
over SFTP to a staging directory and runs `bootstrap.sh wheels` there (the same apt packages as a local
set-up, then pip with --no-index: the host needs no PyPI and runs exactly what was built here). An install
is named by the digest of the wheels' contents and made once per host under flock(1), however many
workers lease that host; a build with other contents installs beside it.

Failures: the host's sessions end with the SSH connection, so a host that drops (RemoteConnectionLost)
marks itself bad in the pool through RemoteHost and ends the guest's session; a `xenpv run` that exits
(a STOP, a dead QEMU, a bad guest YAML) is a RemoteGuestExited with its status and last output. When a
test fails, the guest's artifact directory (logs, console, transcripts, crash dumps) is copied back.
"""
from __future__ import annotations

import hashlib
import logging
import os
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
import pexpect
import pexpect.fdpexpect

from xenpv.base.errors import HarnessError
from xenpv.harness.remote import RemoteError, RemoteHost
from xenpv.stack.agent.console import PROMPT
from xenpv.stack.timescale import TIME_SCALE_ENV, scaled

log = logging.getLogger("harness.remote_guest")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = PROJECT_ROOT / "ci" / "bootstrap.sh"
# What the distribution is made of (setup.py's FOLDERS, with its metadata files).
DISTRIBUTION_FILES = ("pyproject.toml", "setup.py", "README.md", "harness", "stack", "backends", "base", "xenabi",
                      "guests")
INSTALL_TIMEOUT = 900.0  # seconds: a host without the apt packages installs them first
BOOT_TIMEOUT = 90.0  # seconds, scaled: dom0 services, QEMU and the agent's first boot on the host


class RemoteGuestExited(RemoteError):
    """The host's `xenpv run` ended while the guest was in use; `status` is its exit status."""

    def __init__(self, host: str, what: str, status: int | None) -> None:
        self.status = status
        super().__init__(host, what)


@dataclass(frozen=True)
class Wheelhouse:
    """Wheels of this checkout and its dependencies, named by the digest of their contents."""

    path: Path
    digest: str

    @classmethod
    def build(cls, into: Path, timeout: float = 600.0) -> "Wheelhouse":
        if not (PROJECT_ROOT / "pyproject.toml").is_file() or not BOOTSTRAP.is_file():
            raise HarnessError(f"{PROJECT_ROOT} is not a checkout of this project (no pyproject.toml or "
                               "ci/bootstrap.sh): pool hosts are installed from a checkout's wheels")
        into.mkdir(parents=True, exist_ok=True)
        # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and two workers
        # building in the checkout at once would share them.
        with tempfile.TemporaryDirectory(prefix="xenpv-wheel-src-") as src:
            for name in DISTRIBUTION_FILES:
                source = PROJECT_ROOT / name
                if source.is_dir():
                    shutil.copytree(source, Path(src) / name,
                                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc"))
                else:
                    shutil.copy2(source, Path(src) / name)
            argv = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(into), src]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                raise HarnessError(f"building the wheels for pool hosts took more than {timeout:.0f} s") from None
        if done.returncode != 0:
            raise HarnessError(f"building the wheels for pool hosts failed (pip wheel, status "
                               f"{done.returncode}): {done.stderr.strip()[-1000:]}")
        return cls(into, _digest(sorted(into.glob("*.whl"))))


def _digest(wheels: list[Path]) -> str:
    """Of the files inside the wheels, not of the zips: a rebuild of the same code (new zip timestamps)
    reuses the host's install."""
    h = hashlib.sha256()
    for wheel in wheels:
        h.update(wheel.name.encode() + b"\0")
        with zipfile.ZipFile(wheel) as z:
            for name in sorted(z.namelist()):
                h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
    return h.hexdigest()[:16]


def install(remote: RemoteHost, wheels: Wheelhouse, timeout: float = INSTALL_TIMEOUT) -> str:
    """This build installed on the host (once); returns its directory there (its venv is .venv in it)."""
    base = f"{remote.spec.run_dir}/xenpv-{wheels.digest}"
    if remote.run(f"test -f {shlex.quote(base)}/.venv/.installed", timeout=30).status == 0:
        return base
    stage = f"{remote.spec.run_dir}/.stage-{uuid.uuid4().hex[:12]}"
    t0 = time.monotonic()
    try:
        remote.put(wheels.path, f"{stage}/wheels", timeout=timeout)
        remote.put(BOOTSTRAP, f"{stage}/ci/bootstrap.sh", timeout=60)
        # Under the host's install lock: the first worker installs, the others find it done. A base left
        # half-made by a killed install has no .installed stamp and is made again.
        script = (f"set -e; if [ ! -f {base}/.venv/.installed ]; then rm -rf {base}; mv {stage} {base}; "
                  f"{base}/ci/bootstrap.sh wheels {base}/wheels; fi")
        done = remote.run(f"flock {shlex.quote(remote.spec.run_dir)}/.install.lock sh -c {shlex.quote(script)}",
                          timeout=timeout)
        if done.status != 0:
            raise RemoteError(remote.name, f"installing this project in {base} failed (status {done.status}): "
                                           f"{(done.stderr or done.stdout).strip()[-1000:]}")
    finally:
        try:
            remote.run(f"rm -rf {shlex.quote(stage)}", timeout=60)
        except RemoteError as exc:
            log.warning("%s: staging directory %s not removed: %s", remote.name, stage, exc)
    log.info("%s: installed %s in %.1f s", remote.name, base, time.monotonic() - t0)
    return base


class _ChannelPump:
    """A socketpair end for pexpect on one side, the SSH channel on the other: paramiko's channel has no
    file descriptor to read, only one to select on."""

    def __init__(self, channel: paramiko.Channel) -> None:
        self.channel = channel
        self.local, self._inner = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="remote-console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        inner, chan = self._inner, self.channel
        try:
            while True:
                ready, _, _ = select.select([chan, inner], [], [], 1.0)
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break  # the remote side closed (exit, or the connection dropped)
                    inner.sendall(data)
                if inner in ready:
                    data = inner.recv(65536)
                    if not data:
                        break  # our side closed
                    chan.sendall(data)
        except OSError as exc:
            log.debug("console pump ended: %s", exc)
        finally:
            try:
                inner.shutdown(socket.SHUT_WR)  # pexpect sees EOF
            except OSError:
                pass

    def close(self, timeout: float = 5.0) -> None:
        self.channel.close()
        try:
            self.local.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(timeout)
        self.local.close()
        self._inner.close()


@dataclass(eq=False)
class RemoteConsole:
    """The guest console of a host's `xenpv run --console`; `run(command)` as a local guest's console."""

    remote: RemoteHost
    channel: paramiko.Channel
    log_path: Path
    _pump: _ChannelPump = field(init=False)
    _logfile: object = field(init=False)
    child: pexpect.fdpexpect.fdspawn = field(init=False)

    def __post_init__(self) -> None:
        self._pump = _ChannelPump(self.channel)
        self._logfile = open(self.log_path, "a")
        self.child = pexpect.fdpexpect.fdspawn(self._pump.local.fileno(), encoding="utf-8", codec_errors="replace",
                                               logfile=self._logfile)

    def expect_prompt(self, during: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            i = self.child.expect_exact([PROMPT, pexpect.EOF, pexpect.TIMEOUT],
                                        timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            if i == 0:
                return str(self.child.before).replace("\r\n", "\n")
            if i == 1:
                raise self._ended(during)
            transport = self.channel.get_transport()
            if transport is None or not transport.is_active():
                raise self.remote.connection_lost(f"the guest console ({during}): connection lost")
            if time.monotonic() >= deadline:
                raise RemoteError(self.remote.name, f"no guest prompt within {timeout:.1f} s during {during}; "
                                                    f"last output: {str(self.child.before)[-500:]!r}")

    def _ended(self, during: str) -> RemoteError:
        """The session ended: `xenpv run` exited (its status), or the connection dropped (no status)."""
        said = str(self.child.before).replace("\r\n", "\n").strip()[-2000:]
        deadline = time.monotonic() + 5.0
        while not self.channel.exit_status_ready() and time.monotonic() < deadline:
            transport = self.channel.get_transport()
            if transport is None or not transport.is_active():
                break
            time.sleep(0.05)
        if self.channel.exit_status_ready() and self.channel.recv_exit_status() != -1:
            status = self.channel.recv_exit_status()
            return RemoteGuestExited(self.remote.name, f"`xenpv run` exited with status {status} during {during}:"
                                                       f"\n{said}", status)
        return self.remote.connection_lost(f"the guest console ({during}): connection lost"
                                           + (f"; last output: {said[-500:]!r}" if said else ""))

    def run(self, command: str, timeout: float = 30.0) -> str:
        self.child.sendline(command)
        return self.expect_prompt(repr(command), scaled(timeout)).strip("\n")

    def close(self, timeout: float = 30.0) -> int | None:
        """`quit`, then the exit status of `xenpv run` after its teardown (None: it gave none in time, or
        the connection is gone; the channel's close then hangs its session up)."""
        status: int | None = None
        try:
            transport = self.channel.get_transport()
            if transport is not None and transport.is_active() and not self.channel.exit_status_ready():
                self.child.sendline("quit")
                deadline = time.monotonic() + timeout
                while not self.channel.exit_status_ready() and time.monotonic() < deadline:
                    time.sleep(0.05)
            if self.channel.exit_status_ready():
                status = self.channel.recv_exit_status()
        except OSError:
            pass
        finally:
            self._pump.close()
            self._logfile.close()  # type: ignore[attr-defined]
        return None if status == -1 else status


@dataclass(eq=False)
class RemoteGuest:
    """One guest on a pool host: its directory there (guest YAML, artifacts) and its console."""

    remote: RemoteHost
    directory: str
    console: RemoteConsole

    @property
    def host(self) -> str:
        return self.remote.name

    @classmethod
    def boot(cls, remote: RemoteHost, installed: str, guest_yaml: Path, console_log: Path,
             qemu: str | None = None, timeout: float = BOOT_TIMEOUT) -> "RemoteGuest":
        directory = f"{remote.spec.run_dir}/guest-{uuid.uuid4().hex[:12]}"
        remote.put(guest_yaml, f"{directory}/{guest_yaml.name}", timeout=60)
        env = {k: os.environ[k] for k in (TIME_SCALE_ENV,) if k in os.environ}
        argv = [f"{installed}/.venv/bin/xenpv", "run", "--console", "--no-checks",
                "--artifacts", f"{directory}/artifacts", *(["--qemu", qemu] if qemu else []),
                f"{directory}/{guest_yaml.name}"]
        # A pty: the session's processes get SIGHUP when it ends, so a lost connection ends the guest's
        # teardown on the host too (xenpv run treats SIGHUP as SIGTERM). No echo: the transcript is what
        # the guest said.
        command = (f"cd {shlex.quote(directory)} && stty -echo && exec env "
                   + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
                   + " ".join(shlex.quote(a) for a in argv))
        channel = remote.open_pty_session(command, timeout=30)
        guest = cls(remote, directory, RemoteConsole(remote, channel, console_log))
        try:
            guest.console.expect_prompt("boot", scaled(timeout))
        except BaseException:
            guest.console.close(timeout=10)
            raise
        log.info("%s: guest booted in %s", remote.name, directory)
        return guest

    def close(self, fetch_into: Path | None = None) -> None:
        """End the guest; with `fetch_into`, copy its artifacts back there first (a failed test's); then
        remove its directory on the host. Nothing is tried on a host whose connection is gone."""
        status = self.console.close()
        transport = self.remote.client.get_transport()
        if transport is None or not transport.is_active():
            return
        try:
            if fetch_into is not None:
                fetch_into.mkdir(parents=True, exist_ok=True)
                self.remote.get(f"{self.directory}/artifacts", fetch_into / "artifacts")
            self.remote.run(f"rm -rf {shlex.quote(self.directory)}", timeout=60, check=True)
        except RemoteError as exc:
            log.warning("%s: after the guest (status %s): %s", self.remote.name, status, exc)
            raise
