"""xen.sys "Config": the active platform device and reboot requests (XB src/xen/config.c; reference 4, 5(c)).

The active device lives in `Services\\XENFILT\\Parameters` as REG_SZ ActiveDeviceID, ActiveInstanceID and
ActiveLocationInformation; XENBUS sets it, XENFILT reads it to decide unplug and to keep the instance
path stable. A reboot request is the volatile value `<RequestKey>\\<Module>\\Reboot = 1` the xenbus_monitor
service watches; volatile because a request is only meaningful until the next boot.

ConfigSetActive and ConfigUpdateActive both refuse (STATUS_UNSUCCESSFUL, nothing written) a "legacy"
device - any DeviceID that does not start with `PCI\\VEN_5853&DEV_<VENDOR_DEVICE_ID>` - once the vendor
device has an `Enum\\PCI\\VEN_5853&DEV_<V>&SUBSYS_<V>5853&REV_01` key (config.c __ConfigIsDeviceLegacy,
__ConfigIsVendorDevicePresent). The check sits in the Config calls themselves, so it also applies where
FdoSetActive ignores their status (forced activation, a stored ActiveDeviceID). A xen.sys built without
VENDOR_DEVICE_ID (`vendor_device_id=None`) never refuses.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from xenpv.stack.kernel.debuglog import DbgLevel, DebugLog
from xenpv.stack.kernel.registry import Registry, RegistryError
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL

log = logging.getLogger("stack.drivers.xen.config")

SERVICES = r"HKLM\SYSTEM\CurrentControlSet\Services"
XENFILT_PARAMETERS = SERVICES + r"\XENFILT\Parameters"
DEFAULT_REQUEST_KEY = r"SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"
XENBUS_PARAMETERS = SERVICES + r"\XENBUS\Parameters"
ENUM_PCI = r"HKLM\SYSTEM\CurrentControlSet\Enum\PCI"
XEN_PLATFORM_VENDOR_ID = 0x5853
VENDOR_DEVICE_ID = 0xC000  # build variable VENDOR_DEVICE_ID (XenServer's vendor PV device)


@dataclass(frozen=True)
class ActiveDevice:
    device_id: str
    instance_id: str | None = None
    location_information: str | None = None


class Config:
    def __init__(self, registry: Registry, debug_log: DebugLog | None = None,
                 vendor_device_id: int | None = VENDOR_DEVICE_ID) -> None:
        self.registry = registry
        self.debug_log = debug_log
        self.vendor_device_id = vendor_device_id

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

    def ConfigIsDeviceLegacy(self, device_id: str) -> bool:
        if self.vendor_device_id is None:
            return True
        vendor = f"PCI\\VEN_{XEN_PLATFORM_VENDOR_ID:04X}&DEV_{self.vendor_device_id:04X}"
        return not device_id.upper().startswith(vendor)  # _strnicmp over strlen(VendorDeviceID)

    def ConfigIsVendorDevicePresent(self) -> bool:
        if self.vendor_device_id is None:
            return False
        v = f"{self.vendor_device_id:04X}"
        return self.registry.key_exists(f"{ENUM_PCI}\\VEN_{XEN_PLATFORM_VENDOR_ID:04X}&DEV_{v}&SUBSYS_{v}"
                                        f"{XEN_PLATFORM_VENDOR_ID:04X}&REV_01")

    def _refused(self, caller: str, device_id: str) -> bool:
        if self.ConfigIsDeviceLegacy(device_id) and self.ConfigIsVendorDevicePresent():
            text = (f"{caller}: {device_id} is a legacy device and the vendor device "
                    f"DEV_{self.vendor_device_id:04X} exists: STATUS_UNSUCCESSFUL (fail2)")
            log.warning("%s", text)
            if self.debug_log is not None:
                self.debug_log.print("XEN", text, DbgLevel.ERROR)
            return True
        return False

    def ConfigSetActive(self, device_id: str, instance_id: str, location: str) -> int:
        if self._refused("ConfigSetActive", device_id):
            return STATUS_UNSUCCESSFUL
        self.registry.set_sz(XENFILT_PARAMETERS, "ActiveDeviceID", device_id)
        self.registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", instance_id)
        self.registry.set_sz(XENFILT_PARAMETERS, "ActiveLocationInformation", location)
        log.info("active device %s\\%s (%s)", device_id, instance_id, location)
        return STATUS_SUCCESS

    def ConfigUpdateActive(self, device_id: str, instance_id: str, location: str) -> int:
        """Fill in whatever an installer left out; the DeviceID itself is never changed here."""
        if self._refused("ConfigUpdateActive", device_id):
            return STATUS_UNSUCCESSFUL
        if self._get("ActiveInstanceID") is None:
            self.registry.set_sz(XENFILT_PARAMETERS, "ActiveInstanceID", instance_id)
        if self._get("ActiveLocationInformation") is None:
            self.registry.set_sz(XENFILT_PARAMETERS, "ActiveLocationInformation", location)
        return STATUS_SUCCESS

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
