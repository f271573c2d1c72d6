"""BlkQueue.stop(): the serving thread reads the ring and the granted pages, so nothing is released while
it runs; a thread that does not stop in time is an error and leaves the mapping in place."""
from __future__ import annotations

import mmap
import threading
from typing import Any, cast

import pytest

from xenpv.backends.blkback.queue import BlkQueue
from xenpv.base import threads
from xenpv.base.errors import WaitTimeout
from xenpv.xenabi.blkif import BLKIF_NATIVE
from xenpv.xenabi.ring import BackRing, ring_bytes


def test_stop_leaves_the_ring_mapped_while_the_serving_thread_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "THREAD_EXIT_DEADLINE", 0.2)
    page = mmap.mmap(-1, ring_bytes(0))
    view = memoryview(page)
    queue = BlkQueue("vbd1/51712 q0", backend=cast(Any, None), link=cast(Any, None), layouts=BLKIF_NATIVE,
                     disk=cast(Any, None), ring_grefs=[8], remote_port=5, on_fatal=lambda reason: None)
    queue._ring_view = view
    queue._ring = BackRing(view, BLKIF_NATIVE.request_struct, BLKIF_NATIVE.response_struct)
    gate = threading.Event()
    queue._thread = threading.Thread(target=gate.wait, args=(10,), name="blkback vbd1/51712 q0")  # in a request
    queue._thread.start()
    with pytest.raises(WaitTimeout, match="stopping blkback queue vbd1/51712 q0: thread .* still running"):
        queue.stop()
    assert queue._ring is not None and queue._ring.unconsumed_requests() == 0  # still open, still mapped
    with pytest.raises(BufferError):
        page.close()
    gate.set()
    queue.stop()  # the thread has ended: stop finishes the job
    assert queue._ring is None and queue._ring_view is None
    page.close()
