"""Acknowledged data survives blkback being SIGKILLed at random points, and guest memory does not leak.

One guest with two PV-only disks, a raw one and a qcow2 one (served through qemu-nbd). A writer thread
streams writes through the XENVBD model (the guest console's `vbd write`/`vbd flush`), each write's
sectors tagged with the write's LBA and sequence number, while the test SIGKILLs blkback at seeded random
points and starts it again. Afterwards the images are read from outside and every sector is checked:

- raw: a sector holds the last acknowledged write that covered it (pwrite reached the host's page cache,
  which outlives the process);
- qcow2: a sector holds the last write that a completed flush covered with no kill from the write's issue
  to the flush's answer (qemu-nbd dies with blkback and loses what it had not flushed, including a part of
  a write that the dead blkback had already answered), or a write issued after that one.

The frontend must come back after every restart (every write is acknowledged within its deadline), the
guest's free pages and grant entries in use must be the same before and after, and the guest console
must show no Python traceback.

XENPV_KILL_POINTS (default 8) and XENPV_KILL_SEED choose the run; ci/kill_restart.sh runs 50 points.
"""
from __future__ import annotations

import logging
import os
import random
import re
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.blkback.launch import RestartableBlkback
from xenpv.backends.host import HostServices
from xenpv.backends.toolstack.layout import disk_image
from xenpv.base.errors import WaitTimeout
from xenpv.guests.schema import load_guest
from xenpv.harness.agent import Guest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

log = logging.getLogger("test.kill_restart")

KILL_POINTS = int(os.environ.get("XENPV_KILL_POINTS", "8"))
SEED = int(os.environ.get("XENPV_KILL_SEED", "20240611"))
SECTOR = 512
TAG = struct.Struct("<II")  # (first LBA of the write, sequence number): 8 bytes repeated over each sector
BASE_LBA, REGION = 8192, 16384  # the writes land in [BASE_LBA, BASE_LBA + REGION)
WRITE_TIMEOUT = 60.0  # seconds a write may wait for the backend to come back
FLUSH_CHANCE = {"raw": 0.15, "qcow2": 0.4}  # chance that an operation on the disk is a flush

GUEST = """\
name: kill-restart
memory: 128M
seed: 11
platform:
  - {device-id: 0x0001, revision: 1}
emulated:
  disks:
    - {id: hda, bus: 0, unit: 0, size: 16M}
pv:
  disks:
    - {vdev: xvdb, size: 64M, format: raw}
    - {vdev: xvdd, size: 64M, format: qcow2}
drivers:
  era: current
  packages: {xenbus: 9.1.0.10, xenvif: 9.1.0.10, xennet: 9.1.0.10, xenvbd: 9.1.0.10, xeniface: 9.1.0.10}
"""
# XENVBD target ids of xvdb and xvdd ((202 << 8) | (disk << 4): target = disk).
DISKS = {"raw": 1, "qcow2": 3}


@dataclass
class Clock:
    """A global order over what the writer and the killer do (both threads take ticks from it)."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _now: int = 0

    def tick(self) -> int:
        with self._lock:
            self._now += 1
            return self._now


@dataclass
class Op:
    """One console operation of the writer."""

    seq: int
    target: int
    kind: str  # "write" or "flush"
    lba: int = 0
    count: int = 0
    issued: int = 0
    done: int = 0
    acked: bool = False
    answer: str = ""

    @property
    def tag(self) -> bytes:
        return TAG.pack(self.lba, self.seq)

    def sector(self) -> bytes:
        return self.tag * (SECTOR // TAG.size)


@dataclass
class Writer:
    """Streams writes and flushes to both targets until told to stop; every answer is recorded."""

    guest: Guest
    clock: Clock
    rng: random.Random
    ops: list[Op] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vbd-writer", daemon=True)
        self._thread.start()

    def acked(self) -> int:
        return sum(1 for op in self.ops if op.acked and op.kind == "write")

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(WRITE_TIMEOUT + 10)
        assert not self._thread.is_alive(), "the writer is stuck in a console command"

    def _next(self, seq: int) -> Op:
        fmt = self.rng.choice(list(DISKS))
        target = DISKS[fmt]
        if self.rng.random() < FLUSH_CHANCE[fmt]:
            return Op(seq, target, "flush")
        r = self.rng.random()
        # Mostly small direct requests; some indirect ones (over 11 pages); a few split into two requests.
        count = self.rng.randint(1, 16) if r < 0.7 else self.rng.randint(17, 128) if r < 0.96 else 2064
        return Op(seq, target, "write", self.rng.randrange(BASE_LBA, BASE_LBA + REGION - count), count)

    def run(self, op: Op) -> None:
        """Issue one operation on the console and record its answer."""
        if op.kind == "write":
            command = f"vbd write {op.target} {op.lba} {op.tag.hex()} {op.count} --timeout {WRITE_TIMEOUT:g}"
            expect = f"wrote {op.count} sectors at {op.lba} "
        else:
            command = f"vbd flush {op.target} --timeout {WRITE_TIMEOUT:g}"
            expect = "flushed (FLUSH_DISKCACHE)"
        self.ops.append(op)
        op.issued = self.clock.tick()
        op.answer = self.guest.console.run(command, timeout=WRITE_TIMEOUT + 10)
        op.done = self.clock.tick()
        op.acked = op.answer.startswith(expect)
        if not op.acked:
            log.warning("op %d (%s on target %d) not acknowledged: %s", op.seq, op.kind, op.target, op.answer)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run(self._next(len(self.ops) + 1))
        except BaseException as exc:  # reported by the test thread
            self.error = exc


@pytest.fixture
def blkback(host: HostServices, artifacts: Path) -> Iterator[RestartableBlkback]:
    bb = RestartableBlkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, artifacts)
    bb.start()
    yield bb
    bb.stop()


def wait_until(what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{what} within {timeout:.0f}s")
        time.sleep(0.05)


def pages(g: Guest) -> tuple[int, int]:
    out = g.console.run("vbd pages")
    m = re.fullmatch(r"free (\d+) granted (\d+)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


def both_connected(g: Guest) -> bool:
    listing = g.console.run("vbd list")
    return all(re.search(rf"target {t} vbd \d+ connected backend Connected", listing) for t in DISKS.values())


def image_bytes(g: Guest, fmt: str, tmp: Path) -> bytes:
    disk = next(d for d in g.machine.guest.pv_disks if d.format == fmt)
    path, _ = disk_image(disk, g.machine.guest, g.machine.paths.run_dir)
    if fmt == "raw":
        return path.read_bytes()
    out = tmp / "qcow2-as-raw.img"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(path), str(out)], check=True,
                   capture_output=True, text=True, timeout=60)
    return out.read_bytes()


def check_disk(fmt: str, target: int, ops: list[Op], kills: list[tuple[int, int]],
               image: bytes) -> tuple[int, int, list[str]]:
    """(writes the check covers, writes lost, problems): for each sector the tags it may hold, against the
    image."""
    mine = [op for op in ops if op.target == target]
    flushes = [op for op in mine if op.kind == "flush" and op.acked]

    def durable(op: Op) -> bool:
        if not op.acked:
            return False
        if fmt == "raw":
            return True
        # A flush issued after the write's ack covers it when no kill overlaps the time from the write's issue
        # to the flush's answer (a kill is the span from just before SIGKILL to the process reaped): one
        # qemu-nbd saw both. A write split over two rings may have had one part answered by a blkback that
        # then died, the other replayed to its successor: that part was never flushed where it went.
        return any(f.issued > op.done and not any(start < f.done and end > op.issued for start, end in kills)
                   for f in flushes)

    writes = [op for op in mine if op.kind == "write"]
    covered = [op for op in writes if durable(op)]
    last: dict[int, Op] = {}
    for op in covered:
        for s in range(op.lba, op.lba + op.count):
            last[s] = op
    later: dict[int, set[bytes]] = {}
    for op in writes:
        for s in range(op.lba, op.lba + op.count):
            if s not in last or op.seq > last[s].seq:
                later.setdefault(s, set()).add(op.sector())
    problems = []
    lost: set[int] = set()
    for s in range(BASE_LBA, BASE_LBA + REGION):
        content = image[s * SECTOR:(s + 1) * SECTOR]
        allowed = later.get(s, set()) | {last[s].sector() if s in last else bytes(SECTOR)}
        if content not in allowed:
            op = last.get(s)
            if op is not None:
                lost.add(op.seq)
            found = TAG.unpack(content[:TAG.size]) if content[:TAG.size] * (SECTOR // TAG.size) == content else None
            problems.append(f"{fmt} sector {s}: holds {'zeros' if content == bytes(SECTOR) else found or 'garbage'}, "
                            f"expected write {op.seq if op else None} (lba {op.lba if op else '-'})")
    return len(covered), len(lost), problems[:20] + ([f"... {len(problems)} sectors in all, {len(lost)} writes "
                                                      "lost"] if problems else [])


def test_acknowledged_writes_survive_blkback_kills_and_no_page_leaks(blkback: RestartableBlkback, boot_guest,
                                                                     tmp_path: Path) -> None:
    rng = random.Random(SEED)
    definition = tmp_path / "kill-restart.yaml"
    definition.write_text(GUEST)
    g = boot_guest(load_guest(definition))
    wait_until("both PV disks connected", lambda: both_connected(g), 30)
    free_before, granted_before = pages(g)
    started = time.monotonic()
    clock = Clock()
    writer = Writer(g, clock, random.Random(rng.random()))
    kills: list[tuple[int, int]] = []
    writer.start()
    try:
        for point in range(KILL_POINTS):
            if rng.random() < 0.5:
                # Half the points come once the frontend is back and writing; the others anywhere,
                # including while it is still reconnecting.
                acked = writer.acked()
                wait_until(f"a write acknowledged before kill point {point} (the frontend did not come back)",
                           lambda: writer.acked() > acked or writer.error is not None, WRITE_TIMEOUT)
            time.sleep(rng.uniform(0.0, 1.2))
            assert writer.error is None, f"writer failed: {writer.error!r}"
            start = clock.tick()
            blkback.kill()
            kills.append((start, clock.tick()))
            time.sleep(rng.uniform(0.0, 0.3))
            blkback.start()
        acked = writer.acked()
        wait_until("writes acknowledged after the last restart (the frontend did not come back)",
                   lambda: writer.acked() >= acked + 3 or writer.error is not None, WRITE_TIMEOUT)
    finally:
        writer.stop()
    assert writer.error is None, f"writer failed: {writer.error!r}"
    for target in DISKS.values():  # no kill after these: they cover every write since the last one
        writer.run(Op(len(writer.ops) + 1, target, "flush"))
    elapsed = time.monotonic() - started
    wait_until("both PV disks connected after the last restart", lambda: both_connected(g), 30)
    free_after, granted_after = pages(g)
    listing = g.console.run("vbd list")
    console = (g.artifacts / "console.log").read_text(errors="replace")
    failed = [f"{op.kind} {op.seq}: {op.answer}" for op in writer.ops if not op.acked]

    blkback.stop()  # qemu-nbd lets go of the qcow2 image
    figures, problems = [], []
    for fmt, target in DISKS.items():
        image = image_bytes(g, fmt, tmp_path)
        checked, lost, found = check_disk(fmt, target, writer.ops, kills, image)
        problems += found
        acks = sum(1 for op in writer.ops if op.target == target and op.kind == "write" and op.acked)
        connections = re.search(rf"target {target} .* connections (\d+)", listing)
        figures.append(f"{fmt}: {acks} writes acknowledged, {checked} checked, {lost} lost, "
                       f"{connections.group(1) if connections else '?'} connections")
    summary = (f"seed {SEED}, {KILL_POINTS} kill points in {elapsed:.1f}s; " + "; ".join(figures)
               + f"; pages free {free_before} -> {free_after}, grants in use {granted_before} -> {granted_after}")
    print(summary)
    log.info("%s", summary)
    assert not problems, summary + "\n" + "\n".join(problems)
    assert not failed, summary + "\nnot acknowledged:\n" + "\n".join(failed[:10])
    assert (free_after, granted_after) == (free_before, granted_before), summary
    assert "Traceback" not in console, console[console.index("Traceback") - 200:][:3000]
