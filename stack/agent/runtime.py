"""The guest's runtime: its CPU (qtest + RAM mapping + trap link to xenhv), its kernel, its drivers,
and what happens when it stops (a bugcheck: STOP screen and crash dump)."""
from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from xenpv.base.runrecord import RunJournal, RunRecordError, Schedule, SCHEDULE_SEEDED, console_kind
from xenpv.guests.schema import GuestDefinition
from xenpv.stack.drivers.boot import boot_stack, inbox_catalog
from xenpv.stack.install.catalog import RegistryCatalog
from xenpv.stack.install.guest import install_from_guest
from xenpv.stack.install.installer import installed_packages, installed_version
from xenpv.stack.kernel import S5, BugCheck, Kernel, Registry
from xenpv.stack.kernel.clock import SystemClock
from xenpv.stack.kernel.schedule import Scheduler
from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.stack.vcpu.guestmem import GuestMemory
from xenpv.stack.vcpu.hypervisor import HypervisorLink
from xenpv.stack.vcpu.pci import PciFunction
from xenpv.stack.vcpu.qtest import Qtest

log = logging.getLogger("stack.agent")


class Service(Protocol):
    """A Windows service of the guest (xenagent): started after each boot, stopped before each shutdown."""

    def stop(self) -> None: ...


# The services installed in this Windows: factory(runtime) -> a started Service, or None when what it
# belongs to is not installed. stack.agent.winpower registers xenagent's (the package imports it).
SERVICE_FACTORIES: list[Callable[["GuestRuntime"], Service | None]] = []


@dataclass
class AgentConfig:
    guest: GuestDefinition
    qtest_socket: Path
    ram_path: Path
    registry_path: Path
    dump_dir: Path
    transcript: Path
    hv_socket: Path | None = None
    domid: int | None = None
    record: Path | None = None  # the run record's journal (base.runrecord) the console appends to
    schedule: Schedule = field(default_factory=Schedule)


@dataclass
class GuestRuntime:
    config: AgentConfig
    qtest: Qtest
    memory: GuestMemory
    vcpu: Vcpu
    kernel: Kernel
    link: HypervisorLink | None = None
    pci: list[PciFunction] = field(default_factory=list)
    stopped: BugCheck | None = None
    drivers: Any = None  # what the driver stack's boot returned (its handles for the console)
    boots: int = 1
    journal: RunJournal | None = None
    scheduler: Scheduler | None = None
    services: list[Service] = field(default_factory=list)
    # Held by a power transition a service asked for (stack.agent.winpower); console commands wait for it.
    power_lock: threading.RLock = field(default_factory=threading.RLock)
    clock: SystemClock | None = None  # the RTC: it outlives each boot
    _transcript: TextIO | None = None

    @classmethod
    def connect(cls, config: AgentConfig) -> "GuestRuntime":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(config.qtest_socket))
        transcript = open(config.transcript, "a")
        qtest = Qtest(sock, transcript=transcript)
        memory = GuestMemory(config.ram_path, config.guest.memory_mib << 20)
        link = None
        if config.hv_socket is not None:
            if config.domid is None:
                raise ValueError("a hypervisor link needs the domain id")
            link = HypervisorLink(config.hv_socket, config.domid)
        registry = Registry.load(config.registry_path) if config.registry_path.exists() else Registry(config.registry_path)
        scheduler = Scheduler(config.schedule.seed) if config.schedule.mode == SCHEDULE_SEEDED else None
        journal = RunJournal.attach(config.record, "agent") if config.record is not None else None
        kernel = Kernel(registry=registry, seed=config.guest.seed, scheduler=scheduler).activate()
        return cls(config, qtest, memory, Vcpu(qtest, memory, link), kernel, link, journal=journal,
                   scheduler=scheduler, _transcript=transcript)

    def boot(self) -> None:
        """First boot installs the guest's driver packages; then firmware (PCI resources) and Windows
        boot: xen.sys, PnP from the PCI root, XENFILT, XENBUS and whatever binds their children."""
        guest = self.config.guest
        registry = self.kernel.registry
        if not installed_packages(registry):
            for result in install_from_guest(registry, guest):
                self.kernel.log.print("setup", f"installed {result.package.name} {result.package.version}"
                                      + "".join(f"; {u}" for u in result.unbound))
        self._start_windows()

    def reboot(self) -> None:
        """A Windows restart: S5 to every device, the drivers unwound, then a new Kernel over the same hive
        file (so volatile keys are gone) and the same machine booted again. The machine is not reset: the
        vCPU, qtest and the hypervisor link stay, and so do devices an earlier boot unplugged."""
        self.stop_services()
        with self.kernel.cpu.lock:
            self.kernel.power.set_system_state(S5)
        if self.drivers is not None:
            self.drivers.close()
            self.drivers = None
        registry = Registry.load(self.config.registry_path)
        self.kernel = Kernel(registry=registry, seed=self.config.guest.seed, scheduler=self.scheduler).activate()
        self.boots += 1
        self.kernel.log.print("setup", f"boot {self.boots}")
        self._start_windows()

    def module_versions(self) -> dict[str, tuple[int, int, int, int]]:
        """The builds of xen.sys, xenfilt.sys and xenbus.sys on disk: what each image's XenTouch passes."""
        versions = {}
        for module in ("XEN", "XENFILT", "XENBUS"):
            v = installed_version(self.kernel.registry, module)
            if v is not None:
                versions[module] = (v.major, v.minor, v.micro, v.build)
        return versions

    def _start_windows(self) -> None:
        guest = self.config.guest
        registry = self.kernel.registry

        def catalog(images: dict[str, Any]) -> RegistryCatalog:
            return RegistryCatalog(registry, images=images, inbox=inbox_catalog(images))

        # One write of the hive for the whole boot, not one per value (83 per boot of the default guest, a
        # third of the agent's boot time): Windows, too, writes hives back lazily, not at each RegSetValue.
        # A STOP unwinds through the batch, so its hive is written before the dump.
        with registry.batch():
            self.drivers = boot_stack(self.vcpu, guest.memory_mib << 8, kernel=self.kernel, catalog=catalog,
                                      seed=guest.seed, boot_options=guest.boot_options,
                                      module_versions=self.module_versions(), bugs=guest.bugs, build=guest.build)
        self.pci = self.drivers.pci
        self.start_services()

    def start_services(self) -> None:
        """The services of this boot (a service of an earlier boot that is still running is stopped first)."""
        self.stop_services()
        if self.clock is None:
            self.clock = SystemClock(lambda: self.kernel.registry)
        for factory in SERVICE_FACTORIES:
            service = factory(self)
            if service is not None:
                self.services.append(service)

    def stop_services(self) -> None:
        """SERVICE_CONTROL_SHUTDOWN to each, newest first; returns when they have stopped."""
        while self.services:
            service = self.services.pop()
            try:
                service.stop()
            except Exception:  # a service that fails to stop must not keep Windows from shutting down
                log.exception("stopping %r", service)

    def poll(self) -> None:
        """Deferred driver work (xenstore watches, re-enumeration) before each console command. A STOP or
        a give-up (stack.timescale) on another thread since the last command is raised here."""
        with self.power_lock:  # a power transition a service asked for ends first
            pass
        halted = self.kernel.cpu.halted
        if halted is not None:
            raise halted
        if self.drivers is not None and self.stopped is None:
            self.drivers.poll()

    def record_line(self, line: str) -> None:
        """Put a console line in the run record before it runs (a `fault` event for fault injections)."""
        if self.journal is not None:
            try:
                self.journal.event(console_kind(line), line=line)
            except (OSError, RunRecordError) as exc:  # the guest goes on; its dump will lack the line
                log.warning("console line not recorded: %s", exc)

    def write_dump(self, bugcheck: BugCheck) -> Path:
        self.stopped = bugcheck
        path = self.config.dump_dir / f"crash-{bugcheck.code:08x}.json"
        record = None
        if self.journal is not None:
            try:
                record = self.journal.read().to_dict()
            except RunRecordError as exc:  # the dump of the STOP matters more than its record
                log.error("run record not embedded in the crash dump: %s", exc)
        self.kernel.write_crash_dump(bugcheck, path, record=record)
        return path

    def close(self) -> None:
        if self.kernel.cpu.halted is None:
            self.stop_services()
        if self.drivers is not None and self.stopped is None and self.kernel.cpu.halted is None:
            # An orderly end is a Windows shutdown: S5 goes down the tree (children first), so drivers
            # close their frontends and release their interfaces, and dom0 sees them go. Devices are
            # not removed: a removal would undo the children's unplug requests for the next boot.
            try:
                with self.kernel.cpu.lock:
                    self.kernel.power.set_system_state(S5)
                self.drivers.close()
            except BaseException as exc:  # a driver that cannot unwind must not keep the process alive
                log.warning("driver stack shutdown: %r", exc)
        if self.link is not None:
            self.link.close()
        if self.journal is not None:
            self.journal.close()
        self.qtest.close()
        if self._transcript is not None:
            self._transcript.close()
        self.memory.close()
