"""The installer: what dpinst + setupapi + the packages' co-installers do to the registry (reference 5).

Every effect lands in the kernel registry, so it survives reboots through the hive file:
- `Services\\<svc>`: ImagePath, Type, Start, ErrorControl, Group, DisplayName and the INF's AddReg;
- `DriverDatabase\\DriverPackages\\<inf>_amd64_<version>`: the installed package (Version, Era, Services,
  HardwareIDs), `DriverDatabase\\DriverInfFiles\\<inf>` -> the active package, and
  `DriverDatabase\\DeviceIds\\<hardware ID>`: one DWORD per package binding that ID (its INF rank), which
  is what `RegistryCatalog.find` reads (Windows keeps the same index under that name);
- `DriverDatabase\\Images\\<file>`: the version of each image on disk, for XenTouch (`installed_version`).

Era rules are those of the package being installed (its co-installer, or none):
- subscriber (5a): before a provider is installed, every `Services\\<PROVIDER>\\Interfaces\\<SUB>\\<IF>`
  version must lie within the new provider's MIN..MAX, else InstallVetoed(ERROR_REVISION_MISMATCH).
  After the install each subscriber rewrites its subscriptions; the XENBUS package, with a Xen platform
  device present, installs the XENFILT class filter, records the active device and asks for a reboot.
- co-installer (5b; XB src/coinst/coinst.c@5e3c42f^): XENBUS's co-installer runs at DIF_INSTALLDEVICE for
  each platform device the INF binds. Pre-process: AllowUpdate = 0 under Services\\XEN, XENBUS or XENFILT
  vetoes (ERROR_ACCESS_DENIED); the driver on DEV_0001/0002 must be "<PRODUCT_NAME> PV Bus"
  (MatchExistingDriver, ERROR_INSTALL_FAILURE); every bound Enum\\XENBUS child's REV must be in the new
  revision table (SupportChildDrivers, ERROR_FILE_NOT_FOUND), an older row meaning NewBinding.
  Post-process: `(Active && NewBinding) || !VendorIsActive` deletes XEN\\Unplug DISKS and NICS. Its INFs
  reset no Unplug value. Children's co-installers of the era are not modelled.
- current (5c/5d): no checks; INF AddReg resets `XEN\\Unplug` NICS/DISKS to 0 (xenbus, xenvif, xenvbd);
  a child whose bound revision the installed bus lacks simply finds no driver (logged here, as setupapi
  logs "no matching driver" for the device); upgrading an installed package asks for a reboot through
  `xenbus_monitor\\Request\\<SERVICE>\\Reboot` (volatile), standing in for setupapi's DI_NEEDREBOOT.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from xenpv.stack.kernel.pnp import CLASS_KEY
from xenpv.stack.kernel.registry import REG_DWORD, REG_EXPAND_SZ, KeyNotFound, Registry, ValueNotFound

from .packages import (BUS_DEVICE_IDS, SERVICES_KEY, UNPLUG_KEY, VENDOR_DEVICE_ID, XEN_PCI_VENDOR,
                       XENFILT_FILTER_CLASSES, Era, Package, RegEntry, ServiceSpec, Version, get_package)

log = logging.getLogger("stack.install.installer")

DRIVER_DATABASE = r"HKLM\SYSTEM\DriverDatabase"
PACKAGES_KEY = f"{DRIVER_DATABASE}\\DriverPackages"
INF_FILES_KEY = f"{DRIVER_DATABASE}\\DriverInfFiles"
DEVICE_IDS_KEY = f"{DRIVER_DATABASE}\\DeviceIds"
IMAGES_KEY = f"{DRIVER_DATABASE}\\Images"
MONITOR_REQUEST_KEY = f"{SERVICES_KEY}\\xenbus_monitor\\Request"
XENFILT_PARAMETERS = f"{SERVICES_KEY}\\XENFILT\\Parameters"

# INF rank of a match on the models line's first ID vs a later ID of the same line (setupapi ranks).
INF_HARDWARE_ID_RANK = 0x0000
INF_COMPATIBLE_ID_RANK = 0x1000

ERROR_FILE_NOT_FOUND = 2
ERROR_ACCESS_DENIED = 5
ERROR_BAD_FORMAT = 11
ERROR_INSTALL_FAILURE = 1603
ERROR_REVISION_MISMATCH = 1306
WIN32_ERROR_NAMES = {ERROR_FILE_NOT_FOUND: "ERROR_FILE_NOT_FOUND", ERROR_ACCESS_DENIED: "ERROR_ACCESS_DENIED",
                     ERROR_BAD_FORMAT: "ERROR_BAD_FORMAT", ERROR_INSTALL_FAILURE: "ERROR_INSTALL_FAILURE",
                     ERROR_REVISION_MISMATCH: "ERROR_REVISION_MISMATCH"}
ENUM_KEY = r"HKLM\SYSTEM\CurrentControlSet\Enum"
CONFIGFLAG_REINSTALL = 0x20


class InstallError(Exception):
    """An install, upgrade or removal that could not be carried out (`package` names what was asked)."""

    def __init__(self, package: str, reason: str) -> None:
        self.package = package
        self.reason = reason
        super().__init__(f"{package}: {reason}")


class InstallVetoed(InstallError):
    """A co-installer failed DIF_INSTALL: `error` is the Win32 code it set, `error_name` its name."""

    def __init__(self, package: str, error: int, reason: str) -> None:
        self.error = error
        self.error_name = WIN32_ERROR_NAMES.get(error, f"ERROR_{error}")
        super().__init__(package, f"install vetoed ({self.error_name}): {reason}")


@dataclass
class InstallResult:
    package: Package
    previous: Version | None
    reboot_required: bool = False
    unbound: list[str] = field(default_factory=list)  # why children stay without a driver, one line each
    # Era (b): what XENBUS's co-installer decided (DifInstallPreProcess's NewBinding, and whether its
    # post-process cleared the XEN\Unplug requests).
    new_binding: bool = False
    unplug_cleared: bool = False


@dataclass(frozen=True)
class PlatformPciDevice:
    """A Xen platform PCI function as the installer sees it (the subscriber-era active-device choice)."""

    device_id: int
    revision: int = 1
    slot: int = 2  # QEMU places the guest's -device functions from slot 2 on, in YAML order (harness.machine)

    @property
    def pnp_instance_id(self) -> str:
        """pci.sys's InstanceID for function 0 of `slot` (stack.drivers.pci)."""
        return f"3&0&0&{self.slot << 3:02X}"

    @property
    def pnp_device_id(self) -> str:
        # xen-pvdevice reports subsystem = (device, vendor); see xenbus.inf's SUBSYS_C0005853.
        return (f"PCI\\VEN_{XEN_PCI_VENDOR:04X}&DEV_{self.device_id:04X}"
                f"&SUBSYS_{self.device_id:04X}{XEN_PCI_VENDOR:04X}&REV_{self.revision:02X}")


def _service_key(service: str) -> str:
    return f"{SERVICES_KEY}\\{service}"


def request_reboot(registry: Registry, module: str) -> None:
    """xen.sys ConfigRequestReboot / UNPLUG.Reboot: `<RequestKey>\\<Module>\\Reboot = 1`. Only the module key
    is volatile, so the request is gone after the reboot that honours it; RequestKey itself is an ordinary
    key (XB config.c creates it non-volatile), which xenbus_monitor watches across boots."""
    key = f"{MONITOR_REQUEST_KEY}\\{module}"
    registry.create_key(MONITOR_REQUEST_KEY)
    registry.create_key(key, volatile=True)
    registry.set_value(key, "Reboot", REG_DWORD, 1)
    log.info("reboot requested by %s", module)


def reboot_requests(registry: Registry) -> list[str]:
    """Modules with a pending reboot request (what xenbus_monitor would prompt for)."""
    if not registry.key_exists(MONITOR_REQUEST_KEY):
        return []
    pending = []
    for module in registry.subkeys(MONITOR_REQUEST_KEY):
        try:
            if registry.get_dword(f"{MONITOR_REQUEST_KEY}\\{module}", "Reboot"):
                pending.append(module)
        except ValueNotFound:
            continue
    return pending


def filters_install(registry: Registry, service: str = "XENFILT") -> None:
    """XENBUS FiltersInstall (driver.c): append XENFILT to the System and HDC class UpperFilters."""
    for guid in XENFILT_FILTER_CLASSES:
        key = f"{CLASS_KEY}\\{guid}"
        current = _read_filters(registry, key)
        if service.upper() not in (s.upper() for s in current):
            registry.set_multi_sz(key, "UpperFilters", current + [service])


def filters_uninstall(registry: Registry, service: str = "XENFILT") -> None:
    """XENBUS FiltersUninstall: drop XENFILT from the class UpperFilters (the value goes when empty)."""
    for guid in XENFILT_FILTER_CLASSES:
        key = f"{CLASS_KEY}\\{guid}"
        current = _read_filters(registry, key)
        kept = [s for s in current if s.upper() != service.upper()]
        if kept == current:
            continue
        if kept:
            registry.set_multi_sz(key, "UpperFilters", kept)
        else:
            registry.delete_value(key, "UpperFilters")


def _read_filters(registry: Registry, key: str) -> list[str]:
    try:
        return registry.get_multi_sz(key, "UpperFilters")
    except (KeyNotFound, ValueNotFound):
        return []


def installed_package(registry: Registry, name: str) -> Package | None:
    """The active package named `name` ("xenbus"), as recorded in the driver database."""
    try:
        key = registry.get_sz(f"{INF_FILES_KEY}\\{name.lower()}.inf", "Active")
        version = registry.get_sz(f"{PACKAGES_KEY}\\{key}", "Version")
    except (KeyNotFound, ValueNotFound):
        return None
    return get_package(name, version)


def installed_packages(registry: Registry) -> list[Package]:
    if not registry.key_exists(INF_FILES_KEY):
        return []
    found = (installed_package(registry, inf.rsplit(".", 1)[0]) for inf in registry.subkeys(INF_FILES_KEY))
    return [p for p in found if p is not None]


def installed_version(registry: Registry, module: str) -> Version | None:
    """The version of `module`'s image on disk ("XENBUS", "xenbus" or "xenbus.sys"), for XenTouch: xen.sys
    compares it with its own at each module's DriverEntry. None if the image is not installed."""
    image = module.lower() if module.lower().endswith((".sys", ".exe")) else f"{module.lower()}.sys"
    try:
        return Version.parse(registry.get_sz(f"{IMAGES_KEY}\\{image}", "Version"))
    except (KeyNotFound, ValueNotFound):
        return None


class Installer:
    """Installs, upgrades and removes packages on one guest's registry.

    `platform` lists the Xen platform PCI functions the guest has; the subscriber-era XENBUS co-installer
    only does its active-device work when one is present.
    """

    def __init__(self, registry: Registry, *, platform: Sequence[PlatformPciDevice] = ()) -> None:
        self.registry = registry
        self.platform = tuple(platform)

    # -- public API ---------------------------------------------------------------------------------

    def install(self, name: str, version: str | Version | None = None, *, era: Era | None = None) -> InstallResult:
        """Install `name` at `version` (the latest of `era` if None); an installed package is upgraded
        (or downgraded: setupapi installs what it is given)."""
        package = get_package(name, version, era=era)
        previous = installed_package(self.registry, package.name)
        log.info("installing %s (%s era, %s)%s", package, package.era.value, package.history,
                 f" over {previous.version}" if previous else "")
        if package.era == Era.SUBSCRIBER:
            self._support_registered_subscribers(package)
        new_binding = False
        if package.era == Era.COINSTALLER and package.name == "xenbus" and self._bound_devices(package):
            new_binding = self.DifInstallPreProcess(package)
        if previous is not None:
            self._uninstall_records(previous)
        self._copy_files(package)
        for spec in package.services:
            self._add_service(spec)
        for entry in package.add_reg:
            self._add_reg(entry.key, entry)
        self._record(package)
        self._set_driver_desc(package)
        result = InstallResult(package, previous.version if previous else None, new_binding=new_binding)
        if package.era == Era.SUBSCRIBER:
            self._subscriber_post_install(package, previous, result)
        elif package.era == Era.COINSTALLER:
            if package.name == "xenbus":
                for device in self._bound_devices(package):
                    self.DifInstallPostProcess(device, result)
            # setupapi's DI_NEEDREBOOT: the new images load at the next boot.
            result.reboot_required = previous is not None or bool(self._bound_devices(package))
        else:
            self._current_post_install(package, previous, result)
        result.unbound = self.unbound_children()
        for reason in result.unbound:
            log.warning("%s", reason)
        return result

    def upgrade(self, name: str, version: str | Version | None = None, *, era: Era | None = None) -> InstallResult:
        """Replace an installed package; InstallError if `name` is not installed."""
        if installed_package(self.registry, name) is None:
            raise InstallError(name, "not installed, nothing to upgrade")
        return self.install(name, version, era=era)

    def remove(self, name: str) -> Package:
        """Uninstall `name`: its services, driver-database records and subscriptions. Devices it drove
        find no driver at the next enumeration."""
        package = installed_package(self.registry, name)
        if package is None:
            raise InstallError(name, "not installed")
        log.info("removing %s", package)
        self._uninstall_records(package)
        for spec in package.services:
            self._delete_tree(_service_key(spec.name))
        if package.name == "xenbus":
            filters_uninstall(self.registry)
        self._delete_tree(f"{INF_FILES_KEY}\\{package.inf}")
        return package

    def unbound_children(self) -> list[str]:
        """Installed children whose bound revision no installed bus offers, with the reason."""
        reasons = []
        for package in installed_packages(self.registry):
            if package.binds is None:
                continue
            bus_name, revision = package.binds
            bus = installed_package(self.registry, bus_name.lower())
            if bus is None:
                reasons.append(f"{package}: binds {bus_name} REV_{revision:08X} but no {bus_name} package is "
                               "installed; its devices stay without a driver")
            elif revision not in bus.offers:
                offered = ", ".join(f"{r:08X}" for r in sorted(bus.offers, reverse=True)) or "none"
                reasons.append(f"{package}: binds {bus_name} REV_{revision:08X}, which {bus} does not offer "
                               f"(offers {offered}); the PnP manager finds no driver for its IDs")
        return reasons

    # -- INF processing -----------------------------------------------------------------------------

    def _copy_files(self, package: Package) -> None:
        for spec in package.services:
            key = f"{IMAGES_KEY}\\{spec.image.lower()}"
            self.registry.set_sz(key, "Version", str(package.version))
            self.registry.set_sz(key, "Package", package.key)

    def _add_service(self, spec: ServiceSpec) -> None:
        key = _service_key(spec.name)
        self.registry.set_value(key, "ImagePath", REG_EXPAND_SZ, spec.image_path)
        self.registry.set_dword(key, "Type", int(spec.type))
        self.registry.set_dword(key, "Start", int(spec.start))
        self.registry.set_dword(key, "ErrorControl", 1)  # SERVICE_ERROR_NORMAL
        self.registry.set_sz(key, "DisplayName", spec.name)
        if spec.group:
            self.registry.set_sz(key, "Group", spec.group)
        for entry in spec.add_reg:
            self._add_reg(f"{key}\\{entry.key}" if entry.key else key, entry)

    def _add_reg(self, key: str, entry: RegEntry) -> None:
        if entry.append:
            current = _read_filters(self.registry, key) if entry.name == "UpperFilters" else []
            added = [s for s in entry.data if s.upper() not in (c.upper() for c in current)]  # type: ignore[union-attr]
            self.registry.set_multi_sz(key, entry.name, current + added)
            return
        self.registry.set_value(key, entry.name, entry.type, entry.data)

    def _bound_devices(self, package: Package) -> list[PlatformPciDevice]:
        """The platform devices present whose IDs the package's INF lists (DIF_INSTALLDEVICE runs for each)."""
        ids = {i.upper() for i in package.hardware_ids}
        return [d for d in self.platform
                if d.pnp_device_id.upper() in ids or d.pnp_device_id.upper().rsplit("&SUBSYS_", 1)[0] in ids]

    def _set_driver_desc(self, package: Package) -> None:
        """setupapi writes the INF's device description for each device it installs the driver on. The model
        keeps it on the device's Enum key (Windows: DriverDesc in the driver key its Driver value names)."""
        if not package.driver_desc:
            return
        for device in self._bound_devices(package):
            key = f"{ENUM_KEY}\\PCI\\{device.pnp_device_id.removeprefix('PCI' + chr(92))}\\{device.pnp_instance_id}"
            self.registry.set_sz(key, "DriverDesc", package.driver_desc)

    def _record(self, package: Package) -> None:
        key = f"{PACKAGES_KEY}\\{package.key}"
        self.registry.set_sz(key, "Version", str(package.version))
        self.registry.set_sz(key, "Era", package.era.value)
        self.registry.set_multi_sz(key, "Services", [s.name for s in package.services])
        self.registry.set_multi_sz(key, "HardwareIDs", package.hardware_ids)
        self.registry.set_sz(f"{INF_FILES_KEY}\\{package.inf}", "Active", package.key)
        for line in package.models:
            for position, hardware_id in enumerate(line.ids):
                rank = INF_HARDWARE_ID_RANK if position == 0 else INF_COMPATIBLE_ID_RANK + position
                self.registry.set_dword(f"{DEVICE_IDS_KEY}\\{hardware_id}", package.key, rank)

    def _uninstall_records(self, package: Package) -> None:
        for hardware_id in package.hardware_ids:
            key = f"{DEVICE_IDS_KEY}\\{hardware_id}"
            try:
                self.registry.delete_value(key, package.key)
            except (KeyNotFound, ValueNotFound):
                continue
            if not self.registry.values(key) and not self.registry.subkeys(key):
                self.registry.delete_key(key)
        for spec in package.services:
            image = f"{IMAGES_KEY}\\{spec.image.lower()}"
            if self.registry.key_exists(image):
                self.registry.delete_key(image)
        for subscriber in package.subscribes:
            self._unsubscribe(package, subscriber)
        self._delete_tree(f"{PACKAGES_KEY}\\{package.key}")

    def _delete_tree(self, key: str) -> None:
        if self.registry.key_exists(key):
            self.registry.delete_key(key)

    # -- subscriber era (reference 5a) ----------------------------------------------------------------

    def _support_registered_subscribers(self, package: Package) -> None:
        """coinst.c SupportRegisteredSubscribers, for each provider the package carries."""
        for provider in sorted({r.provider for r in package.provides}):
            interfaces_key = f"{_service_key(provider)}\\Interfaces"
            if not self.registry.key_exists(interfaces_key):
                continue
            for subscriber in self.registry.subkeys(interfaces_key):
                for value in self.registry.values(f"{interfaces_key}\\{subscriber}"):
                    if value.type != REG_DWORD:
                        continue
                    supported = package.range(provider, value.name)
                    if supported is None or not supported.min <= int(value.data) <= supported.max:
                        offered = (f"{supported.min}..{supported.max}" if supported is not None
                                   else "does not provide it")
                        raise InstallVetoed(str(package), ERROR_REVISION_MISMATCH,
                                            f"subscriber {subscriber} uses {provider} {value.name} interface "
                                            f"version {value.data}; {package} supports {offered}; "
                                            f"upgrade {subscriber} first")
                log.info("%s: subscriber %s supported by %s", provider, subscriber, package)

    def _unsubscribe(self, package: Package, subscriber: str) -> None:
        for provider in {s.provider for s in package.subscribes[subscriber]}:
            self._delete_tree(f"{_service_key(provider)}\\Interfaces\\{subscriber}")

    def _subscriber_post_install(self, package: Package, previous: Package | None, result: InstallResult) -> None:
        for subscriber, subscriptions in package.subscribes.items():
            for sub in subscriptions:
                self.registry.set_dword(f"{_service_key(sub.provider)}\\Interfaces\\{subscriber}", sub.interface,
                                        sub.version)
        for provider in {r.provider for r in package.provides}:
            self.registry.create_key(f"{_service_key(provider)}\\Interfaces")
        if package.name == "xenbus":
            active = self._active_device()
            if active is None:
                log.info("%s: no Xen platform device; no filters, no active device", package)
                return
            filters_install(self.registry)
            # coinst.c@d55a644^ SetActiveDeviceInstanceID: the DeviceID and InstanceID, no location (XENFILT
            # hides an active device whose ActiveInstanceID is missing: xenfilt pdo.c PdoSetDeviceInformation).
            self.registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", active.pnp_device_id)
            self.registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", active.pnp_instance_id)
            log.info("%s: active device %s\\%s", package, active.pnp_device_id, active.pnp_instance_id)
        # The co-installers set DI_NEEDREBOOT: bus and children start together after a reboot.
        result.reboot_required = bool(self.platform) or previous is not None

    def _active_device(self) -> PlatformPciDevice | None:
        """The vendor device if present, else the first of 0001/0002 (INSTALL.md; fdo.c SetActive)."""
        by_id = {d.device_id: d for d in self.platform if d.device_id in BUS_DEVICE_IDS}
        if VENDOR_DEVICE_ID in by_id:
            return by_id[VENDOR_DEVICE_ID]
        return next(iter(by_id.values()), None)

    # -- co-installer era (reference 5b; XB src/coinst/coinst.c@5e3c42f^) ------------------------------

    def DifInstallPreProcess(self, package: Package) -> bool:
        """DIF_INSTALLDEVICE pre-processing of XENBUS's co-installer: AllowInstall, MatchExistingDriver,
        SupportChildDrivers. A failure vetoes the install with its Win32 error; returns NewBinding."""
        self.AllowInstall(package)
        self.MatchExistingDriver(package)
        return self.SupportChildDrivers(package)

    def AllowInstall(self, package: Package) -> None:
        """AllowUpdate for XEN, XENBUS and XENFILT: `AllowUpdate = 0` in any service key vetoes
        (ERROR_ACCESS_DENIED); a value that is not a REG_DWORD fails the check (ERROR_BAD_FORMAT)."""
        for driver in ("XEN", "XENBUS", "XENFILT"):
            try:
                value = self.registry.query_value(_service_key(driver), "AllowUpdate")
            except (KeyNotFound, ValueNotFound):
                continue
            if value.type != REG_DWORD:
                raise InstallVetoed(str(package), ERROR_BAD_FORMAT,
                                    f"Services\\{driver}\\AllowUpdate is not a REG_DWORD")
            if value.data == 0:
                raise InstallVetoed(str(package), ERROR_ACCESS_DENIED,
                                    f"Services\\{driver}\\AllowUpdate = 0: updates of the PV bus are disallowed")

    def _device_instances(self, bus: str, prefix: str = "") -> list[tuple[str, str]]:
        """(device key, instance key) of each `Enum\\<bus>` device whose name starts with `prefix`, with
        the first instance that has a bound driver (GetDriverKeyName; the model's PnP manager records the
        binding as the instance's Service value, Windows as its Driver value)."""
        root = f"{ENUM_KEY}\\{bus}"
        if not self.registry.key_exists(root):
            return []
        found = []
        for device in self.registry.subkeys(root):
            if not device.startswith(prefix):  # strncmp
                continue
            for instance in self.registry.subkeys(f"{root}\\{device}"):
                path = f"{root}\\{device}\\{instance}"
                try:
                    self.registry.get_sz(path, "Service")
                except (KeyNotFound, ValueNotFound):
                    continue
                found.append((device, path))
                break
        return found

    def MatchExistingDriver(self, package: Package) -> None:
        """The driver bound to the first `Enum\\PCI\\VEN_5853&DEV_0001...` (else DEV_0002) device must be
        "<PRODUCT_NAME> PV Bus": another vendor's bus driver fails the install (ERROR_INSTALL_FAILURE). No
        such device, no bound driver or no DriverDesc: nothing to match."""
        for prefix in (f"VEN_{XEN_PCI_VENDOR:04X}&DEV_0001", f"VEN_{XEN_PCI_VENDOR:04X}&DEV_0002"):
            root = f"{ENUM_KEY}\\PCI"
            devices = [d for d in (self.registry.subkeys(root) if self.registry.key_exists(root) else [])
                       if d.startswith(prefix)]
            if not devices:
                continue
            bound = self._device_instances("PCI", devices[0])
            if not bound:
                return
            try:
                desc = self.registry.get_sz(bound[0][1], "DriverDesc")
            except (KeyNotFound, ValueNotFound):
                return
            if desc != package.driver_desc:
                raise InstallVetoed(str(package), ERROR_INSTALL_FAILURE,
                                    f"{devices[0]} is driven by '{desc}', not '{package.driver_desc}' "
                                    "(MatchExistingDriver)")
            return

    def SupportChildDrivers(self, package: Package) -> bool:
        """Every `Enum\\XENBUS` child with a bound driver (ConfigFlags without CONFIGFLAG_REINSTALL) must
        have been matched on a `REV_%8x` the new bus's revision table has (else ERROR_FILE_NOT_FOUND; an
        ID without one, ERROR_BAD_FORMAT); a match on any but the newest row means NewBinding."""
        newest = max(package.offers)
        new_binding = False
        for device, path in self._device_instances("XENBUS"):
            try:
                flags = self.registry.get_dword(path, "ConfigFlags")
            except (KeyNotFound, ValueNotFound, TypeError):
                flags = 0
            if flags & CONFIGFLAG_REINSTALL:
                continue
            try:
                matching = self.registry.get_sz(path, "MatchingDeviceId")
            except (KeyNotFound, ValueNotFound):
                continue
            tail = matching.rsplit("&", 1)[-1]
            if not tail.upper().startswith("REV_") or len(tail) < 5:
                raise InstallVetoed(str(package), ERROR_BAD_FORMAT, f"{device}: {matching} has no REV_ part")
            try:
                revision = int(tail[4:12], 16)
            except ValueError:
                raise InstallVetoed(str(package), ERROR_BAD_FORMAT, f"{device}: {matching}: bad revision") from None
            if revision not in package.offers:
                raise InstallVetoed(str(package), ERROR_FILE_NOT_FOUND,
                                    f"child {device} is bound to {matching}, a revision {package} does not "
                                    "have (SupportChildDrivers); upgrade the child drivers first")
            if revision != newest:
                new_binding = True
            log.info("%s: child %s on REV_%08X%s", package, device, revision,
                     " (new binding)" if revision != newest else "")
        return new_binding

    def DifInstallPostProcess(self, device: PlatformPciDevice, result: InstallResult) -> None:
        """IsActiveDevice, then `if ((Active && NewBinding) || !VendorIsActive)` delete XEN\\Unplug DISKS
        and NICS, so the next boot is emulated while the children rebind. Without a stored active device
        Active stays TRUE and VendorIsActive is never set (an uninitialised BOOLEAN in the real code); the
        model takes it as FALSE, which clears the requests."""
        active, vendor_is_active = True, False
        try:
            active_id = self.registry.get_sz(XENFILT_PARAMETERS, "ActiveDeviceID")
            active_instance = self.registry.get_sz(XENFILT_PARAMETERS, "ActiveInstanceID")
        except (KeyNotFound, ValueNotFound):
            active_id = active_instance = None
        if active_id is not None and active_instance is not None:
            active = (active_id.upper() == device.pnp_device_id.upper()
                      and active_instance.upper() == device.pnp_instance_id.upper())
            vendor = f"PCI\\VEN_5853&DEV_{VENDOR_DEVICE_ID:04X}&SUBSYS_C0005853&REV_01"  # as coinst.c spells it
            vendor_is_active = active_id.upper() == vendor.upper()
        log.info("%s on %s: Active = %s, NewBinding = %s, VendorIsActive = %s", result.package,
                 device.pnp_device_id, active, result.new_binding, vendor_is_active)
        if (active and result.new_binding) or not vendor_is_active:
            for name in ("DISKS", "NICS"):
                try:
                    self.registry.delete_value(UNPLUG_KEY, name)
                except (KeyNotFound, ValueNotFound):
                    continue
            result.unplug_cleared = True

    # -- current era (reference 5c, 5d) ---------------------------------------------------------------

    def _current_post_install(self, package: Package, previous: Package | None, result: InstallResult) -> None:
        if previous is None:
            return
        # The old images are loaded: the new ones (and XenTouch's exact match) take effect at the reboot.
        result.reboot_required = True
        for service in dict.fromkeys(line.service for line in package.models):
            request_reboot(self.registry, service)
