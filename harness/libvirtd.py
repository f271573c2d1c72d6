"""A private libvirtd for the libvirt launcher (harness.libvirt_launcher) when none is running.

Debian's libvirtd run as root is the privileged daemon: its paths are fixed (/etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt) and it resolves the user `libvirt-qemu` before it
reads qemu.conf (qemu_conf.c virQEMUDriverConfigNew), a user only libvirt-daemon-system creates. So the
daemon runs in a mount and PID namespace of its own (util-linux `unshare`): /etc and /var are overlays
whose upper layers are in this daemon's run directory (the user, qemu.conf and every state, cache and log
file land there, not on the host), /run is a tmpfs, and its sockets are in the run directory, reached as
`qemu:///system?socket=<run dir>/libvirt-sock`. The namespace's init (`python -m xenpv.harness.libvirtd
--init DIR`) starts libvirtd, reaps every orphan (libvirt daemonizes QEMU, which then becomes init's
child; a zombie QEMU would make virDomainDestroy wait for a process that never goes) and forwards
SIGTERM; when it exits the kernel kills whatever is left in the namespace, so no QEMU outlives the daemon.

qemu.conf: QEMU runs as root (the agent maps its RAM file, the harness owns its run directory), no
security driver, no cgroups (none are delegated here), QEMU's stdout and stderr to the domain's log file
directly (no virtlogd).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from xenpv.base.errors import ConfigError, LaunchFailure, ProcessDied, WaitTimeout
from xenpv.base.process import Supervised, read_tail, unix_socket_accepting, wait_for
from xenpv.base.rundir import make_run_dir, remove_run_dir

log = logging.getLogger("harness.libvirtd")

LIBVIRTD = "/usr/sbin/libvirtd"
UNSHARE = "/usr/bin/unshare"
SOCKET = "libvirt-sock"
LIBVIRTD_CONF = f"""\
# The private daemon's own sockets, in its run directory; only root reaches them (the directory is 0700).
unix_sock_dir = "{{run_dir}}"
unix_sock_ro_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""
QEMU_CONF = """\
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
"""
# The compile-time default user and group of Debian's QEMU driver, needed before qemu.conf is read.
PRIVATE_USERS = ("libvirt-qemu:x:64055:64055:libvirt (private):/nonexistent:/usr/sbin/nologin\n",
                 "libvirt-qemu:x:64055:\nkvm:x:64056:\n")
STOP_GRACE = 5.0  # seconds init gives libvirtd after SIGTERM before it exits (and the namespace dies)


@dataclass(eq=False)
class PrivateLibvirtd:
    """A running private libvirtd; `uri` connects to it, `domain_logs` holds its domains' QEMU logs."""

    run_dir: Path
    process: Supervised
    grace: float = STOP_GRACE

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.run_dir / SOCKET}"

    @property
    def domain_logs(self) -> Path:
        return self.run_dir / "var-upper" / "log" / "libvirt" / "qemu"

    @classmethod
    def start(cls, log_path: Path, timeout: float = 30.0, libvirtd: str = LIBVIRTD,
              grace: float = STOP_GRACE, qemu_conf: str = QEMU_CONF) -> "PrivateLibvirtd":
        """Start the daemon; ConfigError naming a missing program, LaunchFailure with its log's tail if it
        does not answer within `timeout`. `grace`: how long init waits for it after SIGTERM at stop();
        `qemu_conf`: its QEMU driver's settings (QEMU_CONF: QEMU as root, unconfined)."""
        for tool in (libvirtd, UNSHARE):
            if not os.access(tool, os.X_OK):
                raise ConfigError(f"{tool} is missing: the libvirt launcher's private daemon needs it "
                                  "(apt-get install libvirt-daemon libvirt-daemon-driver-qemu util-linux)")
        run_dir = make_run_dir("libvirtd")
        try:
            for sub in ("etc-upper", "etc-work", "var-upper", "var-work"):
                (run_dir / sub).mkdir()
            (run_dir / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(run_dir=run_dir))
            (run_dir / "qemu.conf").write_text(qemu_conf)
            # --kill-child: if unshare dies (it gets the harness's PDEATHSIG), init and its namespace die too.
            argv = [UNSHARE, "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private",
                    "--kill-child", sys.executable, "-m", "xenpv.harness.libvirtd", "--init", str(run_dir),
                    "--libvirtd", libvirtd, "--grace", str(grace)]
            process = Supervised("libvirtd (private)", argv, log_path).start()
        except BaseException:
            remove_run_dir(run_dir)
            raise
        daemon = cls(run_dir, process, grace)
        try:
            wait_for(lambda: unix_socket_accepting(run_dir / SOCKET), timeout=timeout,
                     what="the private libvirtd's socket", alive=[process])
        except ProcessDied as exc:  # its message has the log's tail
            daemon.stop()
            raise LaunchFailure(f"the private libvirtd did not start: {exc}") from None
        except WaitTimeout as exc:
            daemon.stop()
            raise LaunchFailure(f"the private libvirtd did not start: {exc}\n{read_tail(log_path)}") from None
        except BaseException:
            daemon.stop()
            raise
        log.info("private libvirtd ready: %s (pid %d)", daemon.uri, process.pid)
        return daemon

    def stop(self) -> int | None:
        """SIGTERM to init, which passes it on and exits when libvirtd has, or after the grace period; the
        kernel then kills what is left of the namespace. SIGKILL if init is not gone 3 s after that."""
        try:
            return self.process.stop(timeout=self.grace + 3.0)
        finally:
            remove_run_dir(self.run_dir)


# -- inside the namespace ------------------------------------------------------------------------------

def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"libvirtd init: mount {' '.join(args)} failed: {done.stderr.strip()}")


def namespace_init(run_dir: Path, libvirtd: str = LIBVIRTD, grace: float = STOP_GRACE) -> int:
    """PID 1 of the private namespace: the overlays, the user, qemu.conf, then libvirtd and the reaping."""
    for top in ("etc", "var"):
        _mount("-t", "overlay", "overlay", "-o",
               f"lowerdir=/{top},upperdir={run_dir}/{top}-upper,workdir={run_dir}/{top}-work", f"/{top}")
    _mount("-t", "tmpfs", "tmpfs", "/run")
    # Appended even if the host has them (libvirt-daemon-system): the first entry of a name is the one used.
    passwd, group = PRIVATE_USERS
    with open("/etc/passwd", "a") as f:
        f.write(passwd)
    with open("/etc/group", "a") as f:
        f.write(group)
    Path("/etc/libvirt").mkdir(exist_ok=True)
    Path("/etc/libvirt/qemu.conf").write_text((run_dir / "qemu.conf").read_text())
    daemon = subprocess.Popen([libvirtd, "-f", str(run_dir / "libvirtd.conf"), "-p", "/run/libvirtd.pid"])
    stopping: list[float] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(time.monotonic())
        try:
            daemon.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        if stopping and time.monotonic() - stopping[0] > grace:
            print(f"libvirtd init: {libvirtd} still running {grace}s after SIGTERM; ending the namespace",
                  flush=True)
            return 1
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return 1
        if pid == daemon.pid:
            return os.waitstatus_to_exitcode(status)
        if pid == 0:  # nothing to reap: a poll, so the grace period is checked without a timer signal
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--init", type=Path, required=True, metavar="RUN_DIR",
                        help="be the namespace's init for the private daemon of RUN_DIR")
    parser.add_argument("--libvirtd", default=LIBVIRTD, metavar="PATH", help=f"the daemon (default {LIBVIRTD})")
    parser.add_argument("--grace", type=float, default=STOP_GRACE, metavar="SECONDS",
                        help="after SIGTERM, how long to wait for the daemon before ending the namespace")
    args = parser.parse_args(argv)
    if os.getpid() != 1:
        parser.error("--init runs as PID 1 of a new PID namespace (started by PrivateLibvirtd.start)")
    return namespace_init(args.init, args.libvirtd, args.grace)


if __name__ == "__main__":
    sys.exit(main())
