"""The machine: a real QEMU (Xen build, accel=qtest) launched from a guest definition and supervised.

Launch builds the command line from the guest YAML, starts QEMU in its own process group, connects
the main QMP monitor over a socketpair (no path, no race), connects the qtest socket, and maps the RAM
file. A second QMP socket in the run directory is reserved for the dom0 device model (xenhv's unplug).
Every wait checks that QEMU is alive; a QEMU that dies is reported as `MachineCrashed` with its exit
status and the tail of its log. Shutdown is QMP `quit`, then SIGKILL of the group; the run directory
(sockets, RAM file, scratch images) is removed, the artifact directory is kept for the caller.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenpv.guests.schema import XEN_PLATFORM_VENDOR, GuestDefinition
from xenpv.base.errors import LaunchFailure, MachineCrashed, WaitTimeout
from xenpv.base.process import Supervised, read_tail, wait_for
from xenpv.base.qmp import QmpSession
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.stack.vcpu.guestmem import GuestMemory
from xenpv.stack.vcpu.qtest import Qtest

log = logging.getLogger("harness.machine")

DEFAULT_QEMU = "/usr/libexec/xen-qemu-system-i386"
REPLAY_EXIT_PORT = 0xF4


def qemu_binary() -> str:
    return os.environ.get("XENPV_QEMU", DEFAULT_QEMU)


@dataclass(frozen=True)
class MachinePaths:
    run_dir: Path
    artifacts: Path
    # Where the guest's disk images are (created when missing): the run directory unless the machine was
    # given a directory that outlives it (a guest that moves to another machine keeps its disks).
    images: Path | None = None

    @property
    def image_dir(self) -> Path:
        return self.images if self.images is not None else self.run_dir

    @property
    def ram(self) -> Path:
        return self.run_dir / "ram"

    @property
    def qtest_socket(self) -> Path:
        return self.run_dir / "qtest.sock"

    @property
    def dm_qmp_socket(self) -> Path:
        return self.run_dir / "dm-qmp.sock"

    @property
    def qemu_log(self) -> Path:
        return self.artifacts / "qemu.log"

    @property
    def qmp_events(self) -> Path:
        return self.artifacts / "qmp-events.jsonl"

    @property
    def transcript(self) -> Path:
        return self.artifacts / "qtest.log"


def device_args(guest: GuestDefinition, image_dir: Path) -> list[str]:
    """The -drive/-device arguments of a guest's platform and emulated devices, in slot order."""
    args: list[str] = []
    for i, p in enumerate(guest.platform):
        args += ["-device", f"xen-pvdevice,id=xen-platform{i},vendor-id={XEN_PLATFORM_VENDOR:#06x},"
                            f"device-id={p.device_id:#06x},revision={p.revision:#x},size={p.bar_size:#x}"]
    for d in guest.emulated_disks:
        image = d.image or image_dir / f"{d.id}.img"
        media = "ide-cd" if d.media == "cdrom" else "ide-hd"
        args += ["-drive", f"if=none,id=drive-{d.id},file={image},format=raw,media={d.media}",
                 "-device", f"{media},id={d.id},drive=drive-{d.id},bus=ide.{d.bus},unit={d.unit}"]
    for n in guest.emulated_nics:
        args += ["-device", f"{n.model},id={n.id},mac={n.mac}"]
    return args


def qemu_argv(guest: GuestDefinition, *, binary: str, ram: Path, image_dir: Path,
              qtest: str, monitors: list[str]) -> list[str]:
    argv = [
        binary,
        "-machine", "pc,accel=qtest,memory-backend=ram",
        "-object", f"memory-backend-file,id=ram,mem-path={ram},size={guest.memory_mib}M,share=on",
        "-m", f"{guest.memory_mib}M",
        "-nodefaults", "-display", "none", "-vga", "none", "-no-user-config",
        "-qtest", qtest,
        # The client records the transcript; QEMU's own copy would go to stderr by default.
        "-qtest-log", "none",
    ]
    for mon in monitors:
        argv += mon.split(" ")
    return argv + device_args(guest, image_dir)


class Machine:
    """One QEMU machine. Use as a context manager, or call launch() and shutdown()."""

    def __init__(self, guest: GuestDefinition, artifacts: Path, *, binary: str | None = None,
                 name: str | None = None, image_dir: Path | None = None, incoming: bool = False) -> None:
        """`image_dir`: where the disk images are and stay (default: the run directory, removed with the
        machine). `incoming`: QEMU starts with `-incoming defer`, to load a saved device state (QMP
        migrate-incoming) before it runs."""
        self.guest = guest
        self.name = name or guest.name
        self.image_dir = image_dir
        self.incoming = incoming
        self.binary = binary or qemu_binary()
        artifacts.mkdir(parents=True, exist_ok=True)
        self.artifacts = artifacts
        # Made by launch(), so a machine that is never launched leaves no run directory behind.
        self._paths: MachinePaths | None = None
        self.process: Supervised | None = None
        self.qmp: QmpSession | None = None
        self._qtest: Qtest | None = None
        self._memory: GuestMemory | None = None
        self._transcript = None
        self.argv: list[str] = []
        self.launch_seconds = 0.0

    # -- life cycle --------------------------------------------------------------------------------

    def _make_images(self) -> None:
        for d in self.guest.emulated_disks:
            path = self.paths.image_dir / f"{d.id}.img"
            if d.image is None and not path.exists():
                with open(path, "wb") as f:
                    f.truncate(d.size)

    @property
    def paths(self) -> MachinePaths:
        if self._paths is None:
            raise LaunchFailure(f"{self.name} was never launched: it has no run directory")
        return self._paths

    def launch(self, timeout: float = 10.0) -> "Machine":
        if self._paths is not None:
            raise LaunchFailure(f"{self.name} was launched already")
        t0 = time.monotonic()
        self._paths = MachinePaths(make_run_dir(self.name), self.artifacts, self.image_dir)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._make_images()
            self.argv = qemu_argv(
                self.guest, binary=self.binary, ram=self.paths.ram, image_dir=self.paths.image_dir,
                qtest=f"unix:{self.paths.qtest_socket},server=on,wait=off",
                monitors=[f"-chardev socket,id=qmp0,fd={theirs.fileno()}", "-mon chardev=qmp0,mode=control",
                          f"-qmp unix:{self.paths.dm_qmp_socket},server=on,wait=off"],
            ) + (["-incoming", "defer"] if self.incoming else [])
            (self.paths.artifacts / "argv.txt").write_text(shlex.join(self.argv) + "\n")
            self.process = Supervised(f"QEMU ({self.name})", self.argv, self.paths.qemu_log,
                                      pass_fds=(theirs.fileno(),))
            self.process.start()
        except BaseException as exc:
            # Whatever stopped the launch here (an interrupt too), the run directory goes.
            ours.close()
            self.shutdown()
            if isinstance(exc, OSError) and self.process is not None and self.process.popen is None:
                raise LaunchFailure(f"cannot start {self.binary}: {exc.strerror}") from None
            raise
        finally:
            theirs.close()
        self._connect(ours, timeout)
        self.launch_seconds = time.monotonic() - t0
        log.info("%s ready in %.0f ms (pid %d)", self.name, self.launch_seconds * 1000, self.process.pid)
        return self

    def _connect(self, qmp: socket.socket | str, timeout: float) -> None:
        """Connect the harness to the QEMU just started: QMP (a session made here unless the launcher made
        it before QEMU started), qtest, guest RAM. If that fails, the machine is shut down and the error
        says whether QEMU died or did not become ready."""
        try:
            if self.qmp is None:
                self.qmp = QmpSession(self.name, self.paths.qmp_events)
            self.qmp.connect(qmp, timeout)
            self._connect_qtest(timeout)
            if self.qtest.endianness() != "little":
                raise LaunchFailure("QEMU reports a big-endian target; the harness models x86 guests")
            self._memory = GuestMemory(self.paths.ram, self.guest.memory_mib << 20)
        except BaseException as exc:
            # Launch failed: if QEMU is exiting, give it the second to report why.
            died = self._crash_report("launching", connection_lost=True)
            self.shutdown()
            if died is not None:
                raise died from None
            if isinstance(exc, (TimeoutError, WaitTimeout)):
                raise LaunchFailure(f"{self.name}: QEMU did not become ready within {timeout:.1f}s\n"
                                    f"{read_tail(self.paths.qemu_log)}") from None
            raise

    def _connect_qtest(self, timeout: float) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def connected() -> bool:
            try:
                sock.connect(str(self.paths.qtest_socket))
                return True
            except (FileNotFoundError, ConnectionRefusedError):
                return False

        try:
            wait_for(connected, timeout=timeout, what="QEMU's qtest socket", alive=self._watched())
        except BaseException:
            sock.close()
            raise
        self._transcript = open(self.paths.transcript, "w")
        self._qtest = Qtest(sock, transcript=self._transcript, on_dead=self._crash_report)

    def _watched(self) -> list[Any]:
        """What a wait for this machine checks is alive (each has check_alive(during)): QEMU's process; the
        libvirt launcher (harness.libvirt_launcher), whose QEMU is libvirtd's child, watches its domain."""
        return [self.process]

    def _crash_report(self, during: str, connection_lost: bool = False) -> MachineCrashed | None:
        """If QEMU is dead, the error that says so. After a lost connection QEMU is going away, so it
        gets up to a second to be reaped and report its real exit status."""
        p = self.process
        if p is None or p.popen is None:
            return None
        try:
            p.popen.wait(1.0 if connection_lost else 0)
        except subprocess.TimeoutExpired:
            return None
        return MachineCrashed(p.name, p.returncode, p.log_tail(), during)

    def shutdown(self, timeout: float = 2.0) -> int | None:
        """Soft (QMP quit) then hard (SIGKILL to the group) stop; releases everything the machine holds."""
        status = None
        self._close_qtest()
        if self.process is not None:
            qmp = self.qmp

            def soft() -> None:
                if qmp is None:
                    self.process.signal_group(signal.SIGTERM)
                    return
                try:
                    qmp.command("quit", timeout=timeout)
                except Exception:
                    self.process.signal_group(signal.SIGTERM)

            status = self.process.stop(soft=soft, timeout=timeout)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        self._release_ram_and_run_dir()
        return status

    def _close_qtest(self) -> None:
        if self._qtest is not None:
            self._qtest.close()
            self._qtest = None
        if self._transcript is not None:
            self._transcript.close()
            self._transcript = None

    def _release_ram_and_run_dir(self) -> None:
        try:
            if self._memory is not None:
                memory, self._memory = self._memory, None
                memory.close()  # raises if someone still views guest RAM: a leak worth reporting
        finally:
            if self._paths is not None:
                remove_run_dir(self._paths.run_dir)

    def hand_over_qtest(self) -> Path:
        """Close the harness's qtest connection so the guest agent can open its own (QEMU serves one
        client at a time); the agent appends to the same transcript, which this returns."""
        self._close_qtest()
        return self.paths.transcript

    def flush_logs(self) -> None:
        """Make the artifacts complete on disk while the machine still runs (for a failure report)."""
        if self._transcript is not None:
            self._transcript.flush()

    def __enter__(self) -> "Machine":
        return self.launch()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- access ----------------------------------------------------------------------------------

    @property
    def qtest(self) -> Qtest:
        if self._qtest is None:
            raise LaunchFailure(f"{self.name} is not running")
        return self._qtest

    @property
    def memory(self) -> GuestMemory:
        if self._memory is None:
            raise LaunchFailure(f"{self.name} is not running")
        return self._memory

    def check_alive(self, during: str = "") -> None:
        if self.process is None:
            raise LaunchFailure(f"{self.name} was never launched")
        if (err := self._crash_report(during)) is not None:
            raise err

    def write_replay_script(self) -> Path:
        """A shell script that replays the qtest transcript against the same QEMU without Python."""
        script = self.paths.artifacts / "replay.sh"
        tmp = "$tmp"
        # qtest has no quit command and QEMU ignores EOF on stdin, so the replay machine gets an
        # isa-debug-exit device and the script ends with a write to it (exit status 1 = clean).
        argv = qemu_argv(self.guest, binary=self.binary, ram=Path(f"{tmp}/ram"), image_dir=Path(tmp),
                         qtest="stdio", monitors=[f"-device isa-debug-exit,iobase={REPLAY_EXIT_PORT:#x},iosize=1"])
        images = "".join(f"truncate -s {d.size} \"$tmp/{d.id}.img\"\n" for d in self.guest.emulated_disks
                         if d.image is None)
        cmd = " ".join(a if "$tmp" in a else shlex.quote(a) for a in argv)
        cmd = cmd.replace(str(Path(tmp)), '"$tmp"')
        script.write_text(
            "#!/bin/sh\n"
            "# Replays this machine's qtest transcript: the same requests, on the same machine, without Python.\n"
            "set -eu\n"
            f"log=\"${{1:-$(dirname \"$0\")/qtest.log}}\"\n"
            "tmp=$(mktemp -d /tmp/xpv-replay-XXXXXX)\ntrap 'rm -rf \"$tmp\"' EXIT\n"
            f"{images}"
            f"{{ sed -n 's/^\\[R +[0-9.]*\\] //p' \"$log\"; echo 'outb {REPLAY_EXIT_PORT:#x} 0'; }} | {cmd} || [ $? -eq 1 ]\n"
        )
        script.chmod(0o755)
        return script
