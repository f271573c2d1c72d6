"""`Kernel`: one guest's kernel, wiring the processor, debug log, registry, PnP and power managers.

The agent builds one per boot and calls `activate()`; the Ke*/Io*/Dbg* functions then act on it. Reboot
= a new Kernel over the same registry file (volatile keys are gone because the hive is reloaded).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .bugcheck import BugCheck, CrashDump
from .debuglog import DebugLog, set_current_log
from .irql import Processor, set_current_processor
from .mm import MemoryManager
from .pnp import DriverCatalog, InMemoryCatalog, PnpManager
from .power import PowerManager
from .registry import Registry
from .schedule import Scheduler, summary

log = logging.getLogger("stack.kernel.system")

ReferenceProvider = Callable[[], Mapping[str, int]]


class Kernel:
    def __init__(self, *, registry: Registry | None = None, catalog: DriverCatalog | None = None,
                 seed: int | None = None, log_capacity: int = 10_000, power_irp_timeout: float = 5.0,
                 scheduler: Scheduler | None = None) -> None:
        # `scheduler`: the seeded scheduling mode (stack.kernel.schedule); one per guest, kept across reboots.
        self.cpu = Processor(scheduler=scheduler)
        self.log = DebugLog(log_capacity)
        self.registry = registry if registry is not None else Registry()
        self.catalog = catalog if catalog is not None else InMemoryCatalog()
        self.seed = seed
        self.pnp = PnpManager(self.registry, self.catalog, self.log)
        self.power = PowerManager(self.pnp, self.log, irp_timeout=power_irp_timeout)
        self.reference_providers: dict[str, ReferenceProvider] = {}
        # Set when the machine is known (stack.drivers.boot): physical memory for drivers.
        self.mm: MemoryManager | None = None

    def activate(self) -> Kernel:
        """Make this the kernel the module-level Windows functions act on."""
        set_current_processor(self.cpu)
        set_current_log(self.log)
        return self

    def boot(self) -> None:
        """Enumerate and start everything from the root, holding the kernel lock."""
        with self.cpu.lock:
            self.pnp.start()

    def add_reference_provider(self, name: str, provider: ReferenceProvider) -> None:
        """`provider()` -> {"XENBUS.STORE": 2, ...}: interface reference counts for the crash dump."""
        self.reference_providers[name] = provider

    def crash_dump(self, bugcheck: BugCheck, *, log_lines: int = 200,
                   record: dict[str, Any] | None = None) -> CrashDump:
        """`record`: the run record to embed (base.runrecord.RunRecord.to_dict())."""
        try:
            tree = self.pnp.dump_tree()
        except Exception as exc:  # noqa: BLE001 - the tree may be mid-update; the dump must still be written
            tree = f"<device tree unavailable: {exc!r}>"
        return CrashDump.from_bugcheck(bugcheck, device_tree=tree, reference_providers=self.reference_providers,
                                       seed=self.seed, debug_log=self.log.tail(log_lines), record=record,
                                       schedule=summary(self.cpu.scheduler))

    def write_crash_dump(self, bugcheck: BugCheck, path: str | os.PathLike[str], *,
                         record: dict[str, Any] | None = None) -> Path:
        return self.crash_dump(bugcheck, record=record).save(path)
