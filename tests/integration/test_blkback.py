"""blkback end to end: a real guest (QEMU, xenhv, xenstored), the blkback process, and a test-side frontend
(harness/blk.py) running as the guest.  Images live in the test's tmp dir and are checked from outside."""
from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.blkback.launch import start_blkback
from xenpv.backends.xenstored.client import XsClient
from xenpv.harness.frontends.blkfront import BlkFront, Op, add_vbd, pack_discard, pack_indirect, pack_request
from xenpv.base.process import Supervised
from xenpv.harness.xendomain import XenDomain
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi.blkif import (BLKIF_DISCARD_SECURE, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ, BLKIF_OP_WRITE,
                          BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY)
from xenpv.xenabi.xenbus import XenbusState

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
    killed: bool = False

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
            if e.killed:
                f.abandon()
            elif f.queues:
                f.close()
        if not e.killed:
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


def test_flush_durability_survives_killing_blkback(env: Env) -> None:
    img = env.image("d.img", 8 * MIB)
    f = env.disk(img)
    data = pattern(3, 32 * 1024)
    f.write(2048, data)
    f.flush()
    env.killed = True
    env.blkback.stop(soft=lambda: env.blkback.signal_group(9))  # SIGKILL: no teardown, no extra sync
    with open(img, "rb") as fh:
        fh.seek(2048 * 512)
        assert fh.read(len(data)) == data


def test_discard_punches_a_hole(env: Env) -> None:
    img = env.image("t.img", 8 * MIB)
    f = env.disk(img)
    assert f.features["feature-discard"] == "1"
    f.write(0, pattern(4, MIB // 16))  # 64 KiB, indirect
    f.write(1024, pattern(5, 40960))
    blocks_before = os.stat(img).st_blocks
    f.discard(0, 128)
    assert f.read(0, 128) == bytes(64 * 1024)
    assert f.read(1024, 80) == pattern(5, 40960)
    assert os.stat(img).st_blocks < blocks_before
    assert f.request(pack_discard(77, 0, 8, BLKIF_DISCARD_SECURE)) == BLKIF_RSP_EOPNOTSUPP


def test_disk_larger_than_2_tib(env: Env) -> None:
    img = env.image("huge.img", 3 << 40)  # sparse
    f = env.disk(img)
    assert f.sectors == (3 << 40) // 512 and f.sectors > 1 << 32
    last = f.sectors - 8
    f.write(last, pattern(6, 4096))
    f.write((1 << 32) + 5, pattern(7, 512))
    assert f.read(last, 8) == pattern(6, 4096)
    assert f.read((1 << 32) + 5, 1) == pattern(7, 512)
    with open(img, "rb") as fh:
        fh.seek(((1 << 32) + 5) * 512)
        assert fh.read(512) == pattern(7, 512)
    assert f.request(pack_request(BLKIF_OP_READ, 9, f.sectors - 7, [(f.slot(0).refs[0], 0, 7)])) == BLKIF_RSP_ERROR


def test_indirect_segments_and_multi_page_ring(env: Env) -> None:
    img = env.image("i.img", 16 * MIB)
    f = env.disk(img, order=2, slot_pages=64, slots=8)
    assert f.queues[0].ring.nr_ents == 128
    data = pattern(8, 64 * 4096)  # 64 segments: one indirect page
    f.write(8, data)
    assert f.read(8, len(data) // 512) == data
    # A full multi-page ring's worth of requests in flight at once.
    ops = [Op("write", 4096 + 8 * i, 8, pattern(100 + i, 4096)) for i in range(128)]
    assert all(r.status == 0 for r in f.run(ops, depth=8))
    assert img.read_bytes()[8 * 512:8 * 512 + len(data)] == data
    assert img.read_bytes()[(4096 + 8 * 127) * 512:][:4096] == pattern(227, 4096)


def test_two_disks_and_two_queues(env: Env) -> None:
    a, b = env.image("a.img", 4 * MIB), env.image("b.img", 4 * MIB)
    fa = env.disk(a, XVDB, queues=2, persistent=True)
    fb = env.disk(b, XVDC)
    for q in range(2):
        fa.write(q * 64, pattern(10 + q, 8192), queue=q)
    fb.write(0, pattern(12, 8192))
    assert fa.read(0, 16, queue=1) == pattern(10, 8192)
    assert fa.read(64, 16, queue=0) == pattern(11, 8192)
    assert fb.read(0, 16) == pattern(12, 8192)
    assert a.read_bytes()[:8192] == pattern(10, 8192) and b.read_bytes()[:8192] == pattern(12, 8192)


def test_qcow2_through_qemu_nbd(env: Env) -> None:
    img = env.tmp / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "8M"], check=True)
    f = env.disk(img, fmt="qcow2")
    assert f.sectors == 8 * MIB // 512
    model = bytearray(8 * MIB)
    for i, sector in enumerate((0, 100, 5000, 16000)):
        data = pattern(20 + i, 12288)
        f.write(sector, data)
        model[sector * 512:sector * 512 + len(data)] = data
    f.discard(100, 8)
    # Discard is advisory: qcow2 may keep a partly discarded cluster, so the model takes what reads back.
    model[100 * 512:108 * 512] = f.read(100, 8)
    f.flush()
    assert f.read(0, 64) == bytes(model[:64 * 512])
    f.close()
    env.fronts.remove(f)
    raw = env.tmp / "q.raw"
    raw.write_bytes(bytes(model))
    env.xs.write(f"/local/domain/0/backend/vbd/{env.dom.domid}/{XVDB}/online", "0")
    from xenpv.base.process import wait_for
    wait_for(lambda: not any(p.name.startswith("qemu-nbd") for p in _qemu_nbd_children(env)), timeout=5,
             what="qemu-nbd to stop", alive=[env.blkback])
    subprocess.run(["qemu-img", "check", "-q", str(img)], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(img), str(raw)], check=True)


def _qemu_nbd_children(env: Env) -> list[Path]:
    """qemu-nbd processes serving this test's images (by their command line)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-nbd") and any(str(env.tmp).encode() in c for c in cmd):
            found.append(Path(cmd[0].decode()))
    return found


def test_randomized_against_a_model(env: Env) -> None:
    seed = 1234
    rng = random.Random(seed)
    size = 4 * MIB
    img = env.image("r.img", size)
    f = env.disk(img, slot_pages=16, slots=32)
    model = bytearray(size)
    sectors = size // 512
    for _ in range(4):
        ops = []
        expect: list[bytes | None] = []
        written: set[int] = set()
        for _ in range(160):
            kind = rng.choices(["read", "write", "flush", "discard"], [45, 40, 5, 10])[0]
            count = rng.randint(1, 128)
            sector = rng.randrange(0, sectors - count)
            span = set(range(sector // 8, (sector + count + 7) // 8))
            # Requests in flight may complete in any order on a real disk: keep a batch free of overlaps
            # with pending writes/discards so the model stays exact.
            if kind in ("read", "write", "discard") and span & written:
                kind = "flush"
            if kind == "write":
                data = rng.randbytes(count * 512)
                model[sector * 512:(sector + count) * 512] = data
                ops.append(Op("write", sector, count, data))
                written |= span
                expect.append(None)
            elif kind == "discard":
                model[sector * 512:(sector + count) * 512] = bytes(count * 512)
                ops.append(Op("discard", sector, count))
                written |= span
                expect.append(None)
            elif kind == "read":
                ops.append(Op("read", sector, count))
                expect.append(bytes(model[sector * 512:(sector + count) * 512]))
            else:
                ops.append(Op("flush"))
                expect.append(None)
        results = f.run(ops, depth=32)
        for r, e in zip(results, expect):
            assert r.status == 0, (seed, r.op)
            if e is not None:
                assert r.data == e, (seed, r.op)
    f.flush()
    assert img.read_bytes() == bytes(model)


def test_hostile_ring_entries(env: Env) -> None:
    img = env.image("h.img", MIB)
    f = env.disk(img)
    good = f.slot(0)
    ref = good.refs[0]
    cases = {
        "unknown operation": pack_request(9, 1, 0, [(ref, 0, 7)]),
        "reserved operation": pack_request(4, 2, 0, [(ref, 0, 7)]),
        "too many segments": pack_request(BLKIF_OP_WRITE, 3, 0, [(ref, 0, 7)], nr_segments=12),
        "first_sect > last_sect": pack_request(BLKIF_OP_WRITE, 4, 0, [(ref, 5, 2)]),
        "last_sect > 7": pack_request(BLKIF_OP_READ, 5, 0, [(ref, 0, 8)]),
        "sector beyond the disk": pack_request(BLKIF_OP_READ, 6, f.sectors, [(ref, 0, 0)]),
        "range past the end": pack_request(BLKIF_OP_READ, 7, f.sectors - 4, [(ref, 0, 7)]),
        "grant not owned": pack_request(BLKIF_OP_READ, 8, 0, [(4000, 0, 7)]),
        "no segments": pack_request(BLKIF_OP_READ, 9, 0, []),
        "indirect: bad inner op": pack_indirect(BLKIF_OP_FLUSH_DISKCACHE, 10, 0, 1, [good.indirect_ref]),
        "indirect: too many segments": pack_indirect(BLKIF_OP_READ, 11, 0, 5000, [good.indirect_ref]),
        "discard beyond the disk": pack_discard(12, f.sectors - 1, 2),
    }
    ro_gfn = env.platform.pages.alloc(1)[0]
    ro_ref = env.platform.grant(0, ro_gfn, readonly=True)
    cases["read into a read-only grant"] = pack_request(BLKIF_OP_READ, 13, 0, [(ro_ref, 0, 7)])
    f.write_page(good.indirect_gfn, (4000).to_bytes(4, "little") + bytes([0, 7, 0, 0]))
    cases["indirect segment with a foreign grant"] = pack_indirect(BLKIF_OP_READ, 14, 0, 1, [good.indirect_ref])
    for name, raw in cases.items():
        assert f.request(raw) == BLKIF_RSP_ERROR, name
        env.alive()
    # The ring still works, and a read-only grant is fine for a write (the backend only reads it).
    f.write_page(ro_gfn, pattern(30, 4096))
    assert f.request(pack_request(BLKIF_OP_WRITE, 15, 8, [(ro_ref, 0, 7)])) == BLKIF_RSP_OKAY
    assert f.read(8, 8) == pattern(30, 4096)
    assert env.platform.end_grant(ro_ref)

    # A second disk must survive the first one's ring being corrupted.
    other = env.disk(env.image("h2.img", MIB), XVDC)
    q = f.queues[0]
    q.ring.req_prod_pvt = (q.ring.req_prod_pvt + 1000) & 0xFFFFFFFF  # a producer index past the ring
    q.ring.push_requests()
    f.kick()
    assert f.wait_backend(XenbusState.Closing) == XenbusState.Closing
    assert "ring corrupt" in env.log.read_text()
    other.write(0, pattern(31, 4096))
    assert other.read(0, 8) == pattern(31, 4096)
    env.alive()
    f.set_state(XenbusState.Closed)
    f.wait_backend(XenbusState.Closed)
    f.queues.clear()


def test_close_and_reconnect(env: Env) -> None:
    img = env.image("c.img", MIB)
    f = env.disk(img)
    f.write(0, pattern(40, 4096))
    f.close()
    f.set_state(XenbusState.Initialising)
    f.wait_backend(XenbusState.InitWait)
    g = BlkFront(env.platform, XVDB)
    env.fronts.append(g)
    g.connect()
    assert g.read(0, 8) == pattern(40, 4096)
