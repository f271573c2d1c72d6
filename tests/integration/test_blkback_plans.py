"""blkback's transfer plans: a request shape whose grants are all persistent is decoded and checked once,
then served from a cache keyed on its bytes (and its indirect pages' contents).  These tests run the real
guest, xenhv, xenstored and blkback with a persistent-grant frontend and check that a cached shape still
follows the indirect page it names, still gets every per-request check, and keeps the data exact."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.blkback.launch import start_blkback
from xenpv.backends.xenstored.client import XsClient
from xenpv.harness.frontends.blkfront import BlkFront, Op, add_vbd, pack_indirect
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi.blkif import BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, BlkifRequestSegment
from xenpv.xenabi.layout import struct_of

pytestmark = pytest.mark.integration

MIB = 1 << 20
XVDB = 51728
PAGE = 4096
_SEGMENT = struct_of(BlkifRequestSegment)


@pytest.fixture
def front(xen_guest_factory, tmp_path: Path, artifacts: Path) -> Iterator[tuple[BlkFront, Path]]:
    dom = xen_guest_factory("default")
    host = dom.host
    bb = start_blkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, artifacts / "blkback.log")
    xs = XsClient(host.xenstored_socket)
    platform = XenPlatform.start(dom.vcpu, dom.machine.guest.memory_mib << 8)
    image = tmp_path / "p.img"
    with open(image, "wb") as f:
        f.truncate(4 * MIB)
    try:
        add_vbd(xs, dom.domid, XVDB, image)
        f = BlkFront(platform, XVDB, persistent=True, slot_pages=16, slots=32).connect()
        yield f, image
        f.close()
        bb.check_alive("the test")
    finally:
        platform.close()
        bb.stop()
        xs.close()


def _segments(f: BlkFront, slot: int) -> bytes:
    return b"".join(_SEGMENT.pack(ref, 0, 7) for ref in f.slot(slot).refs)


def test_cached_shape_follows_its_indirect_page(front: tuple[BlkFront, Path]) -> None:
    f, image = front
    s0 = f.slot(0)
    data = random.Random(1).randbytes(16 * PAGE)
    for p, gfn in enumerate(s0.gfns):
        f.write_page(gfn, data[p * PAGE:(p + 1) * PAGE])
    f.write_page(s0.indirect_gfn, _segments(f, 0))
    for rid in range(3):  # the first maps the grants, the next ones are served from the plan
        assert f.request(pack_indirect(BLKIF_OP_WRITE, rid, 0, 16, [s0.indirect_ref])) == BLKIF_RSP_OKAY
    # Slot 0's indirect page now names slot 1's pages: the same request bytes, other segments.
    other = random.Random(2).randbytes(16 * PAGE)
    for p, gfn in enumerate(f.slot(1).gfns):
        f.write_page(gfn, other[p * PAGE:(p + 1) * PAGE])
    f.write_page(s0.indirect_gfn, _segments(f, 1))
    assert f.request(pack_indirect(BLKIF_OP_WRITE, 9, 128, 16, [s0.indirect_ref])) == BLKIF_RSP_OKAY
    assert image.read_bytes()[:256 * 512] == data + other
    assert f.read(0, 128) + f.read(128, 128) == data + other


def test_cached_shape_is_still_checked(front: tuple[BlkFront, Path]) -> None:
    f, image = front
    s0 = f.slot(0)
    f.write_page(s0.indirect_gfn, _segments(f, 0))
    for rid in range(3):
        assert f.request(pack_indirect(BLKIF_OP_READ, rid, 0, 16, [s0.indirect_ref])) == BLKIF_RSP_OKAY
        assert f.request(pack_indirect(BLKIF_OP_WRITE, rid, 0, 16, [s0.indirect_ref])) == BLKIF_RSP_OKAY
    # A write past the end would grow a raw image: the range check must refuse it before any I/O.
    assert f.request(pack_indirect(BLKIF_OP_WRITE, 9, f.sectors - 8, 16, [s0.indirect_ref])) == BLKIF_RSP_ERROR
    assert image.stat().st_size == 4 * MIB
    assert f.request(pack_indirect(BLKIF_OP_READ, 10, f.sectors - 8, 16, [s0.indirect_ref])) == BLKIF_RSP_ERROR
    assert f.request(pack_indirect(BLKIF_OP_READ, 11, f.sectors, 16, [s0.indirect_ref])) == BLKIF_RSP_ERROR
    # A foreign grant written into the page after the shape was cached.
    f.write_page(s0.indirect_gfn, _SEGMENT.pack(4000, 0, 7) + _segments(f, 0)[_SEGMENT.size:])
    assert f.request(pack_indirect(BLKIF_OP_READ, 12, 0, 16, [s0.indirect_ref])) == BLKIF_RSP_ERROR
    f.write_page(s0.indirect_gfn, _segments(f, 0))
    assert f.request(pack_indirect(BLKIF_OP_READ, 13, 0, 16, [s0.indirect_ref])) == BLKIF_RSP_OKAY


def test_randomized_with_persistent_grants(front: tuple[BlkFront, Path]) -> None:
    f, image = front
    rng = random.Random(77)
    size = 4 * MIB
    model = bytearray(size)
    for _ in range(4):
        ops: list[Op] = []
        writes: list[tuple[int, bytes]] = []
        for _ in range(128):
            count = rng.choice([8, 16, 64, 128, rng.randint(1, 128)])
            sector = rng.randrange(0, size // 512 - count)
            if rng.random() < 0.5:
                writes.append((sector, rng.randbytes(count * 512)))
            else:
                ops.append(Op("read", sector, count))
        # Reads check against the model before this batch (the batch's own writes may land in any
        # order relative to its reads), so reads and writes go in separate batches.
        for r in f.run(ops, depth=32):
            assert r.status == 0
            assert r.data == bytes(model[r.op.sector * 512:(r.op.sector + r.op.count) * 512])
        # Overlapping writes in flight may land in any order: keep the last of each overlap only.
        last: dict[int, tuple[int, bytes]] = {}
        for sector, data in writes:
            if not any(s < sector + len(data) // 512 and sector < s + len(d) // 512 for s, d in last.values()):
                last[sector] = (sector, data)
        for r in f.run([Op("write", s, len(d) // 512, d) for s, d in last.values()], depth=32):
            assert r.status == 0
        for s, d in last.values():
            model[s * 512:s * 512 + len(d)] = d
    f.flush()
    assert image.read_bytes() == bytes(model)
