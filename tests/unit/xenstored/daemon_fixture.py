"""A xenstored process per test module, in a short /tmp directory, stopped and removed at teardown."""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from xenpv.backends.xenstored.launch import start_xenstored
from xenpv.base.process import Supervised


@dataclass
class RunningDaemon:
    proc: Supervised
    sock: Path
    rundir: Path


def running_daemon(prefix: str) -> Iterator[RunningDaemon]:
    rundir = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    proc = start_xenstored(rundir / "sock", rundir / "xenstored.log")
    try:
        yield RunningDaemon(proc, rundir / "sock", rundir)
    finally:
        proc.stop()
        shutil.rmtree(rundir, ignore_errors=True)
