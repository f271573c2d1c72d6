"""Start netback as a supervised process (tests and the bench)."""
from __future__ import annotations

import sys
from pathlib import Path

from xenpv.base.process import Supervised, unix_socket_accepting, wait_for


def start_netback(xenstore: Path, xenhv: Path, vhost_socket: Path, netns: str, log_path: Path,
                  stats_path: Path | None = None, timeout: float = 10.0) -> Supervised:
    """Launch `python -m xenpv.backends.netback` and return once its vhost-user socket accepts connections."""
    vhost_socket.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "xenpv.backends.netback", "--xenstore", str(xenstore), "--xenhv", str(xenhv),
            "--vhost-socket", str(vhost_socket), "--netns", netns, "--log", str(log_path)]
    if stats_path is not None:
        argv += ["--stats", str(stats_path)]
    proc = Supervised("netback", argv, log_path.with_suffix(".out")).start()
    try:
        wait_for(lambda: unix_socket_accepting(vhost_socket), timeout=timeout, what="netback to listen",
                 alive=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc
