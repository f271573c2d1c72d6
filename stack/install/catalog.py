"""`RegistryCatalog`: the PnP manager's `DriverCatalog` over the driver database the installer writes.

`find(id)` reads `DriverDatabase\\DeviceIds\\<id>`: one DWORD per installed package whose INF models section
lists the ID (0 for a line's first ID, the INF hardware ID; 0x1000 + position for the line's later IDs,
its INF compatible IDs), so results come best rank first. Everything lives in the registry, so a
reloaded hive binds the same drivers. Children bind exact revisions: a child package whose REV the
installed bus does not report is listed for IDs no PDO carries, and find() on the PDO's IDs is empty.

`entry_point(service)` maps the service's ImagePath to a Python module and imports it lazily: image
`<name>.sys` is `stack.drivers.<name>.driver:DriverEntry` (xen.sys -> stack.drivers.xen.driver, xendisk.sys
-> stack.drivers.xendisk.driver). A module that does not exist (yet) is a missing image: None, and the PnP
manager reports CM_PROB_DRIVER_FAILED_LOAD. `images` overrides the mapping: {service: DriverEntry or
"module:attribute"}, e.g. the bound entries `stack.drivers.boot.boot_stack` builds, as in
`boot_stack(..., catalog=lambda images: RegistryCatalog(registry, images=images, inbox=inbox))`.
`inbox` is the catalog of Windows' in-box drivers (pci.sys, pciide, atapi: machine.inf and friends,
which no PV package installs); its matches come after the packages' for the same ID.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping, Sequence

from xenpv.stack.kernel.device import DriverEntryRoutine
from xenpv.stack.kernel.pnp import DriverCatalog, DriverMatch
from xenpv.stack.kernel.registry import KeyNotFound, Registry, ValueNotFound

from .installer import DEVICE_IDS_KEY, INF_FILES_KEY, installed_package
from .packages import SERVICES_KEY

log = logging.getLogger("stack.install.catalog")

DRIVER_MODULE_PACKAGE = "xenpv.stack.drivers"
DRIVER_ENTRY_NAME = "DriverEntry"


def driver_module_for_image(image: str) -> str:
    """`xenbus.sys` -> `stack.drivers.xenbus.driver:DriverEntry` (the naming the drivers follow)."""
    stem = image.rsplit("\\", 1)[-1].rsplit(".", 1)[0].lower()
    return f"{DRIVER_MODULE_PACKAGE}.{stem}.driver:{DRIVER_ENTRY_NAME}"


def resolve(target: str) -> DriverEntryRoutine | None:
    """Import `package.module:attribute`; None if the module (or the attribute) does not exist."""
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a missing driver module means "no image"; a driver that fails to import its own
        # dependencies is a bug that must surface.
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        return None
    entry = getattr(module, attribute or DRIVER_ENTRY_NAME, None)
    return entry if callable(entry) else None


class RegistryCatalog:
    def __init__(self, registry: Registry, *, images: Mapping[str, str | DriverEntryRoutine] | None = None,
                 inbox: DriverCatalog | None = None) -> None:
        self.registry = registry
        self.inbox = inbox
        # service (upper case) -> "module:attribute" or a DriverEntry routine
        self.images = {k.upper(): v for k, v in (images or {}).items()}

    def find(self, device_id: str) -> Sequence[DriverMatch]:
        inbox = list(self.inbox.find(device_id)) if self.inbox is not None else []
        try:
            bindings = self.registry.values(rf"{DEVICE_IDS_KEY}\{device_id}")
        except KeyNotFound:
            return inbox
        matches = []
        for binding in bindings:
            match = self._match(device_id, binding.name, int(binding.data))  # type: ignore[arg-type]
            if match is not None:
                matches.append(match)
        return sorted(matches, key=lambda m: m.rank) + inbox

    def _match(self, device_id: str, package_key: str, rank: int) -> DriverMatch | None:
        package = installed_package(self.registry, package_key.split(".inf_", 1)[0])
        if package is None or package.key != package_key:
            log.warning("%s: index names %s, which is not the installed package", device_id, package_key)
            return None
        for line in package.models:
            if device_id.upper() in (i.upper() for i in line.ids):
                return DriverMatch(service=line.service, rank=rank, class_guid=package.class_guid,
                                   package=package.key)
        log.warning("%s: index names %s, whose INF does not list it", device_id, package_key)
        return None

    def entry_point(self, service: str) -> DriverEntryRoutine | None:
        override = self.images.get(service.upper())
        if override is not None:
            return resolve(override) if isinstance(override, str) else override
        if self.inbox is not None:
            entry = self.inbox.entry_point(service)
            if entry is not None:
                return entry
        try:
            image = str(self.registry.query_value(rf"{SERVICES_KEY}\{service}", "ImagePath").data)
        except (KeyNotFound, ValueNotFound):
            log.info("%s: no service key or ImagePath; image missing", service)
            return None
        entry = resolve(driver_module_for_image(image))
        if entry is None:
            log.info("%s: %s has no module %s", service, image, driver_module_for_image(image))
        return entry

    def installed(self) -> list[str]:
        """`<inf>: <package key>` lines, for the agent's console."""
        if not self.registry.key_exists(INF_FILES_KEY):
            return []
        lines = []
        for inf in self.registry.subkeys(INF_FILES_KEY):
            active = self.registry.get_sz(rf"{INF_FILES_KEY}\{inf}", "Active")
            lines.append(f"{inf}: {active}")
        return lines

