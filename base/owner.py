"""Who owns a run's resources, so that what a dead run left behind can be found and removed.

The owner of a run is the harness process that made its resources (the `xenpv` command, or the pytest
process or xdist worker), identified by its pid and its start time (field 22 of /proc/<pid>/stat, in
clock ticks after boot): a pid alone is reused, the pair is not. It is written `<pid>.<start>`:

- in the name of every run directory and network namespace (`xpv-<tag>-<pid>.<start>-<random>`), so
  the resource says who made it from the moment it exists;
- in the environment of every process the harness starts (`XENPV_OWNER`), which its children inherit,
  so the processes of a run are found by reading /proc/<pid>/environ, whatever process group they ended
  up in.

An owner is alive while a process with that pid and that start time exists and is not a zombie.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ENV = "XENPV_OWNER"
_ENV_PREFIX = ENV.encode() + b"="
_OWNER_RE = re.compile(r"(\d+)\.(\d+)")


@dataclass(frozen=True)
class ProcStat:
    """What the reaper (and the benchmarks' CPU figures) need of /proc/<pid>/stat."""

    pid: int
    state: str
    ppid: int
    pgid: int
    start: int
    cpu_ticks: int  # utime + stime, in clock ticks: CPU the process has used


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/<pid>/stat, or None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and parentheses.
    fields = raw[raw.rindex(b")") + 2:].split()
    return ProcStat(pid, fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[19]),
                    int(fields[11]) + int(fields[12]))


@dataclass(frozen=True)
class Owner:
    pid: int
    start: int

    def __str__(self) -> str:
        return f"{self.pid}.{self.start}"

    @classmethod
    def parse(cls, text: str) -> "Owner | None":
        m = _OWNER_RE.fullmatch(text)
        return cls(int(m.group(1)), int(m.group(2))) if m else None

    @classmethod
    def of(cls, pid: int) -> "Owner | None":
        st = proc_stat(pid)
        return None if st is None else cls(pid, st.start)

    @classmethod
    def current(cls) -> "Owner":
        # Not cached: a forked child is an owner of its own.
        owner = cls.of(os.getpid())
        assert owner is not None, "/proc/self/stat is unreadable"
        return owner

    def alive(self) -> bool:
        st = proc_stat(self.pid)
        return st is not None and st.start == self.start and st.state not in ("Z", "X")


def child_env(base: dict[str, str] | None = None, owner: Owner | None = None) -> dict[str, str]:
    """The environment for a child process: `base` (default: ours) marked with its owner (default: us)."""
    env = dict(os.environ if base is None else base)
    env[ENV] = str(owner or Owner.current())
    return env


@dataclass(frozen=True)
class MarkedProcess:
    pid: int
    pgid: int
    owner: Owner


def marked_processes() -> Iterator[MarkedProcess]:
    """Every live (not zombie) process whose environment names an owner."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for var in environ.split(b"\0"):
            if var.startswith(_ENV_PREFIX):
                owner = Owner.parse(var[len(_ENV_PREFIX):].decode("ascii", "replace"))
                st = proc_stat(pid)
                if owner is not None and st is not None and st.state not in ("Z", "X"):
                    yield MarkedProcess(pid, st.pgid, owner)
                break
