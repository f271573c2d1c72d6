"""blkback end to end: a real guest (QEMU, xenhv, xenstored), the blkback process, and a test-side frontend
(harness/blk.py) running as the guest.  Images live in the test's tmp dir and are checked from outside."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from backends.blkback.launch import start_blkback
from backends.xenstored.client import XsClient
from harness.blk import BlkFront, Op, add_vbd, pack_discard, pack_indirect, pack_request
from harness.process import Supervised
from harness.xendomain import XenDomain
from stack.vcpu.platform import XenPlatform
from xenabi.blkif import (BLKIF_DISCARD_SECURE, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE,
                          BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY)
from xenabi.xenbus import XenbusState

pytestmark = pytest.mark.integration

MIB = 1 << 20
XVDB, XVDC = 51728, 51744  # (202<<8)|(disk<<4)


@dataclass
class Env:
    dom: XenDomain
    blkback: Supervised
    platform: XenPlatform
    xs: XsClient
    tmp: Path
    log: Path
    fronts: list[BlkFront] = field(default_factory=list)

    def image(self, name: str, size: int) -> Path:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def disk(self, image: Path, devid: int = XVDB, fmt: str = "raw", **kw: object) -> BlkFront:
        add_vbd(self.xs, self.dom.domid, devid, image, fmt)
        front = BlkFront(self.platform, devid, **kw)  # type: ignore[arg-type]
        self.fronts.append(front)
        return front.connect()

    def alive(self) -> None:
        self.blkback.check_alive("the test")


@pytest.fixture
def env(xen_guest_factory, tmp_path: Path, artifacts: Path) -> Iterator[Env]:
    dom = xen_guest_factory("default")
    host = dom.host
    log = artifacts / "blkback.log"
    bb = start_blkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, log)
    xs = XsClient(host.xenstored_socket)
    platform = XenPlatform.start(dom.vcpu, dom.machine.guest.memory_mib << 8)
    e = Env(dom, bb, platform, xs, tmp_path, log)
    try:
        yield e
        for f in e.fronts:
            if f.queues:
                f.close()
        e.alive()
    finally:
        platform.close()
        bb.stop()
        xs.close()


def pattern(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def test_write_read_back_and_image_checked_from_outside(env: Env) -> None:
    img = env.image("a.img", 16 * MIB)
    f = env.disk(img)
    assert f.sectors == 16 * MIB // 512
    data = pattern(1, 44 * 1024)  # 11 pages: one full direct request
    f.write(100, data)
    assert f.read(100, len(data) // 512) == data
    f.write(0, pattern(2, 512))
    f.flush()
    raw = img.read_bytes()
    assert raw[100 * 512:100 * 512 + len(data)] == data
    assert raw[:512] == pattern(2, 512)
