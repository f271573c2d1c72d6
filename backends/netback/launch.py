"""Start netback as a supervised process (tests and the bench)."""
from __future__ import annotations

import json
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


def read_vif_stats(stats_path: Path, vif: str, netback: Supervised | None = None,
                   timeout: float = 2.0) -> dict[str, int]:
    """One vif's counters from netback's --stats file, once the file names it.

    netback rewrites the file every STATS_INTERVAL, so a vif that connected and carried traffic since the
    last write is not in it yet: wait for it (failing fast if netback dies) rather than read "no vif"."""
    def entry() -> dict[str, int] | None:
        try:
            return json.loads(stats_path.read_text()).get(vif)
        except FileNotFoundError:
            return None
    return wait_for(entry, timeout=timeout, what=f"{vif} in netback's stats {stats_path}",
                    alive=[netback] if netback is not None else [])
