"""Boot a guest's driver stack on a Kernel over the real machine.

`boot_stack(vcpu, ram_pages, ...)` plays firmware and Windows boot: PCI resources are assigned through
0xCF8/0xCFC, xen.sys is loaded (unplug requests for this boot), the PCI root (`ACPI\\PNP0A03`) is
registered with the PnP manager, and PnP runs: pci.sys reports the functions QEMU really has, XENFILT
gates them until unplug is decided, XENBUS binds the platform devices and reports its children.

The catalog is a parameter (the installer supplies the real one); `default_catalog` binds what a
freshly installed XENBUS package binds plus the in-box PCI and IDE drivers. The boot device must be
there at the end (the emulated primary master, or a XENBUS VBD child), else INACCESSIBLE_BOOT_DEVICE.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from xenpv.stack.drivers import bugs as bug_switches
from xenpv.stack.drivers.atapi import IDE_CHANNEL_ID, AtapiDriver, ata_has_medium, ata_identify
from xenpv.stack.drivers.pci import PNP0A03_IDS, PciDriver
from xenpv.stack.drivers.revision import VENDOR_PREFIX
from xenpv.stack.drivers.xen import PACKAGE_VERSION, Xen
from xenpv.stack.drivers.xenbus.driver import FiltersInstall, XenbusDriver
from xenpv.stack.drivers.xenfilt import XenfiltDriver
from xenpv.stack.kernel import BugCheckCode, DeviceNode, InMemoryCatalog, Kernel, KeBugCheckEx, Registry, RegistryError
from xenpv.stack.kernel.assertion import set_build
from xenpv.stack.kernel.pnp import DeviceNodeState, DriverCatalog, HDC_CLASS_GUID, SYSTEM_CLASS_GUID
from xenpv.stack.kernel.mm import MemoryManager, set_current_mm
from xenpv.stack.notmodelled import NotModelled
from xenpv.stack.vcpu.cpu import Vcpu
from xenpv.stack.vcpu.pages import PageAllocator
from xenpv.stack.vcpu.pci import PciBus, PciFunction
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi.unplug import UNPLUG_ALL_IDE_DISKS

log = logging.getLogger("stack.drivers.boot")

XENBUS_PCI_IDS = (r"PCI\VEN_5853&DEV_0001", r"PCI\VEN_5853&DEV_0002", r"PCI\VEN_5853&DEV_C000&SUBSYS_C0005853&REV_01")
PIIX_IDE_ID = r"PCI\VEN_8086&DEV_7010"
XENFILT_PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENFILT\Parameters"
XENBUS_PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters"
CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"


@dataclass
class BootedStack:
    kernel: Kernel
    xen: Xen
    xenfilt: XenfiltDriver
    xenbus: XenbusDriver
    vcpu: Vcpu
    pci: list[PciFunction]  # the bus as the firmware step left it
    children_modelled: bool = True  # False with the default catalog: XENBUS's children have no driver model

    def poll(self) -> None:
        """Run deferred work: xenstore watch events of the active FDO, then queued re-enumerations. Not while
        the vCPU is parked in the suspend hypercall or powered off (stack.vcpu.relocation): no processor
        runs driver code then, and the console must still hand it its next machine."""
        if self.vcpu.relocation.waiting is not None:
            return
        with self.kernel.cpu.lock:
            for fdo in self.xenbus.fdos:
                fdo.poll()
            self.kernel.pnp.process_pending()

    def nodes(self, prefix: str) -> list[DeviceNode]:
        return [n for n in self.kernel.pnp.root.walk() if n.instance_path.upper().startswith(prefix.upper())]

    def close(self) -> None:
        for fdo in self.xenbus.fdos:
            fdo.FdoStop()
        self.xen.unload()


INBOX_SERVICES = ("PCI", "PCIIDE", "ATAPI")  # Windows' own drivers, not from a PV package


def inbox_catalog(drivers: dict[str, Callable[..., int]]) -> InMemoryCatalog:
    """Windows' in-box bindings: the PCI root, the PIIX IDE controller and its channels."""
    catalog = InMemoryCatalog()
    for service in INBOX_SERVICES:
        if service in drivers:
            catalog.add_driver(service, drivers[service])
    catalog.bind("*PNP0A03", "PCI", class_guid=SYSTEM_CLASS_GUID)
    catalog.bind(PIIX_IDE_ID, "PCIIDE", class_guid=HDC_CLASS_GUID)
    catalog.bind(IDE_CHANNEL_ID, "ATAPI", class_guid=HDC_CLASS_GUID)
    return catalog


def default_catalog(drivers: dict[str, Callable[..., int]]) -> InMemoryCatalog:
    """The in-box bindings plus what a freshly installed XENBUS package binds (tests without the installer)."""
    catalog = inbox_catalog(drivers)
    for service, entry in drivers.items():
        catalog.add_driver(service, entry)
    for pci_id in XENBUS_PCI_IDS:
        catalog.bind(pci_id, "XENBUS", class_guid=SYSTEM_CLASS_GUID, package="xenbus")
    return catalog


def prepare_registry(registry: Registry, *, boot_options: tuple[str, ...] = ()) -> None:
    """What installing the XENBUS package leaves behind: the XENFILT type map and class filters."""
    registry.set_sz(XENFILT_PARAMETERS, "*PNP0A03", "PCI")
    registry.set_sz(XENFILT_PARAMETERS, IDE_CHANNEL_ID, "IDE")
    # xenbus.inf XenBus_Parameters; kept if present, so a test can set its own (XENBUS reads no default).
    for name, classes in (("SupportedClasses", ["VIF", "VBD", "VKBD", "IFACE", "CONS"]),
                          ("SyntheticClasses", ["IFACE", "CONS"])):
        try:
            registry.query_value(XENBUS_PARAMETERS, name)
        except RegistryError:
            registry.set_multi_sz(XENBUS_PARAMETERS, name, classes)
    FiltersInstall(registry)
    if boot_options:
        registry.set_sz(CONTROL_KEY, "SystemStartOptions", " ".join(f"XEN:{o}=TRUE" for o in boot_options))


def boot_stack(vcpu: Vcpu, ram_pages: int, *, registry: Registry | None = None,
               catalog: Callable[[dict[str, Callable[..., int]]], DriverCatalog] = default_catalog,
               seed: int | None = None, boot_options: tuple[str, ...] = (), version: tuple[int, int, int, int] = PACKAGE_VERSION,
               prefix: str = VENDOR_PREFIX, extra_drivers: dict[str, Callable[..., int]] | None = None,
               kernel: Kernel | None = None,
               module_versions: Mapping[str, tuple[int, int, int, int]] | None = None,
               bugs: Iterable[str] = (), build: str = "free") -> BootedStack:
    """Boot; `catalog(drivers)` builds the DriverCatalog from the images {service: DriverEntry}. A
    `kernel` made by the caller (who then holds it for a crash dump if boot bugchecks) brings its registry.
    `module_versions` {"XEN"|"XENFILT"|"XENBUS": version} gives each image its own build (the versions of
    the files on disk, which XenTouch compares); a module not named is `version`. `bugs`: the historical
    bug switches of the guest YAML (guests.bugs), joined by those the registry turns on. `build`: the
    drivers' build, "free" or "checked" (stack.kernel.assertion: whether their ASSERTs stop the guest)."""
    versions = {module: (module_versions or {}).get(module, version) for module in ("XEN", "XENFILT", "XENBUS")}
    if kernel is None:
        kernel = Kernel(registry=registry if registry is not None else Registry(), seed=seed)
    registry = kernel.registry
    prepare_registry(registry, boot_options=boot_options)
    bus = PciBus(vcpu)
    pci = bus.assign_resources()
    kernel.activate()
    bug_switches.activate(bugs, registry, kernel.log)  # before xen.sys loads: 080720a lives in its DllInitialize
    set_build(build, kernel.log)
    xen = Xen.load(registry, kernel.log, vcpu, versions["XEN"])
    xenfilt = XenfiltDriver(xen, versions["XENFILT"])
    kernel.mm = MemoryManager(PageAllocator(ram_pages), vcpu)
    set_current_mm(kernel.mm)
    xenbus = XenbusDriver(xen, lambda: XenPlatform.start(vcpu, ram_pages, pages=kernel.mm.pages), kernel,
                          versions["XENBUS"], prefix)
    atapi = AtapiDriver(vcpu)
    images: dict[str, Callable[..., int]] = {"PCI": PciDriver(bus).driver_entry, "PCIIDE": atapi.pciide_entry,
                                             "ATAPI": atapi.atapi_entry, "XENFILT": xenfilt.driver_entry,
                                             "XENBUS": xenbus.driver_entry, **(extra_drivers or {})}
    kernel.catalog = kernel.pnp.catalog = catalog(images)
    kernel.add_reference_provider("XENBUS", lambda: {f"XENBUS.{name}": ctx.references for f in xenbus.fdos
                                                     for name, ctx in f.interfaces.items()})
    kernel.pnp.add_root_device(r"ACPI\PNP0A03", PNP0A03_IDS)
    booted = BootedStack(kernel, xen, xenfilt, xenbus, vcpu, pci, children_modelled=catalog is not default_catalog)
    kernel.boot()
    booted.poll()
    check_boot_device(booted)
    return booted


def check_boot_device(booted: BootedStack) -> None:
    """0x7B unless the boot disk is reachable: the emulated primary master or a XENBUS VBD child."""
    emulated = booted.nodes("IDE\\")
    if any(n.instance_id == "0.0.0" for n in emulated):
        return
    # A VBD PDO is a disk only once a driver (XENVBD) drives it: without one it is a device with a problem
    # code. Boots with the default catalog (unit rigs of xen.sys, XENFILT and XENBUS) model no child driver
    # at all, so there the PDO stands for the disk XENVBD would make of it.
    vbds = booted.nodes(f"XENBUS\\VEN_{booted.xenbus.prefix}&DEV_VBD")
    if any(n.state == DeviceNodeState.STARTED or not booted.children_modelled for n in vbds):
        return
    if (not booted.xen.unplug.unplugged_mask & UNPLUG_ALL_IDE_DISKS and ata_identify(booted.vcpu, 0, 0) is not None
            and not ata_has_medium(booted.vcpu, 0, 0)):
        # The primary master is there without its disk, and this boot unplugged no disk: an earlier boot
        # of this QEMU did. On Xen a restart is a new domain with a new device model, where the disk
        # would be back and Windows would boot from it; the in-place reboot cannot show that.
        raise NotModelled("this boot needs the emulated boot disk, which an earlier boot of the same QEMU "
                          "unplugged (a Windows restart is modelled in place; on Xen the toolstack would "
                          "restart the domain with a new QEMU and the disk back)")
    raise KeBugCheckEx(BugCheckCode.INACCESSIBLE_BOOT_DEVICE, "boot disk", 0, 0, 0, module="ntoskrnl.exe",
                       message="no emulated primary master and no PV disk: the boot disk is gone")
