"""A domain's doorbell table: the generation per event channel port that revokes what DOORBELL handed out.

DOORBELL (xenabi/trap.py) gives the guest's vCPU the kick and call eventfds of a port bound to a dom0
back-end's channel, and the port's generation. A file descriptor cannot be taken back from another
process, so revocation is by generation instead: xenhv changes a port's generation whenever what a
doorbell of that port would be changes, and the vCPU uses a doorbell only while its generation is
current. The table is a memfd the vCPU maps read-only; xenhv is its only writer. Each change is one
atomic store, ordered before whatever xenhv does next (the fds it closes, the port it frees).
"""
from __future__ import annotations

import logging
import mmap
import os

from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.trap import DOORBELL_GENERATION, DOORBELL_PORTS, DOORBELL_TABLE_SIZE

log = logging.getLogger("xenhv.doorbells")

_WIDTH = DOORBELL_GENERATION.size
_MAX = (1 << 8 * _WIDTH) - 1


class DoorbellTable:
    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.fd = os.memfd_create(f"xenhv-dom{domid}-doorbells", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, DOORBELL_TABLE_SIZE)
            self._map = mmap.mmap(self.fd, DOORBELL_TABLE_SIZE, mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise
        self._words = AtomicMemory(self._map)

    def generation(self, port: int) -> int:
        return self._words.load(self._offset(port), _WIDTH)

    def revoke(self, port: int) -> None:
        """Whatever doorbell of `port` the vCPU holds is no longer to be used."""
        offset = self._offset(port)
        # xenhv is the only writer (one thread): a load and a store cannot lose an increment.
        self._words.store(offset, _WIDTH, (self._words.load(offset, _WIDTH) + 1) & _MAX)
        log.debug("dom%d: doorbell of port %d revoked", self.domid, port)

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self.fd)

    @staticmethod
    def _offset(port: int) -> int:
        if not 0 <= port < DOORBELL_PORTS:
            raise ValueError(f"port {port} has no doorbell slot (0..{DOORBELL_PORTS - 1})")
        return port * _WIDTH
