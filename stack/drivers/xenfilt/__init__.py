"""xenfilt.sys: the PCI/IDE UpperFilter that gates emulated devices until unplug and serves EMULATED."""
from .driver import FilterState, XenfiltDriver
from .emulated import GUID_XENFILT_EMULATED_INTERFACE, Emulated, EmulatedDevice, EmulatedDisk, EmulatedStatus

__all__ = ["Emulated", "EmulatedDevice", "EmulatedDisk", "EmulatedStatus", "FilterState",
           "GUID_XENFILT_EMULATED_INTERFACE", "XenfiltDriver"]
