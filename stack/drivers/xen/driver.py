"""xen.sys DllInitialize and its exports: XenTouch, XenVersion, boot options and debug-port logging
(XB src/xen/driver.c, log.c; reference windows-pv-drivers.md 0, 5(d), 6).

- `XenTouch(module, major, minor, micro, build)` is called by XENBUS's and XENFILT's DriverEntry (no
  other module calls it): the module must have been built from exactly this package version, else it is
  STATUS_INCOMPATIBLE_DRIVER_BLOCKED and "NOT COMPATIBLE (REBOOT REQUIRED)" is logged (6816d05): the old
  xen.sys is still loaded until reboot. The first successful touch also asks XenVersion, so off Xen it is
  STATUS_NOT_IMPLEMENTED (nothing counted); once one has succeeded, later ones only count.
- Outside Xen (the vCPU has no hypervisor link) HypercallInitialize finds no Xen CPUID leaves and leaves
  the hypercall page unpopulated; `XenVersion` then is STATUS_NOT_IMPLEMENTED and the modules quiesce
  (080720a: calling through the unpopulated page was the bug; switch `xenbus-080720a` calls anyway).
- Boot options come from `Control\\SystemStartOptions` (`XEN:BOOT_EMULATED=TRUE` ...).
- `XEN\\Parameters\\XenLogLevel` and `QemuLogLevel` are masks of (1 << DPFLTR level); records that match go
  out byte by byte on port 0xE9 (Xen's debug console) and port 0x12 (QEMU's log port, through xenhv).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from xenpv.stack.drivers import bugs
from xenpv.stack.kernel.debuglog import DbgLevel, DebugLog, DebugRecord
from xenpv.stack.kernel.pool import CodePage, MmExecute
from xenpv.stack.kernel.registry import Registry, RegistryError
from xenpv.stack.kernel.status import STATUS_INCOMPATIBLE_DRIVER_BLOCKED, STATUS_NOT_IMPLEMENTED, STATUS_SUCCESS
from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.xenabi import unplug as U
from xenpv.xenabi import xen as X

from .config import SERVICES, Config
from .unplug import UNPLUG_TYPES, Unplug

log = logging.getLogger("stack.drivers.xen")

PACKAGE_VERSION = (9, 1, 0, 10)  # MAJOR, MINOR, MICRO, BUILD of the package this xen.sys comes from
XEN_PARAMETERS = SERVICES + r"\XEN\Parameters"
CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"
XEN_DEBUG_PORT = 0xE9
XENVER_VERSION = 0
HYPERCALL_GATE_SIZE = 32  # hypercall.c: typedef UCHAR HYPERCALL_GATE[32], one per hypercall number


@dataclass(frozen=True)
class BootOptions:
    """The `XEN:` options of SystemStartOptions (driver.c __DriverGetOption); unknown ones are ignored."""

    boot_emulated: bool = False
    dbg_print: bool = True

    @classmethod
    def parse(cls, text: str) -> BootOptions:
        options: dict[str, str] = {}
        for word in text.replace("/", " ").split():
            if word.upper().startswith("XEN:") and "=" in word:
                name, value = word[4:].split("=", 1)
                options[name.upper()] = value.upper()
        return cls(boot_emulated=options.get("BOOT_EMULATED") == "TRUE",
                   dbg_print=options.get("DBG_PRINT", "ON") != "OFF")


@dataclass
class XenLog:
    """A debug-log listener writing matching records to the Xen and QEMU debug ports."""

    vcpu: Vcpu
    xen_mask: int
    qemu_mask: int
    lines: list[str] = field(default_factory=list)

    def __call__(self, record: DebugRecord) -> None:
        bit = 1 << record.level
        if not (self.xen_mask & bit or self.qemu_mask & bit):
            return
        data = (record.line() + "\n").encode("ascii", "replace")
        if self.xen_mask & bit:
            for byte in data:
                self.vcpu.outb(XEN_DEBUG_PORT, byte)
        if self.qemu_mask & bit:
            for byte in data:
                self.vcpu.outb(U.UNPLUG_PORT_LOG, byte)
        self.lines.append(record.line())


class Xen:
    """The loaded xen.sys of one boot. `vcpu` is None on a machine without Xen."""

    def __init__(self, registry: Registry, debug_log: DebugLog, vcpu: Vcpu | None,
                 version: tuple[int, int, int, int] = PACKAGE_VERSION) -> None:
        self.registry = registry
        self.debug_log = debug_log
        self.vcpu = vcpu
        self.version = version
        self.config = Config(registry, debug_log)
        self.options = BootOptions.parse(self._start_options())
        hypervisor = vcpu is not None and vcpu.hv is not None
        # Unplug ports exist only where xenhv serves them; anywhere else port I/O reaches plain QEMU,
        # which reads 0xFFFF at 0x10 and the preamble says "not supported".
        self.unplug = Unplug(registry, debug_log, vcpu if hypervisor else None, version,
                             boot_emulated=self.options.boot_emulated)
        self.xen_log: XenLog | None = None
        self.touch_references = 0  # XenTouch's static Reference
        # The image's .hypercall section: zeroes until HypercallInitialize has Xen fill it.
        self.hypercall_page = CodePage("hypercall page")

    @classmethod
    def load(cls, registry: Registry, debug_log: DebugLog, vcpu: Vcpu | None,
             version: tuple[int, int, int, int] = PACKAGE_VERSION) -> Xen:
        """DllInitialize: log set-up, then the unplug requests for this boot (only inside Xen)."""
        xen = cls(registry, debug_log, vcpu, version)
        xen._start_logging()
        xen.HypercallInitialize()
        status, _ = xen.XenVersion()
        if status == STATUS_NOT_IMPLEMENTED:
            xen._print("not running on Xen: quiescent")
            return xen
        for device_type in UNPLUG_TYPES:
            xen.unplug.UnplugSetRequest(device_type)
        xen._print(f"{'.'.join(map(str, version))} loaded"
                   + (" (BOOT_EMULATED)" if xen.options.boot_emulated else ""))
        return xen

    def _print(self, text: str, level: DbgLevel = DbgLevel.INFO) -> None:
        self.debug_log.print("XEN", text, level)

    def _start_options(self) -> str:
        try:
            return self.registry.get_sz(CONTROL_KEY, "SystemStartOptions")
        except RegistryError:
            return ""

    def _dword(self, path: str, name: str, default: int) -> int:
        try:
            return self.registry.get_dword(path, name)
        except RegistryError:
            return default

    def _start_logging(self) -> None:
        if self.vcpu is None or self.vcpu.hv is None:
            return
        xen_mask = self._dword(XEN_PARAMETERS, "XenLogLevel", 0)
        qemu_mask = self._dword(XEN_PARAMETERS, "QemuLogLevel", 0)
        if xen_mask or qemu_mask:
            self.xen_log = XenLog(self.vcpu, xen_mask, qemu_mask)
            self.debug_log.add_listener(self.xen_log)

    def unload(self) -> None:
        if self.xen_log is not None:
            self.debug_log.remove_listener(self.xen_log)
            self.xen_log = None

    # -- exports -------------------------------------------------------------------------------

    @property
    def is_xen(self) -> bool:
        return self.vcpu is not None and self.vcpu.hv is not None

    def HypercallInitialize(self) -> None:
        """Find Xen's CPUID leaves and have it write the hypercall page (the hypercall MSR); on any other
        hypervisor there are no such leaves and the page keeps its zeroes."""
        if self.is_xen:
            self.hypercall_page.populated = True
        else:
            self._print("HypercallInitialize: no Xen CPUID leaves: hypercall page not populated", DbgLevel.WARNING)

    def HypercallCall(self, name: str, *arguments: int) -> int:
        """A call through the page's gate for hypercall `name`."""
        number = X.HYPERCALL_NUMBERS[name]
        MmExecute(self.hypercall_page, number * HYPERCALL_GATE_SIZE, name)
        assert self.vcpu is not None
        return self.vcpu.hypercall(number, *arguments)

    def XenVersion(self) -> tuple[int, tuple[int, int] | None]:
        """(status, (major, minor)); the version is None when the hypervisor does not report one."""
        if not self.hypercall_page.populated and not bugs.enabled("xenbus-080720a"):
            return STATUS_NOT_IMPLEMENTED, None
        rc = self.HypercallCall("xen_version", XENVER_VERSION, 0)
        return STATUS_SUCCESS, ((rc >> 16, rc & 0xFFFF) if rc > 0 else None)

    def XenTouch(self, module: str, major: int, minor: int, micro: int, build: int) -> int:
        if (major, minor, micro, build) != self.version:
            self._print(f"MODULE '{module}' NOT COMPATIBLE (REBOOT REQUIRED): built for "
                        f"{major}.{minor}.{micro}.{build}, xen.sys is {'.'.join(map(str, self.version))}",
                        DbgLevel.ERROR)
            return STATUS_INCOMPATIBLE_DRIVER_BLOCKED
        if self.touch_references == 0:
            status, _ = self.XenVersion()
            if status == STATUS_NOT_IMPLEMENTED:
                return status
        self.touch_references += 1
        self._print(f"MODULE '{module}' {major}.{minor}.{micro}.{build}")
        return STATUS_SUCCESS
