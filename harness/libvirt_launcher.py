"""The libvirt launcher (issue 17): the same machine as harness.machine, started as a libvirt domain.

`launcher: libvirt` in a guest YAML, or `--xenpv-libvirt URI` for every guest libvirt can run, makes the
pytest plugin launch a `LibvirtMachine`: the guest becomes a transient libvirt domain (virDomainCreateXML
through libvirt-python) of libvirt's QEMU driver, with the same Machine API for tests and the agent.

What libvirt's QEMU driver can run: stock qemu-system-x86_64 (libvirt probes an emulator with
`-accel kvm` and `-accel tcg` and gives up on Debian's Xen build, /usr/libexec/xen-qemu-system-i386,
which has neither: "invalid accelerator tcg"), so no xen-pvdevice, so the shapes without a Xen platform
device, such as guests/no-platform.yaml. The domain is `type='qemu'` (TCG) started paused
(VIR_DOMAIN_START_PAUSED, QEMU's -S) and never resumed: the vCPU never executes, the agent drives the
machine over qtest as on the QEMU launcher's accel=qtest machine. What the harness needs beyond libvirt's
own devices goes through the qemu:commandline namespace (libvirt taints the domain custom-argv for it):
the RAM as `memory-backend-file,share=on` in the machine's run directory (a later `-machine
memory-backend=` replaces libvirt's pc.ram), `-qtest` on the run directory's socket, the harness's QMP
socket and the device model's (libvirt owns its own monitor), and the guest's emulated disks and NICs
with the same -drive/-device arguments and ids as harness.machine.device_args.

libvirt's domain events (lifecycle; device removal for devices libvirt knows) are put into the machine's
QMP event history and qmp-events.jsonl as LIBVIRT_LIFECYCLE and LIBVIRT_DEVICE_REMOVED, so
`machine.qmp.wait_event(...)` waits for them as for QEMU's own. Teardown is virDomainDestroy (a transient
domain leaves no definition behind); the domain's QEMU log is copied into the artifacts' qemu.log.

The agent maps the RAM file and connects to the qtest socket, so the daemon must run QEMU on this
machine, as root and unconfined (qemu.conf user/group root, security_driver "none"): a remote URI
(qemu+ssh://host/system) is refused with that reason. Without a daemon (tests), harness.libvirtd
starts a private one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import libvirt

from xenpv.base.owner import ENV as OWNER_ENV, Owner
from xenpv.base.errors import ConfigError, LaunchFailure, MachineCrashed
from xenpv.base.process import read_tail, wait_for
from xenpv.base.qmp import QmpSession
from xenpv.base.rundir import make_run_dir
from xenpv.guests.schema import GuestDefinition
from xenpv.harness.machine import Machine, MachinePaths, device_args

log = logging.getLogger("harness.libvirt")

LIBVIRT_QEMU = "/usr/bin/qemu-system-x86_64"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
RAM_ID = "xenpv-ram"
DOMAIN_LOGS = Path("/var/log/libvirt/qemu")  # a system daemon's; a private one has its own
LIFECYCLE_EVENT = "LIBVIRT_LIFECYCLE"
ENDED_EVENT_WAIT = 0.5  # seconds for libvirt's STOPPED event once the domain is no longer active
DEVICE_REMOVED_EVENT = "LIBVIRT_DEVICE_REMOVED"
NO_PLATFORM_REASON = ("libvirt's QEMU driver runs stock qemu-system-x86_64, which has no Xen platform device "
                      "(xen-pvdevice); Debian's Xen build cannot be probed by libvirt")
_LOCAL_HOSTS = ("", "localhost", "127.0.0.1", "::1")


def libvirt_qemu_binary() -> str:
    return os.environ.get("XENPV_LIBVIRT_QEMU", LIBVIRT_QEMU)


@dataclass(frozen=True)
class LibvirtTarget:
    """Which daemon runs the domains: its URI, and where it writes each domain's QEMU log."""

    uri: str
    domain_logs: Path = DOMAIN_LOGS

    def __post_init__(self) -> None:
        check_local_uri(self.uri)


def check_local_uri(uri: str) -> str:
    """`uri` if its daemon runs QEMU on this machine; ConfigError naming it and why otherwise."""
    parts = urlsplit(uri)
    if not parts.scheme.startswith("qemu"):
        raise ConfigError(f"--xenpv-libvirt {uri!r}: not a QEMU driver URI (qemu:///system, "
                          "qemu:///system?socket=PATH)")
    if (parts.hostname or "") not in _LOCAL_HOSTS:
        raise ConfigError(f"--xenpv-libvirt {uri!r}: the guest agent maps QEMU's RAM file and connects to its "
                          f"qtest socket on this machine, so the daemon must run here, not on {parts.hostname}")
    return uri


def libvirt_argv(guest: GuestDefinition, paths: MachinePaths) -> list[str]:
    """What the domain's qemu:commandline adds to libvirt's QEMU command line."""
    return [
        # Later -machine options win: this replaces the memory-backend=pc.ram libvirt gives the machine.
        "-machine", f"memory-backend={RAM_ID}",
        "-object", f"memory-backend-file,id={RAM_ID},mem-path={paths.ram},size={guest.memory_mib}M,share=on",
        "-qtest", f"unix:{paths.qtest_socket},server=on,wait=off",
        "-qtest-log", "none",
        "-qmp", f"unix:{qmp_socket(paths)},server=on,wait=off",
        "-qmp", f"unix:{paths.dm_qmp_socket},server=on,wait=off",
    ] + device_args(guest, paths.image_dir)


def qmp_socket(paths: MachinePaths) -> Path:
    """The harness's own QMP socket (the QEMU launcher uses a socketpair; libvirt passes QEMU no fd of ours)."""
    return paths.run_dir / "qmp.sock"


def domain_xml(guest: GuestDefinition, *, domain: str, binary: str, paths: MachinePaths,
               security_models: tuple[str, ...] = (), owner: Owner | None = None) -> str:
    """The libvirt domain XML of `guest` (a shape without a platform device: LibvirtMachine checks).
    `security_models`: the daemon's (its capabilities' <secmodel>s); `owner`: whose QEMU it is (default us)."""
    ET.register_namespace("qemu", QEMU_NS)
    root = ET.Element("domain", type="qemu")
    ET.SubElement(root, "name").text = domain
    ET.SubElement(root, "memory", unit="MiB").text = str(guest.memory_mib)
    ET.SubElement(root, "vcpu").text = "1"
    os_ = ET.SubElement(root, "os")
    ET.SubElement(os_, "type", arch="x86_64", machine="pc").text = "hvm"
    # ACPI on, as the QEMU launcher's machine has it: the PIIX4 power-management function is on its PCI bus.
    ET.SubElement(ET.SubElement(root, "features"), "acpi")
    for when in ("on_poweroff", "on_reboot", "on_crash"):
        ET.SubElement(root, when).text = "destroy"
    devices = ET.SubElement(root, "devices")
    ET.SubElement(devices, "emulator").text = binary
    # libvirt adds a USB controller and a balloon unless told not to; the harness's machine has neither.
    ET.SubElement(devices, "controller", type="usb", model="none")
    ET.SubElement(devices, "memballoon", model="none")
    if "dac" in security_models:
        # A daemon that runs QEMU as its own user (Debian's: libvirt-qemu): this one runs as root, as the
        # QEMU launcher's does, since it makes its sockets and RAM file in the harness's run directory
        # (0700, root's) and relabelling that would change what the harness owns.
        label = ET.SubElement(root, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(label, "label").text = "+0:+0"
    cmdline = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in libvirt_argv(guest, paths):
        ET.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=arg)
    # libvirt gives QEMU an environment of its own: the owner's mark (base.owner) is put back, so if the
    # harness dies without its teardown, the next run's reaper (or `xenpv clean`) finds and kills the QEMU
    # of a daemon that outlives it, and the transient domain goes with it.
    ET.SubElement(cmdline, f"{{{QEMU_NS}}}env", name=OWNER_ENV, value=str(owner or Owner.current()))
    return ET.tostring(root, encoding="unicode")


def _constant_names(prefix: str, *, words: bool) -> dict[int, str]:
    """libvirt's constants <prefix><NAME> as {value: name}, lower case; `words`: NAME may hold underscores
    (a detail such as SUSPENDED_API_ERROR), else it is one word (an event, not VIR_DOMAIN_EVENT_ID_...)."""
    return {getattr(libvirt, k): k[len(prefix):].lower() for k in dir(libvirt)
            if k.startswith(prefix) and (words or "_" not in k[len(prefix):])}


LIFECYCLE_NAMES = _constant_names("VIR_DOMAIN_EVENT_", words=False)


def lifecycle_record(domain: str, event: int, detail: int) -> dict[str, Any]:
    """A libvirt lifecycle event as a QMP-shaped event record (libvirt-domain.h's enum names)."""
    name = LIFECYCLE_NAMES.get(event, str(event))
    details = _constant_names(f"VIR_DOMAIN_EVENT_{name.upper()}_", words=True)
    return _record(LIFECYCLE_EVENT, {"domain": domain, "event": name, "detail": details.get(detail, str(detail))})


def _record(event: str, data: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    return {"event": event, "data": data, "source": "libvirt",
            "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}}


# libvirt delivers domain events only on connections opened after an event loop was registered, and runs
# their callbacks on the thread that runs the loop: one of each per process.
_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        # Errors come back as libvirtError; the default handler would also print each one on stderr.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    log.error("libvirt event loop iteration failed")
                    time.sleep(0.1)

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def open_connection(uri: str) -> libvirt.virConnect:
    _ensure_event_loop()
    try:
        return libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise LaunchFailure(f"cannot connect to libvirt at {uri}: {exc.get_error_message()}") from None


def security_models(conn: libvirt.virConnect) -> tuple[str, ...]:
    """The security drivers the daemon confines QEMU with (its capabilities' host/secmodel/model)."""
    host = ET.fromstring(conn.getCapabilities()).find("host")
    return tuple(m.text or "" for m in host.iterfind("secmodel/model")) if host is not None else ()


def daemon_answers(uri: str) -> bool:
    """True if a libvirt daemon answers at `uri` (the plugin starts a private one when none does)."""
    try:
        open_connection(uri).close()
        return True
    except LaunchFailure:
        return False


class DomainGone(MachineCrashed):
    """The libvirt domain's QEMU is gone (libvirt gives no exit status: its last lifecycle event instead)."""

    def __init__(self, name: str, why: str, log_tail: str, during: str = "") -> None:
        self.name, self.returncode, self.log_tail, self.during = name, None, log_tail, during
        where = f" while {during}" if during else ""
        Exception.__init__(self, f"{name} died{where}: {why}\n--- last lines of its log ---\n"
                                 f"{log_tail.rstrip() or '(no output)'}")


@dataclass(eq=False)
class _DomainWatch:
    """What waits check for a libvirt machine (Machine._watched): the domain is still active."""

    machine: "LibvirtMachine"

    def check_alive(self, during: str = "") -> None:
        if (err := self.machine._crash_report(during)) is not None:
            raise err


class LibvirtMachine(Machine):
    """A Machine whose QEMU is a transient libvirt domain of `target`'s daemon (see the module text)."""

    def __init__(self, guest: GuestDefinition, artifacts: Path, *, target: LibvirtTarget,
                 binary: str | None = None, name: str | None = None, image_dir: Path | None = None) -> None:
        if guest.platform:
            raise LaunchFailure(f"{guest.path}: cannot launch through libvirt: {NO_PLATFORM_REASON}")
        super().__init__(guest, artifacts, binary=binary or libvirt_qemu_binary(), name=name, image_dir=image_dir)
        self.target = target
        self.domain_name = ""
        self.domain: libvirt.virDomain | None = None
        self._conn: libvirt.virConnect | None = None
        self._callbacks: list[int] = []
        self._events_lock = threading.Lock()
        self._last_lifecycle: dict[str, Any] | None = None

    def launch(self, timeout: float = 10.0) -> "LibvirtMachine":
        if self._paths is not None:
            raise LaunchFailure(f"{self.name} was launched already")
        t0 = time.monotonic()
        self._paths = MachinePaths(make_run_dir(self.name), self.artifacts, self.image_dir)
        # The run directory's name is unique and names its owner: so is the domain's (a shared daemon's
        # `virsh list` shows whose it is).
        self.domain_name = f"xenpv-{self.paths.run_dir.name}"
        try:
            self._make_images()
            self.argv = [self.binary, "(libvirt)", *libvirt_argv(self.guest, self.paths)]
            (self.artifacts / "argv.txt").write_text(shlex.join(self.argv) + "\n")
            # Made before the domain, so the STARTED event has a history to go to.
            self.qmp = QmpSession(self.name, self.paths.qmp_events)
            self._conn = open_connection(self.target.uri)
            xml = domain_xml(self.guest, domain=self.domain_name, binary=self.binary, paths=self.paths,
                             security_models=security_models(self._conn))
            (self.artifacts / "domain.xml").write_text(xml + "\n")
            # Lifecycle: registered for every domain, before ours exists, or its STARTED would be missed.
            self._callbacks = [
                self._conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None),
            ]
            try:
                self.domain = self._conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)
            except libvirt.libvirtError as exc:
                raise LaunchFailure(f"{self.name}: libvirt at {self.target.uri} did not start the domain: "
                                    f"{exc.get_error_message()}\n{self._domain_log_tail()}") from None
            self._callbacks.append(self._conn.domainEventRegisterAny(
                self.domain, libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, self._on_device_removed, None))
            log.info("%s: libvirt domain %s (id %d) at %s", self.name, self.domain_name, self.domain.ID(),
                     self.target.uri)
            # libvirt returns once QEMU runs; QEMU makes the socket a moment after (wait=off: not waiting).
            wait_for(lambda: qmp_socket(self.paths).is_socket(), timeout=timeout, what="QEMU's QMP socket",
                     alive=self._watched())
        except BaseException:
            self.shutdown()
            raise
        self._connect(str(qmp_socket(self.paths)), timeout)
        self.launch_seconds = time.monotonic() - t0
        log.info("%s ready in %.0f ms (libvirt domain %s)", self.name, self.launch_seconds * 1000, self.domain_name)
        return self

    # -- libvirt's events into the machine's event history ------------------------------------------

    def _deliver(self, record: dict[str, Any]) -> None:
        # Under the lock that shutdown takes to close the history: a late event is dropped, not written
        # into a closed log.
        with self._events_lock:
            if self.qmp is not None:
                self.qmp.add_event(record)

    def _on_lifecycle(self, conn: Any, dom: libvirt.virDomain, event: int, detail: int, opaque: Any) -> None:
        if dom.name() != self.domain_name:  # registered for every domain of the daemon
            return
        record = lifecycle_record(dom.name(), event, detail)
        self._last_lifecycle = record["data"]
        self._deliver(record)

    def _on_device_removed(self, conn: Any, dom: libvirt.virDomain, alias: str, opaque: Any) -> None:
        self._deliver(_record(DEVICE_REMOVED_EVENT, {"domain": dom.name(), "device": alias}))

    # -- liveness and teardown ----------------------------------------------------------------------

    def _watched(self) -> list[Any]:
        return [_DomainWatch(self)]

    def _active(self) -> bool:
        if self.domain is None:
            return False
        try:
            return bool(self.domain.isActive())
        except libvirt.libvirtError:
            return False  # a transient domain whose QEMU ended is no longer known to libvirt

    def _crash_report(self, during: str, connection_lost: bool = False) -> MachineCrashed | None:
        """If the domain is gone, the error that says so (after a lost connection it gets up to a second)."""
        if self.domain is None:
            return None
        deadline = time.monotonic() + (1.0 if connection_lost else 0.0)
        while self._active():
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)
        # libvirt sends the event after the state changed: give it a moment, so the report says why.
        deadline = time.monotonic() + ENDED_EVENT_WAIT
        while (self._last_lifecycle is None or self._last_lifecycle["event"] != "stopped") \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        last = self._last_lifecycle
        why = (f"libvirt reported it {last['event']} ({last['detail']})" if last is not None
               else "libvirt no longer has it running")
        self._copy_domain_log()
        return DomainGone(f"QEMU ({self.name}, libvirt domain {self.domain_name})", why,
                          read_tail(self.paths.qemu_log), during)

    def check_alive(self, during: str = "") -> None:
        if self.domain is None:
            raise LaunchFailure(f"{self.name} was never launched")
        if (err := self._crash_report(during)) is not None:
            raise err

    def _domain_log(self) -> Path:
        return self.target.domain_logs / f"{self.domain_name}.log"

    def _domain_log_tail(self) -> str:
        return read_tail(self._domain_log())

    def _copy_domain_log(self) -> None:
        try:
            shutil.copyfile(self._domain_log(), self.paths.qemu_log)
        except OSError as exc:
            log.warning("%s: no copy of libvirt's QEMU log %s: %s", self.name, self._domain_log(), exc.strerror)

    def shutdown(self, timeout: float = 2.0) -> int | None:
        """virDomainDestroy (the transient domain is gone with it), then what Machine.shutdown releases."""
        self._close_qtest()
        if self.domain is not None:
            try:
                self.domain.destroy()
            except libvirt.libvirtError as exc:
                # Gone already (a transient domain whose QEMU ended is forgotten): nothing to destroy.
                if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    log.warning("%s: destroying libvirt domain %s: %s", self.name, self.domain_name,
                                exc.get_error_message())
            self._copy_domain_log()
            self.domain = None
        if self._conn is not None:
            for cb in self._callbacks:
                try:
                    self._conn.domainEventDeregisterAny(cb)
                except libvirt.libvirtError:
                    pass
            self._callbacks = []
            self._conn.close()
            self._conn = None
        with self._events_lock:
            qmp, self.qmp = self.qmp, None
        if qmp is not None:
            qmp.close()
        self._release_ram_and_run_dir()
        return None


SYSTEM_URI = "qemu:///system"


@contextlib.contextmanager
def session_target(uri: str | None, logs: Path) -> Iterator[LibvirtTarget]:
    """The daemon for a session's libvirt machines: `uri` (--xenpv-libvirt) if given, else a system daemon
    that answers at qemu:///system, else a private libvirtd (harness.libvirtd, its log in `logs`) started
    now and stopped when the session ends."""
    if uri:
        yield LibvirtTarget(uri)
        return
    if daemon_answers(SYSTEM_URI):
        yield LibvirtTarget(SYSTEM_URI)
        return
    from xenpv.harness.libvirtd import PrivateLibvirtd
    daemon = PrivateLibvirtd.start(logs / "libvirtd.log")
    try:
        yield LibvirtTarget(daemon.uri, daemon.domain_logs)
    finally:
        daemon.stop()
