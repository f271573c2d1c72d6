"""Create and destroy a domain the way libxl does: the hypervisor domain, its xenstore directories, the
xenstore ring page and event channel, INTRODUCE, the split devices, unpause; and the reverse.

Every xenstore batch runs in one transaction retried on EAGAIN (XsClient.transact), as libxl's
`retry_transaction` loops do, so backends and the guest never see half a directory.
"""
from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import xenpv.backends.toolstack.layout as L  # the sibling module, not the package (whose __init__ imports us)
from xenpv.backends.xenhv.control import XenhvControl, XenhvError
from xenpv.backends.xenstored.client import XsClient, XsConnectionError, XsRequestError
from xenpv.guests.schema import GuestDefinition, PvDisk
from xenpv.base.errors import HarnessError
from xenpv.backends.host import HostServices
from xenpv.xenabi.hvm import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
from xenpv.xenabi.xenbus import XenbusState

log = logging.getLogger("toolstack")


class ToolstackError(HarnessError):
    """A create or destroy step failed; names the domain and the step."""

    def __init__(self, domid: int, step: str, reason: str) -> None:
        self.domid = domid
        self.step = step
        self.reason = reason
        super().__init__(f"toolstack: dom{domid}: {step}: {reason}")


@dataclass(frozen=True)
class CreatedDomain:
    domid: int
    name: str
    vm_path: str
    store_gfn: int
    store_evtchn: int
    devices: list[tuple[str, int]] = field(default_factory=list)  # (kind, devid)


@contextmanager
def _step(domid: int, step: str) -> Iterator[None]:
    try:
        yield
    except ToolstackError:
        raise
    except subprocess.CalledProcessError as exc:
        raise ToolstackError(domid, step, f"{exc}: {exc.stderr.strip()}") from exc
    except (XsRequestError, XsConnectionError, XenhvError, OSError, ValueError) as exc:
        raise ToolstackError(domid, step, str(exc)) from exc


def _write_nodes(xs: XsClient, tx: int, nodes: list[L.XsNode]) -> None:
    for n in nodes:
        if n.value is None:
            xs.mkdir(n.path, tx)
        else:
            xs.write(n.path, n.value, tx)
        if n.perms is not None:
            xs.set_perms(n.path, list(n.perms), tx)


def _rm_if_present(xs: XsClient, path: str, tx: int) -> None:
    try:
        xs.rm(path, tx)
    except XsRequestError as exc:
        if exc.errno_name != "ENOENT":  # ENOENT: the parent is missing, so the node is absent too
            raise


def _rm_with_empty_parents(xs: XsClient, path: str, tx: int) -> None:
    """libxl__xs_path_cleanup: remove `path`, then each ancestor left with no children."""
    _rm_if_present(xs, path, tx)
    parent = path.rsplit("/", 1)[0]
    while parent:
        try:
            if xs.directory(parent, tx):
                return
        except XsRequestError as exc:
            if exc.errno_name != "ENOENT":
                raise
        _rm_if_present(xs, parent, tx)
        parent = parent.rsplit("/", 1)[0]


def alloc_store_evtchn(ctl: XenhvControl, domid: int, backend_domid: int) -> int:
    """An unbound port in the guest that xenstored's domain binds (xc_evtchn_alloc_unbound in libxl)."""
    return int(ctl.call("evtchn_alloc_unbound", dom=domid, remote_dom=backend_domid))


def _zero_page(ram: Path, gfn: int) -> None:
    """The ring page must start zeroed: indexes 0, connection CONNECTED, no error (xen-abi.md 2).
    Guest-physical equals the RAM-file offset below the PCI hole (guests.schema.MAX_MEMORY_MIB)."""
    fd = os.open(ram, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.pwrite(fd, bytes(L.PAGE_SIZE), gfn * L.PAGE_SIZE) != L.PAGE_SIZE:
            raise OSError(f"short write zeroing gfn {gfn:#x} in {ram}")
    finally:
        os.close(fd)


def _make_scratch_image(path: Path, disk: PvDisk) -> None:
    if disk.format == "qcow2":
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(disk.size)],
                       check=True, capture_output=True, text=True)
    else:
        with open(path, "wb") as f:
            f.truncate(disk.size)


def create_domain(xs: XsClient, ctl: XenhvControl, guest: GuestDefinition, domid: int, paths: MachineFiles,
                  *, name: str | None = None, backend_domid: int = L.DOM0) -> CreatedDomain:
    """Create domain `domid` for a launched machine; on any failure what was done is undone."""
    name = name or guest.name
    ram_size = guest.memory_mib << 20
    with _step(domid, "xenhv create_domain"):
        ctl.call("create_domain", domid=domid, name=name, ram_path=str(paths.ram), ram_size=ram_size,
                 dm_qmp=str(paths.dm_qmp_socket))
    try:
        return _populate(xs, ctl, guest, domid, paths, name, ram_size, backend_domid)
    except BaseException as exc:
        try:
            destroy_domain(xs, ctl, domid, backend_domid=backend_domid)
        except ToolstackError as undo:
            exc.add_note(f"undoing the partial create also failed: {undo}")
        raise


def _populate(xs: XsClient, ctl: XenhvControl, guest: GuestDefinition, domid: int, paths: MachineFiles,
              name: str, ram_size: int, backend_domid: int) -> CreatedDomain:
    dom = L.domain_path(domid)
    skeleton = L.domain_nodes(guest, domid, name)
    vm_path = L.vm_path(guest, domid)

    def make(tx: int) -> None:
        # A stale directory of an earlier domain with this id must not leak into the new one.
        _rm_if_present(xs, dom, tx)
        _rm_if_present(xs, vm_path, tx)
        _write_nodes(xs, tx, skeleton)

    with _step(domid, "xenstore domain directories"):
        xs.transact(make)

    gfn = L.store_gfn(ram_size)
    with _step(domid, f"zeroing the store page (gfn {gfn:#x})"):
        _zero_page(paths.ram, gfn)
    with _step(domid, "allocating the store event channel"):
        port = alloc_store_evtchn(ctl, domid, backend_domid)
    with _step(domid, "setting HVM_PARAM_STORE_PFN/STORE_EVTCHN"):
        ctl.call("set_param", domid=domid, index=HVM_PARAM_STORE_PFN, value=gfn)
        ctl.call("set_param", domid=domid, index=HVM_PARAM_STORE_EVTCHN, value=port)
    with _step(domid, "xenstore memory and store keys"):
        xs.transact(lambda tx: _write_nodes(xs, tx, L.build_post_nodes(guest, domid, gfn, port)))
    with _step(domid, f"INTRODUCE {domid}|{gfn}|{port}|"):
        xs.introduce(domid, gfn, port)

    devset = L.guest_devices(guest, domid, paths.run_dir, backend_domid)
    for image, disk in devset.scratch_images:
        with _step(domid, f"creating the scratch image {image}"):
            _make_scratch_image(image, disk)
    for dev in devset.devices:
        def add(tx: int, dev: L.XenbusDevice = dev) -> None:
            # As for the domain directory: no stale keys of an earlier device may survive.
            _rm_if_present(xs, L.frontend_path(domid, dev.kind, dev.devid), tx)
            _rm_if_present(xs, L.backend_path(backend_domid, dev.kind, domid, dev.devid), tx)
            _write_nodes(xs, tx, L.device_nodes(dev, domid, backend_domid))

        with _step(domid, f"adding {dev.kind} {dev.devid}"):
            xs.transact(add)

    with _step(domid, "xenhv unpause"):
        ctl.call("unpause", domid=domid)
    log.info("dom%d (%s) created: store gfn %#x port %d, %d devices", domid, name, gfn, port,
             len(devset.devices))
    return CreatedDomain(domid, name, vm_path, gfn, port, [(d.kind, d.devid) for d in devset.devices])


def _backend_dirs(xs: XsClient, domid: int, backend_domid: int) -> list[str]:
    """The domain's backend directories, found from the backend side: the frontend's `backend` keys are
    guest-writable, and trusting them would let a guest make the toolstack remove any path."""
    root = f"{L.domain_path(backend_domid)}/backend"
    found = []
    try:
        kinds = xs.directory(root)
    except XsRequestError as exc:
        if exc.errno_name == "ENOENT":
            return []
        raise
    for kind in kinds:
        if str(domid) in xs.directory(f"{root}/{kind}"):
            found += [f"{root}/{kind}/{domid}/{devid}" for devid in xs.directory(f"{root}/{kind}/{domid}")]
    return found


def destroy_domain(xs: XsClient, ctl: XenhvControl, domid: int, *, backend_domid: int = L.DOM0) -> None:
    """Tear a domain down; every step is attempted even if an earlier one failed, so nothing is left
    behind that can be removed. Raises ToolstackError naming the steps that failed."""
    failures: list[str] = []

    def attempt(step: str, fn: Callable[[], object]) -> None:
        try:
            with _step(domid, step):
                fn()
        except ToolstackError as exc:
            failures.append(f"{step}: {exc.reason}")
            log.warning("%s", exc)

    def release() -> None:
        try:
            xs.release(domid)
        except XsRequestError as exc:
            if exc.errno_name != "ENOENT":  # never introduced (a create that failed early)
                raise

    # Paused first so the guest does not act on a half-removed store (libxl's destroy does the same).
    attempt("xenhv pause", lambda: _pause_if_present(ctl, domid))
    attempt("RELEASE", release)
    dirs: list[str] = []
    attempt("listing backend directories", lambda: dirs.extend(_backend_dirs(xs, domid, backend_domid)))

    def close_backends(tx: int) -> None:
        for be in dirs:
            xs.write(f"{be}/online", "0", tx)
            xs.write(f"{be}/state", XenbusState.Closing.wire(), tx)

    if dirs:
        attempt("backends online=0, state Closing", lambda: xs.transact(close_backends))

    def remove(tx: int) -> None:
        dom = L.domain_path(domid)
        try:
            vm = xs.read(f"{dom}/vm", tx).decode()
        except XsRequestError as exc:
            if exc.errno_name != "ENOENT":
                raise
            vm = ""
        if vm.startswith("/vm/"):
            _rm_with_empty_parents(xs, vm, tx)
        for be in dirs:
            _rm_with_empty_parents(xs, be, tx)
        _rm_with_empty_parents(xs, dom, tx)

    attempt("removing xenstore directories", lambda: xs.transact(remove))
    attempt("xenhv destroy_domain", lambda: _destroy_if_present(ctl, domid))
    if failures:
        raise ToolstackError(domid, "destroy", "; ".join(failures))
    log.info("dom%d destroyed", domid)


def _pause_if_present(ctl: XenhvControl, domid: int) -> None:
    if any(d["domid"] == domid for d in ctl.call("list_domains")):
        ctl.call("pause", domid=domid)


def _destroy_if_present(ctl: XenhvControl, domid: int) -> None:
    if any(d["domid"] == domid for d in ctl.call("list_domains")):
        ctl.call("destroy_domain", domid=domid)


class MachineFiles(Protocol):
    """Where a launched QEMU keeps what the toolstack hands to xenhv (the harness's MachinePaths)."""

    @property
    def run_dir(self) -> Path: ...
    @property
    def ram(self) -> Path: ...
    @property
    def dm_qmp_socket(self) -> Path: ...


class DeviceModel(Protocol):
    """The launched QEMU a domain is built around (the harness's Machine): its guest, name and files."""

    name: str
    guest: GuestDefinition
    paths: MachineFiles


class Toolstack:
    """The toolstack of one host: a dom0 xenstore connection and a xenhv control connection."""

    def __init__(self, host: HostServices) -> None:
        self.host = host
        self.xs = XsClient(host.xenstored_socket)
        try:
            self.ctl = host.xenhv_control()
        except BaseException:
            self.xs.close()
            raise
        self.domains: dict[int, CreatedDomain] = {}

    def create(self, machine: DeviceModel, domid: int | None = None) -> CreatedDomain:
        domid = self.host.allocate_domid() if domid is None else domid
        d = create_domain(self.xs, self.ctl, machine.guest, domid, machine.paths, name=machine.name)
        self.domains[domid] = d
        return d

    def destroy(self, domid: int) -> None:
        self.domains.pop(domid, None)
        destroy_domain(self.xs, self.ctl, domid)

    def destroy_all(self) -> None:
        errors = []
        for domid in reversed(list(self.domains)):
            try:
                self.destroy(domid)
            except ToolstackError as exc:
                errors.append(exc)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(str(other))
            raise errors[0]

    def close(self) -> None:
        self.ctl.close()
        self.xs.close()

    def __enter__(self) -> "Toolstack":
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.destroy_all()
        finally:
            self.close()
