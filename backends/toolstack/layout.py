"""What the toolstack writes to xenstore for one domain, computed from its guest definition.

Pure data (no sockets), so the layout can be unit-tested and compared with `xenstore-ls -p` exactly.
The domain directory follows libxl (tools/libs/light/libxl_create.c libxl__domain_make and
libxl_dom.c libxl__build_post); device directories follow reference xen-abi.md sections 4-6.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from xenpv.guests.schema import GuestDefinition, PvDisk, PvNic
from xenpv.xenabi.xenbus import XenbusState

PAGE_SIZE = 4096
DOM0 = 0
NIC_MTU = 1500  # libxl's default; the guest definition has no MTU field

# libxl derives the /vm path from the domain's handle; ours is derived from the guest and the domid so a
# re-created domain gets the same path and two domains of one guest never share one.
_VM_NAMESPACE = uuid.UUID("5e3f0a52-7d6b-4c1e-9a34-0c8f2b6d1e70")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def backend_path(backend_domid: int, kind: str, domid: int, devid: int) -> str:
    return f"{domain_path(backend_domid)}/backend/{kind}/{domid}/{devid}"


def frontend_path(domid: int, kind: str, devid: int) -> str:
    return f"{domain_path(domid)}/device/{kind}/{devid}"


def vm_uuid(guest: GuestDefinition, domid: int) -> str:
    return str(uuid.uuid5(_VM_NAMESPACE, f"{guest.name}/{guest.seed}/{domid}"))


def vm_path(guest: GuestDefinition, domid: int) -> str:
    return f"/vm/{vm_uuid(guest, domid)}"


# libxl's three permission sets: the domain may read (roperm), the domain owns (rwperm), dom0 only.
def roperm(domid: int) -> list[str]:
    return [f"n{DOM0}", f"r{domid}"]


def rwperm(domid: int) -> list[str]:
    return [f"n{domid}"]


def frontend_perms(domid: int, backend_domid: int) -> list[str]:
    """xen-abi.md 6: the frontend owns its directory and the backend may read and write it."""
    return [f"n{domid}", f"b{backend_domid}"]


def backend_perms(domid: int, backend_domid: int) -> list[str]:
    """xen-abi.md 6: the backend owns its directory and the frontend may read it."""
    return [f"n{backend_domid}", f"r{domid}"]


@dataclass(frozen=True)
class XsNode:
    """One node to create: `value` None makes a directory (MKDIR), `perms` None inherits the parent's."""
    path: str
    value: str | None = None
    perms: tuple[str, ...] | None = None


def store_gfn(ram_size: int) -> int:
    """The xenstore ring page: the last page of guest RAM.

    Real Xen puts the HVM special pages (xenstore, console, ioreqs) in a reserved hole below 0xFF000000
    that hvmloader marks reserved in the e820. This model's p2m has no such hole (guest-physical ==
    RAM-file offset), so the toolstack takes the top RAM page instead; the guest side must treat it as
    reserved, exactly as a Windows guest never touches the e820-reserved special pages."""
    return ram_size // PAGE_SIZE - 1


def domain_nodes(guest: GuestDefinition, domid: int, name: str) -> list[XsNode]:
    """libxl__domain_make: the domain's directory skeleton, in libxl's order."""
    dom, vm = domain_path(domid), vm_path(guest, domid)
    ro, rw = tuple(roperm(domid)), tuple(rwperm(domid))
    nodes = [
        XsNode(dom, perms=ro),
        XsNode(vm, perms=ro),
        XsNode(f"{dom}/vm", vm),
        XsNode(f"{dom}/name", name),
        XsNode(f"{dom}/cpu", perms=ro),
        XsNode(f"{dom}/memory", perms=ro),
        XsNode(f"{dom}/device", perms=ro),
        XsNode(f"{dom}/control", perms=ro),
        XsNode(f"{dom}/hvmloader", perms=ro),
    ]
    # The nodes the guest itself writes: its shutdown acknowledgement, its feature advertisements
    # (Windows XENBUS writes control/feature-suspend and friends), data/ for xeniface, and so on.
    for sub in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                "control/feature-suspend", "control/feature-s3", "control/feature-s4", "control/sysrq",
                "device/suspend/event-channel", "data", "drivers", "feature", "attr", "error"):
        nodes.append(XsNode(f"{dom}/{sub}", perms=rw))
    nodes += [
        XsNode(f"{vm}/uuid", vm_uuid(guest, domid)),
        XsNode(f"{vm}/name", name),
        XsNode(f"{dom}/control/platform-feature-multiprocessor-suspend", "1"),
        XsNode(f"{dom}/control/platform-feature-xs_reset_watches", "1"),
    ]
    return nodes


def build_post_nodes(guest: GuestDefinition, domid: int, gfn: int, port: int) -> list[XsNode]:
    """libxl__build_post: memory, domid and the store location, written just before INTRODUCE.

    libxl subtracts its video-RAM fudge from memory/target; this machine's VGA RAM is not part of the
    guest RAM file, so target == static-max. One vCPU: the agent is a single vCPU."""
    dom, kib = domain_path(domid), str(guest.memory_mib * 1024)
    return [
        XsNode(f"{dom}/memory/static-max", kib),
        XsNode(f"{dom}/memory/target", kib),
        XsNode(f"{dom}/domid", str(domid)),
        XsNode(f"{dom}/store/port", str(port)),
        XsNode(f"{dom}/store/ring-ref", str(gfn)),
        XsNode(f"{dom}/cpu/0/availability", "online"),
    ]


def vdev_name(vdev: int) -> str:
    """The Linux-style name of a vdev number (the inverse of xen-abi.md 4's encoding, as QEMU prints it)."""
    def disk_name(prefix: str, disk: int, part: int) -> str:
        letters = ""
        n = disk + 1
        while n:  # bijective base 26: a..z, aa..
            n, r = divmod(n - 1, 26)
            letters = chr(ord("a") + r) + letters
        return f"{prefix}{letters}{part or ''}"

    if vdev & (1 << 28):
        return disk_name("xvd", (vdev >> 8) & 0xFFFFF, vdev & 0xFF)
    major = vdev >> 8
    if major == 202:
        return disk_name("xvd", (vdev >> 4) & 0xF, vdev & 0xF)
    if major == 8:
        return disk_name("sd", (vdev >> 4) & 0xF, vdev & 0xF)
    if major == 3:
        return disk_name("hd", (vdev >> 6) & 0x3, vdev & 0x3F)
    if major == 22:
        return disk_name("hd", 2 + ((vdev >> 6) & 0x3), vdev & 0x3F)
    raise ValueError(f"vdev {vdev:#x} has no known major number")


@dataclass(frozen=True)
class XenbusDevice:
    """One split device: its kind (vbd, vif), devid, and the keys each side's directory starts with."""
    kind: str
    devid: int
    frontend: dict[str, str]
    backend: dict[str, str]


def disk_image(disk: PvDisk, guest: GuestDefinition, run_dir: Path) -> tuple[Path, bool]:
    """The image behind a PV disk and whether the toolstack must create it.

    A PV disk named like an emulated IDE disk (hda = primary master...) is that disk's PV twin — the
    same image seen through blkfront once unplug removed the emulated one — so it shares the scratch
    image the machine created. Any other disk without an image gets its own scratch image."""
    if disk.image is not None:
        return disk.image, False
    name = vdev_name(disk.vdev)
    for emu in guest.emulated_disks:
        if emu.media == "disk" and name == f"hd{chr(ord('a') + emu.bus * 2 + emu.unit)}":
            return emu.image or run_dir / f"{emu.id}.img", False
    return run_dir / f"pv-{name}.{disk.format}", True


def vbd_device(disk: PvDisk, image: Path, domid: int, backend_domid: int) -> XenbusDevice:
    devid = disk.vdev  # libxl uses the vdev number as the devid
    front = {"backend": backend_path(backend_domid, "vbd", domid, devid), "backend-id": str(backend_domid),
             "state": XenbusState.Initialising.wire(), "virtual-device": str(devid), "device-type": "disk"}
    back = {"frontend": frontend_path(domid, "vbd", devid), "frontend-id": str(domid), "online": "1",
            "removable": "0", "bootable": "1", "state": XenbusState.Initialising.wire(),
            "dev": vdev_name(disk.vdev), "type": "qdisk", "mode": "w", "device-type": "disk",
            # libxl's qdisk form, "<format>:<path>": the back-end opens an image file in that format.
            "params": f"{disk.format}:{image}",
            # No hotplug scripts run here: the back-end process is already up, as the script would report.
            "hotplug-status": "connected"}
    if "discard" in disk.features:
        back["discard-enable"] = "1" if disk.features["discard"] else "0"
    return XenbusDevice("vbd", devid, front, back)


def vif_device(nic: PvNic, index: int, domid: int, backend_domid: int) -> XenbusDevice:
    front = {"backend": backend_path(backend_domid, "vif", domid, index), "backend-id": str(backend_domid),
             "state": XenbusState.Initialising.wire(), "handle": str(index), "mac": nic.mac, "mtu": str(NIC_MTU)}
    back = {"frontend": frontend_path(domid, "vif", index), "frontend-id": str(domid), "online": "1",
            "state": XenbusState.Initialising.wire(), "mac": nic.mac, "handle": str(index), "type": "vif",
            "mtu": str(NIC_MTU), "hotplug-status": "connected"}
    if nic.address is not None:
        back["ip"] = nic.address
    return XenbusDevice("vif", index, front, back)


@dataclass(frozen=True)
class DeviceSet:
    devices: list[XenbusDevice] = field(default_factory=list)
    scratch_images: list[tuple[Path, PvDisk]] = field(default_factory=list)  # images the toolstack creates


def guest_devices(guest: GuestDefinition, domid: int, run_dir: Path, backend_domid: int = DOM0) -> DeviceSet:
    out = DeviceSet()
    for disk in guest.pv_disks:
        image, scratch = disk_image(disk, guest, run_dir)
        if scratch:
            out.scratch_images.append((image, disk))
        out.devices.append(vbd_device(disk, image, domid, backend_domid))
    for i, nic in enumerate(guest.pv_nics):
        out.devices.append(vif_device(nic, i, domid, backend_domid))
    return out


def device_nodes(dev: XenbusDevice, domid: int, backend_domid: int, *, served: bool = True) -> list[XsNode]:
    """libxl__device_generic_add: frontend directory then backend directory, each with its permissions.

    `served` False: no back-end runs for the device's kind (backends.serving). The device is there but
    offline: its backend directory says online=0 and Closed, and has no hotplug-status (no script ran), so
    its frontend gives up at once instead of waiting for a back-end that is not running (XV frontend.c
    FrontendPrepare: backend Closed and not online -> FrontendSetOffline; XENVBD's target loses the device
    as one the toolstack unplugged). libxl would not add the device at all (it waits for the backend's
    InitWait and fails the domain), but a guest here boots without back-ends on purpose and its drivers
    still find the device. The directory is there because a guest reading a backend path that does not
    exist gets EACCES from xenstored (the parent is dom0's), not ENOENT."""
    fe, be = frontend_path(domid, dev.kind, dev.devid), backend_path(backend_domid, dev.kind, domid, dev.devid)
    backend = dict(dev.backend)
    if not served:
        backend.pop("hotplug-status", None)
        backend |= {"online": "0", "state": XenbusState.Closed.wire()}
    nodes = [XsNode(fe, perms=tuple(frontend_perms(domid, backend_domid)))]
    nodes += [XsNode(f"{fe}/{k}", v) for k, v in dev.frontend.items()]
    nodes.append(XsNode(be, perms=tuple(backend_perms(domid, backend_domid))))
    nodes += [XsNode(f"{be}/{k}", v) for k, v in backend.items()]
    return nodes
