"""One virtual block device as dom0 sees it in xenstore: its backend directory, its frontend's keys, the
xenbus state machine between them, and the queues while it is connected.  All of it runs on the daemon's
main thread; queue threads report a broken ring through ``on_fatal``."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from xenpv.backends.blkback.image import Image, ImageError, open_image
from xenpv.backends.blkback.queue import BlkQueue, DiskConfig, QueueSetupError
from xenpv.backends.xenhv.control import XenhvError
from xenpv.backends.xenstored.client import XsClient, XsRequestError
from xenpv.base.errors import HarnessError
from xenpv.xenabi.blkif import BLKIF_SECTOR_SIZE, VDISK_READONLY, layouts_for_protocol
from xenpv.xenabi.xenbus import XenbusState

if TYPE_CHECKING:
    from xenpv.backends.xenbackend import XenBackend

log = logging.getLogger("blkback.device")

MAX_RING_PAGE_ORDER = 4
MAX_QUEUES = 4
MAX_INDIRECT_SEGMENTS = 256
DISCARD_GRANULARITY = 4096


class ConnectError(Exception):
    """The frontend's keys do not describe rings blkback can serve."""


@dataclass
class VbdDevice:
    domid: int
    devid: int
    path: str
    xs: XsClient
    backend: "XenBackend"
    run_dir: Path
    on_fatal: Callable[["VbdDevice", str], None]
    frontend: str = ""
    image: Image | None = None
    readonly: bool = False
    discard: bool = False
    queues: list[BlkQueue] = field(default_factory=list)
    _stale_rings_seen: bool = False

    @property
    def name(self) -> str:
        return f"vbd {self.domid}/{self.devid}"

    @property
    def watch_token(self) -> str:
        return f"fe:{self.domid}:{self.devid}"

    def _read(self, path: str) -> str | None:
        try:
            return self.xs.read(path).decode()
        except XsRequestError as exc:
            if exc.errno_name == "ENOENT":
                return None
            raise

    def _fe(self, key: str) -> str | None:
        return self._read(f"{self.frontend}/{key}")

    def _set_state(self, state: XenbusState) -> None:
        log.info("%s: backend %s", self.name, state.name)
        self.xs.write(f"{self.path}/state", state.wire())

    # ---- the state machine -------------------------------------------------------------------------------

    def sync(self) -> bool:
        """Act on the current states; False once the device is gone and must be forgotten."""
        be_raw = self._read(f"{self.path}/state")
        if be_raw is None:
            self.destroy("backend directory removed")
            return False
        online = self._read(f"{self.path}/online") == "1"
        if self.image is None:
            if not online:
                return True
            if not self._setup():
                return True
            be_raw = XenbusState.InitWait.wire()
        be = XenbusState.parse(be_raw)
        fe = XenbusState.parse(self._fe("state"))
        if fe == XenbusState.Initialised and be == XenbusState.InitWait:
            self._connect()
        elif fe == XenbusState.Connected and be == XenbusState.InitWait:
            # A frontend goes Connected only after its backend did, so these rings were connected to a
            # previous blkback (this one's predecessor, killed). Their slots still hold requests that
            # were answered long ago, whose grants the frontend has revoked and reused: a fresh back ring
            # would serve them again from slot 0 and write stale data over acknowledged writes. InitWait
            # tells the frontend to close and reconnect with new rings, replaying what was not answered.
            if not self._stale_rings_seen:
                log.warning("%s: frontend still connected to a previous backend's rings; waiting for it to "
                            "reconnect", self.name)
                self._stale_rings_seen = True
        elif fe == XenbusState.Closing:
            self.disconnect()
            if be not in (XenbusState.Closing, XenbusState.Closed):
                self._set_state(XenbusState.Closing)
        elif fe in (XenbusState.Closed, XenbusState.Unknown):
            self.disconnect()
            if be != XenbusState.Closed:
                self._set_state(XenbusState.Closed)
            if not online:
                self.destroy("closed and offline")
                return False
        elif fe == XenbusState.Initialising and be == XenbusState.Closed and online:
            self._publish()
            self._set_state(XenbusState.InitWait)
        return True

    def _setup(self) -> bool:
        frontend = self._read(f"{self.path}/frontend")
        params = self._read(f"{self.path}/params")
        if frontend is None or params is None:
            return False  # the toolstack has not finished writing the directory
        self.frontend = frontend
        self.readonly = (self._read(f"{self.path}/mode") or "w") != "w"
        try:
            if self.domid not in self.backend.links:
                self.backend.attach(self.domid)
            self.image = open_image(params, readonly=self.readonly, run_dir=self.run_dir,
                                    name=f"vbd-{self.domid}-{self.devid}")
        except (ImageError, XenhvError, HarnessError, OSError) as exc:
            log.error("%s: cannot set up: %s", self.name, exc)
            self._set_state(XenbusState.Closed)
            return False
        self.discard = self.image.can_discard and self._read(f"{self.path}/discard-enable") != "0"
        self.xs.watch(f"{self.frontend}/state", self.watch_token)
        self._publish()
        self._set_state(XenbusState.InitWait)
        return True

    def _publish(self) -> None:
        assert self.image is not None
        keys = {
            "sectors": str(self.image.size // BLKIF_SECTOR_SIZE),
            "sector-size": str(BLKIF_SECTOR_SIZE),
            "physical-sector-size": str(BLKIF_SECTOR_SIZE),
            "info": str(VDISK_READONLY if self.readonly else 0),
            "feature-flush-cache": "1",
            "feature-barrier": "1",
            "feature-discard": "1" if self.discard else "0",
            "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
            "feature-persistent": "1",
            "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
            "multi-queue-max-queues": str(MAX_QUEUES),
        }
        if self.discard:
            keys |= {"discard-granularity": str(DISCARD_GRANULARITY), "discard-alignment": "0",
                     "discard-secure": "0"}

        def write(tx: int) -> None:
            for k, v in keys.items():
                self.xs.write(f"{self.path}/{k}", v, tx)

        self.xs.transact(write)

    def _connect(self) -> None:
        try:
            self.queues = self._make_queues()
            for q in self.queues:
                q.start()
        except (ConnectError, QueueSetupError, XenhvError, HarnessError, ValueError) as exc:
            log.error("%s: cannot connect: %s", self.name, exc)
            self.disconnect()
            self._set_state(XenbusState.Closing)
            return
        log.info("%s: connected, %d queue(s) %s", self.name, len(self.queues),
                 ", ".join(f"{len(q.ring_grefs)}-page ring" for q in self.queues))
        self._set_state(XenbusState.Connected)

    def _fe_int(self, key: str, default: int | None = None) -> int:
        value = self._fe(key)
        if value is None:
            if default is None:
                raise ConnectError(f"frontend key {key} is missing")
            return default
        try:
            return int(value, 10)
        except ValueError:
            raise ConnectError(f"frontend key {key}={value!r} is not a number") from None

    def _make_queues(self) -> list[BlkQueue]:
        assert self.image is not None
        try:
            layouts = layouts_for_protocol(self._fe("protocol"))
        except ValueError as exc:
            raise ConnectError(str(exc)) from exc
        nqueues = self._fe_int("multi-queue-num-queues", 1)
        if not 1 <= nqueues <= MAX_QUEUES:
            raise ConnectError(f"multi-queue-num-queues={nqueues} (1..{MAX_QUEUES} offered)")
        order = self._fe_int("ring-page-order", 0) if self._fe("ring-page-order") is not None else None
        if order is not None and not 0 <= order <= MAX_RING_PAGE_ORDER:
            raise ConnectError(f"ring-page-order={order} (0..{MAX_RING_PAGE_ORDER} offered)")
        disk = DiskConfig(self.image, self.image.size // BLKIF_SECTOR_SIZE, self.readonly, self.discard,
                          MAX_INDIRECT_SEGMENTS, self._fe("feature-persistent") == "1")
        link = self.backend.links.get(self.domid)
        if link is None:
            raise ConnectError(f"dom{self.domid} is not attached")
        queues = []
        for q in range(nqueues):
            base = "" if nqueues == 1 else f"queue-{q}/"
            if order is None:
                grefs = [self._fe_int(f"{base}ring-ref")]
            else:
                grefs = [self._fe_int(f"{base}ring-ref{i}") for i in range(1 << order)]
            port = self._fe_int(f"{base}event-channel")
            queues.append(BlkQueue(f"{self.name} q{q}", self.backend, link, layouts, disk, grefs, port,
                                   lambda reason: self.on_fatal(self, reason)))
        return queues

    def disconnect(self) -> None:
        for q in self.queues:
            q.stop()
        if self.queues:
            log.info("%s: disconnected (%s requests served)", self.name, sum(q.served for q in self.queues))
        self.queues = []

    def fail(self, reason: str) -> None:
        """A queue found the ring corrupt: drop the connection, tell the frontend by Closing."""
        log.error("%s: disconnecting: %s", self.name, reason)
        self.disconnect()
        if self._read(f"{self.path}/state") is not None:
            self._set_state(XenbusState.Closing)

    def destroy(self, why: str) -> None:
        self.disconnect()
        if self.image is not None:
            try:
                self.xs.unwatch(f"{self.frontend}/state", self.watch_token)
            except XsRequestError as exc:
                log.debug("%s: unwatch: %s", self.name, exc)
            self.image.close()
            self.image = None
        log.info("%s: removed (%s)", self.name, why)
