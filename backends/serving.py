"""Which device kinds a back-end domain serves, as the toolstack asks before it adds a device, and what a
back-end process says on its way out.

libxl asks the same question of QEMU (libxl_dm.c libxl__query_qemu_backend, used by libxl_usb.c to pick
a device's back-end): a QEMU that serves a device type makes `<backend dompath>/device-model/<domid>/
backends/<type>` when it registers the type (QEMU hw/xen/xen-legacy-backend.c xen_be_register). Our
back-ends are dom0 processes serving every domain, so each running one makes

    /local/domain/<backend domid>/backends/<kind>/<owner>

where <owner> is the process's base.owner.Owner, <pid>-<start time> (a xenstore path has no dots), and
removes it when it stops. A back-end killed without a word (SIGKILL) leaves its node: the kind is still
served - a crashed back-end is expected back, and frontends wait for it as for any back-end that has not
answered yet (a restore while blkback is down connects when it returns) - until the next back-end of the
kind starts and takes the node of its dead predecessor away. The node is dom0's alone (permission
n<backend domid>): no guest can make the toolstack believe a back-end runs.

A stopping back-end says Closed on every device it still has (Linux's xenbus backends do the same in
their remove path, netback_remove -> set_backend_state(be, XenbusStateClosed)), so a frontend closing
its side afterwards finds the backend Closed at once instead of waiting out its close timeout.
"""
from __future__ import annotations

import logging

from xenpv.backends.xenstored.client import XsClient, XsConnectionError, XsRequestError
from xenpv.base.owner import Owner
from xenpv.xenabi.xenbus import XenbusState

log = logging.getLogger("backends.serving")

DOM0 = 0


def serving_root(kind: str, backend_domid: int = DOM0) -> str:
    return f"/local/domain/{backend_domid}/backends/{kind}"


def announce(xs: XsClient, kind: str, backend_domid: int = DOM0) -> str:
    """This process serves `kind`: make its node (see the module's docstring) and return its path."""
    root = serving_root(kind, backend_domid)
    owner = Owner.current()
    path = f"{root}/{owner.pid}-{owner.start}"

    def body(tx: int) -> None:
        forget_dead(xs, kind, backend_domid, tx)
        xs.write(path, "", tx)
        xs.set_perms(path, [f"n{backend_domid}"], tx)

    xs.transact(body)
    log.info("serving %s: %s", kind, path)
    return path


def forget_dead(xs: XsClient, kind: str, backend_domid: int = DOM0, tx: int = 0) -> list[str]:
    """Remove the announcements of `kind` whose processes are gone (killed back-ends); their paths."""
    root = serving_root(kind, backend_domid)
    gone = []
    for name in _announcements(xs, root, tx):
        owner = Owner.parse(name.replace("-", ".", 1))
        if owner is None or not owner.alive():
            log.info("serving %s: %s/%s is gone (its process died without withdrawing)", kind, root, name)
            xs.rm(f"{root}/{name}", tx)
            gone.append(f"{root}/{name}")
    return gone


def _announcements(xs: XsClient, root: str, tx: int = 0) -> list[str]:
    try:
        return xs.directory(root, tx)
    except XsRequestError as exc:
        if exc.errno_name == "ENOENT":
            return []
        raise


def withdraw(xs: XsClient, path: str) -> None:
    """The announcing process stops serving: its node goes (a node already gone is fine)."""
    try:
        xs.rm(path)
    except XsRequestError as exc:
        if exc.errno_name != "ENOENT":
            raise


def served(xs: XsClient, kind: str, backend_domid: int = DOM0) -> bool:
    """Whether a back-end announced `kind` in `backend_domid` and has not withdrawn (a killed one has not:
    see the module's docstring)."""
    return bool(_announcements(xs, serving_root(kind, backend_domid)))


def say_closed(xs: XsClient, backend_path: str) -> bool:
    """A stopping back-end's last word on one device: state Closed, if its directory is still there (a
    write would make the removed directory again). False when the directory is gone."""
    def body(tx: int) -> bool:
        try:
            xs.read(f"{backend_path}/state", tx)
        except XsRequestError as exc:
            if exc.errno_name == "ENOENT":
                return False
            raise
        xs.write(f"{backend_path}/state", XenbusState.Closed.wire(), tx)
        return True

    try:
        return xs.transact(body)
    except (XsRequestError, XsConnectionError) as exc:
        # Stopping must finish: a store that no longer answers (the host is going down) is only logged.
        log.warning("%s: saying Closed on stopping: %s", backend_path, exc)
        return False
