"""A remote host over SSH with paramiko (issue 17, first part): commands with a deadline, SFTP transfers.

The host key is checked against the hosts file's known_hosts and nothing else (not ~/.ssh/known_hosts):
an unknown key is refused (paramiko.RejectPolicy), a different key is refused (BadHostKeyException); no
key is ever added. Authentication is by the given private key only (no agent, no ~/.ssh keys), so a test
or a CI job depends on nothing of the account running it.

Every failure is a RemoteError naming the host and what failed. A failure that means the host is gone for
us — it cannot be reached, refuses our key or shows another key, or its connection dropped — is also
reported to `on_failure` (the pool marks the host bad, harness.hosts); a command that outlives its
deadline is not: that is the command's fault, the host still answers.
"""
from __future__ import annotations

import logging
import select
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import paramiko

from xenpv.base.errors import HarnessError, WaitTimeout
from xenpv.harness.hosts import HostLease, HostSpec

log = logging.getLogger("harness.remote")


class RemoteError(HarnessError):
    """Something failed on or on the way to a remote host; `host` is its name (user@host:port)."""

    def __init__(self, host: str, what: str) -> None:
        self.host = host
        self.what = what
        super().__init__(f"{host}: {what}")


class RemoteUnreachable(RemoteError):
    """No SSH session could be opened (connection refused, no route, no answer in time)."""


class RemoteAuthFailed(RemoteError):
    """sshd refused our key."""


class RemoteHostKeyRejected(RemoteError):
    """The host's key is not in known_hosts, or differs from the one there."""


class RemoteConnectionLost(RemoteError):
    """The SSH connection dropped while something was using it."""


class RemoteTimeout(RemoteError, WaitTimeout):
    """A command or transfer did not finish within its deadline; the connection still stands."""


@dataclass(frozen=True)
class RemoteResult:
    """How a remote command ended. `status` is None when it sent no exit status (killed by a signal:
    paramiko reads no exit-signal message)."""

    command: str
    status: int | None
    stdout: str
    stderr: str


@dataclass(eq=False)
class RemoteHost:
    spec: HostSpec
    client: paramiko.SSHClient
    on_failure: Callable[[HostSpec, str], None] | None = None
    _sftp: paramiko.SFTPClient | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def for_lease(cls, lease: HostLease, timeout: float = 15.0) -> "RemoteHost":
        """Connected to the leased host; a connection that fails or drops marks the host bad in its pool."""
        return cls.connect(lease.spec, timeout=timeout, on_failure=lease.pool.mark_bad)

    @classmethod
    def connect(cls, spec: HostSpec, timeout: float = 15.0,
                on_failure: Callable[[HostSpec, str], None] | None = None) -> "RemoteHost":
        client = paramiko.SSHClient()
        # Only the hosts file's known_hosts: not load_system_host_keys(), whose entries would vouch too.
        client.load_host_keys(str(spec.known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(spec.host, port=spec.port, username=spec.user, key_filename=str(spec.key_file),
                           timeout=timeout, banner_timeout=timeout, auth_timeout=timeout,
                           channel_timeout=timeout, look_for_keys=False, allow_agent=False)
        except paramiko.BadHostKeyException as exc:
            err: RemoteError = RemoteHostKeyRejected(
                spec.name, f"host key mismatch: it shows a {exc.key.get_name()} key "
                f"{exc.key.fingerprint}, {spec.known_hosts} has {exc.expected_key.fingerprint}")
        except paramiko.AuthenticationException as exc:
            err = RemoteAuthFailed(spec.name, f"authentication as {spec.user} with {spec.key_file} failed: {exc}")
        except paramiko.SSHException as exc:
            # RejectPolicy's refusal is a bare SSHException ("Server ... not found in known_hosts").
            if "known_hosts" in str(exc):
                err = RemoteHostKeyRejected(spec.name, f"unknown host key: no entry for it in {spec.known_hosts} "
                                                       f"(keys are never added; add it with ssh-keyscan)")
            else:
                err = RemoteUnreachable(spec.name, f"SSH handshake failed: {exc}")
        except EOFError:
            # Closed after the banner, in the key exchange (an sshd dying; before the banner paramiko says
            # "Error reading SSH protocol banner" instead).
            err = RemoteUnreachable(spec.name, "the connection closed during the SSH handshake")
        except (socket.timeout, TimeoutError):
            err = RemoteUnreachable(spec.name, f"no answer within {timeout:.1f} s")
        except paramiko.ssh_exception.NoValidConnectionsError as exc:
            # Its own message drops the reason ("Unable to connect to port"); each address's error has it.
            reasons = sorted({e.strerror or str(e) for e in exc.errors.values()})
            err = RemoteUnreachable(spec.name, f"cannot connect: {'; '.join(reasons)}")
        except OSError as exc:  # no route, network unreachable
            err = RemoteUnreachable(spec.name, f"cannot connect: {exc.strerror or exc}")
        else:
            transport = client.get_transport()
            assert transport is not None
            # A host that vanishes without a FIN or RST is noticed within a few keepalives, not never.
            transport.set_keepalive(5)
            log.info("%s: connected", spec.name)
            return cls(spec, client, on_failure)
        client.close()
        if on_failure is not None:
            on_failure(spec, err.what)
        raise err

    # ---- commands ------------------------------------------------------------------------------------

    def run(self, command: str, timeout: float, check: bool = False) -> RemoteResult:
        """Run `command` with the remote user's shell; its stdout and stderr, read until it ends or until
        `timeout` seconds passed (RemoteTimeout; the channel is closed, which ends the remote command only
        if it writes or reads afterwards: sshd allocates no pty, so it gets no SIGHUP)."""
        deadline = time.monotonic() + timeout
        transport = self._transport(f"running {command!r}")
        try:
            chan = transport.open_session(timeout=timeout)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"running {command!r}: cannot open a session: {exc}") from None
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            while True:
                while chan.recv_ready():
                    out.append(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.append(chan.recv_stderr(65536))
                if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RemoteTimeout(self.name, f"{command!r} still running after {timeout:.1f} s")
                # The channel's fileno is a pipe paramiko makes readable when data or the close arrive.
                select.select([chan], [], [], min(left, 0.5))
        finally:
            chan.close()
        result = RemoteResult(command, None, b"".join(out).decode("utf-8", "replace"),
                              b"".join(err).decode("utf-8", "replace"))
        status = chan.recv_exit_status()
        if status == -1:
            # No exit status: the command was killed by a signal, or the connection dropped (paramiko
            # closes every channel before it marks the transport inactive; saved_exception is set first).
            if self._dropped(transport):
                raise self._lost(f"{command!r} was cut off: connection lost"
                                 + (f"; its output so far: {result.stdout[-500:]!r}" if result.stdout else ""))
            return result
        result = RemoteResult(command, status, result.stdout, result.stderr)
        if check and status != 0:
            raise RemoteError(self.name, f"{command!r} exited with status {status}: {result.stderr.strip()[-500:]}")
        return result

    def open_pty_session(self, command: str, timeout: float) -> paramiko.Channel:
        """`command` in a session with a pty (its processes get SIGHUP when the session ends): the channel,
        for the caller to talk to (harness.remote_guest's console)."""
        transport = self._transport(f"starting {command!r}")
        try:
            chan = transport.open_session(timeout=timeout)
            chan.get_pty(term="dumb", width=200, height=50)
            chan.exec_command(command)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(f"starting {command!r}: cannot open a session: {exc}") from None
        return chan

    def connection_lost(self, what: str) -> RemoteConnectionLost:
        """The error for a connection found gone while `what`; the host is reported to on_failure."""
        return self._lost(what)

    # ---- files ---------------------------------------------------------------------------------------

    def put(self, local: Path, remote: str, timeout: float = 60.0) -> None:
        """Copy the file or directory `local` to the path `remote` (made, with its parents)."""
        what = f"put {local} -> {remote}"
        if not remote.startswith("/"):
            # A relative path would depend on the remote account's home directory.
            raise RemoteError(self.name, f"{what}: the remote path must be absolute")
        sftp = self._sftp_client(timeout)
        try:
            self._mkdirs(sftp, remote.rsplit("/", 1)[0] or "/")
            if local.is_dir():
                for path in sorted([local, *local.rglob("*")]):
                    target = remote + ("" if path == local else "/" + path.relative_to(local).as_posix())
                    if path.is_dir():
                        self._mkdirs(sftp, target)
                    else:
                        sftp.put(str(path), target)
                        sftp.chmod(target, path.stat().st_mode & 0o7777)
            elif local.is_file():
                sftp.put(str(local), remote)
                sftp.chmod(remote, local.stat().st_mode & 0o7777)
            else:
                raise RemoteError(self.name, f"{what}: {local}: no such file or directory")
        except (socket.timeout, TimeoutError):
            raise self._sftp_timeout(what, timeout) from None
        except OSError as exc:
            raise self._sftp_error(what, exc) from None

    def get(self, remote: str, local: Path, timeout: float = 60.0) -> None:
        """Copy the remote file or directory `remote` to `local` (its parent must exist)."""
        sftp = self._sftp_client(timeout)
        what = f"get {remote} -> {local}"
        try:
            self._get(sftp, remote, local)
        except (socket.timeout, TimeoutError):
            raise self._sftp_timeout(what, timeout) from None
        except OSError as exc:
            raise self._sftp_error(what, exc) from None

    def _get(self, sftp: paramiko.SFTPClient, remote: str, local: Path) -> None:
        attrs = sftp.stat(remote)
        if stat.S_ISDIR(attrs.st_mode or 0):
            local.mkdir(exist_ok=True)
            for entry in sftp.listdir_attr(remote):
                self._get(sftp, f"{remote}/{entry.filename}", local / entry.filename)
        else:
            sftp.get(remote, str(local))
            local.chmod((attrs.st_mode or 0o644) & 0o7777)

    def _mkdirs(self, sftp: paramiko.SFTPClient, path: str) -> None:
        parts = [p for p in path.split("/") if p]
        current = ""
        for part in parts:
            current += "/" + part
            try:
                attrs = sftp.stat(current)
            except FileNotFoundError:
                sftp.mkdir(current)
                continue
            if not stat.S_ISDIR(attrs.st_mode or 0):
                raise RemoteError(self.name, f"{current} exists and is not a directory")

    def _sftp_client(self, timeout: float) -> paramiko.SFTPClient:
        if self._sftp is None:
            transport = self._transport("opening SFTP")
            try:
                self._sftp = paramiko.SFTPClient.from_transport(transport)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self._lost(f"opening SFTP: {exc}") from None
            if self._sftp is None:
                raise RemoteError(self.name, "opening SFTP: the server refused the subsystem")
        # Every SFTP request must be answered within `timeout` (paramiko waits on the channel).
        self._sftp.get_channel().settimeout(timeout)
        return self._sftp

    def _sftp_timeout(self, what: str, timeout: float) -> RemoteTimeout:
        # A timeout in the middle of a packet leaves this SFTP session's stream out of step (paramiko copes
        # with whole late answers, not with half-read ones): the next transfer opens a new session.
        sftp, self._sftp = self._sftp, None
        if sftp is not None:
            sftp.close()
        return RemoteTimeout(self.name, f"{what}: no answer within {timeout:.1f} s")

    def _sftp_error(self, what: str, exc: OSError) -> RemoteError:
        transport = self.client.get_transport()
        if transport is None or self._dropped(transport):
            return self._lost(f"{what}: connection lost")
        return RemoteError(self.name, f"{what}: {exc.strerror or exc}")

    # ---- the connection ------------------------------------------------------------------------------

    def _transport(self, during: str) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise self._lost(f"{during}: the connection is closed")
        return transport

    @staticmethod
    def _dropped(transport: paramiko.Transport, grace: float = 2.0) -> bool:
        """Whether the connection is gone. The transport thread records why before it closes the channels
        and marks itself inactive after, so wait a moment for a closed channel's cause to show."""
        deadline = time.monotonic() + grace
        while True:
            if not transport.is_active() or isinstance(transport.saved_exception, (EOFError, OSError)):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _lost(self, what: str) -> RemoteConnectionLost:
        err = RemoteConnectionLost(self.name, what)
        if self.on_failure is not None:
            self.on_failure(self.spec, what)
        return err

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        self.client.close()

    def __enter__(self) -> "RemoteHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
