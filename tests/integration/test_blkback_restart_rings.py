"""A restarted blkback never takes up the rings its predecessor served.

A ring's slots keep what was last written there: a request's slot holds its response once answered, and
a response read back as a request can be a valid WRITE (its id's low bytes become the operation and the
segment count, the request's sector and segments are still there). A new blkback initialising its back
ring at slot 0 over a frontend that is still Connected would serve those slots again, writing whatever
the grants map now over acknowledged data. It must wait in InitWait until the frontend reconnects with
new rings instead.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.backends.blkback.launch import RestartableBlkback
from xenpv.backends.host import HostServices
from xenpv.backends.xenstored.client import XsClient
from xenpv.harness.frontends.blkfront import BlkFront, add_vbd, pack_request
from xenpv.stack.vcpu.platform import XenPlatform
from xenpv.xenabi.blkif import BLKIF_OP_WRITE, BLKIF_RSP_OKAY
from xenpv.xenabi.xenbus import XenbusState

pytestmark = pytest.mark.integration

XVDB = 51728
SECTOR = 512
LBA = 100
# The response to this id, read back as a request, is a WRITE (low byte 1) of one segment (next byte 1).
OVERLAY_ID = 0x0101


@pytest.fixture
def platform(xen_guest_factory) -> Iterator[XenPlatform]:
    dom = xen_guest_factory("default")
    p = XenPlatform.start(dom.vcpu, dom.machine.guest.memory_mib << 8)
    try:
        yield p
    finally:
        p.close()


def test_restarted_blkback_does_not_serve_the_old_rings_again(host: HostServices, platform: XenPlatform,
                                                              tmp_path: Path, artifacts: Path) -> None:
    image = tmp_path / "r.img"
    with open(image, "wb") as f:
        f.truncate(1 << 20)
    blkback = RestartableBlkback(host.run_dir, host.xenstored_socket, host.xenhv_socket, artifacts)
    blkback.start()
    xs = XsClient(host.xenstored_socket)
    front = BlkFront(platform, XVDB)
    try:
        add_vbd(xs, platform.domid, XVDB, image)
        front.connect()
        slot = front.slot(0)
        acked = bytes([0xA5]) * (8 * SECTOR)
        front.write_page(slot.gfns[0], acked)
        raw = pack_request(BLKIF_OP_WRITE, OVERLAY_ID, LBA, [(slot.refs[0], 0, 7)])
        assert front.request(raw) == BLKIF_RSP_OKAY
        assert image.read_bytes()[LBA * SECTOR:(LBA + 8) * SECTOR] == acked
        front.write_page(slot.gfns[0], bytes(8 * SECTOR))  # the frontend reuses its buffer

        blkback.kill()
        blkback.start()
        # The frontend is still Connected to the old rings: the new blkback publishes InitWait and stays.
        time.sleep(1.0)
        assert image.read_bytes()[LBA * SECTOR:(LBA + 8) * SECTOR] == acked, "a stale slot was served again"
        assert front.backend_state() == XenbusState.InitWait
        assert "previous backend's rings" in (artifacts / "blkback-2.log").read_text()

        # The frontend reconnects on new rings, and the acknowledged data is what it reads.
        front.close()
        front.set_state(XenbusState.Initialising)
        front.wait_backend(XenbusState.InitWait)
        again = BlkFront(platform, XVDB)
        again.connect()
        assert again.read(LBA, 8) == acked
        again.close()
        assert blkback.proc is not None
        blkback.proc.check_alive("the test")
    finally:
        front.abandon()  # after a failure: the rings' views go, whatever the backend still does
        blkback.stop()
        xs.close()
