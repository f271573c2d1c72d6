"""A second host for the host-pool tests: Debian's OpenSSH server in a network namespace of its own.

The namespace (harness.netns, owner-named so a dead run's is reaped) is linked to ours by a veth pair
with a /30 of 10.201.0.0/16 of its own; sshd listens only on the namespace's address, with a host key,
a client key and a configuration generated for the test, in the foreground (-D -e, logging to the
Supervised process's log). Nothing of the system's ssh set-up is used: not /etc/ssh/sshd_config, not its
host keys, not ~/.ssh. Teardown kills every process in the namespace (sshd and its sessions, whose
session processes are in sessions of their own), then removes the namespace (and the veth with it) and
the run directory.

Used as `from tests.integration.sshhost import ssh_host` (test modules are imported with importlib).
"""
from __future__ import annotations

import getpass
import ipaddress
import os
import random
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.base.process import Supervised, wait_for
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.harness.hosts import HostSpec
from xenpv.harness.netns import NetNamespace, _ip

SSHD = "/usr/sbin/sshd"
PORT = 2222  # not 22: the known_hosts entry then takes the "[host]:port" form, as it will for most pools
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it; Debian's init script makes it


def keygen(path: Path) -> str:
    """A new ed25519 key pair at `path` (+ .pub); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "xenpv-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return path.with_suffix(".pub").read_text().strip()


def _free_subnet() -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """A /30 of 10.201.0.0/16 no interface here uses (parallel workers each make their own)."""
    used = _ip("-o", "-4", "addr", "show")
    for _ in range(100):
        net = ipaddress.IPv4Network((0x0AC90000 + 4 * random.randrange(16384), 30))
        if f" {net.network_address + 1}/" not in used and f" {net.network_address + 2}/" not in used:
            return (ipaddress.IPv4Interface(f"{net.network_address + 1}/30"),
                    ipaddress.IPv4Interface(f"{net.network_address + 2}/30"))
    raise AssertionError("no free /30 in 10.201.0.0/16 after 100 tries")


def _accepting(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5) as s:
            return s.recv(4).startswith(b"SSH-")  # the server's banner: sshd, not a half-started listener
    except OSError:
        return False


@dataclass
class SshHost:
    ns: NetNamespace
    sshd: Supervised
    directory: Path
    address: str
    port: int
    user: str
    client_key: Path
    host_key_line: str  # "ssh-ed25519 AAAA..." (the public host key)
    known_hosts: Path

    def spec(self, **overrides: object) -> HostSpec:
        fields: dict[str, object] = dict(host=self.address, port=self.port, user=self.user,
                                         key_file=self.client_key, known_hosts=self.known_hosts,
                                         run_dir=str(self.directory / "remote"), max_guests=1)
        fields.update(overrides)
        return HostSpec(**fields)  # type: ignore[arg-type]

    def known_hosts_line(self, key_line: str | None = None) -> str:
        return f"[{self.address}]:{self.port} {key_line or self.host_key_line}\n"

    def kill(self) -> None:
        """The host drops: every process in its namespace (sshd, its sessions and their commands) is
        SIGKILLed, so the kernel closes their sockets and the client sees the connection end."""
        for pid in self.ns.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # SIGKILL is delivered asynchronously: until the listener is gone a new connection may still be
        # accepted, then closed.
        wait_for(lambda: self.sshd.returncode is not None and not self.ns.pids(), timeout=10,
                 what=f"the processes of {self.ns.name} to end")


def start_ssh_host() -> Iterator[SshHost]:
    directory = make_run_dir("ssh")
    ns: NetNamespace | None = None
    sshd: Supervised | None = None
    try:
        os.chmod(directory, 0o755)
        host_key_line = " ".join(keygen(directory / "host_ed25519").split()[:2])
        client_pub = keygen(directory / "client_ed25519")
        (directory / "authorized_keys").write_text(client_pub + "\n")
        ns = NetNamespace.create("ssh")
        outside, inside = _free_subnet()
        ns.add_veth(outside, inside)
        address = str(inside.ip)
        config = directory / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {address}:{PORT}",
            f"HostKey {directory / 'host_ed25519'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            "PidFile none",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            "UsePAM no",  # no PAM session: nothing of the system's login set-up is involved
            "StrictModes no",  # the run directory is not the user's home: its modes are ours to choose
            "UseDNS no",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "",
        ]))
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        sshd = Supervised("sshd", ns.exec_argv(SSHD, "-D", "-e", "-f", str(config)), directory / "sshd.log")
        sshd.start()
        wait_for(lambda: _accepting(address, PORT), timeout=20, what=f"sshd on {address}:{PORT}", alive=[sshd])
        known_hosts = directory / "known_hosts"
        host = SshHost(ns, sshd, directory, address, PORT, getpass.getuser(), directory / "client_ed25519",
                       host_key_line, known_hosts)
        known_hosts.write_text(host.known_hosts_line())
        yield host
    finally:
        if ns is not None:
            try:
                for pid in ns.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            finally:
                if sshd is not None:
                    sshd.stop(timeout=5)
                ns.close()
        remove_run_dir(directory)


@pytest.fixture
def ssh_host() -> Iterator[SshHost]:
    yield from start_ssh_host()
