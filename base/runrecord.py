"""The run record: what a guest went through, kept as it happens, so that a failure can be replayed.

Every guest the harness boots (the pytest fixtures, `xenpv run`, `xenpv repro`, `xenpv explore`) has a
journal, `run-record.jsonl` in its artifact directory. Its first line is the header: the record format, the
guest YAML as it was loaded, the guest's seed, the scheduling mode of the model's deferred work, and the
versions (commit, project, QEMU binary and version, Python, key packages). Each further line is one event,
with its time in seconds since the header was written:

- `console` and `fault`: a console line the guest ran (`fault` for the lines that inject a fault:
  `fault ...`, `bugcheck ...`); written by the guest agent as it starts the line, so it holds whatever
  drove the console (a test, a person at `xenpv run --console`, a replay);
- `dom0`: a dom0-side action the harness caused (a back-end started, killed or restarted);
- `xenstore`: a dom0 xenstore write or removal made through the harness for a test;
- `lifecycle`: a hibernation, power-on, save, restore or migration the harness made (harness.agent.Guest's
  methods), recorded before it starts; the console lines it makes the agent run (`power S4`, `lifecycle
  ...`) follow it in the record and are part of it;
- `toolstack`, and any other kind a component adds with `journal.event(kind, **data)`: recorded as given;
  a replayer must know the kind to replay it.

Two processes append to one journal (the harness and the agent), each line with a single write(2) on an
O_APPEND descriptor, so lines never interleave and the file order is the order things happened. A crash
dump embeds the record read back at the STOP (stack.kernel.bugcheck.CrashDump.record); a passing run
keeps the journal when its artifacts are kept.

The format is versioned (`RUN_RECORD_FORMAT`); a record of a format this code does not know is refused
with a RunRecordError that says which format it is and which ones are read, never half-read.

This module sits in base because both sides write into it: the agent (stack) and the harness.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Mapping

from xenpv.base.errors import ConfigError

log = logging.getLogger("base.runrecord")

RUN_RECORD_FORMAT = 1
KNOWN_FORMATS = (1,)
JOURNAL_NAME = "run-record.jsonl"

# Event kinds the harness knows how to replay (harness.replay); others are recorded as given.
CONSOLE = "console"
FAULT = "fault"
DOM0 = "dom0"
XENSTORE = "xenstore"
TOOLSTACK = "toolstack"
LIFECYCLE = "lifecycle"

# Console commands that inject a fault: recorded as `fault` events.
FAULT_COMMANDS = frozenset({"fault", "bugcheck"})

# Scheduling modes of the guest model's deferred work (stack.kernel.schedule).
SCHEDULE_OS = "os"          # DPCs in FIFO order, threads as the OS schedules them
SCHEDULE_SEEDED = "seeded"  # deferred work drained in an order drawn from the schedule seed
SCHEDULE_MODES = (SCHEDULE_OS, SCHEDULE_SEEDED)

# Packages whose versions a record names (the rest of the environment rarely changes a guest's fate).
KEY_PACKAGES = ("pexpect", "PyYAML", "qemu.qmp", "pytest")

# One event line stays below this: a longer one is refused rather than split (see `event`).
MAX_EVENT_BYTES = 64 * 1024


class RunRecordError(ConfigError, ValueError):
    """A run record that cannot be read or written: names the file (or the dump) and the reason."""


@dataclass(frozen=True)
class RecordEvent:
    t: float                  # seconds since the record's header
    kind: str                 # console, fault, dom0, xenstore, toolstack, ...
    source: str               # who wrote it: "harness" or "agent"
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def line(self) -> str | None:
        """The console line of a console or fault event."""
        value = self.data.get("line")
        return value if isinstance(value, str) else None

    def describe(self) -> str:
        if self.line is not None:
            return f"{self.kind}: {self.line}"
        args = " ".join(f"{k}={v}" for k, v in sorted(self.data.items()))
        return f"{self.kind}: {args}"


@dataclass(frozen=True)
class Schedule:
    """How the guest model schedules its deferred work (DPCs, interrupt delivery)."""

    mode: str = SCHEDULE_OS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULE_MODES:
            raise RunRecordError(f"schedule mode {self.mode!r}: must be one of {', '.join(SCHEDULE_MODES)}")
        if self.mode == SCHEDULE_SEEDED and not isinstance(self.seed, int):
            raise RunRecordError("a seeded schedule needs an integer seed")

    def argument(self) -> str:
        """As the agent's --schedule takes it: `os` or `seeded:SEED`."""
        return self.mode if self.mode == SCHEDULE_OS else f"{self.mode}:{self.seed}"

    @classmethod
    def parse(cls, text: str) -> "Schedule":
        mode, _, seed = text.partition(":")
        if mode == SCHEDULE_SEEDED:
            try:
                return cls(mode, int(seed, 0))
            except ValueError:
                raise RunRecordError(f"schedule {text!r}: `seeded:SEED` needs an integer SEED") from None
        if mode == SCHEDULE_OS and not seed:
            return cls(mode)
        raise RunRecordError(f"schedule {text!r}: must be `os` or `seeded:SEED`")


@dataclass(frozen=True)
class RunRecord:
    """A whole record: the header's fields and the events so far."""

    guest_name: str
    guest_path: str
    guest_yaml: str
    seed: int
    schedule: Schedule
    versions: dict[str, str]
    started: float                          # time.time() of the header
    labels: dict[str, str] = field(default_factory=dict)  # who made it and why (explore seed, run...)
    events: tuple[RecordEvent, ...] = ()
    format: int = RUN_RECORD_FORMAT

    def with_events(self, events: Iterable[RecordEvent]) -> "RunRecord":
        return replace(self, events=tuple(events))

    def header(self) -> dict[str, Any]:
        data = asdict(self)
        del data["events"]
        data["kind"] = "header"
        return data

    def to_dict(self) -> dict[str, Any]:
        data = self.header()
        del data["kind"]
        data["events"] = [asdict(e) for e in self.events]
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "RunRecord":
        """`where` names the file (and the place in it) for the error of a record that cannot be read."""
        if not isinstance(data, dict):
            raise RunRecordError(f"{where}: a run record must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt not in KNOWN_FORMATS:
            raise RunRecordError(f"{where}: run record format {fmt!r} is not one this xenpv reads "
                                 f"({', '.join(map(str, KNOWN_FORMATS))}); a newer xenpv wrote it, "
                                 "or it is no run record")
        try:
            schedule = Schedule(**data["schedule"])
            events = tuple(_event(e, f"{where}: event {i}") for i, e in enumerate(data.get("events", [])))
            record = cls(guest_name=str(data["guest_name"]), guest_path=str(data["guest_path"]),
                         guest_yaml=_text(data["guest_yaml"], "guest_yaml"), seed=_int(data["seed"], "seed"),
                         schedule=schedule, versions={str(k): str(v) for k, v in dict(data["versions"]).items()},
                         started=float(data["started"]),
                         labels={str(k): str(v) for k, v in dict(data.get("labels", {})).items()},
                         events=events, format=fmt)
        except KeyError as exc:
            raise RunRecordError(f"{where}: the run record has no {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, RunRecordError):
                raise
            raise RunRecordError(f"{where}: malformed run record: {exc}") from None
        return record


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _event(data: Any, where: str) -> RecordEvent:
    if not isinstance(data, dict):
        raise RunRecordError(f"{where}: must be a JSON object")
    try:
        payload = data.get("data", {})
        if not isinstance(payload, dict):
            raise ValueError("data must be an object")
        return RecordEvent(t=float(data["t"]), kind=_text(data["kind"], "kind"),
                           source=_text(data["source"], "source"), data=payload)
    except KeyError as exc:
        raise RunRecordError(f"{where}: no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise RunRecordError(f"{where}: {exc}") from None


def console_kind(line: str) -> str:
    """`fault` for a console line that injects a fault, `console` for any other."""
    words = line.split(None, 1)
    return FAULT if words and words[0] in FAULT_COMMANDS else CONSOLE


# -- the journal ----------------------------------------------------------------------------------------

_open: list["RunJournal"] = []
_open_lock = threading.Lock()


class RunJournal:
    """The append-only file of one guest's record. `create` writes the header (the harness); `attach`
    appends to an existing one (the agent). Thread-safe; each event is one write(2)."""

    def __init__(self, path: Path, started: float, source: str) -> None:
        self.path = path
        self.started = started
        self.source = source
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._lock = threading.Lock()
        with _open_lock:
            _open.append(self)

    @classmethod
    def create(cls, path: Path, record: RunRecord, source: str = "harness") -> "RunJournal":
        """A new journal at `path` (replacing one there) holding `record`'s header and events."""
        lines = [json.dumps(record.header(), sort_keys=True)]
        lines += [json.dumps(asdict(e), sort_keys=True) for e in record.events]
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # readable by the other users of a shared machine, whatever the umask
            os.write(fd, ("\n".join(lines) + "\n").encode())
        finally:
            os.close(fd)
        return cls(path, record.started, source)

    @classmethod
    def attach(cls, path: Path, source: str) -> "RunJournal":
        """Append to the journal at `path`, whose header says when the record started."""
        try:
            with open(path, encoding="utf-8") as f:
                first = f.readline()
        except OSError as exc:
            raise RunRecordError(f"{path}: cannot read the run record: {exc.strerror}") from None
        try:
            header = json.loads(first)
        except json.JSONDecodeError as exc:
            raise RunRecordError(f"{path}: line 1: not JSON ({exc.msg})") from None
        record = RunRecord.from_dict(_without_kind(header, f"{path}: line 1"), f"{path}: line 1")
        return cls(path, record.started, source)

    def event(self, kind: str, **data: Any) -> RecordEvent:
        """Record one event now. `data` must be JSON (strings, numbers, lists, objects)."""
        ev = RecordEvent(round(time.time() - self.started, 6), kind, self.source, data)
        line = (json.dumps(asdict(ev), sort_keys=True) + "\n").encode()
        if len(line) > MAX_EVENT_BYTES:
            raise RunRecordError(f"{self.path}: a {kind} event of {len(line)} bytes is over the limit of "
                                 f"{MAX_EVENT_BYTES}: record a reference to the data, not the data")
        with self._lock:
            if self._fd is None:
                raise RunRecordError(f"{self.path}: the journal is closed")
            os.write(self._fd, line)
        return ev

    def read(self) -> RunRecord:
        return read_journal(self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        with _open_lock:
            if self in _open:
                _open.remove(self)

    def __enter__(self) -> "RunJournal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _without_kind(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict) or data.get("kind") != "header":
        raise RunRecordError(f"{where}: the first line of a run record must be its header")
    return {k: v for k, v in data.items() if k != "kind"}


def read_journal(path: Path) -> RunRecord:
    """The record a journal holds now. A last line cut short (a writer killed mid-write) is left out."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise RunRecordError(f"{path}: cannot read the run record: {exc.strerror}") from None
    lines = text.split("\n")
    complete, last = lines[:-1], lines[-1]
    if last:
        log.warning("%s: its last line is incomplete and left out", path)
    if not complete:
        raise RunRecordError(f"{path}: empty run record (no header)")
    try:
        header = json.loads(complete[0])
    except json.JSONDecodeError as exc:
        raise RunRecordError(f"{path}: line 1: not JSON ({exc.msg})") from None
    data = _without_kind(header, f"{path}: line 1")
    events = []
    for number, raw in enumerate(complete[1:], start=2):
        if not raw.strip():
            continue
        try:
            events.append(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise RunRecordError(f"{path}: line {number}: not JSON ({exc.msg})") from None
    data["events"] = events
    return RunRecord.from_dict(data, str(path))


def broadcast(kind: str, **data: Any) -> int:
    """Record an event in every journal this process has open (a back-end killed under every guest of
    the host, say); returns how many got it. A journal that fails is logged, not raised: the action has
    happened and the caller must go on."""
    with _open_lock:
        journals = list(_open)
    for journal in journals:
        try:
            journal.event(kind, **data)
        except (OSError, RunRecordError) as exc:
            log.warning("%s: %s event not recorded: %s", journal.path, kind, exc)
    return len(journals)


# -- versions -------------------------------------------------------------------------------------------

_CHECKOUT = Path(__file__).resolve().parents[1]


def _run(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def _commit() -> dict[str, str]:
    if not (_CHECKOUT / ".git").exists():
        return {"commit": "unknown (not a git checkout)"}
    head = _run(["git", "-C", str(_CHECKOUT), "rev-parse", "HEAD"])
    if head is None:
        return {"commit": "unknown (git failed)"}
    dirty = _run(["git", "-C", str(_CHECKOUT), "status", "--porcelain", "--untracked-files=no"])
    return {"commit": head, "commit_dirty": "yes" if dirty else "no"}


@functools.lru_cache(maxsize=8)
def qemu_version(binary: str) -> str:
    out = _run([binary, "--version"])
    return out.splitlines()[0] if out else "unknown (not runnable)"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def collect_versions(qemu_binary: str | None = None) -> dict[str, str]:
    """What a replay elsewhere needs to know of this machine's software."""
    versions = dict(_commit())
    versions["xenpv-harness"] = _package("xenpv-harness")
    versions["python"] = platform.python_version()
    versions["python_executable"] = sys.executable
    versions["kernel"] = platform.release()
    if qemu_binary is not None:
        versions["qemu_binary"] = qemu_binary
        versions["qemu"] = qemu_version(qemu_binary)
    for name in KEY_PACKAGES:
        versions[name] = _package(name)
    return versions


def new_record(guest_name: str, guest_path: str, guest_yaml: str, seed: int, *, schedule: Schedule | None = None,
               qemu_binary: str | None = None, labels: Mapping[str, str] | None = None) -> RunRecord:
    return RunRecord(guest_name=guest_name, guest_path=guest_path, guest_yaml=guest_yaml, seed=seed,
                     schedule=schedule or Schedule(), versions=collect_versions(qemu_binary), started=time.time(),
                     labels=dict(labels or {}))
