"""Guest definitions: the YAML schema, validated on load.

Every error names the file, the field (as a path such as `platform[1].device-id`) and the reason.
"""
from __future__ import annotations

import ipaddress
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from xenpv.base.errors import GuestDefinitionError
from xenpv.guests.bugs import BUGS_KEY, CATALOGUE, unknown_switch_message

GUESTS_DIR = Path(__file__).resolve().parent

XEN_PLATFORM_VENDOR = 0x5853
# 0001 upstream Xen, 0002 XenServer, C000 the vendor PV device (reference windows-pv-drivers.md section 4).
PLATFORM_DEVICE_IDS = (0x0001, 0x0002, 0xC000)
NIC_MODELS = ("rtl8139", "e1000")
DISK_FORMATS = ("raw", "qcow2")
# The installer eras of reference windows-pv-drivers.md 5: (a) subscriber registry, (b) co-installers
# without it (07/2015 - 09/2023), (c)/(d) no co-installers.
DRIVER_ERAS = ("subscriber", "coinstaller", "current")
DRIVER_PACKAGES = ("xenbus", "xenvif", "xennet", "xenvbd", "xeniface")
BOOT_OPTIONS = ("BOOT_EMULATED",)
# The PV drivers' build: a checked build (DBG=1) stops on a failed ASSERT, a free build runs past it.
DRIVER_BUILDS = ("free", "checked")
# How the machine is started (harness.machine, harness.libvirt_launcher): QEMU launched by the harness, or a
# libvirt domain. libvirt's QEMU driver runs stock qemu-system-x86_64 only (it cannot probe Debian's Xen
# build), which has no xen-pvdevice: a libvirt guest has no Xen platform device.
LAUNCHERS = ("qemu", "libvirt")
MAX_MEMORY_MIB = 3072  # below the PC's 32-bit PCI hole, so guest-physical == RAM file offset

_SIZE_RE = re.compile(r"^(\d+)\s*([KMGT]i?B?|B)?$", re.IGNORECASE)
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$", re.IGNORECASE)
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,31}$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class PlatformDevice:
    device_id: int
    revision: int = 1
    bar_size: int = 16 << 20  # the MMIO BAR that XENBUS carves hypervisor frames from


@dataclass(frozen=True)
class EmulatedDisk:
    id: str
    bus: int
    unit: int
    size: int
    media: str = "disk"  # or "cdrom", which unplug never touches
    image: Path | None = None


@dataclass(frozen=True)
class EmulatedNic:
    id: str
    model: str
    mac: str


@dataclass(frozen=True)
class PvDisk:
    vdev: int
    size: int
    format: str = "raw"
    image: Path | None = None
    features: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PvNic:
    mac: str
    queues: int = 1
    address: str | None = None
    peer: str | None = None

    def addressing(self, devid: int) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
        """(namespace side, guest side) of vif `devid`: `peer` (default 10.200.<devid>.1/24) is the
        namespace's address and network; `address` (default the one after peer) the guest's, with peer's
        prefix length unless it gives its own. Validated on load, so a loaded definition never raises."""
        return nic_addressing(self.address, self.peer, devid)


def nic_addressing(address: str | None, peer: str | None,
                   devid: int) -> tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface]:
    """The rule behind PvNic.addressing; raises ValueError naming what is wrong."""
    ns = ipaddress.IPv4Interface(peer if peer and "/" in peer else f"{peer}/24" if peer else f"10.200.{devid}.1/24")
    if address is None:
        guest = ipaddress.IPv4Interface(f"{ns.ip + 1}/{ns.network.prefixlen}")
    else:
        guest = ipaddress.IPv4Interface(address if "/" in address else f"{address}/{ns.network.prefixlen}")
    for side, iface in (("peer", ns), ("address", guest)):
        net = iface.network
        # A /31 or /32 has no room for the two ends; the network and broadcast addresses are no host's.
        if net.prefixlen > 30 or iface.ip in (net.network_address, net.broadcast_address):
            raise ValueError(f"{side} {iface} is not a host address of a network with room for both ends")
    if guest.ip not in ns.network:
        raise ValueError(f"the guest's address {guest.ip} is outside the namespace network {ns.network}")
    if guest.ip == ns.ip:
        raise ValueError(f"the guest and the namespace would both be {guest.ip}")
    return ns, guest


@dataclass(frozen=True)
class Drivers:
    era: str = "current"
    packages: dict[str, str] = field(default_factory=dict)
    none_reason: str | None = None  # `drivers: {none: REASON}`: no package, on purpose, and why


# The packages a class of PV device needs before the main job can expect it to work.
PV_CLASS_PACKAGES = {"disks": ("xenbus", "xenvbd"), "nics": ("xenbus", "xenvif", "xennet")}


@dataclass(frozen=True)
class PvExpectation:
    """Whether the main job must see one class of PV device (disks or nics) work after the reboot; when
    not, `reason` says why (the guest file's words, or what the definition lacks)."""
    kind: str
    expected: bool
    reason: str = ""


@dataclass(frozen=True)
class GuestDefinition:
    name: str
    path: Path
    memory_mib: int
    seed: int
    platform: tuple[PlatformDevice, ...]
    emulated_disks: tuple[EmulatedDisk, ...]
    emulated_nics: tuple[EmulatedNic, ...]
    pv_disks: tuple[PvDisk, ...]
    pv_nics: tuple[PvNic, ...]
    drivers: Drivers
    registry: dict[str, dict[str, Any]]
    boot_options: tuple[str, ...]
    not_expected: dict[str, str] = field(default_factory=dict)  # "disks"/"nics" -> the file's reason
    # Historical defects put back into the model (guests.bugs.CATALOGUE names), in the file's order.
    bugs: tuple[str, ...] = ()
    build: str = "free"  # DRIVER_BUILDS: which build of the PV drivers the guest runs
    launcher: str = "qemu"  # LAUNCHERS: who starts the machine

    def pv_expectation(self, kind: str) -> PvExpectation:
        """What the main job may demand of this guest's PV `kind` ("disks" or "nics")."""
        if kind not in PV_CLASS_PACKAGES:
            raise ValueError(f"no PV device class {kind!r} (known: {', '.join(PV_CLASS_PACKAGES)})")
        if self.drivers.none_reason is not None:
            return PvExpectation(kind, False, f"no PV drivers on purpose: {self.drivers.none_reason}")
        if not self.platform:
            return PvExpectation(kind, False, "no Xen platform device: not a Xen guest")
        if not (self.pv_disks if kind == "disks" else self.pv_nics):
            return PvExpectation(kind, False, f"the guest has no pv.{kind}")
        if kind in self.not_expected:
            return PvExpectation(kind, False, self.not_expected[kind])
        # parse_guest refuses a definition that lands here lacking a package, so this is only a guard.
        missing = [p for p in PV_CLASS_PACKAGES[kind] if p not in self.drivers.packages]
        if missing:
            return PvExpectation(kind, False, f"drivers.packages lacks {', '.join(missing)}")
        return PvExpectation(kind, True)

    @property
    def expects_pv_drivers(self) -> bool:
        """True when the PV drivers must bring up at least one class of this guest's PV devices."""
        return any(self.pv_expectation(k).expected for k in PV_CLASS_PACKAGES)


T = TypeVar("T")


class _Reader:
    """Walks the parsed YAML, keeping the field path for error messages."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, fieldpath: str, reason: str) -> GuestDefinitionError:
        return GuestDefinitionError(self.path, fieldpath or "(top level)", reason)

    def mapping(self, value: Any, fieldpath: str, allowed: set[str]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(fieldpath, f"must be a mapping, got {type(value).__name__}")
        for key in value:
            if key not in allowed:
                raise self.fail(_join(fieldpath, str(key)), f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def sequence(self, value: Any, fieldpath: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(fieldpath, f"must be a list, got {type(value).__name__}")
        return value

    def integer(self, value: Any, fieldpath: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(fieldpath, f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise self.fail(fieldpath, f"must be between {lo:#x} and {hi:#x}, got {value:#x}")
        return value

    def size(self, value: Any, fieldpath: str, lo: int = 1, hi: int = 1 << 62) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif isinstance(value, str) and (m := _SIZE_RE.match(value.strip())):
            n = int(m.group(1)) * _UNITS[(m.group(2) or "")[:1].lower()]
        else:
            raise self.fail(fieldpath, f"must be a size such as 64M or 2G, got {value!r}")
        if not lo <= n <= hi:
            raise self.fail(fieldpath, f"must be between {lo} and {hi} bytes, got {n}")
        return n

    def choice(self, value: Any, fieldpath: str, choices: tuple[str, ...]) -> str:
        if value not in choices:
            raise self.fail(fieldpath, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def string(self, value: Any, fieldpath: str, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
        if not isinstance(value, str):
            raise self.fail(fieldpath, f"must be a string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.fail(fieldpath, f"must be {what}, got {value!r}")
        return value

    def required(self, mapping: dict[str, Any], key: str, fieldpath: str) -> Any:
        if key not in mapping:
            raise self.fail(_join(fieldpath, key), "is required")
        return mapping[key]

    def items(self, value: Any, fieldpath: str, parse: Callable[[Any, str], T]) -> tuple[T, ...]:
        return tuple(parse(v, f"{fieldpath}[{i}]") for i, v in enumerate(self.sequence(value, fieldpath)))


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a else b


def _vdev(r: _Reader, value: Any, fieldpath: str) -> int:
    """A vdev is a number or a Linux-style name (xvda, hda...), encoded as xen-abi.md section 6."""
    if isinstance(value, int) and not isinstance(value, bool):
        return r.integer(value, fieldpath, 1, (1 << 28) | 0xFFFFFFF)
    if isinstance(value, str):
        m = re.match(r"^(xvd|hd|sd)([a-z])$", value)
        if m:
            disk = ord(m.group(2)) - ord("a")
            if m.group(1) == "xvd":
                return (202 << 8) | (disk << 4)
            if m.group(1) == "sd":
                return (8 << 8) | (disk << 4)
            if disk < 2:
                return (3 << 8) | (disk << 6)
            if disk < 4:
                return (22 << 8) | ((disk - 2) << 6)
    raise r.fail(fieldpath, f"must be a vdev number or a name such as xvda or hda, got {value!r}")


def load_guest(path: str | Path) -> GuestDefinition:
    """Load and validate a guest definition; relative image paths are relative to the file."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and (GUESTS_DIR / p.name).exists() and p.parent.name == "guests":
        p = GUESTS_DIR / p.name
    shown = str(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise GuestDefinitionError(shown, "(file)", f"cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise GuestDefinitionError(shown, f"line {line}",
                                   f"is not UTF-8 (byte {raw[exc.start]:#04x} at offset {exc.start})") from None
    try:
        doc = yaml.safe_load(text)
    except RecursionError:
        raise GuestDefinitionError(shown, "(yaml)", "is nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "(yaml)"
        raise GuestDefinitionError(shown, where, f"is not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_guest(doc, p, shown)


def parse_guest(doc: Any, path: Path, shown: str | None = None) -> GuestDefinition:
    r = _Reader(shown or str(path))
    top = r.mapping(doc, "", {"name", "memory", "seed", "platform", "emulated", "pv", "drivers", "registry", "boot",
                              "not-expected", "bugs", "build", "launcher"})
    base = path.parent

    def image(value: Any, fieldpath: str) -> Path | None:
        if value is None:
            return None
        s = Path(r.string(value, fieldpath))
        return s if s.is_absolute() else (base / s)

    def existing_image(value: Any, fieldpath: str) -> Path | None:
        """A PV disk's own image: nothing creates it (the toolstack makes scratch images only for disks
        without one), so blkback would find it missing and close the device without a word."""
        path = image(value, fieldpath)
        if path is None:
            return None
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise r.fail(fieldpath, f"{path} does not exist") from None
        except OSError as exc:
            raise r.fail(fieldpath, f"{path} cannot be examined: {exc.strerror}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise r.fail(fieldpath, f"{path} is neither a regular file nor a block device")
        return path

    def reason(value: Any, fieldpath: str) -> str:
        text = r.string(value, fieldpath).strip()
        if not text:
            raise r.fail(fieldpath, "must say why, got an empty reason")
        return " ".join(text.split())

    name = r.string(top.get("name", path.stem), "name", _ID_RE, "a short identifier")
    memory = r.size(top.get("memory", "128M"), "memory", 16 << 20, MAX_MEMORY_MIB << 20)
    if memory % (1 << 20):
        raise r.fail("memory", f"must be a whole number of MiB, got {memory} bytes")
    seed = r.integer(top.get("seed", 0), "seed", 0, (1 << 64) - 1)

    def platform_dev(v: Any, fp: str) -> PlatformDevice:
        m = r.mapping(v, fp, {"device-id", "revision", "bar-size"})
        did = r.integer(r.required(m, "device-id", fp), _join(fp, "device-id"), 0, 0xFFFF)
        if did not in PLATFORM_DEVICE_IDS:
            ids = ", ".join(f"{i:#06x}" for i in PLATFORM_DEVICE_IDS)
            raise r.fail(_join(fp, "device-id"), f"must be one of {ids}, got {did:#06x}")
        rev = r.integer(m.get("revision", 1), _join(fp, "revision"), 0, 0xFF)
        bar = r.size(m.get("bar-size", 16 << 20), _join(fp, "bar-size"), 4096, 1 << 30)
        if bar & (bar - 1):
            raise r.fail(_join(fp, "bar-size"), f"must be a power of two, got {bar:#x}")
        return PlatformDevice(did, rev, bar)

    platform = r.items(top.get("platform"), "platform", platform_dev)
    seen_ids = [d.device_id for d in platform]
    if len(set(seen_ids)) != len(seen_ids):
        raise r.fail("platform", "lists the same device-id twice")

    emulated = r.mapping(top.get("emulated"), "emulated", {"disks", "nics"})

    def emu_disk(v: Any, fp: str) -> EmulatedDisk:
        m = r.mapping(v, fp, {"id", "bus", "unit", "size", "media", "image"})
        return EmulatedDisk(
            id=r.string(r.required(m, "id", fp), _join(fp, "id"), _ID_RE, "a short identifier"),
            bus=r.integer(m.get("bus", 0), _join(fp, "bus"), 0, 1),
            unit=r.integer(m.get("unit", 0), _join(fp, "unit"), 0, 1),
            size=r.size(m.get("size", "16M"), _join(fp, "size"), 512, 1 << 44),
            media=r.choice(m.get("media", "disk"), _join(fp, "media"), ("disk", "cdrom")),
            image=image(m.get("image"), _join(fp, "image")),
        )

    def emu_nic(v: Any, fp: str) -> EmulatedNic:
        m = r.mapping(v, fp, {"id", "model", "mac"})
        return EmulatedNic(
            id=r.string(r.required(m, "id", fp), _join(fp, "id"), _ID_RE, "a short identifier"),
            model=r.choice(m.get("model", "rtl8139"), _join(fp, "model"), NIC_MODELS),
            mac=r.string(r.required(m, "mac", fp), _join(fp, "mac"), _MAC_RE, "a MAC address like 00:16:3e:00:00:01").lower(),
        )

    emu_disks = r.items(emulated.get("disks"), "emulated.disks", emu_disk)
    emu_nics = r.items(emulated.get("nics"), "emulated.nics", emu_nic)
    slots = [(d.bus, d.unit) for d in emu_disks]
    if len(set(slots)) != len(slots):
        raise r.fail("emulated.disks", "two disks share one IDE bus and unit")
    ids = [x.id for x in (*emu_disks, *emu_nics)]
    if len(set(ids)) != len(ids):
        raise r.fail("emulated", "two emulated devices share one id")

    pv = r.mapping(top.get("pv"), "pv", {"disks", "nics"})

    def pv_disk(v: Any, fp: str) -> PvDisk:
        m = r.mapping(v, fp, {"vdev", "size", "format", "image", "features"})
        return PvDisk(
            vdev=_vdev(r, r.required(m, "vdev", fp), _join(fp, "vdev")),
            size=r.size(m.get("size", "64M"), _join(fp, "size"), 512, 1 << 52),
            format=r.choice(m.get("format", "raw"), _join(fp, "format"), DISK_FORMATS),
            image=existing_image(m.get("image"), _join(fp, "image")),
            features=dict(r.mapping(m.get("features"), _join(fp, "features"),
                                    {"indirect", "discard", "flush", "persistent", "ring-page-order", "queues"})),
        )

    def ipv4(value: Any, fieldpath: str) -> str | None:
        if value is None:
            return None
        text = r.string(value, fieldpath)
        try:
            ipaddress.IPv4Interface(text)
        except ValueError as exc:
            raise r.fail(fieldpath, f"must be an IPv4 address with an optional /prefix, got {text!r} ({exc})") from None
        return text

    def pv_nic(v: Any, fp: str) -> PvNic:
        m = r.mapping(v, fp, {"mac", "queues", "address", "peer"})
        return PvNic(
            mac=r.string(r.required(m, "mac", fp), _join(fp, "mac"), _MAC_RE, "a MAC address like 00:16:3e:00:00:01").lower(),
            queues=r.integer(m.get("queues", 1), _join(fp, "queues"), 1, 8),
            address=ipv4(m.get("address"), _join(fp, "address")),
            peer=ipv4(m.get("peer"), _join(fp, "peer")),
        )

    pv_disks = r.items(pv.get("disks"), "pv.disks", pv_disk)
    pv_nics = r.items(pv.get("nics"), "pv.nics", pv_nic)
    for devid, nic in enumerate(pv_nics):  # vif N is the Nth NIC: its default network depends on N
        try:
            nic.addressing(devid)
        except ValueError as exc:
            raise r.fail(f"pv.nics[{devid}]", str(exc)) from None
    vdevs = [d.vdev for d in pv_disks]
    if len(set(vdevs)) != len(vdevs):
        raise r.fail("pv.disks", "two disks share one vdev")

    dm = r.mapping(top.get("drivers"), "drivers", {"era", "packages", "none"})
    pk = r.mapping(dm.get("packages"), "drivers.packages", set(DRIVER_PACKAGES))
    packages = {k: r.string(str(v) if isinstance(v, (int, float)) else v, f"drivers.packages.{k}",
                            re.compile(r"^\d+\.\d+\.\d+(\.\d+)?$"), "a version such as 9.1.0.10")
                for k, v in pk.items()}
    none_reason = None
    if "none" in dm:
        none_reason = reason(dm["none"], "drivers.none")
        if packages or "era" in dm:
            raise r.fail("drivers.none", "installs no package, so drivers.era and drivers.packages must go")
    drivers = Drivers(era=r.choice(dm.get("era", "current"), "drivers.era", DRIVER_ERAS), packages=packages,
                      none_reason=none_reason)

    # Whether the main job may demand working PV disks and NICs: a Xen guest with PV devices installs
    # the packages that drive them, or its file says why not (drivers.none, or not-expected.pv-<class>).
    listed = {"disks": pv_disks, "nics": pv_nics}
    not_expected: dict[str, str] = {}
    for key, why in r.mapping(top.get("not-expected"), "not-expected", {"pv-disks", "pv-nics"}).items():
        kind, fp = key.removeprefix("pv-"), f"not-expected.{key}"
        not_expected[kind] = reason(why, fp)
        if not listed[kind]:
            raise r.fail(fp, f"the guest has no pv.{kind} to expect nothing of")
        if none_reason is not None:
            raise r.fail(fp, "drivers.none already says why no PV device works")
    if platform and none_reason is None:
        for kind, devices in listed.items():
            missing = [p for p in PV_CLASS_PACKAGES[kind] if p not in packages]
            if devices and missing and kind not in not_expected:
                where = "drivers.packages" if "drivers" in top else "drivers"
                raise r.fail(where, f"pv.{kind} need the package{'s' if len(missing) > 1 else ''} "
                                    f"{', '.join(missing)}: list {'them' if len(missing) > 1 else 'it'} in "
                                    f"drivers.packages, or say why the guest goes without (drivers.none: REASON, "
                                    f"or not-expected.pv-{kind}: REASON)")

    registry: dict[str, dict[str, Any]] = {}
    for key, values in r.mapping(top.get("registry"), "registry", _AnyKeys()).items():
        fp = f"registry[{key}]"
        if not isinstance(key, str) or not key.upper().startswith("HKLM\\"):
            raise r.fail(fp, "keys must be HKLM\\... paths")
        vals = r.mapping(values, fp, _AnyKeys())
        for vname, v in vals.items():
            if not (isinstance(v, (str, int)) and not isinstance(v, bool)) and not (
                isinstance(v, list) and all(isinstance(s, str) for s in v)
            ):
                raise r.fail(f"{fp}.{vname}", f"must be a DWORD, a string or a list of strings, got {v!r}")
            if isinstance(v, int) and not 0 <= v <= 0xFFFFFFFF:
                raise r.fail(f"{fp}.{vname}", f"a DWORD must fit in 32 bits, got {v}")
        if key.upper() == BUGS_KEY.upper():
            for vname, v in vals.items():
                if vname not in CATALOGUE:
                    raise r.fail(f"{fp}.{vname}", unknown_switch_message(vname))
                if not isinstance(v, int):
                    raise r.fail(f"{fp}.{vname}", f"a bug switch is a DWORD (0 off, else on), got {v!r}")
        registry[key] = dict(vals)

    boot = r.mapping(top.get("boot"), "boot", {"options"})
    options = tuple(r.choice(o, f"boot.options[{i}]", BOOT_OPTIONS) for i, o in enumerate(r.sequence(boot.get("options"), "boot.options")))

    bugs: list[str] = []
    for i, switch in enumerate(r.sequence(top.get("bugs"), "bugs")):
        if switch not in CATALOGUE:
            raise r.fail(f"bugs[{i}]", unknown_switch_message(switch))
        if switch in bugs:
            raise r.fail(f"bugs[{i}]", f"names {switch} twice")
        bugs.append(switch)

    launcher = r.choice(top.get("launcher", "qemu"), "launcher", LAUNCHERS)
    if launcher == "libvirt" and platform:
        raise r.fail("launcher", "libvirt runs stock qemu-system-x86_64, which has no Xen platform device "
                                 "(xen-pvdevice): a guest with `platform` needs `launcher: qemu`")

    return GuestDefinition(
        name=name, path=path, memory_mib=memory >> 20, seed=seed, platform=platform,
        emulated_disks=emu_disks, emulated_nics=emu_nics, pv_disks=pv_disks, pv_nics=pv_nics,
        drivers=drivers, registry=registry, boot_options=options, not_expected=not_expected,
        bugs=tuple(bugs), build=r.choice(top.get("build", "free"), "build", DRIVER_BUILDS), launcher=launcher,
    )


class _AnyKeys(set[str]):
    """An `allowed` set that admits every key (registry paths and value names are free-form)."""

    def __contains__(self, item: object) -> bool:
        return True
