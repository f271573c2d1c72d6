"""The netback process: one XenBackend (vhost-user server reached by xenhv), one dom0 xenstore
connection watching `/local/domain/0/backend/vif`, one Vif per device found there."""
from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

from xenpv.backends import serving
from xenpv.backends.netback.vif import Vif
from xenpv.backends.xenbackend import XenBackend
from xenpv.backends.xenstored.client import XsClient, XsRequestError

log = logging.getLogger("netback.daemon")

ROOT = "/local/domain/0/backend/vif"
CLONE_NEWNET = 0x40000000
STATS_INTERVAL = 0.25


class NetnsError(Exception):
    pass


def enter_netns(name: str) -> None:
    """Move this (still single-threaded) process into the named namespace, where the TAPs are; the unix
    sockets it uses live in the filesystem and are unaffected."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Netback:
    def __init__(self, xenstore: Path, xenhv: Path, vhost_socket: Path, stats_path: Path | None) -> None:
        vhost_socket.unlink(missing_ok=True)  # left by a killed predecessor
        self.backend = XenBackend("netback", vhost_socket, xenhv)
        self.xs = XsClient(xenstore)
        self.stats_path = stats_path
        self.vifs: dict[tuple[int, int], Vif] = {}
        self._fatal: queue.Queue[tuple[Vif, str]] = queue.Queue()
        self._stop = threading.Event()
        self._last_stats = ""

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        # Announced before the vhost-user socket listens (what the launcher waits for), so a domain the
        # toolstack makes once we are started gets its vif directories; one made before the watch below
        # is found by the scan after it.
        announced = serving.announce(self.xs, "vif")
        try:
            self.backend.start()
        except BaseException:
            serving.withdraw(self.xs, announced)
            raise
        try:
            self.xs.watch(ROOT, "backend")
            self._scan()
            last = 0.0
            while not self._stop.is_set():
                path, token = self.xs.wait_event(0.05) or (None, None)
                if token == "backend":
                    self._backend_event(path)
                elif token is not None and token.startswith("fe "):
                    vif = self.vifs.get(tuple(int(x) for x in token.split()[1:]))
                    if vif is not None:
                        vif.frontend_changed()
                while not self._fatal.empty():
                    vif, reason = self._fatal.get()
                    vif.fatal(reason)
                if time.monotonic() - last > STATS_INTERVAL:
                    last = time.monotonic()
                    self._write_stats()
        finally:
            serving.withdraw(self.xs, announced)
            for vif in self.vifs.values():
                vif.disconnect()
                serving.say_closed(self.xs, vif.path)
            self._write_stats()
            self.backend.stop()
            self.xs.close()

    def _scan(self) -> None:
        try:
            domids = self.xs.directory(ROOT)
        except XsRequestError:
            return
        for d in domids:
            for dev in self.xs.directory(f"{ROOT}/{d}"):
                self._backend_event(f"{ROOT}/{d}/{dev}")

    def _backend_event(self, path: str | None) -> None:
        parts = (path or "").removeprefix(ROOT).strip("/").split("/")
        if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
            if path == ROOT:
                self._scan()
            return
        key = (int(parts[0]), int(parts[1]))
        vif = self.vifs.get(key)
        base = f"{ROOT}/{key[0]}/{key[1]}"
        if not self.xs.exists(base):
            if vif is not None:
                log.info("%s: backend directory removed", vif.name)
                vif.disconnect()
                self.xs.unwatch(f"{vif.frontend}/state", f"fe {key[0]} {key[1]}")
                del self.vifs[key]
            return
        if vif is not None or not self.xs.exists(f"{base}/frontend"):
            return
        try:
            vif = Vif(self.backend, self.xs, key[0], key[1], self._report_fatal)
            self.xs.watch(f"{vif.frontend}/state", f"fe {key[0]} {key[1]}")
            self.vifs[key] = vif
            vif.start(watch_registered_now=True)
        except XsRequestError as exc:
            log.warning("vif %d/%d: not ready: %s", *key, exc)

    def _report_fatal(self, vif: Vif, reason: str) -> None:
        self._fatal.put((vif, reason))

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        text = json.dumps({v.name: {"state": v.state.name, **v.stats.as_dict()} for v in self.vifs.values()},
                          sort_keys=True)
        if text == self._last_stats:
            return
        tmp = self.stats_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.stats_path)
        self._last_stats = text
