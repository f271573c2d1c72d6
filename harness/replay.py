"""Replaying a run record (base.runrecord) on a fresh guest.

`xenpv repro`, `xenpv repro --minimize`, `xenpv explore` and the regression tests that --minimize writes
all go through `ReplayEnv`: dom0 (xenhv, xenstored, blkback, netback) started once and reused by the
runs made in it (restarted when a run leaves a daemon dead), and per run a new machine, domain and agent
from the recorded guest YAML, with the recorded scheduling mode, driven through the recorded actions:

- `console` and `fault` events: the console line;
- `dom0` events: the back-end action (Dom0Backends.kill, start_backend, restart);
- `xenstore` events: the dom0 write or removal, the recorded `{domid}` standing for the new domain's;
- `lifecycle` events: Guest.hibernate, power_on, migrate, save (to a file of the run) and restore; the
  console lines such an operation makes the agent run (`power S4` after a hibernation, `lifecycle ...`)
  are part of it and not replayed on their own (`replayable`); a `power S4` line of its own on a Xen
  guest is replayed as a hibernation too, since the harness must tear down the machine QEMU powers off;
- any other kind: the replayer registered for it with `register_replayer(kind, fn)` (save/restore/S4
  hooks register theirs), else the replay stops and says the kind cannot be replayed.

A replay ends in an `Outcome`: the guest stopped (a STOP: its bucket and dump), it did not, or the harness
saw a failure that is no STOP (a console line that did not come back: a hang; the agent or a dom0 daemon
died). Those are findings too: `write_finding` keeps them as a dump of their own (`finding-*.json`, with
the run record, a bucket that never starts with 0x, and the tails of the logs) that repro, --minimize and
triage read as they read crash dumps (`load_failure`).
"""
from __future__ import annotations

import calendar
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenpv.backends.host import HostServices
from xenpv.backends.xenstored.client import XsClient
from xenpv.base.errors import (ConfigError, HarnessError, HarnessTooSlow, NotModelledPath, ProcessDied, WaitTimeout,
                               describe_status)
from xenpv.base.process import read_tail
from xenpv.base.runrecord import (CONSOLE, DOM0, FAULT, LIFECYCLE, XENSTORE, RecordEvent, RunRecord,
                                  RunRecordError, Schedule, new_record, read_journal)
from xenpv.guests.schema import GuestDefinition, load_guest
from xenpv.harness.agent import AgentExited, Guest, GuestBugcheck
from xenpv.harness.dom0 import BACKENDS, Dom0Backends
from xenpv.harness.lifecycle import LifecycleError
from xenpv.harness.machine import Machine
from xenpv.stack.kernel.bugcheck import CrashDump, CrashDumpError

log = logging.getLogger("harness.replay")

# A console line that has not come back in this long (scaled by XENPV_TIME_SCALE, as every console wait)
# is a hang: the guest model's own deadlines (I/O, power IRPs, waits) are all shorter.
COMMAND_WATCHDOG = 90.0
BOOT_TIMEOUT = 60.0
# Pacing "recorded" never sleeps longer than this between two actions.
MAX_PACE_GAP = 10.0
FINDING_FORMAT = 1

# Outcome kinds.
STOP = "stop"
CLEAN = "clean"
HANG = "hang"
AGENT_EXIT = "agent-exit"
DOM0_DIED = "dom0-died"
MACHINE_DIED = "machine-died"
TOO_SLOW = "too-slow"
NOT_MODELLED = "not-modelled"  # the guest reached a path the harness does not model (stack.notmodelled)
UNREPLAYABLE = "unreplayable"
FINDINGS = (STOP, HANG, AGENT_EXIT, DOM0_DIED, MACHINE_DIED)

Replayer = Callable[["ReplayEnv", Guest, RecordEvent], None]
REPLAYERS: dict[str, Replayer] = {}


def register_replayer(kind: str, replayer: Replayer) -> None:
    """Teach replays an event kind (the save/restore hooks, say): `replayer(env, guest, event)`."""
    REPLAYERS[kind] = replayer


class NotReplayable(HarnessError):
    """A recorded event this xenpv cannot replay (an unknown kind, a malformed one)."""


@dataclass
class Outcome:
    kind: str
    reason: str
    bucket: str | None = None
    dump: Path | None = None
    actions: int = 0  # actions replayed before the outcome (the one that ended it included)
    schedule: dict[str, Any] = field(default_factory=dict)

    @property
    def finding(self) -> bool:
        return self.kind in FINDINGS

    def describe(self) -> str:
        return f"{self.kind}: {self.reason}" + (f" (bucket {self.bucket})" if self.bucket else "")


# -- findings that are no STOP --------------------------------------------------------------------------

@dataclass(frozen=True)
class Failure:
    """A crash dump or a finding, as repro and triage read it."""

    path: Path
    kind: str               # stop, hang, agent-exit, dom0-died, machine-died
    bucket: str
    summary: str            # the STOP line, or what the harness saw
    record: RunRecord | None
    written: float          # seconds since the epoch
    schedule: dict[str, Any]


def _epoch(text: str, path: Path) -> float:
    try:
        return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
    except (ValueError, TypeError):
        return path.stat().st_mtime


def load_failure(path: Path) -> Failure:
    """A crash dump (crash-*.json) or a finding (finding-*.json); CrashDumpError or RunRecordError naming
    the file when it is neither, or of a format this xenpv does not read."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise CrashDumpError(f"{path}: cannot be read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CrashDumpError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and data.get("kind") == "finding":
        fmt = data.get("format")
        if fmt != FINDING_FORMAT:
            raise CrashDumpError(f"{path}: finding format {fmt!r} is not one this xenpv reads ({FINDING_FORMAT})")
        try:
            record = RunRecord.from_dict(data["record"], f"{path}: record") if data.get("record") else None
            return Failure(path, str(data["finding"]), str(data["bucket"]), str(data["message"]).splitlines()[0],
                           record, _epoch(data.get("written", ""), path), dict(data.get("schedule", {})))
        except KeyError as exc:
            raise CrashDumpError(f"{path}: finding without {exc.args[0]!r}") from None
    dump = CrashDump.from_json(json.dumps(data), str(path))
    record = RunRecord.from_dict(dump.record, f"{path}: record") if dump.record else None
    return Failure(path, STOP, dump.bucket, dump.stop_line(), record, _epoch(dump.written, path), dump.schedule)


def write_finding(directory: Path, kind: str, bucket: str, message: str, record: RunRecord | None, *,
                  logs: Sequence[Path] = ()) -> Path:
    """A finding's dump: the watchdog's report of a hang, or of an agent or a dom0 daemon that died."""
    directory.mkdir(parents=True, exist_ok=True)
    tails = {p.name: read_tail(p, 40) for p in logs if p.exists()}
    data = {"format": FINDING_FORMAT, "kind": "finding", "finding": kind, "bucket": bucket, "message": message,
            "record": record.to_dict() if record else None, "log_tails": tails,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = directory / f"finding-{kind}.json"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"finding-{kind}-{n}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True))
    return path


def _status_word(status: int | None, signal_status: int | None) -> str:
    if signal_status:
        try:
            return f"SIGNAL_{signal.Signals(signal_status).name}"
        except ValueError:
            return f"SIGNAL_{signal_status}"
    if status is not None and status < 0:
        return _status_word(None, -status)
    return f"EXIT_{status}"


def _word(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "unknown"


# -- the domid in recorded xenstore paths ---------------------------------------------------------------

_DOMAIN_PATH = re.compile(r"(/local/domain/|(?:^|/)backend/[a-z_]+/)(\d+)(?=/|$)")


def domid_template(path: str, domid: int) -> str:
    """`path` with the guest's domid written `{domid}` where a xenstore path names a domain."""
    return _DOMAIN_PATH.sub(lambda m: m.group(1) + ("{domid}" if int(m.group(2)) == domid else m.group(2)), path)


def fill_domid(template: str, domid: int) -> str:
    return template.replace("{domid}", str(domid))


class RecordedXenstore:
    """dom0 xenstore writes and removals made for a guest, each also put in its run record, so a replay
    makes them too. Use as a context manager; paths are absolute."""

    def __init__(self, guest: Guest, socket: Path) -> None:
        if guest.domain is None:
            raise HarnessError("the guest is no Xen domain: it has no xenstore")
        self.guest = guest
        self.domid = guest.domain.domid
        self.xs = XsClient(socket)

    def _record(self, **data: Any) -> None:
        if self.guest.record is not None:
            self.guest.record.event(XENSTORE, **data)

    def write(self, path: str, value: str) -> None:
        self._record(op="write", path=domid_template(path, self.domid), value=value)
        self.xs.write(path, value)

    def rm(self, path: str) -> None:
        self._record(op="rm", path=domid_template(path, self.domid))
        self.xs.rm(path)

    def close(self) -> None:
        self.xs.close()

    def __enter__(self) -> "RecordedXenstore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- what of a record is replayed ------------------------------------------------------------------------

INTERNAL_PREFIX = "lifecycle "  # console commands only the harness issues, with arguments of one machine
SAVE_IMAGE = "replay-save.img"


def replayable(events: Sequence[RecordEvent]) -> list[RecordEvent]:
    """The actions of a record without the console lines a lifecycle action made the agent run: every
    `lifecycle ...` line, and the `power S4` a hibernation sent (the replay's hibernation sends it again)."""
    out: list[RecordEvent] = []
    after_hibernate = False
    for event in events:
        line = event.line
        if event.kind in (CONSOLE, FAULT) and line is not None:
            if line.startswith(INTERNAL_PREFIX) or (after_hibernate and line == "power S4"):
                after_hibernate = False
                continue
            after_hibernate = False
        elif event.kind == LIFECYCLE:
            after_hibernate = event.data.get("op") == "hibernate"
        out.append(event)
    return out


# -- the guest a record names ---------------------------------------------------------------------------

def guest_from_record(record: RunRecord, workdir: Path) -> GuestDefinition:
    """The recorded guest: its original file when that still holds the recorded text, else the recorded
    text written to `workdir/<name>.yaml` (image paths in it are then relative to `workdir`)."""
    original = Path(record.guest_path)
    try:
        if original.is_file() and original.read_text() == record.guest_yaml:
            return load_guest(original)
    except OSError:
        pass
    workdir.mkdir(parents=True, exist_ok=True)
    copy = workdir / f"{_word(record.guest_name)}.yaml"
    copy.write_text(record.guest_yaml)
    return load_guest(copy)


def record_for(guest_yaml: str, guest_name: str, seed: int, schedule: Schedule,
               events: Sequence[RecordEvent]) -> RunRecord:
    """A record to replay made from its parts (the regression tests --minimize writes)."""
    return new_record(guest_name, "", guest_yaml, seed, schedule=schedule).with_events(events)


# -- the environment --------------------------------------------------------------------------------------

class ReplayEnv:
    """dom0 for a series of replays, and the runs made in it; artifacts under `artifacts`."""

    def __init__(self, artifacts: Path, *, qemu: str | None = None) -> None:
        self.artifacts = artifacts
        self.qemu = qemu
        self.host: HostServices | None = None
        self.backends: Dom0Backends | None = None
        self._dom0s = 0
        self.runs = 0

    def __enter__(self) -> "ReplayEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.backends is not None:
                self.backends.stop()
        finally:
            self.backends = None
            if self.host is not None:
                self.host.stop()
            self.host = None

    def dom0(self) -> tuple[HostServices, Dom0Backends]:
        """dom0, started now or reused; a back-end a run killed is started again, and dom0 is made anew
        when one of its daemons died."""
        if self.host is not None and self.backends is not None:
            dead = [p.name for p in self.host.processes() + self.backends.processes() if not p.alive()]
            if dead:
                log.warning("dom0 daemons died (%s): starting dom0 anew", ", ".join(dead))
                self.close()
            else:
                for name in BACKENDS:
                    if self.backends.backend(name) is None:
                        self.backends.start_backend(name)
                return self.host, self.backends
        self._dom0s += 1
        logs = self.artifacts / f"dom0-{self._dom0s}"
        host = HostServices.start(logs)
        try:
            backends = Dom0Backends.start(host, logs)
        except BaseException:
            host.stop()
            raise
        self.host, self.backends = host, backends
        return host, backends

    def dead_daemons(self, expected_down: set[str] = frozenset()) -> list[str]:
        """dom0 daemons that died (a back-end a recorded action killed is not one)."""
        if self.host is None or self.backends is None:
            return []
        died = [p for p in self.host.processes() if not p.alive()]
        died += [p for p in self.backends.processes() if not p.alive() and p.name not in expected_down]
        return [f"{p.name} ({describe_status(p.returncode)})" for p in died]

    def boot(self, guest: GuestDefinition, run_dir: Path, *, schedule: Schedule, labels: dict[str, str],
             timeout: float = BOOT_TIMEOUT) -> tuple[Machine, Guest]:
        host, backends = self.dom0()
        machine = Machine(guest, run_dir, binary=self.qemu, name=_word(guest.name))
        machine.launch()
        try:
            booted = Guest.boot(host, machine, timeout, backends=backends, schedule=schedule, labels=labels)
        except BaseException:
            machine.shutdown()
            self._release_taps()
            raise
        return machine, booted

    def _release_taps(self) -> None:
        if self.backends is not None:
            for domid in list(self.backends.taps):
                try:
                    self.backends.release(domid)
                except HarnessError as exc:
                    log.warning("TAPs of domain %d: %s", domid, exc)

    def finish(self, machine: Machine, guest: Guest) -> None:
        try:
            guest.shutdown()
        finally:
            try:
                machine.shutdown()
            finally:
                self._release_taps()

    # -- actions --------------------------------------------------------------------------------------

    def apply(self, guest: Guest, event: RecordEvent, *, watchdog: float = COMMAND_WATCHDOG) -> str:
        """Carry out one recorded action on `guest`; its console output for a console line."""
        if event.kind in (CONSOLE, FAULT):
            if event.line is None:
                raise NotReplayable(f"{event.kind} event without a line: {event.data}")
            if event.line.strip() == "power S4" and guest.domain is not None:
                return self._lifecycle(guest, "hibernate", event)
            return guest.console.run(event.line, timeout=watchdog)
        if event.kind == LIFECYCLE:
            return self._lifecycle(guest, str(event.data.get("op")), event)
        if event.kind == DOM0:
            assert self.backends is not None
            action, name = event.data.get("action"), event.data.get("backend")
            if name not in BACKENDS:
                raise NotReplayable(f"dom0 event for back-end {name!r} (replays know {', '.join(BACKENDS)})")
            running = self.backends.backend(name) is not None
            if action == "backend-kill":
                if running:
                    self.backends.kill(name)
            elif action == "backend-start":
                if not running:  # a minimised record may start a back-end it never killed
                    self.backends.start_backend(name)
            elif action == "backend-restart":
                self.backends.restart(name) if running else self.backends.start_backend(name)
            else:
                raise NotReplayable(f"dom0 action {action!r}")
            return ""
        if event.kind == XENSTORE:
            assert self.host is not None and guest.domain is not None
            op, template = event.data.get("op"), event.data.get("path")
            if op not in ("write", "rm") or not isinstance(template, str):
                raise NotReplayable(f"xenstore event {event.data}")
            path = fill_domid(template, guest.domain.domid)
            with RecordedXenstore(guest, self.host.xenstored_socket) as xs:
                try:
                    if op == "write":
                        xs.write(path, str(event.data.get("value", "")))
                    else:
                        xs.rm(path)
                except HarnessError as exc:  # ENOENT, EACCES...: what the recorded run saw too, likely
                    return f"xenstore {op} {path}: {exc}"
            return ""
        replayer = REPLAYERS.get(event.kind)
        if replayer is None:
            raise NotReplayable(f"no replayer for {event.kind!r} events (known: console, fault, dom0, xenstore"
                                + "".join(f", {k}" for k in sorted(REPLAYERS)) + ")")
        replayer(self, guest, event)
        return ""

    def _lifecycle(self, guest: Guest, op: str, event: RecordEvent) -> str:
        """A lifecycle action; one the guest refuses (vetoed, in the wrong state) is its answer, as it was
        the recorded run's, not a finding. A STOP during it raises GuestBugcheck as any console line."""
        image = guest.artifacts / SAVE_IMAGE
        try:
            if op == "hibernate":
                guest.hibernate()
            elif op == "power-on":
                return guest.power_on()
            elif op == "migrate":
                guest.migrate()
            elif op == "save":
                guest.save(image, checkpoint=bool(event.data.get("checkpoint")))
            elif op == "restore":
                guest.restore(image)
            else:
                raise NotReplayable(f"lifecycle operation {op!r}")
        except LifecycleError as exc:
            return f"{op}: {exc}"
        return ""

    # -- a whole replay -------------------------------------------------------------------------------

    def replay(self, record: RunRecord, events: Sequence[RecordEvent] | None = None, *, name: str | None = None,
               schedule: Schedule | None = None, pace: str = "recorded", labels: dict[str, str] | None = None,
               watchdog: float = COMMAND_WATCHDOG) -> Outcome:
        """Boot the recorded guest and replay `events` (default: the record's); the outcome."""
        self.runs += 1
        events = replayable(record.events if events is None else events)
        run_dir = self.artifacts / (name or f"run-{self.runs}")
        guest_def = guest_from_record(record, run_dir)
        labels = {**record.labels, "replay-of": record.guest_name, **(labels or {})}
        try:
            machine, guest = self.boot(guest_def, run_dir, schedule=schedule or record.schedule, labels=labels)
        except GuestBugcheck as stop:
            return Outcome(STOP, f"the guest stopped while booting: {stop.dump.stop_line()}", stop.bucket,
                           stop.dump_path, 0, stop.dump.schedule)
        except HarnessTooSlow as late:
            return Outcome(TOO_SLOW, f"while booting: {late}")
        except NotModelledPath as limit:
            return Outcome(NOT_MODELLED, f"while booting: {limit}")
        except AgentExited as exc:
            return self._died(AGENT_EXIT, f"AGENT_{_status_word(exc.status, exc.signal_status)}", str(exc),
                              run_dir, 0)
        try:
            return self._drive(machine, guest, events, run_dir, pace, watchdog)
        finally:
            self.finish(machine, guest)

    def _drive(self, machine: Machine, guest: Guest, events: Sequence[RecordEvent], run_dir: Path, pace: str,
               watchdog: float) -> Outcome:
        start = time.monotonic()
        base = events[0].t if events else 0.0
        down: set[str] = set()
        for index, event in enumerate(events, start=1):
            if pace == "recorded":
                due = start + min(event.t - base, MAX_PACE_GAP * index)
                time.sleep(max(0.0, min(due - time.monotonic(), MAX_PACE_GAP)))
            outcome = self.step(guest, event, index, run_dir, down, watchdog=watchdog)
            if outcome is not None:
                return outcome
        outcome = self.check_dom0(machine, guest, len(events), run_dir, down)
        if outcome is not None:
            return outcome
        return Outcome(CLEAN, f"all {len(events)} actions replayed; the guest did not stop", actions=len(events))

    def step(self, guest: Guest, event: RecordEvent, index: int, run_dir: Path, down: set[str], *,
             watchdog: float = COMMAND_WATCHDOG) -> Outcome | None:
        """Apply action number `index`; the outcome if it ended the run (a STOP, a hang, a death), else
        None. `down`: the back-ends recorded actions killed (kept up to date)."""
        try:
            self.apply(guest, event, watchdog=watchdog)
        except GuestBugcheck as stop:
            return Outcome(STOP, stop.dump.stop_line(), stop.bucket, stop.dump_path, index, stop.dump.schedule)
        except HarnessTooSlow as late:
            return Outcome(TOO_SLOW, f"action {index} ({event.describe()}): {late}", actions=index)
        except NotModelledPath as limit:
            return Outcome(NOT_MODELLED, f"action {index} ({event.describe()}): {limit}", actions=index)
        except AgentExited as exc:
            return self._died(AGENT_EXIT, f"AGENT_{_status_word(exc.status, exc.signal_status)}",
                              f"action {index} ({event.describe()}): {exc}", run_dir, index, guest)
        except ProcessDied as exc:
            kind = MACHINE_DIED if exc.name.startswith("QEMU") else DOM0_DIED
            word = "QEMU" if kind == MACHINE_DIED else f"DOM0_{_word(exc.name.split()[0])}"
            return self._died(kind, f"{word}_{_status_word(exc.returncode, None)}",
                              f"action {index} ({event.describe()}): {exc}", run_dir, index, guest)
        except WaitTimeout as exc:
            return self._hang(guest, event, index, str(exc), run_dir)
        except NotReplayable as exc:
            return Outcome(UNREPLAYABLE, f"action {index}: {exc}", actions=index)
        if event.kind == DOM0:
            name = str(event.data.get("backend"))
            if event.data.get("action") == "backend-kill":
                down.add(name)
            else:
                down.discard(name)
        return None

    def check_dom0(self, machine: Machine, guest: Guest, index: int, run_dir: Path, down: set[str]) -> Outcome | None:
        """A dom0 daemon or QEMU that died without an action killing it: a finding. The machine checked is
        the guest's current one (a power-on or a restore gives it a new one); a guest that is off or saved
        has none."""
        dead = self.dead_daemons(down)
        if dead:
            return self._died(DOM0_DIED, f"DOM0_{_word(dead[0].split()[0])}_DIED", "dom0 daemons died: " +
                              ", ".join(dead), run_dir, index, guest)
        if guest.state != "running":
            return None
        try:
            guest.machine.check_alive("after the replay")
        except ProcessDied as exc:
            return self._died(MACHINE_DIED, f"QEMU_{_status_word(exc.returncode, None)}", str(exc), run_dir,
                              index, guest)
        return None

    def _record_of(self, guest: Guest | None) -> RunRecord | None:
        if guest is None or guest.record is None:
            return None
        try:
            return read_journal(guest.record.path)
        except RunRecordError as exc:
            log.warning("run record of the finding unreadable: %s", exc)
            return None

    def _died(self, kind: str, bucket: str, message: str, run_dir: Path, index: int,
              guest: Guest | None = None) -> Outcome:
        record = self._record_of(guest) if guest is not None else self._record_from(run_dir)
        logs = [run_dir / n for n in ("console.log", "agent.log", "qemu.log")]
        if self.host is not None:
            logs += [self.host.logs / n for n in ("xenhv.log", "xenstored.log")]
        path = write_finding(run_dir, kind, bucket, message, record, logs=logs)
        return Outcome(kind, message.splitlines()[0], bucket, path, index)

    def _record_from(self, run_dir: Path) -> RunRecord | None:
        try:
            return read_journal(run_dir / "run-record.jsonl")
        except RunRecordError:
            return None

    def _hang(self, guest: Guest, event: RecordEvent, index: int, why: str, run_dir: Path) -> Outcome:
        """The watchdog: a console line that did not come back. The agent's threads' Python stacks go to
        its console log first (SIGUSR1, base.crashtrace), so the finding shows where it hangs."""
        try:
            os.kill(guest.console.child.pid, signal.SIGUSR1)
            time.sleep(0.5)
            guest.console.child.expect(r"\$\$never\$\$", timeout=0.5)  # let pexpect copy the output to the log
        except Exception:  # noqa: BLE001 - the report goes out with what there is
            pass
        word = (event.line or "").split()[0] if event.line else event.kind
        bucket = f"HANG_{_word(word)}"
        message = f"action {index} ({event.describe()}) did not come back: {why}"
        path = write_finding(run_dir, HANG, bucket, message, self._record_of(guest),
                             logs=[run_dir / "console.log", run_dir / "agent.log"])
        return Outcome(HANG, message, bucket, path, index)


def require_record(failure: Failure) -> RunRecord:
    if failure.record is None:
        raise ConfigError(f"{failure.path}: the dump holds no run record (written before run records, or by a "
                          "guest the harness did not start), so it cannot be replayed")
    return failure.record
