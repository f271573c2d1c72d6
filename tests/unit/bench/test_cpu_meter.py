"""The benchmarks' CPU figures (harness/bench/cpu.py): /proc/stat's busy fields and a process's own
utime + stime, turned into cores over a run."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xenpv.harness.bench.cpu import TICKS_PER_SECOND, CpuMeter, machine_busy_ticks, process_ticks


def test_busy_is_every_field_but_idle_and_iowait(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice (guest time is inside user already)
    stat.write_text("cpu  1 2 4 1000 2000 8 16 32 64 128\ncpu0 1 2 4 1000 2000 8 16 32 64 128\nintr 5\n")
    assert machine_busy_ticks(stat) == 1 + 2 + 4 + 8 + 16 + 32


def test_a_stat_file_without_the_cpu_line_is_an_error(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu0 1 2 3 4\n")
    with pytest.raises(RuntimeError, match="no aggregate cpu line"):
        machine_busy_ticks(stat)


def test_a_process_that_is_gone_counts_nothing() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_ticks([child.pid]) == 0


def _spin(cpu_seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < cpu_seconds:
        pass


def test_the_meter_counts_the_cpu_a_process_used_over_the_run() -> None:
    meter = CpuMeter({"me": [os.getpid()], "nobody": []}).start()
    _spin(0.3)
    meter.stop()
    assert meter.group_cores["nobody"] == 0
    # utime + stime move in whole ticks (10 ms at 100 Hz): 0.3 s of CPU, give or take a few.
    assert meter.group_cores["me"] * meter.seconds == pytest.approx(0.3, abs=4 / TICKS_PER_SECOND)
    # The machine was busy at least while this process was.
    assert meter.machine_cores * meter.seconds >= 0.3 - 4 / TICKS_PER_SECOND


def test_stop_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="before it started"):
        CpuMeter({}).stop()
