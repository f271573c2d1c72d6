"""The dom0 host services: one xenhv and one xenstored per host (per test session), each a supervised
process with its sockets in one short run directory and its log in the session's artifacts."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.backends.xenhv.control import XenhvControl
from xenpv.backends.xenhv.launch import start_xenhv
from xenpv.backends.xenstored.launch import start_xenstored
from xenpv.base.process import Supervised
from xenpv.base.rundir import make_run_dir, remove_run_dir

log = logging.getLogger("harness.services")


@dataclass
class HostServices:
    run_dir: Path
    logs: Path
    xenhv: Supervised | None = None
    xenstored: Supervised | None = None
    _next_domid: int = field(default=1)

    @classmethod
    def start(cls, logs: Path) -> "HostServices":
        logs.mkdir(parents=True, exist_ok=True)
        host = cls(make_run_dir("host"), logs)
        try:
            host.xenhv = start_xenhv(host.run_dir, logs / "xenhv.log")
            host.xenstored = start_xenstored(host.xenstored_socket, logs / "xenstored.log",
                                             xenhv_socket=host.xenhv_socket)
        except BaseException:
            host.stop()
            raise
        return host

    @property
    def xenstored_socket(self) -> Path:
        return self.run_dir / "xenstored.sock"

    @property
    def xenhv_socket(self) -> Path:
        return self.run_dir / "xenhv.sock"

    def processes(self) -> list[Supervised]:
        """In stopping order: xenstored is a client of xenhv."""
        return [p for p in (self.xenstored, self.xenhv) if p is not None]

    def check_alive(self, during: str = "") -> None:
        for p in self.processes():
            p.check_alive(during)

    def xenhv_control(self) -> XenhvControl:
        self.check_alive("connecting to xenhv")
        return XenhvControl(self.xenhv_socket)

    def next_domid(self) -> int:
        """The domid the next domain will get (a test names per-domain resources, e.g. TAPs, before boot)."""
        return self._next_domid

    def allocate_domid(self) -> int:
        domid = self._next_domid
        self._next_domid += 1
        return domid

    def stop(self) -> None:
        for p in self.processes():
            p.stop()
        remove_run_dir(self.run_dir)
