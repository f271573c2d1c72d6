"""Booting a guest: the machine, its domain (when it is a Xen guest), and the agent process whose
console the harness drives with pexpect.

`GuestConsole.run("devices")` returns a command's output; a bugcheck at any point raises
`GuestBugcheck` carrying the crash dump, so a test fails with the STOP line, the bucket, the dump's path
and the tails of the console and the agent's log instead of a timeout.

Every booted guest keeps a run record (base.runrecord) in `run-record.jsonl` of its artifacts: the harness
writes the header (guest YAML, seed, schedule, versions) and its own dom0-side events
(`guest.record.event(kind, **data)`); the agent appends each console line it runs. A crash dump embeds it.
XENPV_SCHEDULE (`os`, `seeded` or `seeded:SEED`) picks how the guest model schedules its deferred work
(stack.kernel.schedule); `seeded` alone takes the guest's seed. A guest that gave up on a deadline of the harness (no STOP: the machine was too
slow) raises `HarnessTooSlow` saying what was late. The console's deadlines are scaled by XENPV_TIME_SCALE
as the guest model's are.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pexpect

from xenpv.backends.toolstack import CreatedDomain, Toolstack
from xenpv.base.errors import HarnessError, HarnessTooSlow, NotModelledPath, WaitTimeout
from xenpv.base.errors import ConfigError
from xenpv.base.owner import child_env
from xenpv.base.rundir import remove_run_dir
from xenpv.base.process import read_tail
from xenpv.base.runrecord import JOURNAL_NAME, LIFECYCLE, RunJournal, RunRecordError, Schedule, new_record
if TYPE_CHECKING:
    from xenpv.harness.dom0 import Dom0Backends
from xenpv.harness import forkserver
from xenpv.harness.machine import Machine
from xenpv.backends.host import HostServices
from xenpv.stack.agent.console import NOT_MODELLED_MARKER, PROMPT, STOP_MARKER, TOO_SLOW_MARKER
from xenpv.stack.kernel import CrashDump
from xenpv.stack.timescale import scaled, time_scale

log = logging.getLogger("harness.agent")

_STOP_LINE = re.compile(re.escape(STOP_MARKER) + r" (0x[0-9A-F]{8}) (\S+) dump=(\S+)")
SCHEDULE_ENV = "XENPV_SCHEDULE"
REPORT_TAIL_LINES = 20


def schedule_from_env(seed: int, environ: dict[str, str] | None = None) -> Schedule:
    """$XENPV_SCHEDULE: `os` (default), `seeded` (the guest's seed) or `seeded:SEED`; ConfigError naming it."""
    raw = (os.environ if environ is None else environ).get(SCHEDULE_ENV, "").strip()
    if not raw:
        return Schedule()
    try:
        return Schedule("seeded", seed) if raw == "seeded" else Schedule.parse(raw)
    except RunRecordError as exc:
        raise ConfigError(f"{SCHEDULE_ENV}={raw!r}: {exc}") from None


class GuestBugcheck(HarnessError):
    """The guest stopped with a bugcheck; `dump` is its crash dump. The message is the failure report:
    the STOP line, the bucket, the dump's path and the tails of the console and the agent's log."""

    def __init__(self, dump: CrashDump, dump_path: Path, during: str, *, console_log: Path | None = None,
                 agent_log: Path | None = None) -> None:
        self.dump = dump
        self.dump_path = dump_path
        self.during = during
        self.console_log = console_log
        self.agent_log = agent_log
        super().__init__(self.report())

    @property
    def bucket(self) -> str:
        return self.dump.bucket

    def report(self) -> str:
        dump = self.dump
        lines = [f"guest bugchecked during {self.during}: {dump.stop_line()}",
                 f"bucket: {dump.bucket}",
                 f"crash dump: {self.dump_path}",
                 f"replay: xenpv repro {self.dump_path}" + ("" if dump.record else " (no run record: cannot replay)")]
        for name, path in (("console", self.console_log), ("agent log", self.agent_log)):
            tail = read_tail(path, REPORT_TAIL_LINES) if path is not None and path.exists() else ""
            if tail.strip():
                lines += [f"--- last lines of the {name} ({path}) ---", tail.rstrip("\n")]
        if not (self.console_log and self.console_log.exists()):
            lines.append(dump.stop_screen().rstrip("\n"))
        return "\n".join(lines)


class AgentExited(HarnessError):
    """The guest agent process ended without a STOP or a give-up: it crashed, or was killed."""

    def __init__(self, message: str, status: int | None, signal_status: int | None) -> None:
        self.status = status
        self.signal_status = signal_status
        super().__init__(message)


class GuestConsole:
    def __init__(self, argv: list[str], log_path: Path, machine: Machine, timeout: float = 30.0,
                 agent_log: Path | None = None) -> None:
        self.machine = machine
        self.log_path = log_path
        self.agent_log = agent_log
        self._logfile = open(log_path, "a")
        # The agent is a session leader on its own pty; its environment names its owner (base.owner).
        # The guest model's own agent is forked from a process that has it imported (harness.forkserver).
        if argv[1:3] == ["-m", "xenpv.stack.agent"] and forkserver.enabled():
            self.child: pexpect.spawn | forkserver.ForkedAgent = forkserver.AgentForkServer.shared().spawn(
                argv[3:], logfile=self._logfile, timeout=timeout)
        else:
            self.child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace",
                                       logfile=self._logfile, timeout=timeout, echo=False, env=child_env())

    def wait_booted(self, timeout: float = 30.0) -> None:
        self._expect_prompt("boot", timeout)

    @property
    def pid(self) -> int:
        return int(self.child.pid)

    def check_alive(self, during: str = "") -> None:
        """HarnessError if the agent process has gone (a guest parked or powered off still has it)."""
        if not self.child.isalive():
            raise HarnessError(f"the guest agent exited {during} (status {self.child.exitstatus}, "
                               f"signal {self.child.signalstatus})")

    def _expect_prompt(self, during: str, timeout: float) -> str:
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        while True:
            # Short slices, so a QEMU that died is reported as such rather than as a timeout.
            i = self.child.expect_exact([PROMPT, STOP_MARKER, pexpect.EOF, pexpect.TIMEOUT, TOO_SLOW_MARKER,
                                         NOT_MODELLED_MARKER],
                                        timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            if i == 0:
                return self.child.before.replace("\r\n", "\n")
            if i == 1:
                self.child.expect(r"\n")
                m = _STOP_LINE.match(STOP_MARKER + self.child.before)
                path = Path(m.group(3)) if m else Path("?")
                self._wait_exit()
                self._logfile.flush()
                raise GuestBugcheck(CrashDump.load(path), path, during, console_log=self.log_path,
                                    agent_log=self.agent_log)
            if i == 4:
                raise HarnessTooSlow(f"the guest gave up during {during}, the harness being too slow: "
                                     f"{self._last_words()}; XENPV_TIME_SCALE=N gives every deadline N times as long")
            if i == 5:
                raise NotModelledPath(f"the guest ended during {during} on a path the harness does not model: "
                                      f"{self._last_words()}")
            if i == 2:
                self.child.close()
                raise AgentExited(f"the guest agent exited during {during} (status {self.child.exitstatus}, "
                                  f"signal {self.child.signalstatus}):\n{self.child.before[-2000:]}",
                                  self.child.exitstatus, self.child.signalstatus)
            self.machine.check_alive(f"the guest console ({during})")
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"no guest prompt within {timeout:.1f}s during {during}")

    def _last_words(self) -> str:
        """The rest of a marker's line (`*** MARKER: <what>`), once the agent that printed it has ended."""
        self.child.expect(r"\n")
        what = self.child.before.removeprefix(":").strip()
        self._wait_exit()
        self._logfile.flush()
        return what

    def _wait_exit(self, timeout: float = 5.0) -> None:
        """After the guest's last word (a STOP, a give-up): its end. The dump and the line are already
        there, so an agent slow to exit on a loaded machine must not turn them into a timeout; close()
        kills what is left."""
        try:
            self.child.expect(pexpect.EOF, timeout=scaled(timeout))
        except pexpect.TIMEOUT:
            log.warning("the guest agent had not exited %gs after its last line", scaled(timeout))

    def run(self, command: str, timeout: float = 30.0) -> str:
        self.child.sendline(command)
        return self._expect_prompt(repr(command), timeout).strip("\n")

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> str:
        """The first debug-log line matching `pattern` (a regex), polling the guest's log."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            for line in self.run("log 1000").splitlines():
                if rx.search(line):
                    return line
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"no guest log line matching {pattern!r} within {timeout:.1f}s")
            time.sleep(0.05)

    def close(self, timeout: float = 5.0) -> None:
        if self.child.isalive():
            try:
                self.child.sendline("quit")
                self.child.expect(pexpect.EOF, timeout=timeout)
            except (pexpect.TIMEOUT, OSError):
                log.warning("guest agent did not quit; killing it")
            self.child.close(force=True)
        self._logfile.close()


@dataclass
class Guest:
    """A booted guest: its machine, its domain (None when it has no Xen platform device), its console."""

    machine: Machine
    console: GuestConsole
    domain: CreatedDomain | None = None
    toolstack: Toolstack | None = None
    artifacts: Path = field(default=Path("."))
    record: RunJournal | None = None
    host: HostServices | None = None
    backends: "Dom0Backends | None" = None
    # Losing and regaining the domain (harness.lifecycle): "running", "saved" (the vCPU parked, no
    # machine, no domain) or "off" (after hibernation); the disk images kept across machines, and the
    # machines this guest launched itself (the first one is its creator's).
    state: str = "running"
    storage: Path | None = None
    owned: list[Machine] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The guest definition's name: the same whichever machine the guest runs on now."""
        return self.machine.guest.name

    @property
    def last_machine(self) -> Machine:
        return self.machine

    def record_event(self, kind: str, **data: object) -> None:
        """Put a dom0-side action in this guest's run record (base.runrecord); one that cannot be written
        is logged: the action goes on."""
        if self.record is not None:
            try:
                self.record.event(kind, **data)
            except (OSError, RunRecordError) as exc:
                log.warning("%s event not recorded: %s", kind, exc)

    def save(self, path: Path, *, checkpoint: bool = False, ack_timeout: float | None = None,
             timeout: float | None = None) -> Any:
        """Xen save (harness.lifecycle.save): the guest suspends, its state goes to `path`, the source is torn
        down (with `checkpoint`, it runs on instead). SaveFailed, the guest running on, if it never suspends."""
        from xenpv.harness import lifecycle
        self.record_event(LIFECYCLE, op="save", checkpoint=checkpoint)
        return lifecycle.save(self, Path(path), checkpoint=checkpoint, ack_timeout=ack_timeout, timeout=timeout)

    def restore(self, path: Path) -> Any:
        """Xen restore of this guest's own save image into a new QEMU and a new domain (new domid)."""
        from xenpv.harness import lifecycle
        self.record_event(LIFECYCLE, op="restore")
        return lifecycle.restore(self, Path(path))

    def migrate(self) -> Any:
        """Local migration into a new QEMU and a new domain; the source is torn down."""
        from xenpv.harness import lifecycle
        self.record_event(LIFECYCLE, op="migrate")
        return lifecycle.migrate(self)

    def hibernate(self) -> Any:
        """S4 for real (harness.lifecycle.hibernate): the image in the hiberfile, QEMU powered off, the domain
        destroyed; the guest is "off" until power_on."""
        from xenpv.harness import lifecycle
        self.record_event(LIFECYCLE, op="hibernate")
        return lifecycle.hibernate(self)

    def power_on(self) -> str:
        """A new QEMU and a new domain; the guest resumes from its hiberfile (or boots afresh)."""
        from xenpv.harness import lifecycle
        self.record_event(LIFECYCLE, op="power-on")
        return lifecycle.power_on(self)

    def drop_machine(self) -> None:
        """The current machine's QEMU goes (its run directory too; disks live on in `storage`)."""
        self.machine.shutdown()

    def new_machine(self, *, incoming: bool = False) -> Machine:
        """A new QEMU for this guest on the same disk images, launched; shut down with the guest."""
        base = self.machine.guest.name
        name = f"{base}-m{len(self.owned) + 2}"
        m = Machine(self.machine.guest, self.machine.artifacts.parent / name, binary=self.machine.binary,
                    name=name, image_dir=self.storage, incoming=incoming)
        self.owned.append(m)
        m.launch()
        return m

    def new_domain(self, machine: Machine, *, restore_from: Path | None = None, name: str | None = None) -> CreatedDomain:
        """A domain with a new domid for `machine` (TAPs first, as at boot); it becomes the guest's."""
        assert self.host is not None and self.toolstack is not None
        domid = self.host.allocate_domid()
        if self.backends is not None:
            self.backends.prepare(machine.guest, domid)
        domain = self.toolstack.create(machine, domid=domid, restore_from=restore_from, name=name)
        self.machine, self.domain = machine, domain
        self.console.machine = machine
        return domain

    @classmethod
    def boot(cls, host: HostServices, machine: Machine, timeout: float = 30.0,
             backends: "Dom0Backends | None" = None, *, schedule: Schedule | None = None,
             labels: dict[str, str] | None = None) -> "Guest":
        """`backends`: dom0's blkback and netback; the domain's vifs get their TAPs before it boots.
        `schedule`: how the guest model schedules deferred work (default: $XENPV_SCHEDULE, else `os`);
        `labels`: what the run record says about who made this guest and why."""
        time_scale()  # a ConfigError naming XENPV_TIME_SCALE now, not an agent that will not start
        guest = machine.guest
        schedule = schedule or schedule_from_env(guest.seed)
        art = machine.paths.artifacts
        toolstack = domain = None
        try:
            yaml_text = guest.path.read_text()
        except OSError as exc:
            raise ConfigError(f"{guest.path}: cannot read the guest YAML for the run record: {exc.strerror}") from None
        record = RunJournal.create(art / JOURNAL_NAME, new_record(
            guest.name, str(guest.path.resolve()), yaml_text, guest.seed, schedule=schedule,
            qemu_binary=machine.binary, labels=labels))
        argv = [sys.executable, "-m", "xenpv.stack.agent", "--guest", str(machine.guest.path),
                "--qtest", str(machine.paths.qtest_socket), "--ram", str(machine.paths.ram),
                "--registry", str(art / "registry.json"), "--dump-dir", str(art),
                "--transcript", str(machine.hand_over_qtest()), "--log", str(art / "agent.log"),
                "--record", str(record.path), "--schedule", schedule.argument()]
        console = None
        try:
            if machine.guest.platform:
                # The agent starts (and imports) while the toolstack builds the domain: its vCPU's
                # HELLO is answered only once the toolstack unpauses the domain, as a paused vCPU waits.
                toolstack = Toolstack(host)
                domid = host.allocate_domid()
                if backends is not None:
                    backends.prepare(machine.guest, domid)
                argv += ["--hv", str(host.run_dir / f"hv-{domid}.sock"), "--domid", str(domid)]
                console = GuestConsole(argv, art / "console.log", machine, timeout, agent_log=art / "agent.log")
                domain = toolstack.create(machine, domid=domid)
            else:
                console = GuestConsole(argv, art / "console.log", machine, timeout, agent_log=art / "agent.log")
            console.wait_booted(timeout)
        except BaseException:
            try:
                if console is not None:
                    console.close()
                if toolstack is not None:
                    if domain is not None:
                        toolstack.destroy(domain.domid)
                    toolstack.close()
            finally:
                record.close()
            raise
        return cls(machine, console, domain, toolstack, art, record, host=host, backends=backends)

    def shutdown(self) -> None:
        try:
            # A parked or powered-off guest cannot run its shutdown: its agent is simply ended.
            self.console.close(timeout=5.0 if self.state == "running" else 0.5)
        finally:
            if self.record is not None:
                self.record.close()
            try:
                if self.toolstack is not None:
                    try:
                        if self.domain is not None:
                            self.toolstack.destroy(self.domain.domid)
                            if self.backends is not None:
                                self.backends.release(self.domain.domid)
                    finally:
                        self.toolstack.close()
            finally:
                for m in reversed(self.owned):
                    m.shutdown()
                if self.storage is not None:
                    remove_run_dir(self.storage)
