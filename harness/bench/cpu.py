"""CPU used while a benchmark's timed run goes on: the whole machine's busy time and given processes',
in cores (1.0 = one CPU kept busy for the whole run), so a throughput figure says whether it was bounded
by the CPUs there are or by waiting."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.base.owner import proc_stat

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal; busy is everything but idle and iowait.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def machine_busy_ticks(stat: Path = Path("/proc/stat")) -> int:
    for line in stat.read_text().splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            return sum(values[i] for i in _BUSY_FIELDS if i < len(values))
    raise RuntimeError(f"{stat} has no aggregate cpu line")


def process_ticks(pids: list[int]) -> int:
    """CPU ticks used so far by `pids` (a process that is gone counts nothing)."""
    return sum(st.cpu_ticks for pid in pids if (st := proc_stat(pid)) is not None)


@dataclass
class CpuMeter:
    """Started before a timed run and stopped after it: `machine_cores` and `group_cores` (each named group
    of processes) over that run, and its length in `seconds`."""

    groups: dict[str, list[int]]
    seconds: float = 0.0  # the run's length, once stopped
    machine_cores: float = 0.0
    group_cores: dict[str, float] = field(default_factory=dict)
    _t0: float | None = None
    _machine0: int = 0
    _group0: dict[str, int] = field(default_factory=dict)

    def start(self) -> "CpuMeter":
        self._t0 = time.monotonic()
        self._machine0 = machine_busy_ticks()
        self._group0 = {name: process_ticks(pids) for name, pids in self.groups.items()}
        return self

    def stop(self) -> "CpuMeter":
        if self._t0 is None:
            raise RuntimeError("CpuMeter stopped before it started")
        self.seconds = time.monotonic() - self._t0
        per_second = TICKS_PER_SECOND * self.seconds
        self.machine_cores = (machine_busy_ticks() - self._machine0) / per_second
        self.group_cores = {name: (process_ticks(pids) - self._group0[name]) / per_second
                            for name, pids in self.groups.items()}
        return self
