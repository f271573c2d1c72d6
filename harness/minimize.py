"""`xenpv repro --minimize`: delta debugging over a record's actions and their fault parameters, keeping the
bucket, then the result as a pytest regression test and as a console script.

`ddmin` is Zeller's algorithm (Zeller and Hildebrandt, "Simplifying and Isolating Failure-Inducing
Input", 2002): split the actions into n chunks, keep a chunk or a complement that still fails the same
way, refine n when none does; the result is 1-minimal: removing any single action loses the bucket.
Then `simplify_parameters` tries, for each remaining console line, shorter forms (trailing arguments
dropped, numbers made 0) and keeps each that still fails the same way.

Every test is a full replay (harness.replay): a new machine, domain and agent, so a minimisation of n
actions costs O(n log n) boots at best and O(n^2) at worst; results are cached by the set of actions.

The console script (`<name>.console`) holds the guest's console lines as typed at `guest> `, with dom0
actions as `!` lines, and a header naming the guest YAML, the schedule and the expected bucket;
`xenpv repro <name>.console` replays it (`parse_console_script`).
"""
from __future__ import annotations

import logging
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from xenpv.base.errors import ConfigError
from xenpv.base.runrecord import (DOM0, LIFECYCLE, XENSTORE, RecordEvent, RunRecord, Schedule, console_kind,
                                  new_record)

log = logging.getLogger("harness.minimize")

T = TypeVar("T")


def ddmin(items: Sequence[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """A 1-minimal sub-sequence of `items` (order kept) for which `fails` holds; `fails(items)` must hold.
    The empty sequence is tried first (a failure with no actions at all)."""
    current = list(items)
    if fails([]):
        return []
    n = 2
    while len(current) >= 2:
        size = len(current)
        bounds = [size * i // n for i in range(n + 1)]
        chunks = [current[bounds[i]:bounds[i + 1]] for i in range(n)]
        for chunk in chunks:
            if chunk and fails(chunk):
                current, n = chunk, 2
                break
        else:
            for i in range(n):
                complement = [x for j, c in enumerate(chunks) if j != i for x in c]
                if len(complement) < size and fails(complement):
                    current, n = complement, max(n - 1, 2)
                    break
            else:
                if n >= size:
                    break
                n = min(2 * n, size)
    return current


_NUMBER = re.compile(r"^(0x[0-9a-fA-F]+|\d+)$")


def simpler_lines(line: str) -> list[str]:
    """Shorter forms of a console line, simplest first: trailing numeric arguments dropped (those are the
    optional parameters of fault injections), then each number other than 0 made 0."""
    try:
        words = shlex.split(line)
    except ValueError:
        return []
    out: list[str] = []
    end = len(words)
    while end > 2 and _NUMBER.match(words[end - 1]):
        end -= 1
        out.append(shlex.join(words[:end]))
    for i in range(1, len(words)):
        if _NUMBER.match(words[i]) and int(words[i], 0) != 0:
            out.append(shlex.join(words[:i] + ["0"] + words[i + 1:]))
    seen: list[str] = []
    for candidate in out:
        if candidate != line and candidate not in seen:
            seen.append(candidate)
    return seen


def simplify_parameters(events: list[RecordEvent], fails: Callable[[list[RecordEvent]], bool]) -> list[RecordEvent]:
    """Each console line in its simplest form that still fails the same way (one pass per line, taking the
    first simpler form that keeps the failure, until none does)."""
    events = list(events)
    for i in range(len(events)):
        changed = True
        while changed and events[i].line is not None:
            changed = False
            for candidate in simpler_lines(events[i].line or ""):
                trial = events[:i] + [replace(events[i], data={**events[i].data, "line": candidate})] + events[i + 1:]
                if fails(trial):
                    events, changed = trial, True
                    break
    return events


@dataclass
class Minimized:
    events: list[RecordEvent]
    tests: int        # replays made
    seconds: float


class Minimizer:
    """Runs ddmin then simplify_parameters with `replays(events) -> bucket or None`, caching results."""

    def __init__(self, target: str, replay: Callable[[list[RecordEvent]], str | None]) -> None:
        self.target = target
        self._replay = replay
        self._cache: dict[tuple[str, ...], bool] = {}
        self.tests = 0

    def fails(self, events: list[RecordEvent]) -> bool:
        key = tuple(e.describe() for e in events)
        if key not in self._cache:
            self.tests += 1
            bucket = self._replay(events)
            self._cache[key] = bucket == self.target
            log.info("test %d: %d actions -> %s", self.tests, len(events), bucket or "no stop")
        return self._cache[key]

    def run(self, events: Sequence[RecordEvent]) -> Minimized:
        t0 = time.monotonic()
        if not self.fails(list(events)):
            raise ConfigError(f"the full record does not reproduce {self.target}: nothing to minimise "
                              "(`xenpv repro --runs N` measures how often it does)")
        smallest = ddmin(list(events), self.fails)
        smallest = simplify_parameters(smallest, self.fails)
        return Minimized(smallest, self.tests, time.monotonic() - t0)


# -- what --minimize writes -------------------------------------------------------------------------------

def slug(bucket: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", bucket.lower()).strip("_")[:60] or "crash"


def _event_literal(e: RecordEvent) -> str:
    return f"RecordEvent(t={e.t!r}, kind={e.kind!r}, source={e.source!r}, data={e.data!r})"


def write_regression_test(path: Path, record: RunRecord, events: Sequence[RecordEvent], bucket: str,
                          source: Path, summary: str, tries: int = 1) -> Path:
    name = slug(bucket)
    actions = "\n".join(f"    {_event_literal(e)}," for e in events)
    text = f'''"""Regression test for bucket {bucket}, written by `xenpv repro --minimize` from
{source} on {time.strftime("%Y-%m-%d")}: {summary}

It boots the recorded guest ({record.guest_name}) with schedule {record.schedule.argument()} and replays
{len(events)} action(s), {tries} time(s). While the bug is there the guest stops in that bucket and this test
fails with the STOP line and the crash dump; once it is fixed the guest does not stop and the test passes.
Keep it in tests/integration/.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.base.runrecord import RecordEvent, Schedule
from xenpv.harness.replay import CLEAN, ReplayEnv, record_for

pytestmark = pytest.mark.integration

BUCKET = {bucket!r}
GUEST_YAML = {record.guest_yaml!r}
SCHEDULE = Schedule({record.schedule.mode!r}, {record.schedule.seed!r})
TRIES = {tries}  # the bug did not show on every replay when it was minimised
ACTIONS = [
{actions}
]


def test_{name}(artifacts: Path) -> None:
    record = record_for(GUEST_YAML, {record.guest_name!r}, {record.seed!r}, SCHEDULE, ACTIONS)
    with ReplayEnv(artifacts) as env:
        for _ in range(TRIES):
            outcome = env.replay(record, pace="asap")
            assert outcome.kind == CLEAN, f"{{outcome.describe()}}; dump: {{outcome.dump}} (regression bucket {{BUCKET}})"
'''
    path.write_text(text)
    return path


LIFECYCLE_OPS = ("hibernate", "power-on", "migrate", "save", "restore")


def script_line(e: RecordEvent) -> str:
    if e.line is not None:
        return e.line
    if e.kind == DOM0:
        return f"!{e.data.get('action')} {e.data.get('backend')}"
    if e.kind == LIFECYCLE:
        return f"!{e.data.get('op')}" + (" checkpoint" if e.data.get("checkpoint") else "")
    if e.kind == XENSTORE:
        if e.data.get("op") == "write":
            return f"!xenstore-write {shlex.quote(str(e.data.get('path')))} {shlex.quote(str(e.data.get('value', '')))}"
        return f"!xenstore-rm {shlex.quote(str(e.data.get('path')))}"
    raise ConfigError(f"a {e.kind} event cannot be written as a console script line")


def write_console_script(path: Path, guest_file: Path, record: RunRecord, events: Sequence[RecordEvent],
                         bucket: str, source: Path) -> Path:
    header = [
        f"# xenpv console script: the actions that lead to bucket {bucket}",
        f"# from {source} (xenpv repro --minimize, {time.strftime('%Y-%m-%d')})",
        f"# guest: {guest_file.name}",
        f"# seed: {record.seed}",
        f"# schedule: {record.schedule.argument()}",
        f"# expect: {bucket}",
        "# Replay it with `xenpv repro THIS-FILE`, or type the lines at `xenpv run GUEST --console`.",
        "# Lines starting with ! are dom0 actions, which only a replay makes: !backend-kill|backend-start|",
        "# backend-restart NAME, !xenstore-write PATH VALUE, !xenstore-rm PATH ({domid}: the guest's domain),",
        "# !hibernate, !power-on, !migrate, !save [checkpoint], !restore.",
    ]
    guest_file.write_text(record.guest_yaml)
    path.write_text("\n".join(header + [script_line(e) for e in events]) + "\n")
    return path


@dataclass(frozen=True)
class ConsoleScript:
    record: RunRecord
    expect: str | None


def parse_console_script(path: Path) -> ConsoleScript:
    """A console script as write_console_script writes it; ConfigError naming the line that is wrong."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    meta: dict[str, str] = {}
    events: list[RecordEvent] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, sep, value = line[1:].partition(":")
            if sep and key.strip() in ("guest", "seed", "schedule", "expect"):
                meta[key.strip()] = value.strip()
            continue
        t = float(len(events))
        if line.startswith("!"):
            try:
                words = shlex.split(line[1:])
            except ValueError as exc:
                raise ConfigError(f"{path}:{number}: {exc}") from None
            if len(words) == 2 and words[0] in ("backend-kill", "backend-start", "backend-restart"):
                events.append(RecordEvent(t, DOM0, "harness", {"action": words[0], "backend": words[1]}))
            elif len(words) == 3 and words[0] == "xenstore-write":
                events.append(RecordEvent(t, XENSTORE, "harness", {"op": "write", "path": words[1], "value": words[2]}))
            elif len(words) == 2 and words[0] == "xenstore-rm":
                events.append(RecordEvent(t, XENSTORE, "harness", {"op": "rm", "path": words[1]}))
            elif words and words[0] in LIFECYCLE_OPS and (len(words) == 1 or words[1:] == ["checkpoint"] and
                                                         words[0] == "save"):
                data: dict[str, object] = {"op": words[0]}
                if words[0] == "save":
                    data["checkpoint"] = len(words) == 2
                events.append(RecordEvent(t, LIFECYCLE, "harness", data))
            else:
                raise ConfigError(f"{path}:{number}: not a dom0 action: {line}")
            continue
        events.append(RecordEvent(t, console_kind(line), "agent", {"line": line}))
    if "guest" not in meta:
        raise ConfigError(f"{path}: no `# guest: FILE` line naming the guest YAML")
    guest_file = (path.parent / meta["guest"]).resolve()
    try:
        yaml_text = guest_file.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: guest {guest_file}: cannot be read: {exc.strerror}") from None
    try:
        schedule = Schedule.parse(meta.get("schedule", "os"))
        seed = int(meta.get("seed", "0"), 0)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    record = new_record(guest_file.stem, str(guest_file), yaml_text, seed, schedule=schedule)
    return ConsoleScript(record.with_events(events), meta.get("expect"))


__all__ = ["ConsoleScript", "Minimized", "Minimizer", "ddmin", "parse_console_script", "simpler_lines",
           "simplify_parameters", "write_console_script", "write_regression_test"]
