"""Guest set-up from its YAML definition: the packages and era it names, then its registry presets.

This models a guest on which the packages were installed and the reboot they ask for has happened:
with a Xen platform device, XENFILT is in the class UpperFilters (what XENBUS FiltersInstall did at its
first AddDevice; the subscriber-era co-installer did it itself). Reboot requests of the install are
volatile and so gone. Presets come last, so a YAML can override INF defaults (e.g. `XEN\\Unplug`).
"""
from __future__ import annotations

import logging
from typing import Any

from xenpv.guests.schema import GuestDefinition
from xenpv.stack.kernel.registry import REG_DWORD, REG_MULTI_SZ, REG_SZ, Registry

from .installer import InstallError, InstallResult, Installer, PlatformPciDevice, filters_install
from .packages import PACKAGE_NAMES, Era

log = logging.getLogger("stack.install.guest")

CONTROL_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control"


def install_from_guest(registry: Registry, guest: GuestDefinition) -> list[InstallResult]:
    with registry.batch():
        return _install_from_guest(registry, guest)


def _install_from_guest(registry: Registry, guest: GuestDefinition) -> list[InstallResult]:
    era = Era(guest.drivers.era)
    installer = Installer(registry, platform=[PlatformPciDevice(d.device_id, d.revision, slot=2 + i)
                                              for i, d in enumerate(guest.platform)])
    results = []
    # Bus first: children bind to its PDOs (reference 10), then the rest in a fixed order.
    for name in sorted(guest.drivers.packages, key=PACKAGE_NAMES.index):
        try:
            results.append(installer.install(name, guest.drivers.packages[name], era=era))
        except LookupError as exc:
            raise InstallError(name, f"guest {guest.name}: {exc} in the {era.value} era") from exc
    if guest.platform and "xenbus" in guest.drivers.packages:
        filters_install(registry)
    for key, values in guest.registry.items():
        for name, data in values.items():
            _set_preset(registry, key, name, data)
    if guest.boot_options:
        # Windows keeps the boot options, without the leading slashes, in one REG_SZ.
        registry.set_sz(CONTROL_KEY, "SystemStartOptions",
                        " ".join(f"XEN:{option}=TRUE" for option in guest.boot_options))
    return results


def _set_preset(registry: Registry, key: str, name: str, data: Any) -> None:
    kind = REG_DWORD if isinstance(data, int) else REG_MULTI_SZ if isinstance(data, list) else REG_SZ
    registry.set_value(key, name, kind, data)
    log.info("preset %s\\%s = %r", key, name, data)
