"""The blkback daemon: one xenstore watch on dom0's whole ``backend/vbd`` tree, one VbdDevice per
``<domid>/<devid>`` found there, and a vhost-user server through which xenhv links it to each guest."""
from __future__ import annotations

import logging
import os
import queue
import select
import threading
from pathlib import Path

from xenpv.backends import serving
from xenpv.backends.blkback.device import VbdDevice
from xenpv.backends.xenbackend import XenBackend
from xenpv.backends.xenstored.client import XsClient, XsRequestError

log = logging.getLogger("blkback.daemon")

BACKEND_ROOT = "/local/domain/0/backend/vbd"
ROOT_TOKEN = "vbd"


class Blkback:
    def __init__(self, xenstore: Path, xenhv: Path, vhost_socket: Path) -> None:
        self.run_dir = vhost_socket.parent
        self.backend = XenBackend("blkback", vhost_socket, xenhv)
        self.xs = XsClient(xenstore)
        self.devices: dict[tuple[int, int], VbdDevice] = {}
        self._fatal: queue.SimpleQueue[tuple[VbdDevice, str]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Safe from a signal handler: the main loop notices at its next wake-up."""
        self._stop.set()
        os.write(self._wake_w, b"s")

    def _report_fatal(self, device: VbdDevice, reason: str) -> None:
        # Called on a queue thread; xenstore belongs to the main thread.
        self._fatal.put((device, reason))
        os.write(self._wake_w, b"f")

    def run(self) -> None:
        self.backend.start()
        announced = None
        try:
            self.xs.watch(BACKEND_ROOT, ROOT_TOKEN)
            announced = serving.announce(self.xs, "vbd")
            print("blkback ready", flush=True)
            while not self._stop.is_set():
                self._step()
        finally:
            if announced is not None:
                serving.withdraw(self.xs, announced)
            for dev in list(self.devices.values()):
                dev.destroy("blkback stopping")
                serving.say_closed(self.xs, dev.path)
            self.devices.clear()
            self.xs.close()
            self.backend.stop()

    def _step(self) -> None:
        while not self._fatal.empty():
            dev, reason = self._fatal.get()
            if self.devices.get((dev.domid, dev.devid)) is dev:
                dev.fail(reason)
        event = self.xs.wait_event(1.0, wake=self._wake_r)
        if event is None:
            if select.select([self._wake_r], [], [], 0)[0]:
                os.read(self._wake_r, 4096)
            return
        self._on_event(*event)
        while self.xs.events:
            self._on_event(*self.xs.events.popleft())

    def _on_event(self, path: str, token: str) -> None:
        if token == ROOT_TOKEN:
            rest = path[len(BACKEND_ROOT):].strip("/").split("/")
            if rest == [""]:
                self._rescan()
            elif len(rest) == 1:
                self._sync_domain(rest[0])
            else:
                self._sync(rest[0], rest[1])
        elif token.startswith("fe:"):
            _, domid, devid = token.split(":")
            self._sync(domid, devid)

    def _rescan(self) -> None:
        for domid in self._children(BACKEND_ROOT):
            self._sync_domain(domid)
        for key in [k for k in self.devices if str(k[0]) not in self._children(BACKEND_ROOT)]:
            self._sync(str(key[0]), str(key[1]))

    def _sync_domain(self, domid: str) -> None:
        devids = self._children(f"{BACKEND_ROOT}/{domid}")
        for devid in devids:
            self._sync(domid, devid)
        for key in [k for k in self.devices if str(k[0]) == domid and str(k[1]) not in devids]:
            self._sync(str(key[0]), str(key[1]))

    def _children(self, path: str) -> list[str]:
        try:
            return self.xs.directory(path)
        except XsRequestError as exc:
            if exc.errno_name == "ENOENT":
                return []
            raise

    def _sync(self, domid_text: str, devid_text: str) -> None:
        if not (domid_text.isdigit() and devid_text.isdigit()):
            return
        key = (int(domid_text), int(devid_text))
        dev = self.devices.get(key)
        if dev is None:
            dev = VbdDevice(key[0], key[1], f"{BACKEND_ROOT}/{key[0]}/{key[1]}", self.xs, self.backend,
                            self.run_dir, self._report_fatal)
            self.devices[key] = dev
        try:
            alive = dev.sync()
        except XsRequestError as exc:
            # A directory removed under our feet (domain destruction) shows up as ENOENT half-way.
            log.warning("%s: xenstore: %s", dev.name, exc)
            alive = dev._read(f"{dev.path}/state") is not None
            if not alive:
                dev.destroy("backend directory removed")
        if not alive:
            del self.devices[key]
