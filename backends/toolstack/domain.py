"""Create and destroy a domain the way libxl does: the hypervisor domain, its xenstore directories, the
xenstore ring page and event channel, INTRODUCE, the split devices, unpause; and the reverse. Suspend and
restore too, as libxl's save/restore (libxl_dom_suspend.c, libxl_create.c's restore path):

- suspend_domain: control/shutdown=suspend; the guest acknowledges by writing "" (within SUSPEND_ACK_SECONDS,
  else the request is withdrawn and the save fails naming why, the domain running on), then its vCPU shuts
  the domain down with SHUTDOWN_suspend (within SUSPEND_SECONDS);
- a cancelled suspend or a checkpoint resumes the same domain (xenhv resume_domain: the guest's hypercall
  returns 1);
- restore is create_domain with `restore_from`: a NEW domid, xenhv's saved state loaded before the domain
  is populated, then the same xenstore tree, a cleared store page and a new store event channel (libxc
  clears the special pages of a restored HVM guest), INTRODUCE, the device directories the guest
  definition gives (the back-ends attach) and unpause.

Every xenstore batch runs in one transaction retried on EAGAIN (XsClient.transact), as libxl's
`retry_transaction` loops do, so backends and the guest never see half a directory.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import xenpv.backends.toolstack.layout as L  # the sibling module, not the package (whose __init__ imports us)
from xenpv.backends import serving
from xenpv.backends.xenhv.control import XenhvControl, XenhvError
from xenpv.backends.xenstored.client import XsClient, XsConnectionError, XsRequestError
from xenpv.guests.schema import GuestDefinition, PvDisk
from xenpv.base.errors import HarnessError
from xenpv.backends.host import HostServices
from xenpv.xenabi.hvm import HVM_PARAM_STORE_EVTCHN, HVM_PARAM_STORE_PFN
from xenpv.xenabi.xen import SHUTDOWN_suspend as SHUTDOWN_SUSPEND
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
                  *, name: str | None = None, backend_domid: int = L.DOM0,
                  restore_from: Path | None = None) -> CreatedDomain:
    """Create domain `domid` for a launched machine; with `restore_from` (a xenhv save_domain file) the new
    domain gets that saved state first. On any failure what was done is undone."""
    name = name or guest.name
    ram_size = guest.memory_mib << 20
    with _step(domid, "xenhv create_domain"):
        ctl.call("create_domain", domid=domid, name=name, ram_path=str(paths.ram), ram_size=ram_size,
                 dm_qmp=str(paths.dm_qmp_socket))
    try:
        if restore_from is not None:
            with _step(domid, f"xenhv restore_domain from {restore_from}"):
                ctl.call("restore_domain", domid=domid, path=str(restore_from))
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

    devset = L.guest_devices(guest, domid, paths.image_dir, backend_domid)
    for image, disk in devset.scratch_images:
        if image.exists():
            continue  # a restored domain's disk: its data is what the guest wrote before the save
        with _step(domid, f"creating the scratch image {image}"):
            _make_scratch_image(image, disk)
    # A device is online only when a back-end serves its kind (as libxl asks QEMU,
    # libxl__query_qemu_backend): a frontend then waits only for a back-end that exists.
    with _step(domid, "asking which device kinds a back-end serves"):
        served = {kind: serving.served(xs, kind, backend_domid) for kind in {d.kind for d in devset.devices}}
    for dev in devset.devices:
        def add(tx: int, dev: L.XenbusDevice = dev) -> None:
            # As for the domain directory: no stale keys of an earlier device may survive.
            _rm_if_present(xs, L.frontend_path(domid, dev.kind, dev.devid), tx)
            _rm_if_present(xs, L.backend_path(backend_domid, dev.kind, domid, dev.devid), tx)
            _write_nodes(xs, tx, L.device_nodes(dev, domid, backend_domid, served=served[dev.kind]))

        with _step(domid, f"adding {dev.kind} {dev.devid}"):
            xs.transact(add)
        if not served[dev.kind]:
            log.info("dom%d: no back-end serves %s: %s %d is offline", domid, dev.kind, dev.kind, dev.devid)

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


SUSPEND_ACK_SECONDS = 10.0  # libxl waits longer still; a guest answers in milliseconds
SUSPEND_SECONDS = 20.0
SUSPEND_POLL_SECONDS = 0.005


def domain_info(ctl: XenhvControl, domid: int) -> dict | None:
    return next((d for d in ctl.call("list_domains") if d["domid"] == domid), None)


def suspend_domain(xs: XsClient, ctl: XenhvControl, domid: int, *, ack_timeout: float = SUSPEND_ACK_SECONDS,
                   timeout: float = SUSPEND_SECONDS, alive: Callable[[], None] | None = None) -> float:
    """Ask the guest to suspend (libxl's pvcontrol path) and wait until its domain has shut down with
    SHUTDOWN_suspend; returns the seconds it took. `alive()` is called while waiting and raises if what
    runs the guest died. A guest that does not acknowledge within `ack_timeout` has the request withdrawn
    (control/shutdown back to "" if it still says suspend) and is left running: ToolstackError."""
    node = f"{L.domain_path(domid)}/control/shutdown"
    start = time.monotonic()
    with _step(domid, "writing control/shutdown=suspend"):
        if domain_info(ctl, domid) is None:
            raise ToolstackError(domid, "suspend", "no such domain")
        xs.write(node, "suspend")
    ack_deadline, deadline = start + ack_timeout, start + timeout
    acknowledged = False
    while True:
        with _step(domid, "waiting for the suspend"):
            info = domain_info(ctl, domid)
            if info is None:
                raise ToolstackError(domid, "suspend", "the domain went away while suspending")
            if info["state"] == "shutdown":
                if info["shutdown_reason"] != SHUTDOWN_SUSPEND:
                    raise ToolstackError(domid, "suspend", f"the domain shut down with reason "
                                                           f"{info['shutdown_reason']}, not suspend")
                elapsed = time.monotonic() - start
                log.info("dom%d suspended in %.0f ms", domid, elapsed * 1000)
                return elapsed
            if not acknowledged:
                acknowledged = xs.read(node) != b"suspend"
        if alive is not None:
            alive()
        now = time.monotonic()
        if not acknowledged and now >= ack_deadline:
            withdrawn = _withdraw_suspend(xs, node)
            raise ToolstackError(domid, "suspend", f"the guest did not acknowledge control/shutdown=suspend within "
                                                   f"{ack_timeout:g}s (its PV drivers never answered); "
                                                   + ("request withdrawn, " if withdrawn else "")
                                                   + "the domain runs on")
        if now >= deadline:
            raise ToolstackError(domid, "suspend", f"the guest acknowledged the suspend request but its domain did "
                                                   f"not shut down with SHUTDOWN_suspend within {timeout:g}s")
        time.sleep(SUSPEND_POLL_SECONDS)


# libxl__domain_pvcontrol: the guest has this long to acknowledge (write "" or remove the node).
PVCONTROL_ACK_SECONDS = 60.0
# What a toolstack writes to control/shutdown for the guest's own power paths: libxl_domain_shutdown
# "poweroff", libxl_domain_reboot "reboot"; xl has no sleep request, XAPI's xenopsd writes "s3" and "s4",
# which is what Windows' xenagent answers. ("suspend" is suspend_domain's.)
PVCONTROL_COMMANDS = ("poweroff", "reboot", "s3", "s4")


def pvcontrol_domain(xs: XsClient, ctl: XenhvControl, domid: int, command: str, *,
                     ack_timeout: float = PVCONTROL_ACK_SECONDS, alive: Callable[[], None] | None = None) -> float:
    """libxl__domain_pvcontrol: write control/shutdown=`command` and wait for the guest's acknowledgement
    (the node read back as "" or gone: pvcontrol_acked); the seconds it took. What the guest then does
    (power off, restart, hibernate) is its own; the caller watches for it. A guest that does not acknowledge
    within `ack_timeout` is a ToolstackError ("guest didn't acknowledge control request"), the request left
    in place as libxl leaves it. libxl first refuses a HVM guest whose HVM_PARAM_CALLBACK_IRQ is 0
    (ERROR_NOPARAVIRT); the model's guest takes its upcalls through xenhv's trap link and never sets that
    parameter, so the check is not made."""
    if command not in PVCONTROL_COMMANDS:
        raise ValueError(f"control/shutdown={command!r}: not one of {', '.join(PVCONTROL_COMMANDS)}")
    node = f"{L.domain_path(domid)}/control/shutdown"
    start = time.monotonic()
    with _step(domid, f"writing control/shutdown={command}"):
        if domain_info(ctl, domid) is None:
            raise ToolstackError(domid, command, "no such domain")
        xs.write(node, command)
    deadline = start + ack_timeout
    while True:
        with _step(domid, f"waiting for the guest to acknowledge {command}"):
            try:
                acknowledged = xs.read(node) == b""
            except XsRequestError:
                acknowledged = True  # the node is gone: pvcontrol_acked(NULL)
        if acknowledged:
            elapsed = time.monotonic() - start
            log.info("dom%d acknowledged control/shutdown=%s in %.0f ms", domid, command, elapsed * 1000)
            return elapsed
        if alive is not None:
            alive()
        if time.monotonic() >= deadline:
            raise ToolstackError(domid, command, f"guest didn't acknowledge control request within {ack_timeout:g}s "
                                                 f"(no PV agent answers control/shutdown)")
        time.sleep(SUSPEND_POLL_SECONDS)


def _withdraw_suspend(xs: XsClient, node: str) -> bool:
    """libxl's cancel: control/shutdown back to "" in a transaction, only if it still asks to suspend."""
    def body(tx: int) -> bool:
        try:
            if xs.read(node, tx) != b"suspend":
                return False
        except XsRequestError:
            return False
        xs.write(node, "", tx)
        return True
    try:
        return xs.transact(body)
    except (XsRequestError, XsConnectionError) as exc:
        log.warning("withdrawing the suspend request at %s: %s", node, exc)
        return False


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
    def image_dir(self) -> Path: ...  # the guest's disk images (the PV disks' scratch images go there too)
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

    def create(self, machine: DeviceModel, domid: int | None = None, *, restore_from: Path | None = None,
               name: str | None = None) -> CreatedDomain:
        domid = self.host.allocate_domid() if domid is None else domid
        d = create_domain(self.xs, self.ctl, machine.guest, domid, machine.paths, name=name or machine.name,
                          restore_from=restore_from)
        self.domains[domid] = d
        return d

    def suspend(self, domid: int, **waits: object) -> float:
        return suspend_domain(self.xs, self.ctl, domid, **waits)  # type: ignore[arg-type]

    def save_state(self, domid: int, path: Path) -> None:
        """xenhv's part of a save: what Xen keeps outside guest RAM."""
        with _step(domid, f"xenhv save_domain to {path}"):
            self.ctl.call("save_domain", domid=domid, path=str(path))

    def resume_cancelled(self, domid: int) -> None:
        """The checkpoint's end, or a failed save's: the suspended domain runs on where it stopped."""
        with _step(domid, "xenhv resume_domain"):
            self.ctl.call("resume_domain", domid=domid)

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
