"""xen.sys "Config": the active platform device and reboot requests (XB src/xen/config.c; reference 4, 5(c)).

The active device lives in `Services\\XENFILT\\Parameters` as REG_SZ ActiveDeviceID, ActiveInstanceID and
ActiveLocationInformation; XENBUS sets it, XENFILT reads it to decide unplug and to keep the instance
path stable. A reboot request is the volatile value `<RequestKey>\\<Module>\\Reboot = 1` the xenbus_monitor
service watches; volatile because a request is only meaningful until the next boot.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from xenpv.stack.kernel.registry import Registry, RegistryError

log = logging.getLogger("stack.drivers.xen.config")

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
XENFILT_PARAMETERS = SERVICES + r"\XENFILT\Parameters"
DEFAULT_REQUEST_KEY = r"SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"
XENBUS_PARAMETERS = SERVICES + r"\XENBUS\Parameters"


@dataclass(frozen=True)
class ActiveDevice:
    device_id: str
    instance_id: str | None = None
    location_information: str | None = None


class Config:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def _get(self, name: str) -> str | None:
        try:
            return self.registry.get_sz(XENFILT_PARAMETERS, name)
        except RegistryError:
            return None

    def ConfigGetActive(self) -> ActiveDevice | None:
        device_id = self._get("ActiveDeviceID")
        if device_id is None:
            return None
        return ActiveDevice(device_id, self._get("ActiveInstanceID"), self._get("ActiveLocationInformation"))

    def ConfigSetActive(self, device_id: str, instance_id: str, location: str) -> None:
        self.registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", device_id)
        self.registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", instance_id)
        self.registry.set_sz(XENFILT_PARAMETERS, "ActiveLocationInformation", location)
        log.info("active device %s\\%s (%s)", device_id, instance_id, location)

    def ConfigUpdateActive(self, device_id: str, instance_id: str, location: str) -> None:
        """Fill in whatever an installer left out; the DeviceID itself is never changed here."""
        if self._get("ActiveInstanceID") is None:
            self.registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", instance_id)
        if self._get("ActiveLocationInformation") is None:
            self.registry.set_sz(XENFILT_PARAMETERS, "ActiveLocationInformation", location)

    def ConfigClearActive(self) -> None:
        # LocationInformation stays, as in config.c: only the ID pair names the active device.
        for name in ("ActiveDeviceID", "ActiveInstanceID"):
            try:
                self.registry.delete_value(XENFILT_PARAMETERS, name)
            except RegistryError:
                pass

    def request_key(self) -> str:
        try:
            key = self.registry.get_sz(XENBUS_PARAMETERS, "RequestKey")
        except RegistryError:
            key = DEFAULT_REQUEST_KEY
        return "HKLM\\" + key.removeprefix("HKLM\\")

    def ConfigRequestReboot(self, module: str) -> None:
        path = f"{self.request_key()}\\{module}"
        # Parents are ordinary keys; only the module key is volatile.
        self.registry.create_key(path.rsplit("\\", 1)[0])
        self.registry.create_key(path, volatile=True)
        self.registry.set_dword(path, "Reboot", 1)
        log.info("%s: reboot requested", module)

    def reboot_requested(self, module: str) -> bool:
        try:
            return self.registry.get_dword(f"{self.request_key()}\\{module}", "Reboot") == 1
        except RegistryError:
            return False
