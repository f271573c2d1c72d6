"""Start the daemon as a supervised process (used by the harness host services, tests and the bench)."""
from __future__ import annotations

import sys
from pathlib import Path

from xenpv.base.process import Supervised, unix_socket_accepting, wait_for


def start_xenstored(socket_path: Path, log_path: Path, ring_dir: Path | None = None,
                    log_level: str = "INFO", timeout: float = 10.0, xenhv_socket: Path | None = None) -> Supervised:
    """Launch `python -m xenpv.backends.xenstored` and return once its socket accepts connections."""
    argv = [sys.executable, "-m", "xenpv.backends.xenstored", "--socket", str(socket_path),
            "--log", str(log_path), "--log-level", log_level]
    if ring_dir is not None:
        argv += ["--ring-dir", str(ring_dir)]
    if xenhv_socket is not None:
        argv += ["--xenhv", str(xenhv_socket)]
    proc = Supervised("xenstored", argv, log_path.with_suffix(".out")).start()
    try:
        wait_for(lambda: unix_socket_accepting(socket_path), timeout=timeout, what="xenstored to listen", alive=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc
