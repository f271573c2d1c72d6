"""Driver packages: INF-like manifests for XENBUS (xen, xenbus, xenfilt), XENVIF, XENNET, XENVBD, XENIFACE.

A `Package` is what an INF plus its co-installer says: the hardware IDs its models section binds, the
services it adds (start type, image, AddReg under the service key), HKLM AddReg lines, the revision
table the drivers carry (XENBUS and XENVIF: the revisions they offer their children; children: the one
revision their INF binds) and, for the subscriber era, the interface ranges a provider supports and the
interface versions a subscriber writes under `Services\\<PROVIDER>\\Interfaces\\<SUBSCRIBER>`.

History (reference windows-pv-drivers.md 3 and 5; XB = xcp-ng/win-xenbus, XV = xcp-ng/win-xenvif):
- 8.0.0.1 (subscriber era) is modelled on the 8.0 development trees of July 2015, just before the
  subscriber checks were removed: XB d55a644^ (interface MIN..MAX from include/*_interface.h, the single
  revision 0x08000008, xenbus.inf services) and XV d00398b (xenvif.inf binds REV_08000008 for XSC000,
  XS0001 and XS0002; its co-installer subscribes DEBUG SUSPEND EVTCHN STORE RANGE_SET CACHE GNTTAB at the
  *_VERSION_MAX of its build; it provides VIF 1..2). XENNET, XENVBD and XENIFACE 8.0.0.1 follow the
  same pattern with subscription lists chosen for the harness. The prefix then was "XS"; the harness uses
  VENDOR_PREFIX ("XP") for every era so that one XENBUS model serves all packages.
- 8.0.1.1 (subscriber era) is INVENTED: it retires EVTCHN v1..v4 inside the subscriber era (the real
  retirement came later, without a veto: EVTCHN MIN is 5 today) so that the veto has something to veto.
  Its one revision 0x08000009 is invented too (the real 0x08000009 of 8.1.0 is another row).
- 9.1.0.5 (current era) is modelled on the 2024-06 tree (XB a5de8b1: revisions 0x09000000..0x0900000B;
  XV of 2024-07 binds REV_0900000A); rows 0x09000001..07 are from XB revision.h of that time, the others
  equal stack.drivers.revision. XENVIF 9.1.0.5 offers XENVIF revisions up to 0x09000004 (UNPLUG v2), the
  UNPLUG its bus offers at the revision it binds; that cut is the harness's choice.
- 9.1.0.10 (current era) is the 2025-08 and later tree: exactly stack.drivers.revision (XENBUS
  0x09000008..0C, children bind 0x0900000B, XENNET binds XENVIF 0x09000005).
- 9.0.0.4 and 9.1.0.1 (co-installer era, 5b): 9.1.0.1 is the last tree with the co-installer (XB
  5e3c42f^, 2023-09: revisions 0x09000000..0x0900000A, children bind 0x09000009); 9.0.0.4 is modelled on the 2019-12 trees (XB eb31daa: revision.h 0x08000009..
  0x09000007, the DEFINE_REVISION_TABLE its co-installer checks children against; XV 3247aee); its
  children bind the newest row. Only XENBUS's co-installer (coinst.c@5e3c42f^) is modelled.
- 9.1.0.11 is 9.1.0.10 built with a variant: xenbus with FORCE_ACTIVATE (the XENFILT Precedence values
  and class UpperFilters of xenbus.inf), xenvbd with FORCE_UNPLUG (XEN\\ForceUnplug\\DISKS = 1). A
  variant is installed only when its version is named.
- XENVIF 9.0.0.3 is modelled on XV of 2019-12 (3247aee): it binds XENBUS REV_09000005, which XENBUS
  9.1.0.10 no longer offers (retired by XB 36e3eea, 2025-08), and offers XENVIF revisions
  0x0800000B..0x09000001 (4 columns then: no UNPLUG). Real 9.0.0 shipped with an era-(b) co-installer;
  the harness installs it with current-era rules. Build numbers (.1, .3, .5, .10) are invented.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from types import MappingProxyType

from xenpv.stack.drivers.revision import (CHILD_BINDS_XENBUS_REVISION, VENDOR_PREFIX, XENBUS_DEPRECATED_REVISIONS,
                                    XENBUS_INTERFACES, XENBUS_REVISIONS, XENNET_BINDS_XENVIF_REVISION,
                                    XENVIF_INTERFACES, XENVIF_REVISIONS, vendor_name)
from xenpv.stack.kernel.pnp import HDC_CLASS_GUID, SYSTEM_CLASS_GUID
from xenpv.stack.kernel.registry import REG_DWORD, REG_MULTI_SZ, REG_SZ, RegData, RegType

SERVICES_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services"
NET_CLASS_GUID = "{4d36e972-e325-11ce-bfc1-08002be10318}"
SCSI_ADAPTER_CLASS_GUID = "{4d36e97b-e325-11ce-bfc1-08002be10318}"

XEN_PCI_VENDOR = 0x5853
VENDOR_DEVICE_ID = 0xC000  # XenServer's vendor PV device (reference 4); VENDOR_DEVICE_ID of the INFs
BUS_DEVICE_IDS = (VENDOR_DEVICE_ID, 0x0001, 0x0002)  # INF order: vendor device first

UNPLUG_KEY = rf"{SERVICES_KEY}\XEN\Unplug"
FORCE_UNPLUG_KEY = rf"{SERVICES_KEY}\XEN\ForceUnplug"
REQUEST_KEY = r"SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"


class Era(Enum):
    SUBSCRIBER = "subscriber"    # 2013 - 07/2015: co-installers with the subscriber registry (reference 5a)
    COINSTALLER = "coinstaller"  # 07/2015 - 09/2023: co-installers without it (5b, coinst.c@5e3c42f^)
    CURRENT = "current"          # 09/2023 - now: no co-installers, exact REV bindings, XenTouch (5c, 5d)


# build.ps1's default PRODUCT_NAME: the INFs' "@PRODUCT_NAME@ PV Bus" device description, which the era-(b)
# co-installer's MatchExistingDriver requires of the driver already bound to DEV_0001/0002.
PRODUCT_NAME = "Xen"
XENBUS_DRIVER_DESC = f"{PRODUCT_NAME} PV Bus"
# Build variants (genfiles.ps1 drops every INF line carrying @VARIANT@ unless the variable is set).
FORCE_ACTIVATE = "FORCE_ACTIVATE"  # xenbus.inf: XENFILT Precedence values and the class UpperFilters
FORCE_UNPLUG = "FORCE_UNPLUG"      # xenvbd.inf: XEN\ForceUnplug\DISKS = 1


class StartType(IntEnum):
    BOOT = 0
    SYSTEM = 1
    AUTO = 2
    DEMAND = 3
    DISABLED = 4


class ServiceType(IntEnum):
    KERNEL_DRIVER = 0x1
    WIN32_OWN_PROCESS = 0x10


_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:\.(\d+))?$")


@functools.total_ordering
@dataclass(frozen=True)
class Version:
    """MAJOR.MINOR.MICRO.BUILD, as DriverVer and XenTouch carry it."""

    major: int
    minor: int
    micro: int
    build: int = 0

    @classmethod
    def parse(cls, text: str | Version) -> Version:
        if isinstance(text, Version):
            return text
        m = _VERSION_RE.match(str(text).strip())
        if m is None:
            raise ValueError(f"{text!r} is not a MAJOR.MINOR.MICRO[.BUILD] version")
        return cls(*(int(g) if g is not None else 0 for g in m.groups()))

    def _key(self) -> tuple[int, int, int, int]:
        return (self.major, self.minor, self.micro, self.build)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}.{self.build}"


@dataclass(frozen=True)
class RegEntry:
    """One AddReg line. `key` is relative to the service key (HKR) or, if it starts with HKLM, absolute.
    `append`: FLG_ADDREG_APPEND (0x00010008) on a REG_MULTI_SZ, which adds the strings not yet there."""

    key: str
    name: str
    type: RegType
    data: RegData
    append: bool = False


@dataclass(frozen=True)
class ServiceSpec:
    """An AddService section. `image` is the file under System32\\drivers (or System32 for services)."""

    name: str
    image: str
    start: StartType
    type: ServiceType = ServiceType.KERNEL_DRIVER
    group: str = ""
    add_reg: tuple[RegEntry, ...] = ()

    @property
    def image_path(self) -> str:
        if self.type == ServiceType.KERNEL_DRIVER:
            return rf"\SystemRoot\System32\drivers\{self.image}"
        return rf"%SystemRoot%\System32\{self.image}"


@dataclass(frozen=True)
class ModelLine:
    """One line of the INF models section: the first ID is the INF hardware ID, the rest its compatible
    IDs (Windows ranks a match on a later ID of the line worse)."""

    service: str
    ids: tuple[str, ...]


@dataclass(frozen=True)
class InterfaceRange:
    provider: str
    interface: str
    min: int
    max: int


@dataclass(frozen=True)
class Subscription:
    provider: str
    interface: str
    version: int


@dataclass(frozen=True)
class Package:
    name: str                    # "xenbus": the INF's base name and the guest YAML key
    version: Version
    era: Era
    class_guid: str
    models: tuple[ModelLine, ...]
    services: tuple[ServiceSpec, ...]
    history: str                 # "modelled on ..." or "invented: ..."
    add_reg: tuple[RegEntry, ...] = ()  # HKLM lines outside the service keys
    # Revisions this package's bus driver offers its children (XENBUS, XENVIF), newest last.
    offers: Mapping[int, Mapping[str, int]] = field(default_factory=lambda: MappingProxyType({}))
    # (bus, revision) the package's INF binds: ("XENBUS", 0x0900000B).
    binds: tuple[str, int] | None = None
    # Subscriber era: what the package's providers support and what its subscribers write.
    provides: tuple[InterfaceRange, ...] = ()
    subscribes: dict[str, tuple[Subscription, ...]] = field(default_factory=dict)
    variant: str = ""            # a build variant (FORCE_ACTIVATE, FORCE_UNPLUG); never the default pick
    driver_desc: str = ""        # the device description its INF gives the devices it binds

    @property
    def inf(self) -> str:
        return f"{self.name}.inf"

    @property
    def key(self) -> str:
        """The driver store name: `<inf>_<arch>_<version>` (Windows uses a hash; the version is clearer)."""
        return f"{self.inf}_amd64_{self.version}"

    @property
    def hardware_ids(self) -> list[str]:
        return [i for line in self.models for i in line.ids]

    def service(self, name: str) -> ServiceSpec:
        for spec in self.services:
            if spec.name.upper() == name.upper():
                return spec
        raise KeyError(f"{self.key} has no service {name}")

    def range(self, provider: str, interface: str) -> InterfaceRange | None:
        for entry in self.provides:
            if entry.provider.upper() == provider.upper() and entry.interface.upper() == interface.upper():
                return entry
        return None

    def __str__(self) -> str:
        return f"{self.name} {self.version}" + (f" ({self.variant})" if self.variant else "")


class UnknownPackage(LookupError):
    def __init__(self, name: str, version: str | Version | None) -> None:
        self.name = name
        self.version = version
        known = ", ".join(str(p.version) for p in packages_named(name)) or "none"
        super().__init__(f"no package {name} {version or '(latest)'} in the catalog (known versions: {known})")


# -- helpers building manifests -------------------------------------------------------------------

def child_ids(bus: str, child_class: str, revision: int, prefix: str = VENDOR_PREFIX) -> tuple[str, ...]:
    """`XENBUS\\VEN_XPC000&DEV_VIF&REV_0900000B` and the 0001/0002 variants, in the INFs' order."""
    return tuple(f"{bus}\\VEN_{vendor_name(did, prefix)}&DEV_{child_class}&REV_{revision:08X}"
                 for did in BUS_DEVICE_IDS)


def _pci_ids() -> tuple[str, ...]:
    return (f"PCI\\VEN_{XEN_PCI_VENDOR:04X}&DEV_{VENDOR_DEVICE_ID:04X}&SUBSYS_{VENDOR_DEVICE_ID:04X}"
            f"{XEN_PCI_VENDOR:04X}&REV_01",
            f"PCI\\VEN_{XEN_PCI_VENDOR:04X}&DEV_0002", f"PCI\\VEN_{XEN_PCI_VENDOR:04X}&DEV_0001")


def _dw(key: str, name: str, data: int) -> RegEntry:
    return RegEntry(key, name, REG_DWORD, data)


def _sz(key: str, name: str, data: str) -> RegEntry:
    return RegEntry(key, name, REG_SZ, data)


def _msz(key: str, name: str, data: list[str]) -> RegEntry:
    return RegEntry(key, name, REG_MULTI_SZ, data)


def _frozen(table: Mapping[int, Mapping[str, int]]) -> Mapping[int, Mapping[str, int]]:
    return MappingProxyType({rev: MappingProxyType(dict(row)) for rev, row in sorted(table.items())})


def _rows(interfaces: tuple[str, ...], rows: dict[int, tuple[int, ...]]) -> dict[int, Mapping[str, int]]:
    return {rev: MappingProxyType(dict(zip(interfaces, values))) for rev, values in rows.items()}


# XB revision.h of 2019-2024 (rows 0x09000001..07; 0x09000000 is revision.py's deprecated row).
_XENBUS_2024_EXTRA = _rows(XENBUS_INTERFACES, {
    0x09000001: (1, 2, 6, 1, 2, 1, 1, 2, 1, 1, 1),
    0x09000002: (1, 2, 7, 1, 2, 1, 1, 2, 1, 1, 1),
    0x09000003: (1, 2, 8, 1, 2, 1, 1, 2, 1, 1, 1),
    0x09000004: (1, 2, 8, 1, 2, 1, 1, 3, 1, 1, 1),
    0x09000005: (1, 2, 8, 1, 2, 1, 2, 4, 1, 1, 1),
    0x09000006: (1, 3, 8, 1, 2, 1, 2, 4, 1, 1, 1),
    0x09000007: (1, 3, 8, 1, 2, 1, 2, 4, 1, 1, 2),
})
XENBUS_2024_REVISIONS = _frozen({**XENBUS_DEPRECATED_REVISIONS, **_XENBUS_2024_EXTRA,
                                 **{r: v for r, v in XENBUS_REVISIONS.items() if r <= 0x0900000B}})

# The 2015 tables had no UNPLUG or CONSOLE column (UNPLUG was XENFILT's then).
_XENBUS_2015_INTERFACES = ("SUSPEND", "SHARED_INFO", "EVTCHN", "DEBUG", "STORE", "RANGE_SET", "CACHE", "GNTTAB",
                           "EMULATED")
XENBUS_2015_REVISIONS = _frozen(_rows(_XENBUS_2015_INTERFACES, {0x08000008: (1, 2, 4, 1, 1, 1, 1, 1, 1)}))
XENBUS_2015_INVENTED_REVISIONS = _frozen(_rows(_XENBUS_2015_INTERFACES, {0x08000009: (1, 2, 5, 1, 1, 1, 1, 1, 1)}))

# XV revision.h of 2019-12: (CACHE, VIF, STORE, SUSPEND), no UNPLUG column yet.
XENVIF_2019_REVISIONS = _frozen(_rows(XENVIF_INTERFACES[:4], {
    0x0800000B: (1, 6, 2, 1), 0x0800000C: (1, 7, 2, 1), 0x0800000D: (1, 8, 2, 1),
    0x09000000: (1, 8, 2, 1), 0x09000001: (2, 8, 2, 1),
}))
XENVIF_2024_REVISIONS = _frozen({r: v for r, v in XENVIF_REVISIONS.items() if r <= 0x09000004})
# XB revision.h at 5e3c42f^ (2023-09) and XV's of then: the last era-(b) tables.
XENBUS_2023_REVISIONS = _frozen({r: v for r, v in XENBUS_2024_REVISIONS.items() if r <= 0x0900000A})
XENVIF_2023_REVISIONS = _frozen({r: v for r, v in XENVIF_REVISIONS.items() if r <= 0x09000003})
# XB revision.h of 2019-12 (eb31daa): 0x08000009..0x09000007, the era-(b) co-installer's DEFINE_REVISION_TABLE.
XENBUS_2019_REVISIONS = _frozen({**_rows(XENBUS_INTERFACES, {
    0x08000009: (1, 2, 4, 1, 1, 1, 1, 1, 1, 0, 1),
    0x0800000A: (1, 2, 5, 1, 1, 1, 1, 1, 1, 0, 1),
    0x0800000B: (1, 2, 5, 1, 2, 1, 1, 2, 1, 0, 1),
}), **XENBUS_DEPRECATED_REVISIONS, **_XENBUS_2024_EXTRA})
XENVIF_2015_REVISIONS = _frozen(_rows(("VIF",), {0x08000001: (1,), 0x08000002: (2,)}))  # invented

# The subscriber-era provider ranges (XB d55a644^ include/*_interface.h; XV d00398b VIF).
_RANGES_8_0_0 = (
    InterfaceRange("XENBUS", "DEBUG", 1, 1), InterfaceRange("XENBUS", "SUSPEND", 1, 1),
    InterfaceRange("XENBUS", "SHARED_INFO", 1, 2), InterfaceRange("XENBUS", "EVTCHN", 1, 4),
    InterfaceRange("XENBUS", "STORE", 1, 1), InterfaceRange("XENBUS", "RANGE_SET", 1, 1),
    InterfaceRange("XENBUS", "CACHE", 1, 1), InterfaceRange("XENBUS", "GNTTAB", 1, 1),
    InterfaceRange("XENFILT", "EMULATED", 1, 1), InterfaceRange("XENFILT", "UNPLUG", 1, 1),
)
_RANGES_8_0_1 = tuple(InterfaceRange("XENBUS", "EVTCHN", 5, 5) if (r.provider, r.interface) == ("XENBUS", "EVTCHN")
                      else r for r in _RANGES_8_0_0)


def _subs(provider: str, **versions: int) -> tuple[Subscription, ...]:
    return tuple(Subscription(provider, interface, version) for interface, version in versions.items())


def _evtchn_max(version: Version) -> int:
    return 4 if version == Version(8, 0, 0, 1) else 5


# -- the manifests ----------------------------------------------------------------------------------

def _xenbus(version: Version, era: Era, history: str, variant: str = "") -> Package:
    current = era == Era.CURRENT
    subscriber = era == Era.SUBSCRIBER
    bus_params = [
        _msz("Parameters", "SupportedClasses", ["VIF", "VBD", "VKBD", "IFACE", "CONS"] if current
             else ["VIF", "VBD", "IFACE"]),
        _msz("Parameters", "SyntheticClasses", ["IFACE", "CONS"] if current else ["IFACE"]),
    ]
    if not subscriber:
        bus_params.append(_sz("Parameters", "RequestKey", REQUEST_KEY))
    # XENFILT's hardware-ID -> bus-type map: today's names; the 2015 INF said ACPI\PNP0A03=DEVICE and
    # PCIIDE\IDEChannel=DISK, which the harness's XENFILT model does not read.
    filt_params: tuple[RegEntry, ...] = (_sz("Parameters", "*PNP0A03", "PCI"),
                                         _sz("Parameters", "Internal_IDE_Channel", "IDE"))
    if variant == FORCE_ACTIVATE:
        # xenbus.inf [XenFilt_Parameters] Precedence lines, each "; @FORCE_ACTIVATE@".
        filt_params += tuple(_dw(r"Parameters\Precedence", f"PCI\\VEN_{XEN_PCI_VENDOR:04X}&DEV_{did:04X}", did)
                             for did in (0x0001, 0x0002, VENDOR_DEVICE_ID))
    services = [
        # xen.sys is an export driver imported by xenbus.sys and xenfilt.sys; its service key holds the
        # Unplug/ForceUnplug values and XenLogLevel, and the model loads it through this service.
        ServiceSpec("XEN", "xen.sys", StartType.BOOT, group="Boot Bus Extender",
                    add_reg=(_dw("Parameters", "XenLogLevel", 0), _dw("Parameters", "QemuLogLevel", 0))),
        ServiceSpec("XENBUS", "xenbus.sys", StartType.BOOT, group="Boot Bus Extender", add_reg=tuple(bus_params)),
        ServiceSpec("XENFILT", "xenfilt.sys", StartType.BOOT, group="Boot Bus Extender", add_reg=filt_params),
    ]
    add_reg: tuple[RegEntry, ...] = ()
    if not subscriber:
        services.append(ServiceSpec(
            "xenbus_monitor", f"xenbus_monitor_{version.major}_{version.minor}_{version.micro}_{version.build}.exe",
            StartType.AUTO, type=ServiceType.WIN32_OWN_PROCESS,
            add_reg=(_sz("Parameters", "RequestKey", REQUEST_KEY),)))
    if current:
        add_reg = (_dw(UNPLUG_KEY, "NICS", 0), _dw(UNPLUG_KEY, "DISKS", 0))
        if variant == FORCE_ACTIVATE:
            # [XenFilt_Filters]: the class UpperFilters at install time, not at XENBUS's first AddDevice.
            add_reg += tuple(RegEntry(rf"HKLM\SYSTEM\CurrentControlSet\Control\Class\{guid}", "UpperFilters",
                                      REG_MULTI_SZ, ["XENFILT"], append=True)
                             for guid in (SYSTEM_CLASS_GUID, HDC_CLASS_GUID))
        offers = XENBUS_REVISIONS if version >= Version(9, 1, 0, 10) else XENBUS_2024_REVISIONS
        # One models line: the vendor device is the INF hardware ID, 0002 and 0001 its compatible IDs.
        models = (ModelLine("XENBUS", _pci_ids()),)
    elif era == Era.COINSTALLER:
        offers = XENBUS_2019_REVISIONS if version < Version(9, 1, 0) else XENBUS_2023_REVISIONS
        models = tuple(ModelLine("XENBUS", (pci_id,)) for pci_id in _pci_ids())  # one line per ID until 2023
    else:
        offers = XENBUS_2015_REVISIONS if version == Version(8, 0, 0, 1) else XENBUS_2015_INVENTED_REVISIONS
        models = tuple(ModelLine("XENBUS", (pci_id,)) for pci_id in _pci_ids())  # one line per ID in 2015
    return Package(
        name="xenbus", version=version, era=era, class_guid=SYSTEM_CLASS_GUID, models=models,
        services=tuple(services), history=history, add_reg=add_reg, offers=_frozen(offers),
        provides=() if not subscriber else (_RANGES_8_0_0 if version == Version(8, 0, 0, 1) else _RANGES_8_0_1),
        subscribes={} if not subscriber else {"XENBUS": _subs("XENFILT", EMULATED=1, UNPLUG=1)},
        variant=variant, driver_desc=XENBUS_DRIVER_DESC,
    )


def _child(name: str, version: Version, era: Era, history: str, *, child_class: str, service: str, image: str,
           class_guid: str, revision: int, start: StartType, bus: str = "XENBUS",
           add_reg: tuple[RegEntry, ...] = (), service_reg: tuple[RegEntry, ...] = (),
           extra_services: tuple[ServiceSpec, ...] = (), offers: Mapping[int, Mapping[str, int]] | None = None,
           provides: tuple[InterfaceRange, ...] = (), subscribes: tuple[Subscription, ...] = (),
           variant: str = "") -> Package:
    models = (ModelLine(service, child_ids(bus, child_class, revision)),) if era == Era.CURRENT else tuple(
        ModelLine(service, (i,)) for i in child_ids(bus, child_class, revision))
    return Package(
        name=name, version=version, era=era, class_guid=class_guid, models=models,
        services=(ServiceSpec(service, image, start, add_reg=service_reg), *extra_services), history=history,
        add_reg=add_reg if era == Era.CURRENT else (), offers=_frozen(offers or {}), binds=(bus, revision),
        provides=provides, subscribes={service: subscribes} if subscribes else {}, variant=variant,
    )


def _children(version: Version, era: Era, history: str, *, bus_revision: int, vif_revision: int,
              vif_offers: Mapping[int, Mapping[str, int]]) -> list[Package]:
    boot_flags = (_dw("", "BootFlags", 0x81),)  # network boot load | WinPE (reference 8)
    subscriber = era == Era.SUBSCRIBER
    evtchn = _evtchn_max(version) if subscriber else 0
    return [
        _child("xenvif", version, era, history, child_class="VIF", service="XENVIF", image="xenvif.sys",
               class_guid=SYSTEM_CLASS_GUID, revision=bus_revision, start=StartType.DEMAND,
               service_reg=boot_flags, add_reg=(_dw(UNPLUG_KEY, "NICS", 0),), offers=vif_offers,
               provides=(InterfaceRange("XENVIF", "VIF", 1, 2),) if subscriber else (),
               subscribes=_subs("XENBUS", DEBUG=1, SUSPEND=1, EVTCHN=evtchn, STORE=1, RANGE_SET=1, CACHE=1,
                                GNTTAB=1) if subscriber else ()),
        _child("xennet", version, era, history, child_class="NET", service="XENNET", image="xennet.sys",
               class_guid=NET_CLASS_GUID, revision=vif_revision, start=StartType.DEMAND, bus="XENVIF",
               service_reg=boot_flags, subscribes=_subs("XENVIF", VIF=2) if subscriber else ()),
        _child("xenvbd", version, era, history, child_class="VBD", service="XENVBD", image="xenvbd.sys",
               class_guid=SCSI_ADAPTER_CLASS_GUID, revision=bus_revision, start=StartType.BOOT,
               service_reg=(_dw(r"Parameters\PnpInterface", "5", 1),),  # storport: PNPBus miniport
               add_reg=(_dw(UNPLUG_KEY, "DISKS", 0),),
               # XENDISK is the disk-class filter on the PDOs XENVBD's storport adapter reports.
               extra_services=(ServiceSpec("XENDISK", "xendisk.sys", StartType.BOOT),),
               subscribes=_subs("XENBUS", DEBUG=1, SUSPEND=1, EVTCHN=evtchn, STORE=1, GNTTAB=1, CACHE=1)
               if subscriber else ()),
        _child("xeniface", version, era, history, child_class="IFACE", service="XENIFACE", image="xeniface.sys",
               class_guid=SYSTEM_CLASS_GUID, revision=bus_revision, start=StartType.DEMAND,
               subscribes=_subs("XENBUS", SUSPEND=1, SHARED_INFO=2, EVTCHN=evtchn, STORE=1, GNTTAB=1)
               if subscriber else ()),
    ]


def _build_catalog() -> dict[tuple[str, Version], Package]:
    built: list[Package] = []
    v = Version(8, 0, 0, 1)
    note = "modelled on XB d55a644^ / XV d00398b (2015-07); XENNET/XENVBD/XENIFACE subscriptions invented"
    built += [_xenbus(v, Era.SUBSCRIBER, note),
              *_children(v, Era.SUBSCRIBER, note, bus_revision=0x08000008, vif_revision=0x08000002,
                         vif_offers=XENVIF_2015_REVISIONS)]
    v = Version(8, 0, 1, 1)
    note = "invented: EVTCHN v1..v4 retired within the subscriber era; revision 0x08000009 invented"
    built += [_xenbus(v, Era.SUBSCRIBER, note),
              *_children(v, Era.SUBSCRIBER, note, bus_revision=0x08000009, vif_revision=0x08000002,
                         vif_offers=XENVIF_2015_REVISIONS)]
    v = Version(9, 1, 0, 5)
    note = "modelled on XB a5de8b1 / XV 2024-07 (children bind 0x0900000A); build number invented"
    built += [_xenbus(v, Era.CURRENT, note),
              *_children(v, Era.CURRENT, note, bus_revision=0x0900000A, vif_revision=0x09000004,
                         vif_offers=XENVIF_2024_REVISIONS)]
    v = Version(9, 1, 0, 10)
    note = "modelled on XB/XV from 2025-08 on (stack.drivers.revision); build number invented"
    built += [_xenbus(v, Era.CURRENT, note),
              *_children(v, Era.CURRENT, note, bus_revision=CHILD_BINDS_XENBUS_REVISION,
                         vif_revision=XENNET_BINDS_XENVIF_REVISION, vif_offers=XENVIF_REVISIONS)]
    v = Version(9, 0, 0, 4)
    note = ("modelled on XB eb31daa / XV 3247aee (2019-12, the 9.0 branch): the era-(b) co-installer "
            "(coinst.c@5e3c42f^), revisions 0x08000009..0x09000007, children bind the newest; build invented")
    built += [_xenbus(v, Era.COINSTALLER, note),
              *_children(v, Era.COINSTALLER, note, bus_revision=0x09000007, vif_revision=0x09000001,
                         vif_offers=XENVIF_2019_REVISIONS)]
    v = Version(9, 1, 0, 1)
    note = ("modelled on XB 5e3c42f^ / XV of 2023-09, the last trees with the era-(b) co-installer: revisions "
            "0x09000000..0x0900000A, children bind 0x09000009; build number invented")
    built += [_xenbus(v, Era.COINSTALLER, note),
              *_children(v, Era.COINSTALLER, note, bus_revision=0x09000009, vif_revision=0x09000003,
                         vif_offers=XENVIF_2023_REVISIONS)]
    v = Version(9, 1, 0, 11)
    note = "the 9.1.0.10 trees built with FORCE_ACTIVATE (xenbus) and FORCE_UNPLUG (xenvbd); build number invented"
    built.append(_xenbus(v, Era.CURRENT, note, variant=FORCE_ACTIVATE))
    vbd = next(p for p in _children(v, Era.CURRENT, note, bus_revision=CHILD_BINDS_XENBUS_REVISION,
                                    vif_revision=XENNET_BINDS_XENVIF_REVISION, vif_offers=XENVIF_REVISIONS)
               if p.name == "xenvbd")
    built.append(dataclasses.replace(vbd, variant=FORCE_UNPLUG,
                                     add_reg=vbd.add_reg + (_dw(FORCE_UNPLUG_KEY, "DISKS", 1),)))
    v = Version(9, 0, 0, 3)
    built.append(_children(v, Era.CURRENT, "modelled on XV 3247aee (2019-12): binds XENBUS REV_09000005, "
                           "retired by XB 36e3eea (2025-08); installed with current-era rules",
                           bus_revision=0x09000005, vif_revision=0x09000001, vif_offers=XENVIF_2019_REVISIONS)[0])
    return {(p.name, p.version): p for p in built}


PACKAGES: Mapping[tuple[str, Version], Package] = MappingProxyType(_build_catalog())
PACKAGE_NAMES = ("xenbus", "xenvif", "xennet", "xenvbd", "xeniface")  # fresh-install order: bus first


def packages_named(name: str) -> list[Package]:
    return sorted((p for (n, _), p in PACKAGES.items() if n == name.lower()), key=lambda p: p.version)


def get_package(name: str, version: str | Version | None = None, *, era: Era | None = None) -> Package:
    """The package `name` at `version` (latest of `era`, or of all, when None; a build variant only when
    its version is named)."""
    candidates = [p for p in packages_named(name) if era is None or p.era == era]
    if version is None:
        plain = [p for p in candidates if not p.variant]
        if not plain:
            raise UnknownPackage(name, None)
        return plain[-1]
    wanted = Version.parse(version)
    for package in candidates:
        if package.version == wanted:
            return package
    raise UnknownPackage(name, wanted)


# Windows class keys the XENFILT filter goes into (reference 0).
XENFILT_FILTER_CLASSES = (SYSTEM_CLASS_GUID, HDC_CLASS_GUID)
