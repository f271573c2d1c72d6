"""Package and life-cycle commands: `pkg list|install|upgrade|remove`, `reboot`, `reg add` and `fault ...`.

`pkg` runs stack.install's Installer on the running guest's registry, as dpinst/pnputil would: the
subscriber-era veto comes back with its reason; bindings, images and services change on disk (the hive)
and take effect at the next boot (no device is restarted in the running guest: XENFILT filters the PCI
bus and cannot be unloaded, so Windows asks for a reboot instead). Every outcome also goes to the debug
log under SETUP, as setupapi's log would have it.

`fault` injects the mistakes the drivers' history is made of (reference windows-pv-drivers.md 7, 9):
- `irql-query-interface [CLASS]`: a child driver's DPC sends IRP_MN_QUERY_INTERFACE to its PDO at
  DISPATCH_LEVEL (the bugcheck names the child's module);
- `leak-ref INTERFACE`: acquire a XENBUS interface (STORE, or XENBUS.STORE as `interfaces` shows it) and
  never release it (then `power S4` hits the FdoS3ToS4 rule);
- `grant [DOMID]` then `revoke-in-use`: permit a page to a back-end domain, and, once the back-end has
  mapped it, try to revoke it (GnttabRevokeForeignAccess fails and the grant stays in use).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xenpv.stack.agent.console import UsageError, command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.install.installer import (IMAGES_KEY, InstallError, InstallResult, InstallVetoed, Installer,
                                     PlatformPciDevice, installed_packages, reboot_requests)
from xenpv.stack.install.packages import Era
from xenpv.stack.kernel import (IRP_MN_PNP, Irp, IoSynchronousCallDriver, KeInitializeDpc, KeInsertQueueDpc,
                          QueryInterfaceParameters)
from xenpv.stack.kernel.registry import REG_DWORD, REG_SZ, KeyNotFound, ValueNotFound
from xenpv.stack.kernel.status import NT_SUCCESS, status_name


def _print(rt: GuestRuntime, text: str) -> str:
    for line in text.splitlines():
        rt.kernel.log.print("setup", line)
    return text


def _installer(rt: GuestRuntime) -> Installer:
    platform = [PlatformPciDevice(d.device_id, d.revision, slot=2 + i)
                for i, d in enumerate(rt.config.guest.platform)]
    return Installer(rt.kernel.registry, platform=platform)


def _describe(verb: str, result: InstallResult) -> str:
    lines = [f"{verb} {result.package} ({result.package.era.value} era)"
             + (f", replacing {result.previous}" if result.previous is not None else "")]
    lines += [f"unbound: {reason}" for reason in result.unbound]
    if result.new_binding:
        lines.append("co-installer: new binding (a child is bound to an older revision)")
    if result.unplug_cleared:
        lines.append(r"co-installer: XEN\Unplug DISKS and NICS cleared (the next boot is emulated)")
    if result.reboot_required:
        lines.append("reboot required")
    return "\n".join(lines)


def _list(rt: GuestRuntime) -> str:
    registry = rt.kernel.registry
    lines = [f"{p.name:<9} {p.version!s:<10} {p.era.value}" for p in installed_packages(registry)]
    images = []
    if registry.key_exists(IMAGES_KEY):
        for image in sorted(registry.subkeys(IMAGES_KEY)):
            try:
                version = registry.get_sz(IMAGES_KEY + "\\" + image, "Version")
            except (KeyNotFound, ValueNotFound):
                continue
            images.append(f"{image}={version}")
    if images:
        lines.append("images: " + " ".join(images))
    pending = reboot_requests(registry)
    if pending:
        lines.append("reboot requested by: " + ", ".join(pending))
    return "\n".join(lines) or "(no packages installed)"


@command("pkg", "driver packages: list, install, upgrade, remove (at the next boot)",
         ("list", "install NAME [VERSION]", "upgrade NAME [VERSION]", "remove NAME"),
         details="NAME: xenbus, xenvif, xennet, xenvbd or xeniface; VERSION: such as 9.1.0.10 (default: the "
                 "newest of the guest's era)")
def _pkg(rt: GuestRuntime, args: list[str]) -> str:
    # The installer writes the registry (ZwSetValueKey: PASSIVE_LEVEL only), so it runs owning the CPU, as
    # every console command that runs kernel code does: without the kernel lock, a driver thread holding
    # the CPU at DISPATCH_LEVEL meanwhile made the write a false 0xA (found by `xenpv explore`).
    with rt.kernel.cpu.lock:
        return _pkg_locked(rt, args)


def _pkg_locked(rt: GuestRuntime, args: list[str]) -> str:
    op, rest = args[0], args[1:]
    if op == "list":
        return _list(rt)
    installer = _installer(rt)
    if op in ("install", "upgrade"):
        name, version = rest[0], rest[1] if len(rest) == 2 else None
        # Without a version: the newest package of the guest's era.
        era = Era(rt.config.guest.drivers.era) if version is None else None
        what = f"{name} {version or '(latest)'}"
        try:
            result = (installer.install if op == "install" else installer.upgrade)(name, version, era=era)
        except InstallVetoed as exc:
            return _print(rt, f"{op} {what}: VETOED {exc.error_name} ({exc.error}): {exc.reason}")
        except (InstallError, LookupError) as exc:
            return _print(rt, f"{op} {what}: failed: {exc}")
        return _print(rt, _describe("upgraded" if op == "upgrade" else "installed", result))
    try:
        package = installer.remove(rest[0])
    except InstallError as exc:
        return _print(rt, f"remove {rest[0]}: failed: {exc}")
    return _print(rt, f"removed {package}")


@command("reboot", "restart Windows on the same machine (the hive persists, volatile keys go)")
def _reboot(rt: GuestRuntime, args: list[str]) -> str:
    pending = reboot_requests(rt.kernel.registry)
    rt.reboot()
    return f"boot {rt.boots}" + (f" (reboot requested by {', '.join(pending)})" if pending else "")


@command("reg", "set a registry value (reg.exe syntax)", ("add KEY /v NAME /t REG_DWORD|REG_SZ /d DATA",),
         details="KEY: quote it ('HKLM\\SOFTWARE\\X'); DATA: a number (0x10, 16) for REG_DWORD")
def _reg(rt: GuestRuntime, args: list[str]) -> str:
    key, name, kind, data = args[1], args[3], args[5], args[7]
    if kind == "REG_DWORD":
        typed: tuple[int, int | str] = (REG_DWORD, parse_int(data, "DATA", 0, 0xFFFFFFFF))
    else:
        typed = (REG_SZ, data)
    with rt.kernel.cpu.lock:  # see _pkg
        rt.kernel.registry.set_value(key, name, *typed)
    return "The operation completed successfully."


# -- fault injection ----------------------------------------------------------------------------------

@dataclass
class _Grant:
    kernel: Any  # the boot it was made in: a restart by any path (console, xenagent, xenbus_monitor) ends it
    gnttab: Any
    cache: Any
    entry: Any
    mdl: Any


_grants: list[_Grant] = []


def _active_fdo(rt: GuestRuntime) -> Any:
    fdo = rt.drivers.xenbus.active_fdo if rt.drivers is not None else None
    if fdo is None:
        raise RuntimeError("no active XENBUS FDO: not a Xen guest, or XENBUS did not start")
    return fdo


def _irql_query_interface(rt: GuestRuntime, args: list[str]) -> str:
    fdo = _active_fdo(rt)
    if not fdo.children:
        return "XENBUS has no child PDOs"
    child = args[0].upper() if args else ("VBD" if "VBD" in fdo.children else next(iter(fdo.children)))
    pdo = fdo.children.get(child)
    if pdo is None:
        return f"no {child} child (children: {', '.join(fdo.children)})"
    node = pdo.device_node
    service = node.service if node is not None and node.service else f"XEN{child}"
    store = fdo.interfaces["STORE"]
    irp = Irp.pnp(IRP_MN_PNP.QUERY_INTERFACE, QueryInterfaceParameters(store.GUID, 4096, store.max_version(), None))
    # What a child does wrong when it asks for an interface from its DPC instead of at PASSIVE_LEVEL.
    dpc = KeInitializeDpc(lambda *_: IoSynchronousCallDriver(pdo, irp), module=f"{service.lower()}.sys")
    with rt.kernel.cpu.lock:
        KeInsertQueueDpc(dpc)
    return f"QUERY_INTERFACE at DISPATCH_LEVEL from {service} returned {status_name(irp.io_status.status)}"


def _leak_ref(rt: GuestRuntime, args: list[str]) -> str:
    fdo = _active_fdo(rt)
    # As `interfaces` names them (XENBUS.STORE) or bare (STORE).
    name = args[0].upper().removeprefix("XENBUS.")
    if name not in fdo.interfaces:
        raise UsageError(f"XENBUS has no interface {args[0]!r} (it has {', '.join(fdo.interfaces)})")
    context = fdo.interfaces[name]
    with rt.kernel.cpu.lock:
        status = context.acquire()
    if not NT_SUCCESS(status):
        return f"{context.NAME}: acquire failed with {status_name(status)}"
    return f"{context.NAME}: one reference acquired and never released ({context.references} now)"


def _grant(rt: GuestRuntime, args: list[str]) -> str:
    domid = parse_int(args[0], "DOMID", 0, 0x7FEF) if args else 0  # DOMID_FIRST_RESERVED - 1
    fdo = _active_fdo(rt)
    gnttab = fdo.interfaces["GNTTAB"]
    assert rt.kernel.mm is not None
    with rt.kernel.cpu.lock:
        status = gnttab.acquire()
        if not NT_SUCCESS(status):
            return f"GNTTAB: acquire failed with {status_name(status)}"
        status, cache = gnttab.GnttabCreateCache("fault", 0, 1, lambda _a: None, lambda _a: None, None)
        mdl = rt.kernel.mm.MmAllocatePagesForMdl(1)
        status, entry = gnttab.GnttabPermitForeignAccess(cache, False, domid, mdl.pfns[0], False)
        if not NT_SUCCESS(status):
            gnttab.GnttabDestroyCache(cache)
            rt.kernel.mm.MmFreePagesFromMdl(mdl)
            gnttab.release()
            return f"permit to dom{domid}: {status_name(status)}"
    _grants.append(_Grant(rt.kernel, gnttab, cache, entry, mdl))
    return f"granted ref {gnttab.GnttabGetReference(entry)} pfn {mdl.pfns[0]:#x} to dom{domid}"


def _revoke_in_use(rt: GuestRuntime, args: list[str]) -> str:
    _grants[:] = [g for g in _grants if g.kernel is rt.kernel]  # an earlier boot's went with its kernel
    if not _grants:
        return "no outstanding grant: run `fault grant [DOMID]` and map it from the back-end first"
    grant = _grants[-1]
    ref = grant.gnttab.GnttabGetReference(grant.entry)
    with rt.kernel.cpu.lock:
        status = grant.gnttab.GnttabRevokeForeignAccess(grant.cache, False, grant.entry)
    if not NT_SUCCESS(status):
        # The real callers ignore this status: the page goes back to the pool still granted (a leak the
        # back-end can read and write), which is the bug class being injected.
        return f"revoke ref {ref}: {status_name(status)}: the back-end still maps it; the grant stays in use"
    _grants.pop()
    with rt.kernel.cpu.lock:
        grant.gnttab.GnttabDestroyCache(grant.cache)
        grant.gnttab.release()
    assert rt.kernel.mm is not None
    rt.kernel.mm.MmFreePagesFromMdl(grant.mdl)
    return f"revoke ref {ref}: {status_name(status)}"


_FAULTS = {"irql-query-interface": _irql_query_interface, "leak-ref": _leak_ref, "grant": _grant,
           "revoke-in-use": _revoke_in_use}


@command("fault", "inject a fault (the drivers' bug classes)",
         ("irql-query-interface [CLASS]", "leak-ref INTERFACE", "grant [DOMID]", "revoke-in-use"),
         details="CLASS: a XENBUS child (VBD, VIF, IFACE...; default VBD); INTERFACE: a XENBUS interface as "
                 "`interfaces` names it, with or without XENBUS. (STORE or XENBUS.STORE); DOMID: the back-end "
                 "domain to grant to (default 0)")
def _fault(rt: GuestRuntime, args: list[str]) -> str:
    return _FAULTS[args[0]](rt, args[1:])
