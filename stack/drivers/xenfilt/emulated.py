"""XENFILT's EMULATED interface v1-3 (XB src/xenfilt/emulated.c, include/emulated_interface.h; reference 1).

The objects are what XENFILT saw below its filters: PCI functions (DeviceID, InstanceID, the forced
activation status from Precedence) and IDE disks (InstanceID "C.T.L"). v3's IsDevicePresent also returns
the status; v2 and v3's IsDiskPresent takes the index (ctrl << 1) | target, v1's takes (C, T, L) and uses
T as the index.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import IntEnum

from xenpv.stack.drivers.interface import Interface, InterfaceTable, table
from xenpv.stack.kernel.status import STATUS_SUCCESS

GUID_XENFILT_EMULATED_INTERFACE = uuid.UUID("959027A1-FCCE-4E78-BCF4-637384F499C5")
# QEMU's emulated NVMe controllers count as disks for every index (emulated.c): 8086:5845 with
# use-intel-id on, 1B36:0010 with it off, matched against a CompatibleID exactly.
NVME_DEVICE_IDS = (r"PCI\VEN_8086&DEV_5845", r"PCI\VEN_1B36&DEV_0010")


class EmulatedStatus(IntEnum):
    NEUTRAL = 0
    FORCE_ACTIVATED = 1
    FORCE_DEACTIVATED = 2


@dataclass
class EmulatedDevice:
    device_id: str
    instance_id: str
    status: EmulatedStatus = EmulatedStatus.NEUTRAL
    is_emulated_nvme: bool = False


@dataclass
class EmulatedDisk:
    controller: int
    target: int
    lun: int

    @property
    def index(self) -> int:
        return self.controller << 1 | self.target


class Emulated(Interface):
    NAME = "EMULATED"
    GUID = GUID_XENFILT_EMULATED_INTERFACE
    TABLES = {1: table(1, "IsDevicePresent", "IsDiskPresent"),
              2: table(2, "IsDevicePresent", "IsDiskPresent"),
              3: table(3, "IsDevicePresent", "IsDiskPresent")}

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[EmulatedDevice] = []
        self.disks: list[EmulatedDisk] = []

    def get_interface(self, version: int, size: int) -> tuple[int, InterfaceTable | None]:
        status, found = super().get_interface(version, size)
        if status == STATUS_SUCCESS and found is not None and version < 3:
            found.methods["EmulatedIsDevicePresent"] = (
                lambda device_id, instance_id: self.EmulatedIsDevicePresent(device_id, instance_id)[0])
            if version == 1:
                found.methods["EmulatedIsDiskPresent"] = lambda c, t, l: self.EmulatedIsDiskPresent(t)
        return status, found

    def EmulatedAddObject(self, object_type: str, device_id: str, instance_id: str, compatible_ids: list[str],
                          force: EmulatedStatus) -> EmulatedDevice | EmulatedDisk | None:
        """emulated.c EmulatedAddObject: a PCI function, or an IDE disk whose InstanceID is "C.T.0" with
        C and T at most 1 (EmulatedSetObjectDiskData; anything else is not added). A PCI object is an
        emulated NVMe controller when one of its CompatibleIDs is exactly one of QEMU's NVMe IDs."""
        if object_type == "PCI":
            nvme = any(c.upper() == n.upper() for c in compatible_ids for n in NVME_DEVICE_IDS)
            device = EmulatedDevice(device_id, instance_id, force, nvme)
            self.devices.append(device)
            return device
        parts = instance_id.split(".")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            return None
        controller, target, lun = (int(p) for p in parts)
        if controller > 1 or target > 1 or lun != 0:
            return None
        disk = EmulatedDisk(controller, target, lun)
        self.disks.append(disk)
        return disk

    def EmulatedRemoveObject(self, emulated: EmulatedDevice | EmulatedDisk) -> None:
        if isinstance(emulated, EmulatedDevice):
            self.devices = [d for d in self.devices if d is not emulated]
        else:
            self.disks = [d for d in self.disks if d is not emulated]

    def EmulatedIsDevicePresent(self, device_id: str | None, instance_id: str | None) -> tuple[bool, EmulatedStatus]:
        for device in self.devices:
            if device_id is None:
                if device.status != EmulatedStatus.FORCE_ACTIVATED:
                    continue
            elif device.device_id.upper() != device_id.upper():
                continue
            if instance_id is not None and device.instance_id.upper() != instance_id.upper():
                continue
            return True, device.status
        return False, EmulatedStatus.NEUTRAL

    def EmulatedIsDiskPresent(self, index: int) -> bool:
        if any(d.is_emulated_nvme for d in self.devices):
            return True
        return any(disk.index == index for disk in self.disks)
