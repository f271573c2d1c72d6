"""blkback's request rules at their exact bounds, through BlkQueue._serve with and without persistent grants
(the two paths: transient mappings checked per request, and cached plans of persistent grants checked per
use), issue 18: a read-only disk refuses every kind of write; a request must lie inside the disk (its last
sector may be the disk's last); an indirect request has 1..max segments, each inside one page. Grant and
guest-memory access is a fake xenhv that refuses a writable map of a read-only grant, as the real one does
(Linux blkback's xen_vbd_translate and xen_blkbk_parse_indirect are the references)."""
from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any, cast

import pytest

from xenpv.backends.blkback.image import RawImage
from xenpv.backends.blkback.queue import BlkQueue, DiskConfig
from xenpv.backends.vhost_user.memory import GuestMemoryError
from xenpv.backends.xenhv.control import XenhvError
from xenpv.harness.frontends.blkfront import pack_discard, pack_indirect, pack_request
from xenpv.xenabi.blkif import (BLKIF_NATIVE, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_READ,
                                BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
                                BLKIF_SECTOR_SIZE)
from xenpv.xenabi.ring import XEN_PAGE_SIZE, FrontRing

PAGES = 64
DISK_SECTORS = 64          # 32 KiB
MAX_INDIRECT = 32
INDIRECT_REF = 60          # a guest page holding indirect segments
OK, ERR = BLKIF_RSP_OKAY, BLKIF_RSP_ERROR


@dataclass
class FakeXenhv:
    """Grant ref N is guest frame N; refs in `readonly` are granted read-only."""
    memory: bytearray
    readonly: set[int] = field(default_factory=set)
    live: dict[int, tuple[int, bool]] = field(default_factory=dict)
    maps: list[tuple[int, bool]] = field(default_factory=list)
    _handles: Iterator[int] = field(default_factory=count)
    name: str = "blkback"

    def call(self, op: str, **kw: Any) -> dict[str, int]:
        if op == "gnttab_map":
            ref, readonly = kw["ref"], kw["readonly"]
            self.maps.append((ref, readonly))
            if not 0 <= ref < len(self.memory) // XEN_PAGE_SIZE or (ref in self.readonly and not readonly):
                raise XenhvError(op, f"ref {ref} refused", None, -1)
            handle = next(self._handles)
            self.live[handle] = (ref, readonly)
            return {"handle": handle, "gfn": ref}
        if op == "gnttab_unmap":
            del self.live[kw["handle"]]
            return {}
        if op == "gnttab_share":
            # No shared pin table: every grant access of the queue comes here, where the rules are checked.
            raise XenhvError(op, "not shared", None)
        raise AssertionError(op)


@dataclass
class FakeMemory:
    ram: bytearray

    def view(self, gpa: int, length: int) -> memoryview:
        if gpa < 0 or length < 0 or gpa + length > len(self.ram):
            raise GuestMemoryError(gpa, length, "outside guest RAM")
        return memoryview(self.ram)[gpa:gpa + length]


@dataclass
class FakeLink:
    memory: FakeMemory
    domid: int = 1


@dataclass
class Disk:
    queue: BlkQueue
    xenhv: FakeXenhv
    ram: bytearray
    path: Path

    def serve(self, raw: bytes) -> int:
        rid, op, status = self.queue._serve(raw)
        assert (rid, op) == (int.from_bytes(raw[8:16], "little"), raw[0])
        return status

    def image(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture(params=[False, True], ids=["transient", "persistent"])
def persistent(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def make_disk(tmp_path: Path, persistent: bool) -> Iterator[Any]:
    disks: list[Disk] = []

    def make(readonly: bool = False, discard: bool = True) -> Disk:
        path = tmp_path / f"disk{len(disks)}.raw"
        path.write_bytes(bytes(range(256)) * (DISK_SECTORS * BLKIF_SECTOR_SIZE // 256))
        ram = bytearray(PAGES * XEN_PAGE_SIZE)
        xenhv = FakeXenhv(ram)
        # The image itself stays writable: a read-only disk must be refused by the queue's own checks.
        config = DiskConfig(RawImage(path), DISK_SECTORS, readonly, discard, MAX_INDIRECT, persistent)
        queue = BlkQueue("test q0", backend=cast(Any, xenhv), link=cast(Any, FakeLink(FakeMemory(ram))),
                         layouts=BLKIF_NATIVE, disk=config, ring_grefs=[], remote_port=0,
                         on_fatal=lambda reason: pytest.fail(reason))
        disk = Disk(queue, xenhv, ram, path)
        disks.append(disk)
        return disk

    yield make
    for d in disks:
        d.queue._clear_plans()
        for page in d.queue._persistent.values():
            page.release()
        d.queue._persistent.clear()
        d.queue.disk.image.close()


# ---- a read-only disk ------------------------------------------------------------------------------

def test_read_only_disk_refuses_every_write(make_disk) -> None:
    d = make_disk(readonly=True)
    before = d.image()
    assert d.serve(pack_request(BLKIF_OP_READ, 1, 0, [(3, 0, 7)])) == OK    # reads are served (the second
    assert d.serve(pack_request(BLKIF_OP_READ, 9, 8, [(3, 0, 7)])) == OK    # from a persistent-grant plan)...
    for raw in (pack_request(BLKIF_OP_WRITE, 2, 0, [(3, 0, 7)]),
                pack_request(BLKIF_OP_WRITE, 3, 8, [(3, 0, 7)]),           # ...a write in the same shape is not
                pack_request(BLKIF_OP_WRITE_BARRIER, 4, 0, [(3, 0, 0)]),
                pack_request(BLKIF_OP_FLUSH_DISKCACHE, 5, 0, [(3, 0, 0)]),
                pack_discard(6, 0, 8)):
        assert d.serve(raw) == ERR, raw[0]
    _put_segments(d, [(4, 0, 7)])
    assert d.serve(pack_indirect(BLKIF_OP_WRITE, 7, 0, 1, [INDIRECT_REF])) == ERR
    assert d.serve(pack_request(BLKIF_OP_FLUSH_DISKCACHE, 8, 0, [])) == OK  # a flush alone writes nothing
    assert d.image() == before


def test_writable_disk_takes_the_same_writes(make_disk) -> None:
    d = make_disk()
    d.ram[3 * XEN_PAGE_SIZE:4 * XEN_PAGE_SIZE] = b"W" * XEN_PAGE_SIZE
    assert d.serve(pack_request(BLKIF_OP_WRITE, 2, 8, [(3, 0, 7)])) == OK
    assert d.image()[8 * 512:16 * 512] == b"W" * 4096
    assert d.serve(pack_discard(6, 0, 8)) == OK


def test_reads_map_writable_and_writes_map_read_only(make_disk) -> None:
    d = make_disk()
    d.xenhv.readonly.add(5)  # the guest granted this page read-only: only a write may use it
    d.ram[5 * XEN_PAGE_SIZE:6 * XEN_PAGE_SIZE] = b"R" * XEN_PAGE_SIZE
    assert d.serve(pack_request(BLKIF_OP_READ, 1, 0, [(5, 0, 7)])) == ERR
    assert d.ram[5 * XEN_PAGE_SIZE:6 * XEN_PAGE_SIZE] == b"R" * XEN_PAGE_SIZE
    # A write reads guest memory only: it maps the grant read-only (after a refused persistent mapping,
    # which is always writable, with persistent grants).
    assert d.serve(pack_request(BLKIF_OP_WRITE, 2, 0, [(5, 0, 7)])) == OK
    assert d.xenhv.maps[-1] == (5, True) and d.image()[:4096] == b"R" * 4096
    assert not d.xenhv.live, "a transient mapping outlived its request"


# ---- the disk's range ------------------------------------------------------------------------------

def test_read_and_write_up_to_the_last_sector(make_disk) -> None:
    d = make_disk()
    last = DISK_SECTORS - 8
    for op in (BLKIF_OP_READ, BLKIF_OP_WRITE):
        assert d.serve(pack_request(op, 1, 0, [(3, 0, 7)])) == OK          # (caches the shape's plan)
        assert d.serve(pack_request(op, 2, last, [(3, 0, 7)])) == OK       # ends on the last sector
        assert d.serve(pack_request(op, 3, last + 1, [(3, 0, 7)])) == ERR  # one sector beyond
        assert d.serve(pack_request(op, 4, DISK_SECTORS, [(3, 0, 0)])) == ERR
        assert d.serve(pack_request(op, 5, (1 << 64) - 1, [(3, 0, 7)])) == ERR
        assert d.serve(pack_request(op, 6, DISK_SECTORS - 1, [(3, 7, 7)])) == OK
        assert d.serve(pack_request(op, 7, last, [(3, 0, 7), (4, 0, 0)])) == ERR  # 9 sectors from `last`


def test_write_beyond_the_end_changes_nothing(make_disk) -> None:
    d = make_disk()
    before = d.image()
    d.ram[3 * XEN_PAGE_SIZE:4 * XEN_PAGE_SIZE] = b"X" * XEN_PAGE_SIZE
    assert d.serve(pack_request(BLKIF_OP_WRITE, 1, DISK_SECTORS - 7, [(3, 0, 7)])) == ERR
    assert d.image() == before and os.path.getsize(d.path) == DISK_SECTORS * BLKIF_SECTOR_SIZE


def test_discard_up_to_the_last_sector(make_disk) -> None:
    d = make_disk()
    assert d.serve(pack_discard(1, 8, DISK_SECTORS - 8)) == OK
    assert d.serve(pack_discard(2, 8, DISK_SECTORS - 7)) == ERR
    assert d.serve(pack_discard(3, DISK_SECTORS, 1)) == ERR
    assert d.serve(pack_discard(4, 1, (1 << 64) - 1)) == ERR


def test_a_discard_of_no_sectors_is_okay_wherever_it_points(make_disk) -> None:
    """Linux blkback (xen_vbd_translate) range-checks only a request with sectors: a DISCARD of none, even
    at or past the disk's end, is OKAY and touches nothing."""
    d = make_disk()
    before = d.image()
    for rid, sector in enumerate((0, DISK_SECTORS - 1, DISK_SECTORS, DISK_SECTORS + 1000, (1 << 64) - 1), 5):
        assert d.serve(pack_discard(rid, sector, 0)) == OK, sector
    assert d.image() == before
    assert d.serve(pack_discard(10, DISK_SECTORS, 1)) == ERR


# ---- indirect segments -----------------------------------------------------------------------------

def _put_segments(d: Disk, segments: list[tuple[int, int, int]], ref: int = INDIRECT_REF) -> None:
    page = bytearray(XEN_PAGE_SIZE)
    for i, (gref, first, last) in enumerate(segments):
        page[i * 8:i * 8 + 8] = gref.to_bytes(4, "little") + bytes([first, last, 0, 0])
    d.ram[ref * XEN_PAGE_SIZE:(ref + 1) * XEN_PAGE_SIZE] = page


def test_indirect_segment_count_bounds(make_disk) -> None:
    d = make_disk()
    _put_segments(d, [(1 + i % 40, 0, 0) for i in range(MAX_INDIRECT + 1)])  # one sector per segment
    assert d.serve(pack_indirect(BLKIF_OP_READ, 1, 0, MAX_INDIRECT, [INDIRECT_REF])) == OK
    assert d.serve(pack_indirect(BLKIF_OP_READ, 2, 0, 1, [INDIRECT_REF])) == OK
    assert d.serve(pack_indirect(BLKIF_OP_READ, 3, 0, MAX_INDIRECT + 1, [INDIRECT_REF])) == ERR
    assert d.serve(pack_indirect(BLKIF_OP_READ, 4, 0, 0, [INDIRECT_REF])) == ERR
    assert d.serve(pack_indirect(BLKIF_OP_READ, 5, DISK_SECTORS - MAX_INDIRECT, MAX_INDIRECT,
                                 [INDIRECT_REF])) == OK
    assert d.serve(pack_indirect(BLKIF_OP_READ, 6, DISK_SECTORS - MAX_INDIRECT + 1, MAX_INDIRECT,
                                 [INDIRECT_REF])) == ERR


@pytest.mark.parametrize("segment, status", [((7, 0, 7), OK), ((7, 7, 7), OK), ((7, 0, 8), ERR),
                                             ((7, 5, 4), ERR), ((7, 8, 8), ERR)])
def test_indirect_segments_stay_inside_their_page(make_disk, segment: tuple[int, int, int], status: int) -> None:
    d = make_disk()
    _put_segments(d, [(6, 0, 7), segment])
    assert d.serve(pack_indirect(BLKIF_OP_READ, 1, 0, 2, [INDIRECT_REF])) == status



def test_a_cached_plan_serves_only_requests_of_its_shape(make_disk) -> None:
    """With persistent grants a checked request's plan is cached under its bytes other than id and sector
    (BlkQueue._plan_key) and reused: it must serve only a request that would be decoded to the same transfer.
    A request for another grant, or an indirect request whose segment page now lists other grants, gets its
    own; the sector comes from each request."""
    d = make_disk()
    d.path.write_bytes(b"".join(bytes([k]) * BLKIF_SECTOR_SIZE for k in range(DISK_SECTORS)))

    def page(ref: int) -> bytes:
        return bytes(d.ram[ref * XEN_PAGE_SIZE:ref * XEN_PAGE_SIZE + BLKIF_SECTOR_SIZE])

    assert d.serve(pack_request(BLKIF_OP_READ, 1, 5, [(3, 0, 0)])) == OK
    assert page(3) == bytes([5]) * BLKIF_SECTOR_SIZE
    assert d.serve(pack_request(BLKIF_OP_READ, 2, 9, [(4, 0, 0)])) == OK      # differs in the gref only
    assert page(4) == bytes([9]) * BLKIF_SECTOR_SIZE and page(3) == bytes([5]) * BLKIF_SECTOR_SIZE
    assert d.serve(pack_request(BLKIF_OP_READ, 3, 6, [(3, 0, 0)])) == OK      # the first shape, another sector:
    assert page(3) == bytes([6]) * BLKIF_SECTOR_SIZE                          # now a plan, both grants persistent
    assert d.serve(pack_request(BLKIF_OP_READ, 4, 10, [(4, 0, 0)])) == OK
    assert page(4) == bytes([10]) * BLKIF_SECTOR_SIZE and page(3) == bytes([6]) * BLKIF_SECTOR_SIZE
    _put_segments(d, [(5, 0, 0)])
    for rid, sector in ((5, 7), (6, 11)):                                     # the second from a plan
        assert d.serve(pack_indirect(BLKIF_OP_READ, rid, sector, 1, [INDIRECT_REF])) == OK
        assert page(5) == bytes([sector]) * BLKIF_SECTOR_SIZE
    _put_segments(d, [(6, 0, 0)])                                             # same request, other segments
    assert d.serve(pack_indirect(BLKIF_OP_READ, 7, 8, 1, [INDIRECT_REF])) == OK
    assert page(6) == bytes([8]) * BLKIF_SECTOR_SIZE and page(5) == bytes([11]) * BLKIF_SECTOR_SIZE


@dataclass
class SplitMemory(FakeMemory):
    """Guest RAM in two vhost-user memory regions that meet at `split`: no single view may cross it."""
    split: int = 4 * XEN_PAGE_SIZE

    def view(self, gpa: int, length: int) -> memoryview:
        if gpa < self.split < gpa + length:
            raise GuestMemoryError(gpa, length, "crosses two memory regions")
        return super().view(gpa, length)


def test_a_request_over_adjacent_pages_lands_sector_by_sector(make_disk) -> None:
    """blkif.h: segment i moves sectors first_sect..last_sect of its granted page, in order, for consecutive
    disk sectors. Here three segments whose pages are adjacent guest frames (page 3 from sector 4 of the page,
    page 4 whole, page 5's first sector), in RAM whose memory regions meet between pages 3 and 4; served
    three times (the persistent mode's third time from its plan, which merges the adjacent ranges and must
    split them again where the regions meet), each at another disk sector."""
    d = make_disk()
    d.queue.link = cast(Any, FakeLink(SplitMemory(d.ram)))
    d.path.write_bytes(b"".join(bytes([k]) * BLKIF_SECTOR_SIZE for k in range(DISK_SECTORS)))
    segments = [(3, 4, 7), (4, 0, 7), (5, 0, 0)]
    for rid, sector in ((1, 0), (2, 20), (3, 40)):
        assert d.serve(pack_request(BLKIF_OP_READ, rid, sector, segments)) == OK
        got = bytes(d.ram[3 * XEN_PAGE_SIZE + 4 * BLKIF_SECTOR_SIZE:5 * XEN_PAGE_SIZE + BLKIF_SECTOR_SIZE])
        assert got == b"".join(bytes([sector + k]) * BLKIF_SECTOR_SIZE for k in range(13)), rid
        assert bytes(d.ram[5 * XEN_PAGE_SIZE + BLKIF_SECTOR_SIZE:6 * XEN_PAGE_SIZE]) == bytes(7 * BLKIF_SECTOR_SIZE)
    for rid, sector in ((7, 2), (8, 22), (9, 42)):      # adjacent pages in descending order: not one range
        assert d.serve(pack_request(BLKIF_OP_READ, rid, sector, [(13, 0, 7), (12, 0, 7)])) == OK
        assert bytes(d.ram[12 * XEN_PAGE_SIZE:14 * XEN_PAGE_SIZE]) == b"".join(
            bytes([sector + k]) * BLKIF_SECTOR_SIZE for k in (8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)), rid
    for rid, sector in ((4, 1), (5, 21), (6, 41)):      # pages that are not adjacent: a range each
        assert d.serve(pack_request(BLKIF_OP_READ, rid, sector, [(7, 0, 0), (9, 1, 1), (11, 7, 7)])) == OK
        assert [bytes(d.ram[ref * XEN_PAGE_SIZE + at:ref * XEN_PAGE_SIZE + at + BLKIF_SECTOR_SIZE])
                for ref, at in ((7, 0), (9, 512), (11, 3584))] == [bytes([sector + k]) * BLKIF_SECTOR_SIZE
                                                                  for k in range(3)], rid


def test_a_barrier_writes_the_data_it_carries(make_disk) -> None:
    """blkif.h BLKIF_OP_WRITE_BARRIER / FLUSH_DISKCACHE with segments: the data is written (between the
    flushes), as Linux xen-blkback dispatch_rw_block_io treats it as a write with REQ_PREFLUSH | REQ_FUA."""
    d = make_disk()
    d.ram[3 * XEN_PAGE_SIZE:4 * XEN_PAGE_SIZE] = b"B" * XEN_PAGE_SIZE
    assert d.serve(pack_request(BLKIF_OP_WRITE_BARRIER, 1, 8, [(3, 0, 7)])) == OK
    assert d.image()[8 * 512:16 * 512] == b"B" * 4096


def test_indirect_segment_pages_need_only_a_read_only_grant(make_disk) -> None:
    """Linux xen-blkback xen_blkbk_parse_indirect maps the indirect pages read-only: a frontend may grant them
    read-only, and the request is served."""
    d = make_disk()
    _put_segments(d, [(6, 0, 7)])
    d.xenhv.readonly.add(INDIRECT_REF)
    assert d.serve(pack_indirect(BLKIF_OP_READ, 1, 0, 1, [INDIRECT_REF])) == OK

# ---- a started queue: its ring, its channel, its thread, and what stop() gives back -------------------------

@dataclass
class _Session:
    closed: bool = False


@dataclass
class ChannelLink(FakeLink):
    """FakeLink with what a started queue also uses of its DomainLink: the event channel and the session."""
    session: _Session = field(default_factory=_Session)
    bound: list[int] = field(default_factory=list)
    unbound: list[int] = field(default_factory=list)
    notified: list[int] = field(default_factory=list)
    kick: Any = None

    def bind(self, remote_port: int, callback: Any) -> int:
        self.bound.append(remote_port)
        self.kick = callback
        return 33

    def unbind(self, port: int) -> None:
        self.unbound.append(port)

    def notify(self, port: int) -> None:
        self.notified.append(port)


def test_a_started_queue_serves_its_ring_until_stopped_and_gives_everything_back(tmp_path: Path) -> None:
    """Linux xen-blkback's ring life (xenbus.c xen_blkif_map, blkback.c xen_blkif_schedule): the ring pages are
    mapped writable (the back-end writes responses there) and its channel bound; a thread of its own serves
    the ring (an event that announces nothing is harmless), also requests a frontend pushed without an event
    because RING_PUSH_REQUESTS_AND_CHECK_NOTIFY said none was needed (the back-end re-arms req_event and checks again before it sleeps,
    RING_FINAL_CHECK_FOR_REQUESTS); stop() unbinds the channel and unmaps the ring. A queue stopped before it
    started has nothing to give back, and its thread is a daemon: it never keeps the back-end process alive."""
    ring_ref = 10
    ram = mmap.mmap(-1, PAGES * XEN_PAGE_SIZE)   # an mmap can be closed only once no view of it is left
    xenhv = FakeXenhv(cast(Any, ram))
    link = ChannelLink(FakeMemory(ram))
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(range(256)) * (DISK_SECTORS * BLKIF_SECTOR_SIZE // 256))
    fatal: list[str] = []

    def make() -> BlkQueue:
        return BlkQueue("test q0", backend=cast(Any, xenhv), link=cast(Any, link), layouts=BLKIF_NATIVE,
                        disk=DiskConfig(RawImage(path), DISK_SECTORS, False, True, MAX_INDIRECT, False),
                        ring_grefs=[ring_ref], remote_port=7, on_fatal=fatal.append)

    unstarted = make()
    unstarted.stop()                               # never started: nothing to stop, unbind or unmap
    unstarted.disk.image.close()
    assert (unstarted.served, xenhv.maps, link.unbound) == (0, [], [])
    queue = make()
    front_view = memoryview(ram)[ring_ref * XEN_PAGE_SIZE:(ring_ref + 1) * XEN_PAGE_SIZE]
    front = FrontRing(front_view, BLKIF_NATIVE.request_struct, BLKIF_NATIVE.response_struct, init=True)
    responses: list[tuple[int, int]] = []
    try:
        queue.start()
        assert xenhv.maps == [(ring_ref, False)] and link.bound == [7]
        assert queue._thread is not None and queue._thread.daemon
        link.kick()                                # an event with nothing new on the ring is harmless
        deadline = time.monotonic() + 10
        while queue._kick.is_set():                # taken: the thread looks at the empty ring now
            assert time.monotonic() < deadline, "the serving thread never took the event"
            time.sleep(0.001)
        time.sleep(0.05)
        for i in range(4):
            front.put_request_bytes(pack_request(BLKIF_OP_READ, 100 + i, 8 * i, [(20 + i, 0, 7)]))
            if front.push_requests_and_check_notify():
                link.kick()
            deadline = time.monotonic() + 10
            while not front.unconsumed_responses():
                assert time.monotonic() < deadline, f"request {i} not answered (fatal: {fatal})"
                time.sleep(0.001)
            rid, _op, status = front.get_response()[:3]
            responses.append((rid, status))
        # Idle: the back-end re-arms req_event for the next request (RING_FINAL_CHECK_FOR_REQUESTS) and sleeps
        # until an event, which it takes (the kick is cleared) instead of spinning over the ring.
        deadline = time.monotonic() + 10
        while front.sring_req_event != 5:
            assert time.monotonic() < deadline, f"req_event {front.sring_req_event} never re-armed to 5"
            time.sleep(0.001)
        link.kick()
        while queue._kick.is_set():
            assert time.monotonic() < deadline, "the idle serving thread never took the event"
            time.sleep(0.001)
        # The frontend asked once to be notified (rsp_event 1, never re-armed): exactly one notification.
        assert link.notified == [33]
    finally:
        queue.stop()
        queue.disk.image.close()
    assert responses == [(100 + i, OK) for i in range(4)] and queue.served == 4 and fatal == []
    image = path.read_bytes()
    for i in range(4):
        assert ram[(20 + i) * XEN_PAGE_SIZE:(21 + i) * XEN_PAGE_SIZE] == image[8 * i * 512:(8 * i + 8) * 512]
    assert link.unbound == [33] and xenhv.live == {}
    queue.stop()                                   # again: everything was given back the first time
    assert link.unbound == [33] and len(xenhv.maps) == 5
    front.close()
    front_view.release()
    ram.close()                                    # BufferError if the queue still held a view of the ring


def test_at_most_1056_grants_are_kept_mapped_persistently(tmp_path: Path) -> None:
    """Linux xen-blkback blkback.c xen_blkif_max_pgrants (module parameter max_persistent_grants, default
    1056): a queue keeps at most 1056 grants mapped persistently; a grant first used after that is mapped
    for its request only and unmapped when it is served."""
    pages = 1100
    ram = bytearray(pages * XEN_PAGE_SIZE)
    xenhv = FakeXenhv(ram)
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(DISK_SECTORS * BLKIF_SECTOR_SIZE))
    queue = BlkQueue("test q0", backend=cast(Any, xenhv), link=cast(Any, FakeLink(FakeMemory(ram))),
                     layouts=BLKIF_NATIVE, disk=DiskConfig(RawImage(path), DISK_SECTORS, False, True, MAX_INDIRECT,
                                                           True),
                     ring_grefs=[], remote_port=0, on_fatal=lambda reason: pytest.fail(reason))
    try:
        for first in range(0, 1060, 10):    # ten one-sector segments a request, each in a grant of its own
            raw = pack_request(BLKIF_OP_READ, first, 0, [(ref, 0, 0) for ref in range(first, first + 10)])
            assert queue._serve(raw)[2] == OK
        # The request that crosses the cap has its grants mapped in no particular order: 6 of its 10 stay.
        assert len(queue._persistent) == 1056 and set(range(1050)) < set(queue._persistent) < set(range(1060))
        assert len(xenhv.live) == 1056                 # grants 1056..1059 were unmapped after their request
    finally:
        queue.stop()
        queue.disk.image.close()


def test_an_unexpected_failure_is_answered_with_an_error(make_disk) -> None:
    """BlkQueue._serve never raises for guest input: a failure no rule names (here the image raises a
    RuntimeError) is still answered, BLKIF_RSP_ERROR (Linux xen-blkback answers BLKIF_RSP_ERROR when a
    request cannot be carried out), and the queue serves the next request."""
    d = make_disk()

    def broken(*args: object) -> int:
        raise RuntimeError("injected defect")

    real = d.queue.disk.image.read_into
    d.queue.disk.image.read_into = broken  # type: ignore[method-assign]
    try:
        assert d.serve(pack_request(BLKIF_OP_READ, 1, 0, [(3, 0, 7)])) == ERR
    finally:
        d.queue.disk.image.read_into = real  # type: ignore[method-assign]
    assert d.serve(pack_request(BLKIF_OP_READ, 2, 0, [(3, 0, 7)])) == OK


def test_a_batch_answers_each_request_as_serving_it_alone_would(make_disk, persistent: bool) -> None:
    """BlkQueue._serve_batch, what the serving thread runs on each batch taken off the ring, answers a READ or
    WRITE whose shape has a cached plan without going through _serve: each response must still carry the
    request's own id and operation, the transfer use the request's own sector, the disk's bounds hold (its
    last sector may be read, one past it is BLKIF_RSP_ERROR), and every request counts as served."""
    d = make_disk()
    q = d.queue
    d.path.write_bytes(b"".join(bytes([k]) * BLKIF_SECTOR_SIZE for k in range(DISK_SECTORS)))
    W, R = BLKIF_OP_WRITE, BLKIF_OP_READ

    def page(ref: int) -> bytes:
        return bytes(d.ram[ref * XEN_PAGE_SIZE:(ref + 1) * XEN_PAGE_SIZE])

    # Each shape twice: its grant becomes persistent, then the shape gets its plan (with persistent grants).
    warm = [pack_request(W, 1, 0, [(3, 0, 7)]), pack_request(R, 2, 0, [(4, 0, 7)])] * 2
    assert q._serve_batch(warm) == [(1, W, OK), (2, R, OK)] * 2
    assert len(q._plans) == (2 if persistent else 0)
    d.ram[3 * XEN_PAGE_SIZE:4 * XEN_PAGE_SIZE] = bytes([0xA5]) * XEN_PAGE_SIZE
    assert q._serve_batch([pack_request(W, 10, 16, [(3, 0, 7)]),
                           pack_request(R, 11, 16, [(4, 0, 7)])]) == [(10, W, OK), (11, R, OK)]
    assert d.image()[16 * BLKIF_SECTOR_SIZE:24 * BLKIF_SECTOR_SIZE] == bytes([0xA5]) * XEN_PAGE_SIZE
    assert page(4) == bytes([0xA5]) * XEN_PAGE_SIZE
    last = DISK_SECTORS - 8
    assert q._serve_batch([pack_request(R, 12, last, [(4, 0, 7)]),
                           pack_request(R, 13, last + 1, [(4, 0, 7)]),
                           pack_request(W, 14, DISK_SECTORS, [(3, 0, 7)])]) == [(12, R, OK), (13, R, ERR), (14, W, ERR)]
    assert page(4) == b"".join(bytes([k]) * BLKIF_SECTOR_SIZE for k in range(last, DISK_SECTORS))
    assert q.served == 9 and len(q._plans) == (2 if persistent else 0)
