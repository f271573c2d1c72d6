"""stack/vcpu/doorbells.py with real eventfds, a real doorbell table (a memfd) and a shared_info page: the
delivery a doorbell prepares when it is taken (evtchn_2l's set-pending for its port and vCPU), and a
doorbell xenhv hands out for a vCPU the 2-level ABI has no vcpu_info for, which is refused."""
from __future__ import annotations

import mmap
import os
import select
from collections.abc import Iterator

import pytest

from xenpv.stack.vcpu.doorbells import Doorbells
from xenpv.xenabi import evtchn_2l
from xenpv.xenabi.atomic import AtomicMemory
from xenpv.xenabi.trap import DOORBELL_TABLE_SIZE
from xenpv.xenabi.xen import XEN_LEGACY_MAX_VCPUS

PORT = 7


@pytest.fixture
def rig() -> Iterator[tuple]:
    table = os.memfd_create("doorbells")
    os.ftruncate(table, DOORBELL_TABLE_SIZE)
    shared = mmap.mmap(-1, 4096)
    epoll = select.epoll()
    handed: list[int] = []

    def make(vcpu: int) -> Doorbells:
        def ask(port: int) -> tuple[int, int, int, list[int]]:
            fds = [os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)]
            handed.extend(fds)
            return 0, 0, vcpu, fds
        return Doorbells(table, memoryview(shared), epoll, ask)

    yield make, shared, handed
    epoll.close()
    os.close(table)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_a_delivery_marks_the_port_pending_and_asks_for_the_upcall_once(rig) -> None:
    make, shared, handed = rig
    bells = make(0)
    try:
        assert bells.send(PORT)
        kick, call = handed
        assert os.eventfd_read(kick) == 1
        os.eventfd_write(call, 1)
        assert bells.deliver(call) is True
        os.eventfd_write(call, 1)
        assert bells.deliver(call) is False  # already pending: no second upcall
        page = AtomicMemory(memoryview(shared))
        assert page.test_bit(evtchn_2l.PENDING, PORT)
        page.release()
    finally:
        bells.close()


def test_a_doorbell_for_a_vcpu_without_vcpu_info_is_refused_and_its_fds_closed(rig) -> None:
    make, shared, handed = rig
    bells = make(XEN_LEGACY_MAX_VCPUS)
    try:
        assert bells.send(PORT) is False  # the caller traps instead
        assert handed and not any(_open(fd) for fd in handed)
        assert not bells.holds(PORT)
    finally:
        bells.close()
