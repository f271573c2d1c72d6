"""xen.sys: the export library every PV driver links against (reference windows-pv-drivers.md 0, 5(d), 6).

It is not a PnP driver: it is loaded once per boot (`Xen.load`, its DllInitialize) and the other
modules call into it: `XenTouch`, `XenVersion`, the unplug port protocol, the "Config" helpers for the
active device and reboot requests, and logging to the debug ports.
"""
from .config import ActiveDevice, Config
from .driver import PACKAGE_VERSION, BootOptions, Xen, XenLog
from .unplug import UNPLUG_DISKS, UNPLUG_NICS, UNPLUG_TYPES, Unplug

__all__ = ["ActiveDevice", "BootOptions", "Config", "PACKAGE_VERSION", "UNPLUG_DISKS", "UNPLUG_NICS",
           "UNPLUG_TYPES", "Unplug", "Xen", "XenLog"]
