"""Start xenhv as a supervised process (used by the harness host services, tests and the bench)."""
from __future__ import annotations

import sys
from pathlib import Path

from xenpv.base.process import Supervised, unix_socket_accepting, wait_for


def start_xenhv(run_dir: Path, log_path: Path, verbose: bool = False, timeout: float = 10.0) -> Supervised:
    """Launch `python -m xenpv.backends.xenhv` and return once its control socket accepts connections."""
    argv = [sys.executable, "-m", "xenpv.backends.xenhv", "--run-dir", str(run_dir), "--log", str(log_path)]
    if verbose:
        argv.append("--verbose")
    proc = Supervised("xenhv", argv, log_path.with_suffix(".out")).start()
    try:
        wait_for(lambda: unix_socket_accepting(run_dir / "xenhv.sock"), timeout=timeout, what="xenhv to listen",
                 alive=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc
