"""A front ring and a back ring in two processes over one shared mmap, notifying each other through eventfds
only when PUSH_*_AND_CHECK_NOTIFY says so.  A lost wake-up would stall the exchange and hit the deadline."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import select
import time

from xenpv.xenabi import blkif
from xenpv.xenabi.ring import BackRing, FrontRing, ring_bytes

REQUESTS = 3000
DEADLINE_S = 10.0


def _wait(fd: int, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
        raise TimeoutError("no notification before the deadline: a wake-up was lost")
    os.eventfd_read(fd)


def _back_end(buffer: mmap.mmap, kick: int, call: int) -> None:
    layouts = blkif.BLKIF_NATIVE
    back = BackRing(buffer, layouts.request_struct, layouts.response_struct)
    deadline = time.monotonic() + DEADLINE_S
    served = 0
    while served < REQUESTS:
        _wait(kick, deadline)
        while True:
            while back.unconsumed_requests():
                request = blkif.BlkifRequest.from_buffer_copy(back.get_request_bytes())
                response = blkif.BlkifResponse(id=request.id, operation=request.operation,
                                               status=blkif.BLKIF_RSP_OKAY if request.sector_number == 2 * request.id
                                               else blkif.BLKIF_RSP_ERROR)
                back.put_response_bytes(bytes(response))
                served += 1
            if back.push_responses_and_check_notify():
                os.eventfd_write(call, 1)
            if not back.final_check_for_requests():
                break
    back.close()


def test_front_and_back_in_two_processes() -> None:
    order = 1
    buffer = mmap.mmap(-1, ring_bytes(order))  # MAP_SHARED: the child sees the same pages
    kick, call = os.eventfd(0), os.eventfd(0)
    layouts = blkif.BLKIF_NATIVE
    front = FrontRing(buffer, layouts.request_struct, layouts.response_struct, init=True)
    child = multiprocessing.get_context("fork").Process(target=_back_end, args=(buffer, kick, call), daemon=True)
    child.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        sent = 0
        ids = []
        notifications = 0
        while len(ids) < REQUESTS:
            while sent < REQUESTS and not front.full():
                front.put_request_bytes(bytes(blkif.BlkifRequest(operation=blkif.BLKIF_OP_WRITE, id=sent,
                                                                 sector_number=2 * sent)))
                sent += 1
            if front.push_requests_and_check_notify():
                notifications += 1
                os.eventfd_write(kick, 1)
            while True:
                while front.unconsumed_responses():
                    response = blkif.BlkifResponse.from_buffer_copy(front.get_response_bytes())
                    assert response.status == blkif.BLKIF_RSP_OKAY
                    ids.append(response.id)
                if not front.final_check_for_responses():
                    break
            if len(ids) < REQUESTS and (sent == REQUESTS or front.full()):
                _wait(call, deadline)
        assert ids == list(range(REQUESTS))
        # Event suppression works: far fewer kicks than requests.
        assert notifications < REQUESTS
        child.join(DEADLINE_S)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        front.close()
        buffer.close()
        os.close(kick)
        os.close(call)
