"""A domain of the hypervisor model: memory and p2m, HVM params, event channels and their doorbells, grant
table, the platform unplug ports, and its run state."""
from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from xenpv.backends.xenhv.doorbells import DoorbellTable
from xenpv.backends.xenhv.memory import DomainMemory
from xenpv.backends.xenhv.unplug import DeviceModel, PlatformPorts
from xenpv.xenabi.trap import SHARED_INFO_FRAME

log = logging.getLogger("xenhv.domain")

DEFAULT_MAX_GRANT_FRAMES = 32


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"


@dataclass
class DomainConfig:
    domid: int
    name: str
    ram_path: Path
    ram_size: int
    max_grant_frames: int = DEFAULT_MAX_GRANT_FRAMES
    max_evtchn_ports: int = 1023
    privileged: bool = False


@dataclass
class Domain:
    config: DomainConfig
    memory: DomainMemory
    platform: PlatformPorts
    doorbells: DoorbellTable
    params: dict[int, int] = field(default_factory=dict)
    state: RunState = RunState.PAUSED
    shutdown_reason: int | None = None
    upcall_fd: int | None = None
    vcpu_parked: bool = False  # in SCHEDOP_shutdown(SHUTDOWN_suspend), its trap not answered yet
    upcalls: int = 0
    on_shutdown: Callable[["Domain"], None] | None = None

    @property
    def domid(self) -> int:
        return self.config.domid

    @classmethod
    def create(cls, config: DomainConfig, dm: DeviceModel | None) -> "Domain":
        memory = DomainMemory(config.domid, config.ram_path, config.ram_size, 1 + config.max_grant_frames)
        try:
            doorbells = DoorbellTable(config.domid)
        except BaseException:
            memory.close()
            raise
        return cls(config=config, memory=memory, platform=PlatformPorts(dm, config.domid), doorbells=doorbells)

    def grant_frame_index(self, i: int) -> int:
        return SHARED_INFO_FRAME + 1 + i

    def upcall(self) -> None:
        """The vCPU's event-channel upcall: wake the guest's interrupt thread."""
        self.upcalls += 1
        if self.upcall_fd is not None:
            try:
                os.eventfd_write(self.upcall_fd, 1)
            except OSError as exc:
                log.warning("dom%d: upcall eventfd: %s", self.domid, exc)

    def close(self) -> None:
        if self.upcall_fd is not None:
            os.close(self.upcall_fd)
            self.upcall_fd = None
        self.doorbells.close()
        self.memory.close()
