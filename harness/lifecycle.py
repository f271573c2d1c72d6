"""A guest losing and regaining its domain, as the toolstack and the machine do it (ARCHITECTURE.md section 7):
Xen save, restore, checkpoint and local migration.

save (libxl's domain save): the toolstack asks the guest to suspend (control/shutdown=suspend), the guest's
XENBUS acknowledges and parks its vCPU in SCHEDOP_shutdown(SHUTDOWN_suspend); then QEMU is stopped and its
device state saved with QMP `migrate` (capability x-ignore-shared: RAM stays in the memory-backend-file,
which is copied instead), xenhv's state of the domain is saved, and all of it goes into one save image
(`SaveImage`) with the guest definition the devices come from. A checkpoint then resumes the same domain
(the guest's hypercall returns 1: no resume callback runs); a save tears the source down (domain, back-end
directories, TAPs, QEMU). A guest that never acknowledges is a SaveFailed naming why, and keeps running.

restore: a new QEMU started with `-incoming defer` on the same disk images, the saved RAM written into its
RAM file, the device state loaded with `migrate-incoming`; a new domain with a NEW domid made by the
toolstack with xenhv's saved state, a new xenstore tree and back-end directories (the back-ends attach),
unpaused; then the guest's parked vCPU is handed that machine (`lifecycle resume` on its console) and its
hypercall returns 0: XENBUS runs the EARLY callbacks (UnplugDevices first) and the LATE ones, and the
children reconnect. migrate = save to a temporary image + restore, on this host.

What the model keeps across all of this is the agent process itself - the vCPU and, beyond QEMU's RAM
file, the guest's memory (the Python state of its kernel and drivers) - so a save image restores only into
the guest whose agent made it, while that agent is alive (it is parked, waiting).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import struct
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from xenpv.backends.toolstack import ToolstackError
from xenpv.backends.toolstack.domain import SUSPEND_ACK_SECONDS, SUSPEND_SECONDS
from xenpv.backends.toolstack import layout as L
from xenpv.base.errors import HarnessError, WaitTimeout
from xenpv.base.qmp import QmpSession
from xenpv.base.rundir import make_run_dir, remove_run_dir
from xenpv.harness.machine import Machine
from xenpv.backends.host import HostServices
from xenpv.backends.toolstack import CreatedDomain, Toolstack
from xenpv.stack.timescale import scaled

log = logging.getLogger("harness.lifecycle")

# The save image: MAGIC, the sections back to back, the manifest (JSON), then the trailer. The RAM section
# holds only the RAM_CHUNK-sized pieces of guest RAM that are not all zero, each after a RAM_RECORD header
# (its offset in RAM and its length): a restored machine's RAM file starts out zero.
SAVE_MAGIC = b"XENPV-SAVE\x00\x01"
SAVE_TRAILER = struct.Struct("<QQ16s")  # manifest offset, manifest length, SAVE_MAGIC padded
RAM_RECORD = struct.Struct("<QI")  # offset in guest RAM, length
RAM_CHUNK = 64 << 10
SAVE_FORMAT = 2
MAX_MANIFEST = 1 << 20
COPY_CHUNK = 8 << 20
MIGRATE_SECONDS = 30.0
RESUME_SECONDS = 60.0
MIGRATE_POLL_SECONDS = 0.002

_RESUMED_LINE = re.compile(r"^resumed: running in dom(\d+); suspend count (\d+)$")


class GuestConsoleLike(Protocol):
    @property
    def pid(self) -> int: ...

    def run(self, command: str, timeout: float = 30.0) -> str: ...

    def check_alive(self, during: str = "") -> None: ...


class Guest(Protocol):
    """What this module needs of a booted guest (harness.agent.Guest, whose save/restore/migrate methods
    call here; a Protocol because agent.py imports this module)."""

    machine: Machine
    console: GuestConsoleLike
    domain: CreatedDomain | None
    toolstack: Toolstack | None
    host: HostServices | None
    backends: Any
    state: str
    storage: Path | None

    @property
    def name(self) -> str: ...

    @property
    def last_machine(self) -> Machine: ...

    def drop_machine(self) -> None: ...

    def new_machine(self, *, incoming: bool = False) -> Machine: ...

    def new_domain(self, machine: Machine, *, restore_from: Path | None = None,
                   name: str | None = None) -> CreatedDomain: ...


class LifecycleError(HarnessError):
    """A save, restore or migration step failed; names the guest and the step."""


class SaveFailed(LifecycleError):
    """The save did not happen; the guest runs on in its domain."""


class BadSaveImage(LifecycleError):
    """A save image that cannot be used: names the file and what is wrong with it."""


@dataclass
class Section:
    name: str
    offset: int
    length: int
    crc32: int


@dataclass
class SaveManifest:
    """What a save image says about itself (JSON at its end)."""

    format: int
    guest_yaml: str
    guest_name: str
    domain_name: str
    source_domid: int
    ram_size: int
    checkpoint: bool
    agent_pid: int
    devices: list[dict[str, Any]]
    sections: list[Section] = field(default_factory=list)

    def section(self, name: str) -> Section:
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)


@dataclass
class Timings:
    """Where the time of one operation went, in seconds (for `xenpv bench resume`)."""

    steps: dict[str, float] = field(default_factory=dict)

    def add(self, step: str, since: float) -> float:
        now = time.monotonic()
        self.steps[step] = self.steps.get(step, 0.0) + now - since
        return now

    @property
    def total(self) -> float:
        return sum(self.steps.values())


# -- the save image --------------------------------------------------------------------------------------

class SaveImageWriter:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._tmp = path.with_name(f".{path.name}.tmp")
        self._f: BinaryIO = open(self._tmp, "wb")
        self._f.write(SAVE_MAGIC)
        self.sections: list[Section] = []

    def add_bytes(self, name: str, data: bytes) -> None:
        offset = self._f.tell()
        self._f.write(data)
        self.sections.append(Section(name, offset, len(data), zlib.crc32(data)))

    def add_file(self, name: str, path: Path, length: int | None = None) -> None:
        """The first `length` bytes (default: all) of the file at `path`, in chunks."""
        offset = self._f.tell()
        crc = 0
        copied = 0
        with open(path, "rb") as src:
            total = os.fstat(src.fileno()).st_size if length is None else length
            while copied < total:
                chunk = src.read(min(COPY_CHUNK, total - copied))
                if not chunk:
                    raise LifecycleError(f"{path} ended after {copied} of {total} bytes")
                crc = zlib.crc32(chunk, crc)
                self._f.write(chunk)
                copied += len(chunk)
        self.sections.append(Section(name, offset, copied, crc))

    def add_ram(self, path: Path, size: int) -> None:
        """Guest RAM from its file, as RAM_RECORDs of the chunks that are not all zero. The file is sparse
        (QEMU's memory-backend-file: pages the guest never touched are holes), so only its data extents
        are read (SEEK_DATA/SEEK_HOLE): a guest's untouched RAM costs nothing."""
        offset = self._f.tell()
        crc = 0
        zero = bytes(RAM_CHUNK)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size < size:
                raise LifecycleError(f"{path} holds fewer than the guest's {size} bytes of RAM")
            for start, end in _data_extents(fd, size):
                at = start - start % RAM_CHUNK
                while at < end:
                    length = min(RAM_CHUNK, size - at)
                    chunk = os.pread(fd, length, at)
                    if len(chunk) != length:
                        raise LifecycleError(f"{path}: short read at {at:#x}")
                    if chunk != zero[:length]:
                        header = RAM_RECORD.pack(at, length)
                        crc = zlib.crc32(chunk, zlib.crc32(header, crc))
                        self._f.write(header)
                        self._f.write(chunk)
                    at += RAM_CHUNK
        finally:
            os.close(fd)
        self.sections.append(Section("ram", offset, self._f.tell() - offset, crc))

    def finish(self, manifest: SaveManifest) -> None:
        manifest.sections = self.sections
        data = json.dumps(asdict(manifest)).encode()
        offset = self._f.tell()
        self._f.write(data)
        self._f.write(SAVE_TRAILER.pack(offset, len(data), SAVE_MAGIC))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._tmp.replace(self.path)

    def abandon(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The [start, end) ranges of the first `size` bytes of a file that hold data (not holes), merged so
    that no RAM_CHUNK is visited twice."""
    extents: list[tuple[int, int]] = []
    at = 0
    while at < size:
        try:
            start = os.lseek(fd, at, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after `at`
            break
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        chunk_start = start - start % RAM_CHUNK
        if extents and chunk_start <= extents[-1][1]:
            extents[-1] = (extents[-1][0], max(extents[-1][1], end))
        else:
            extents.append((start, end))
        at = end
    return extents


def read_manifest(path: Path) -> SaveManifest:
    """The manifest of a save image, every field and section checked against the file (BadSaveImage)."""
    def bad(why: str) -> BadSaveImage:
        return BadSaveImage(f"{path} is not a usable xenpv save image: {why}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(SAVE_MAGIC) + SAVE_TRAILER.size or f.read(len(SAVE_MAGIC)) != SAVE_MAGIC:
                raise bad("no xenpv save header")
            f.seek(size - SAVE_TRAILER.size)
            offset, length, magic = SAVE_TRAILER.unpack(f.read(SAVE_TRAILER.size))
            if magic.rstrip(b"\0") != SAVE_MAGIC.rstrip(b"\0"):
                raise bad("no trailer (the file was cut short?)")
            if length > MAX_MANIFEST or offset < len(SAVE_MAGIC) or offset + length > size - SAVE_TRAILER.size:
                raise bad(f"manifest at {offset}+{length} lies outside the file")
            f.seek(offset)
            raw = json.loads(f.read(length))
    except OSError as exc:
        raise BadSaveImage(f"{path}: {exc.strerror}") from None
    except (ValueError, struct.error) as exc:
        raise bad(f"manifest: {exc}") from None
    try:
        sections = [Section(str(s["name"]), int(s["offset"]), int(s["length"]), int(s["crc32"]))
                    for s in raw.pop("sections")]
        manifest = SaveManifest(**raw, sections=sections)
    except (TypeError, KeyError, ValueError) as exc:
        raise bad(f"manifest fields: {exc}") from None
    if manifest.format != SAVE_FORMAT:
        raise bad(f"format {manifest.format}, this harness reads {SAVE_FORMAT}")
    for s in manifest.sections:
        if s.offset < len(SAVE_MAGIC) or s.length < 0 or s.offset + s.length > offset:
            raise bad(f"section {s.name} at {s.offset}+{s.length} overlaps the manifest or lies outside the file")
    for name in ("qemu", "xenhv", "ram"):
        try:
            manifest.section(name)
        except KeyError:
            raise bad(f"no {name} section") from None
    if manifest.ram_size <= 0 or manifest.ram_size % 4096:
        raise bad(f"a RAM size of {manifest.ram_size} bytes")
    return manifest


def load_ram(image: Path, section: Section, ram: Path, size: int) -> int:
    """Write the RAM section's chunks into a fresh (all zero) RAM file of `size` bytes, checking every
    record's bounds and the section's CRC; returns the bytes written."""
    crc = 0
    written = 0
    fd = os.open(ram, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with open(image, "rb") as f:
            f.seek(section.offset)
            left = section.length
            while left:
                header = f.read(RAM_RECORD.size)
                if len(header) != RAM_RECORD.size or left < RAM_RECORD.size:
                    raise BadSaveImage(f"{image}: the RAM section ends inside a record header")
                at, length = RAM_RECORD.unpack(header)
                left -= RAM_RECORD.size
                if length == 0 or length > RAM_CHUNK or at % RAM_CHUNK or at + length > size or length > left:
                    raise BadSaveImage(f"{image}: a RAM record of {length} bytes at {at:#x} does not fit the guest's "
                                       f"{size} bytes of RAM or the section")
                data = f.read(length)
                if len(data) != length:
                    raise BadSaveImage(f"{image}: the RAM section ends early")
                crc = zlib.crc32(data, zlib.crc32(header, crc))
                if os.pwrite(fd, data, at) != length:
                    raise LifecycleError(f"{ram}: short write at {at:#x}")
                left -= length
                written += length
    finally:
        os.close(fd)
    if crc != section.crc32:
        raise BadSaveImage(f"{image}: the RAM section fails its CRC (stored {section.crc32:#010x}, read {crc:#010x})")
    return written


def extract_section(image: Path, section: Section, dest: Path | int, *, dest_offset: int = 0) -> None:
    """Copy a section to a file (a path, or an open fd at `dest_offset`), checking its CRC."""
    crc = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600) if isinstance(dest, Path) else dest
    try:
        with open(image, "rb") as f:
            f.seek(section.offset)
            done = 0
            while done < section.length:
                chunk = f.read(min(COPY_CHUNK, section.length - done))
                if not chunk:
                    raise BadSaveImage(f"{image}: section {section.name} ends early")
                crc = zlib.crc32(chunk, crc)
                view = memoryview(chunk)
                while view:
                    n = os.pwrite(fd, view, dest_offset + done)
                    view = view[n:]
                    done += n
    finally:
        if isinstance(dest, Path):
            os.close(fd)
    if crc != section.crc32:
        raise BadSaveImage(f"{image}: section {section.name} fails its CRC (stored {section.crc32:#010x}, "
                           f"read {crc:#010x})")


# -- QEMU's device state ------------------------------------------------------------------------------

def _wait_migration(qmp: QmpSession, what: str, timeout: float) -> float:
    timeout = scaled(timeout)
    t0 = time.monotonic()
    while True:
        info = qmp.command("query-migrate")
        status = info.get("status")
        if status == "completed":
            return time.monotonic() - t0
        if status in ("failed", "cancelled"):
            raise LifecycleError(f"QEMU {what}: migration {status}: {info.get('error-desc', 'no reason given')}")
        if time.monotonic() - t0 > timeout:
            raise WaitTimeout(f"QEMU {what}: migration still {status} after {timeout:.1f}s")
        time.sleep(MIGRATE_POLL_SECONDS)


def save_device_state(qmp: QmpSession, path: Path, timeout: float = MIGRATE_SECONDS) -> float:
    """QMP migrate of a stopped machine's device state to `path` (RAM is shared: x-ignore-shared);
    returns QEMU's own migration time."""
    qmp.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    qmp.command("migrate", uri=f"exec:cat > {shlex.quote(str(path))}")
    return _wait_migration(qmp, "saving its device state", timeout)


def load_device_state(qmp: QmpSession, path: Path, timeout: float = MIGRATE_SECONDS) -> float:
    """migrate-incoming on a QEMU started with -incoming defer; the machine stays paused (it was stopped
    when saved) until `cont`."""
    qmp.command("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    qmp.command("migrate-incoming", uri=f"exec:cat {shlex.quote(str(path))}")
    return _wait_migration(qmp, "loading the saved device state", timeout)


# -- the guest's disks -----------------------------------------------------------------------------------

def guest_images(machine: Machine) -> list[Path]:
    """The image files the machine's guest keeps in its image directory (emulated disks and the PV disks'
    scratch images), as the machine and the toolstack name them."""
    image_dir = machine.paths.image_dir
    names = [image_dir / f"{d.id}.img" for d in machine.guest.emulated_disks if d.image is None]
    for disk in machine.guest.pv_disks:
        path, _scratch = L.disk_image(disk, machine.guest, image_dir)
        if path.parent == image_dir:
            names.append(path)
    return [p for p in dict.fromkeys(names) if p.exists()]


def keep_disks(guest: Guest) -> Path:
    """A directory of the guest's own for its disk images, which outlives any one machine: the current
    machine's images are hard-linked there (same inode: QEMU and blkback keep writing the same data)."""
    if guest.storage is not None:
        return guest.storage
    storage = make_run_dir("disks")
    try:
        for image in guest_images(guest.machine):
            os.link(image, storage / image.name)
    except OSError as exc:
        remove_run_dir(storage)
        raise LifecycleError(f"keeping the disk images of {guest.machine.name}: {exc}") from None
    guest.storage = storage
    return storage


# -- save, restore, migrate ------------------------------------------------------------------------------

def _alive(guest: Guest) -> None:
    guest.machine.check_alive("suspending the guest")
    guest.console.check_alive("suspending the guest")


def save(guest: Guest, path: Path, *, checkpoint: bool = False, ack_timeout: float | None = None,
         timeout: float | None = None) -> Timings:
    """Save the running guest to `path` (see the module docstring); with `checkpoint` it runs on in the
    same domain afterwards. Returns where the time went."""
    if guest.state != "running" or guest.domain is None or guest.toolstack is None:
        raise SaveFailed(f"{guest.machine.name} cannot be saved: it is {guest.state}"
                         + ("" if guest.domain is not None else ", not a Xen domain"))
    timings = Timings()
    domid, machine, toolstack = guest.domain.domid, guest.machine, guest.toolstack
    # The toolstack's deadlines, scaled by XENPV_TIME_SCALE as the guest model's are (a loaded machine
    # answers late, it does not refuse).
    waits = {"ack_timeout": scaled(SUSPEND_ACK_SECONDS if ack_timeout is None else ack_timeout),
             "timeout": scaled(SUSPEND_SECONDS if timeout is None else timeout)}
    t = time.monotonic()
    try:
        toolstack.suspend(domid, alive=lambda: _alive(guest), **waits)
    except ToolstackError as exc:
        raise SaveFailed(f"save of {machine.name} (dom{domid}) failed, the guest runs on: {exc.reason}") from exc
    t = timings.add("suspend", t)
    qmp = machine.qmp
    assert qmp is not None
    work = Path(tempfile.mkdtemp(prefix="save-", dir=machine.paths.run_dir))
    writer = SaveImageWriter(path)
    try:
        qmp.command("stop")
        state = work / "qemu.state"
        timings.steps["qemu_migrate"] = save_device_state(qmp, state)
        t = timings.add("device_state", t)
        xenhv_state = work / "xenhv.json"
        toolstack.save_state(domid, xenhv_state)
        writer.add_file("qemu", state)
        writer.add_file("xenhv", xenhv_state)
        writer.add_ram(machine.paths.ram, machine.guest.memory_mib << 20)
        devices = [asdict(d) for d in L.guest_devices(machine.guest, domid, machine.paths.image_dir).devices]
        writer.finish(SaveManifest(SAVE_FORMAT, str(machine.guest.path.resolve()), machine.guest.name,
                                   guest.domain.name, domid, machine.guest.memory_mib << 20, checkpoint,
                                   guest.console.pid, devices))
        t = timings.add("write_image", t)
    except BaseException:
        writer.abandon()
        # The domain is suspended with its state half saved: it resumes where it stopped, as libxl does
        # when a save fails after the suspend.
        _resume_in_place(guest, qmp, domid)
        raise
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()
    if checkpoint:
        _resume_in_place(guest, qmp, domid)
        timings.add("resume", t)
        return timings
    keep_disks(guest)
    toolstack.destroy(domid)
    if guest.backends is not None:
        guest.backends.release(domid)
    guest.drop_machine()
    guest.domain = None
    guest.state = "saved"
    timings.add("teardown", t)
    log.info("%s saved to %s (dom%d torn down)", machine.name, path, domid)
    return timings


def _resume_in_place(guest: Guest, qmp: QmpSession, domid: int) -> None:
    """The checkpoint's resume (and a failed save's): QEMU runs again, the domain resumes where it
    stopped, and the guest answers its console again."""
    assert guest.toolstack is not None
    qmp.command("cont")
    guest.toolstack.resume_cancelled(domid)
    # xenhv has answered the parked hypercall; the guest's suspend thread still has to return from it (CI,
    # under load: one look found it "suspended" yet). It gets until RESUME_SECONDS; each look is a console
    # command, so a guest that stopped or died meanwhile is reported as such.
    deadline = time.monotonic() + scaled(RESUME_SECONDS)
    while not (out := guest.console.run("lifecycle status", timeout=RESUME_SECONDS)).startswith("running"):
        if time.monotonic() >= deadline:
            raise LifecycleError(f"{guest.machine.name}: resumed in place but after {scaled(RESUME_SECONDS):.0f} s "
                                 f"the guest still says {out!r}")
        time.sleep(0.02)


def restore(guest: Guest, path: Path) -> Timings:
    """Run the guest's saved state (its own save image) in a new QEMU and a new domain."""
    timings = Timings()
    t = time.monotonic()
    manifest = read_manifest(path)
    if guest.state != "saved":
        raise LifecycleError(f"{guest.name}: restore needs a saved guest, this one is {guest.state}")
    if manifest.agent_pid != guest.console.pid:
        raise BadSaveImage(f"{path} was saved by the guest agent pid {manifest.agent_pid}, not this guest's "
                           f"(pid {guest.console.pid}): a save image restores only into the guest that made it")
    old = guest.last_machine
    if manifest.guest_name != old.guest.name or manifest.ram_size != old.guest.memory_mib << 20:
        raise BadSaveImage(f"{path} holds guest {manifest.guest_name!r} with {manifest.ram_size} bytes of RAM, "
                           f"not {old.guest.name!r} with {old.guest.memory_mib << 20}")
    machine = guest.new_machine(incoming=True)
    t = timings.add("launch", t)
    load_ram(path, manifest.section("ram"), machine.paths.ram, manifest.ram_size)
    state = machine.paths.run_dir / "incoming.state"
    xenhv_state = machine.paths.run_dir / "xenhv.json"
    extract_section(path, manifest.section("qemu"), state)
    extract_section(path, manifest.section("xenhv"), xenhv_state)
    t = timings.add("read_image", t)
    assert machine.qmp is not None
    timings.steps["qemu_migrate"] = load_device_state(machine.qmp, state)
    t = timings.add("device_state", t)
    domain = guest.new_domain(machine, restore_from=xenhv_state, name=manifest.domain_name)
    machine.qmp.command("cont")
    t = timings.add("domain", t)
    _attach(guest, machine, domain.domid)
    timings.add("resume", t)
    log.info("%s restored from %s into dom%d", machine.name, path, domain.domid)
    return timings


def _attach(guest: Guest, machine: Machine, domid: int) -> None:
    """Hand the parked vCPU its new machine and wait until the guest runs there."""
    host = guest.host
    assert host is not None
    qtest = machine.paths.qtest_socket
    machine.hand_over_qtest()
    out = guest.console.run(f"lifecycle resume {qtest} {machine.paths.ram} {host.run_dir / f'hv-{domid}.sock'} {domid}",
                            timeout=RESUME_SECONDS)
    m = _RESUMED_LINE.match(out.strip().splitlines()[-1] if out.strip() else "")
    if m is None or int(m.group(1)) != domid:
        raise LifecycleError(f"{machine.name}: the guest did not resume in dom{domid}: {out!r}")
    guest.state = "running"


def migrate(guest: Guest) -> Timings:
    """Local migration: save to a temporary image, restore it into a new QEMU and a new domain."""
    work = make_run_dir("migrate")
    try:
        timings = save(guest, work / "guest.save")
        back = restore(guest, work / "guest.save")
        for step, seconds in back.steps.items():
            timings.steps[f"restore_{step}" if step in timings.steps else step] = seconds
        return timings
    finally:
        remove_run_dir(work)


# -- S4: hibernation and power-on ----------------------------------------------------------------------

HIBERNATE_SECONDS = 120.0
POWER_OFF_SECONDS = 10.0
POWER_ON_SECONDS = 120.0


def hibernate(guest: Guest, timeout: float = HIBERNATE_SECONDS) -> Timings:
    """`power S4` in the guest: its image goes to the hiberfile area of its system disk and the real QEMU
    powers off (QMP SUSPEND_DISK, then the process ends); the toolstack destroys the domain (the back-ends
    see their frontends go) and the machine goes. The agent stays, powered off, for `power_on`."""
    if guest.state != "running" or guest.domain is None or guest.toolstack is None:
        raise LifecycleError(f"{guest.name} cannot hibernate: it is {guest.state}"
                             + ("" if guest.domain is not None else ", not a Xen domain"))
    timings = Timings()
    machine, domid = guest.machine, guest.domain.domid
    t = time.monotonic()
    out = guest.console.run("power S4", timeout=timeout)
    if not out.startswith("power S4: hibernated"):
        raise LifecycleError(f"{guest.name} did not hibernate: {out}")
    t = timings.add("hibernate", t)
    powered_off(guest, "SUSPEND_DISK", timings, t, scaled(POWER_OFF_SECONDS))
    log.info("%s hibernated; QEMU powered off (exit status %s), dom%d destroyed", guest.name,
             machine.process.popen.returncode if machine.process and machine.process.popen else None, domid)
    return timings


def powered_off(guest: Guest, event: str, timings: Timings, since: float, timeout: float) -> None:
    """The guest's machine turns itself off: QMP `event` (SUSPEND_DISK for S4, SHUTDOWN for S5) within
    `timeout`, QEMU's exit, then the teardown a powered-off guest gets - its disks kept, its domain destroyed,
    the back-ends released, the machine dropped. The guest is "off" (power_on boots it again)."""
    machine, domid = guest.machine, guest.domain.domid
    assert machine.qmp is not None and machine.process is not None and machine.process.popen is not None
    assert guest.toolstack is not None
    machine.qmp.wait_event(event, timeout=timeout, alive=[guest.console])
    try:
        machine.process.popen.wait(scaled(POWER_OFF_SECONDS))
    except Exception as exc:  # subprocess.TimeoutExpired
        raise LifecycleError(f"{guest.name}: QEMU sent {event} but did not power off: {exc}") from None
    t = timings.add("power_off", since)
    keep_disks(guest)
    guest.toolstack.destroy(domid)
    if guest.backends is not None:
        guest.backends.release(domid)
    guest.drop_machine()
    guest.domain = None
    guest.state = "off"
    timings.add("teardown", t)


def power_on(guest: Guest, timeout: float = POWER_ON_SECONDS) -> str:
    """The power button after hibernation: a new QEMU on the same disks, a new domain, and the guest's
    resume loader (or a fresh boot when it finds no usable image). Returns what the guest said."""
    if guest.state != "off":
        raise LifecycleError(f"{guest.name} is {guest.state}, not powered off")
    machine = guest.new_machine()
    domain = guest.new_domain(machine)
    host = guest.host
    assert host is not None
    machine.hand_over_qtest()
    out = guest.console.run(f"lifecycle poweron {machine.paths.qtest_socket} {machine.paths.ram} "
                            f"{host.run_dir / f'hv-{domain.domid}.sock'} {domain.domid}", timeout=timeout)
    if not out.startswith(("resumed from hibernation", "fresh boot")):
        raise LifecycleError(f"{guest.name} did not come back on power-on: {out}")
    guest.state = "running"
    return out
