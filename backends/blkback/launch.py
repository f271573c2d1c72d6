"""Start blkback as a supervised process and wait until it watches xenstore; or keep one that tests kill
and start again."""
from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from xenpv.base.process import Supervised, wait_for
from xenpv.base.runrecord import DOM0, broadcast


def start_blkback(run_dir: Path, xenstored_socket: Path, xenhv_socket: Path, log_path: Path,
                  log_level: str = "INFO", timeout: float = 10.0) -> Supervised:
    out = log_path.with_suffix(".out")
    # A blkback that was killed leaves its socket behind; only one blkback serves a host at a time.
    (run_dir / "blkback.sock").unlink(missing_ok=True)
    argv = [sys.executable, "-m", "xenpv.backends.blkback", "--xenstore", str(xenstored_socket), "--xenhv",
            str(xenhv_socket), "--vhost-socket", str(run_dir / "blkback.sock"), "--log", str(log_path),
            "--log-level", log_level]
    proc = Supervised("blkback", argv, out).start()
    try:
        wait_for(lambda: out.exists() and "blkback ready" in out.read_text(errors="replace"), timeout=timeout,
                 what="blkback to watch xenstore", alive=[proc])
    except BaseException:
        proc.stop()
        raise
    return proc


@dataclass
class RestartableBlkback:
    """A blkback that a test kills (SIGKILL: no teardown) and starts again; each start logs to its own
    `blkback-<n>.log` in `logs`. Kills and restarts go into the run record of every guest of the process
    (base.runrecord.broadcast), as the harness caused them."""

    run_dir: Path
    xenstored_socket: Path
    xenhv_socket: Path
    logs: Path
    proc: Supervised | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = start_blkback(self.run_dir, self.xenstored_socket, self.xenhv_socket,
                                  self.logs / f"blkback-{self.starts}.log")
        if self.starts > 1:
            broadcast(DOM0, action="backend-start", backend="blkback")

    def kill(self) -> None:
        assert self.proc is not None, "blkback is not running"
        self.proc.signal_group(signal.SIGKILL)
        self.proc.stop()
        self.proc = None
        broadcast(DOM0, action="backend-kill", backend="blkback")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
