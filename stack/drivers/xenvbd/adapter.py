"""The XENVBD adapter: the FDO on XENBUS's VBD PDO (VBD src/xenvbd/adapter.c; reference
windows-pv-drivers.md 1, 2, 6 and 8).

AdapterStart (START_DEVICE, after the PDO started, at PASSIVE_LEVEL): IRP_MN_QUERY_INTERFACE to the PDO for
STORE, EVTCHN, GNTTAB, SUSPEND, CACHE and UNPLUG at the versions of the XENBUS revision xenvbd.inf binds
(CHILD_BINDS_XENBUS_REVISION), and EMULATED as an optional one; Acquire them all; UNPLUG.Request(DISKS, TRUE)
so the next boot unplugs the emulated disks. Then a `device/vbd` watch and the adapter's thread (the
driver's ScanThread and backend watch in one): AdapterEnumerate creates a target per device/vbd/<devid>
and drops those that vanished, and every target's frontend follows its backend.

__AdapterEnumerate skips, silently and without a refusal, a vbd that __AdapterHiddenTarget hides: one whose
`ejected` reads non-zero (strtoul base 2) or whose `device-type` is missing or not "disk" (a CD-ROM
stays with the emulated drive). TargetCreate (target.c) then refuses: a vdev __ParseVbd cannot map to a
target below XENVBD_MAX_TARGETS with STATUS_RETRY; target 0 under XEN:BOOT_EMULATED with
STATUS_UNSUCCESSFUL; a target AdapterIsTargetEmulated calls emulated with STATUS_RETRY. Targets above 3
are never emulated; without EMULATED (not served, or its Acquire failing) targets 0-3 count as emulated,
since nothing could unplug their twins. Any STATUS_RETRY of a pass asks xenbus_monitor for a reboot
(UNPLUG.Reboot("XENVBD")). AdapterStop (REMOVE_DEVICE) destroys the targets, UNPLUG.Request(DISKS, FALSE)
and releases every interface.

The adapter and its targets (target.py) import each other, as adapter.c and target.c do.
"""
from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from xenpv.stack.drivers.interface import InterfaceTable
from xenpv.stack.drivers.revision import CHILD_BINDS_XENBUS_REVISION, XENBUS_REVISIONS
from xenpv.stack.drivers.xenbus.cache import CACHE_GUID
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_GUID
from xenpv.stack.drivers.xenbus.gnttab import GNTTAB_GUID
from xenpv.stack.drivers.xenbus.store import STORE_GUID
from xenpv.stack.drivers.xenbus.suspend import SUSPEND_CALLBACK_LATE, SUSPEND_GUID
from xenpv.stack.drivers.xenbus.unplug import GUID_XENBUS_UNPLUG_INTERFACE, XENBUS_UNPLUG_DEVICE_TYPE_DISKS
from xenpv.stack.drivers.xenfilt.emulated import GUID_XENFILT_EMULATED_INTERFACE
from xenpv.stack.kernel import (IRP_MN_PNP, DeviceObject, Irp, IoSynchronousCallDriver, KEvent, KeWaitForSingleObject,
                          QueryInterfaceParameters)
from xenpv.stack.kernel.bugcheck import BUG, BugCheck
from xenpv.stack.kernel.event import wait_for_thread
from xenpv.stack.kernel.debuglog import DbgLevel, current_log
from xenpv.stack.kernel.irql import assert_passive, current_processor
from xenpv.stack.kernel.registry import Registry, RegistryError
from xenpv.stack.kernel.status import (NT_SUCCESS, STATUS_NOT_SUPPORTED, STATUS_RETRY, STATUS_SUCCESS,
                                       STATUS_UNSUCCESSFUL, status_name)
from xenpv.stack.timescale import HarnessTooSlow

from .target import XenvbdTarget

log = logging.getLogger("stack.drivers.xenvbd.adapter")

PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENVBD\Parameters"
XENVBD_MAX_TARGETS = 255
MAX_EMULATED_TARGET = 3  # AdapterIsTargetEmulated: only the four IDE positions can have an emulated twin
MODULE = "XENVBD"
SCAN_INTERVAL_SECONDS = 0.05
QUERY_SIZE = 4096  # the client's buffer: large enough for any version's table

# Linux IDE majors of hd disks, each carrying two disks (the disk number in bits 6-7 of the vdev).
IDE_MAJOR_FIRST_DISK = {3: 0, 22: 2, 33: 4, 34: 6, 56: 8, 57: 10, 88: 12, 89: 14, 90: 16, 91: 18}
XVD_MAJOR = 202
SD_MAJOR = 8
EXTENDED = 1 << 28


def ParseVbd(vdev: int) -> int | None:
    """__ParseVbd: the target id of a vdev number (xen-abi.md 4's encodings); None if it names none, or a
    target TargetCreate cannot have (>= XENVBD_MAX_TARGETS)."""
    if vdev < 0 or vdev >= 1 << 29:
        return None
    if vdev & EXTENDED:
        target = (vdev & ((1 << 20) - 1)) >> 8
    else:
        major = vdev >> 8
        if major in (XVD_MAJOR, SD_MAJOR):
            target = (vdev & 0xF0) >> 4
        elif major in IDE_MAJOR_FIRST_DISK:
            target = ((vdev & 0xC0) >> 6) + IDE_MAJOR_FIRST_DISK[major]
        else:
            return None
    return target if target < XENVBD_MAX_TARGETS else None


def strtoul_base2(text: str) -> int:
    """strtoul(Buffer, NULL, 2): leading blanks, an optional sign, then the longest run of 0/1 (0 if none)."""
    text = text.lstrip(" \t\n\v\f\r")
    negative = text[:1] == "-"
    if text[:1] in "+-" and text:
        text = text[1:]
    digits = ""
    for ch in text:
        if ch not in "01":
            break
        digits += ch
    value = int(digits, 2) if digits else 0
    return (-value) & 0xFFFFFFFF if negative else value & 0xFFFFFFFF


class AdapterError(Exception):
    pass


@dataclass
class InterfaceQuery:
    name: str
    guid: uuid.UUID
    optional: bool = False


ADAPTER_INTERFACES = (InterfaceQuery("STORE", STORE_GUID), InterfaceQuery("EVTCHN", EVTCHN_GUID),
                      InterfaceQuery("GNTTAB", GNTTAB_GUID), InterfaceQuery("SUSPEND", SUSPEND_GUID),
                      InterfaceQuery("CACHE", CACHE_GUID), InterfaceQuery("UNPLUG", GUID_XENBUS_UNPLUG_INTERFACE),
                      InterfaceQuery("EMULATED", GUID_XENFILT_EMULATED_INTERFACE, optional=True))


def query_interface(lower: DeviceObject, guid: uuid.UUID, version: int) -> tuple[int, InterfaceTable | None]:
    """A synchronous IRP_MN_QUERY_INTERFACE to the PDO (Status preset to NOT_SUPPORTED by Irp.pnp)."""
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(guid, QUERY_SIZE, version, None))
    status = IoSynchronousCallDriver(lower, irp)
    return status, irp.parameters.interface if NT_SUCCESS(status) else None


@dataclass(eq=False)
class XenvbdAdapter:
    device: DeviceObject
    lower: DeviceObject
    registry: Registry
    revision: int = CHILD_BINDS_XENBUS_REVISION
    interfaces: dict[str, InterfaceTable] = field(default_factory=dict)
    targets: dict[int, XenvbdTarget] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    event: KEvent = field(default_factory=lambda: KEvent("xenvbd adapter", synchronization=True))
    started: bool = False
    powered_down: bool = False
    _watch: Any = None
    _thread: threading.Thread | None = None
    _stopping: bool = False
    _suspend_callback: Any = None
    _resumed: bool = False

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        current_log().print("XENVBD", text, level)

    # the interface tables, named as the driver's context fields
    @property
    def store(self) -> InterfaceTable:
        return self.interfaces["STORE"]

    @property
    def evtchn(self) -> InterfaceTable:
        return self.interfaces["EVTCHN"]

    @property
    def gnttab(self) -> InterfaceTable:
        return self.interfaces["GNTTAB"]

    @property
    def unplug(self) -> InterfaceTable:
        return self.interfaces["UNPLUG"]

    def parameter(self, name: str) -> int | None:
        try:
            return self.registry.get_dword(PARAMETERS, name)
        except RegistryError:
            return None

    # -- start / stop -----------------------------------------------------------------------------

    def AdapterQueryInterfaces(self) -> int:
        assert_passive("AdapterQueryInterfaces")
        versions = XENBUS_REVISIONS[self.revision]
        for query in ADAPTER_INTERFACES:
            status, table = query_interface(self.lower, query.guid, versions[query.name])
            if not NT_SUCCESS(status) or table is None:
                if query.optional and status == STATUS_NOT_SUPPORTED:
                    self._print(f"{query.name}: not available")
                    continue
                self._print(f"{query.name} v{versions[query.name]}: {status_name(status)}", DbgLevel.ERROR)
                return status
            self.interfaces[query.name] = table
        return STATUS_SUCCESS

    def _acquire(self) -> int:
        acquired: list[str] = []
        for name, table in self.interfaces.items():
            status = getattr(table, f"{name.title()}Acquire")()
            if not NT_SUCCESS(status):
                self._print(f"{name}: Acquire failed ({status_name(status)})", DbgLevel.ERROR)
                for held in reversed(acquired):
                    getattr(self.interfaces[held], f"{held.title()}Release")()
                return status
            acquired.append(name)
        return STATUS_SUCCESS

    def _release(self) -> None:
        for name in reversed(list(self.interfaces)):
            getattr(self.interfaces[name], f"{name.title()}Release")()

    def AdapterStart(self) -> int:
        status = self.AdapterQueryInterfaces()
        if NT_SUCCESS(status):
            status = self._acquire()
        if not NT_SUCCESS(status):
            self.interfaces.clear()
            return status
        self.unplug.UnplugRequest(XENBUS_UNPLUG_DEVICE_TYPE_DISKS, True)
        self._enable()
        self.started = True
        self._print(f"adapter started (XENBUS revision {self.revision:08X})")
        return STATUS_SUCCESS

    def _enable(self) -> None:
        status, self._watch = self.store.StoreWatchAdd(None, "device/vbd", self.event)
        if not NT_SUCCESS(status):
            self._watch = None
            self._print(f"device/vbd watch: {status_name(status)}", DbgLevel.WARNING)
        suspend = self.interfaces.get("SUSPEND")
        if suspend is not None:
            _, self._suspend_callback = suspend.SuspendRegister(SUSPEND_CALLBACK_LATE, self._suspend_late, None)
        self.refused.clear()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="xenvbd-adapter", daemon=True)
        self._thread.start()

    def _disable(self) -> None:
        """Stop the thread, close every target's frontend, drop the watch."""
        self._stopping = True
        self.event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            # The targets are destroyed below: the thread that steps them must be gone first.
            wait_for_thread(self._thread, "XENVBD adapter stop")
        self._thread = None
        if self._suspend_callback is not None:
            self.interfaces["SUSPEND"].SuspendDeregister(self._suspend_callback)
            self._suspend_callback = None
        for target in list(self.targets.values()):
            target.TargetDestroy()
        self.targets.clear()
        if self._watch is not None:
            self.store.StoreWatchRemove(self._watch)
            self._watch = None

    def _suspend_late(self, _argument: Any) -> None:
        """SUSPEND LATE in a new domain (DISPATCH_LEVEL): every target goes CLOSED now; the adapter's thread
        re-adds the device/vbd watch and each target's backend watch and walks them back (AdapterResume)."""
        for target in self.targets.values():
            target.TargetSuspendLate()
        self._resumed = True
        self.event.set()

    def AdapterResume(self) -> None:
        """On the adapter's thread after a resume: the watches of the old domain are replaced."""
        if self._watch is not None:
            self.store.StoreWatchRemove(self._watch)
        status, self._watch = self.store.StoreWatchAdd(None, "device/vbd", self.event)
        if not NT_SUCCESS(status):
            self._watch = None
        for target in self.targets.values():
            target.TargetResume()
        self._print("adapter resumed: watches re-added")

    def AdapterD0ToD3(self) -> None:
        """Sleep, hibernate or shutdown: frontends closed and every interface released (XENBUS checks the
        references of the Xen-backed ones before S4); the unplug request stands for the next boot."""
        if not self.started or self.powered_down:
            return
        self._disable()
        self._release()
        self.powered_down = True
        self._print("adapter D0 -> D3")

    def AdapterD3ToD0(self) -> None:
        if not self.started or not self.powered_down:
            return
        if NT_SUCCESS(self._acquire()):
            self.powered_down = False
            self._enable()
            self._print("adapter D3 -> D0")

    def AdapterStop(self) -> None:
        if not self.started:
            return
        if not self.powered_down:
            self._disable()
        else:
            self._acquire()
        self.unplug.UnplugRequest(XENBUS_UNPLUG_DEVICE_TYPE_DISKS, False)
        self._release()
        self.interfaces.clear()
        self.started = self.powered_down = False
        self._print("adapter stopped")

    # -- the adapter thread -----------------------------------------------------------------------

    def _run(self) -> None:
        cpu = current_processor()
        while not self._stopping:
            try:
                with cpu.lock:
                    if cpu.crashed is not None or self._stopping:
                        return
                    if self._resumed:
                        self._resumed = False
                        self.AdapterResume()
                    self.AdapterEnumerate()
                    for target in list(self.targets.values()):
                        target.FrontendStep()
                    KeWaitForSingleObject(self.event, SCAN_INTERVAL_SECONDS)
            except BugCheck:
                return  # the guest stopped; its dump says why
            except HarnessTooSlow as late:
                # A deadline of the harness passed (xenstored, xenhv): no driver's fault, so no STOP; the
                # processor stops and the main thread reports it (stack.timescale).
                cpu.give_up(late)
                return
            except (OSError, ValueError, AttributeError) as exc:
                # The platform (and its xenstore connection) goes away when the agent shuts down.
                log.info("adapter thread ends: %r", exc)
                return
            except Exception as exc:
                # An exception escaping a system thread stops Windows; the model stops the guest the same
                # way (a STOP with a dump naming xenvbd.sys), never with a bare traceback on the console.
                log.exception("xenvbd-adapter thread: unhandled exception")
                try:
                    BUG(f"unhandled {type(exc).__name__} in the adapter thread: {exc}", module="xenvbd.sys")
                except BugCheck:
                    return

    def _read(self, path: str, name: str) -> str | None:
        status, buffer = self.store.StoreRead(None, path, name)
        if not NT_SUCCESS(status) or buffer is None:
            return None
        try:
            return buffer.Value.decode(errors="replace")
        finally:
            self.store.StoreFree(buffer)

    def AdapterHiddenTarget(self, devid: int) -> bool:
        """__AdapterHiddenTarget: ejected media, and anything that is not a disk, are left alone."""
        path = f"device/vbd/{devid}"
        ejected = self._read(path, "ejected")
        if ejected is not None and strtoul_base2(ejected):
            return True
        return self._read(path, "device-type") != "disk"

    def AdapterEnumerate(self) -> None:
        status, buffer = self.store.StoreDirectory(None, None, "device/vbd")
        names: list[str] = []
        if NT_SUCCESS(status):
            names = [n for n in buffer.Value.decode(errors="replace").split("\0") if n]
            self.store.StoreFree(buffer)
        present = {int(n) for n in names if n.isdigit()}
        need_reboot = False
        for devid in sorted(present - set(self.targets) - set(self.refused)):
            if self.AdapterHiddenTarget(devid):
                continue
            status = self.TargetCreate(devid)
            if status == STATUS_RETRY:
                need_reboot = True
            if not NT_SUCCESS(status):
                self.refused[devid] = status_name(status)
        if need_reboot:
            self.AdapterRequestReboot()
        for devid in sorted(set(self.targets) - present):
            target = self.targets.pop(devid)
            self._print(f"vbd {devid} gone from xenstore")
            target.FrontendStep()
            target.TargetDestroy()
        for devid in sorted(set(self.refused) - present):
            del self.refused[devid]

    def AdapterRequestReboot(self) -> None:
        if self.unplug.Version < 3:  # Reboot is UNPLUG v3's
            return
        if NT_SUCCESS(self.unplug.UnplugAcquire()):
            try:
                self.unplug.UnplugReboot(MODULE)
            finally:
                self.unplug.UnplugRelease()

    def AdapterBootEmulated(self) -> bool:
        return self.unplug.Version >= 3 and bool(self.unplug.UnplugBootEmulated())

    def AdapterIsTargetEmulated(self, target_id: int) -> bool:
        if target_id > MAX_EMULATED_TARGET:
            return False
        emulated = self.interfaces.get("EMULATED")
        if emulated is None:
            return True  # nothing can unplug the twin, so it must be assumed there
        if not NT_SUCCESS(emulated.EmulatedAcquire()):
            return True
        try:
            return bool(emulated.EmulatedIsDiskPresent(target_id))
        finally:
            emulated.EmulatedRelease()

    def TargetCreate(self, devid: int) -> int:
        target_id = ParseVbd(devid)
        if target_id is None:
            self._print(f"vbd {devid}: no target for this vdev: STATUS_RETRY, reboot requested", DbgLevel.WARNING)
            return STATUS_RETRY
        if any(t.target_id == target_id for t in self.targets.values()):
            self._print(f"vbd {devid}: target {target_id} already exists", DbgLevel.WARNING)
            return STATUS_NOT_SUPPORTED
        if target_id == 0 and self.AdapterBootEmulated():
            self._print(f"Target[0]: vbd {devid}: BOOT_EMULATED, the emulated disk stays", DbgLevel.WARNING)
            return STATUS_UNSUCCESSFUL
        if self.AdapterIsTargetEmulated(target_id):
            self._print(f"Target[{target_id}]: vbd {devid}: emulated disk present: STATUS_RETRY, reboot requested",
                        DbgLevel.WARNING)
            return STATUS_RETRY
        target = XenvbdTarget(self, devid, target_id)
        status = target.TargetStart()
        if not NT_SUCCESS(status):
            self._print(f"Target[{target_id}]: vbd {devid}: {status_name(status)}", DbgLevel.WARNING)
            return status
        self.targets[devid] = target
        return STATUS_SUCCESS

    def target(self, target_id: int) -> XenvbdTarget:
        for target in self.targets.values():
            if target.target_id == target_id:
                return target
        raise AdapterError(f"no target {target_id} (targets: {sorted(t.target_id for t in self.targets.values())})")
