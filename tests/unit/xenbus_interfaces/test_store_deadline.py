"""STORE over the real ring protocol against a scripted xenstored: a reply is matched to its request by
req_id (a stale one is dropped), and a xenstored that does not answer in time is the harness too slow,
never a status (STATUS_IO_TIMEOUT) a client would act on. The real StoreSubmitRequest has no timeout."""
from __future__ import annotations

import mmap
import threading
from collections.abc import Callable, Iterator

import pytest

from xenpv.stack.kernel import KEvent, KeWaitForSingleObject
from xenpv.stack.timescale import TIME_SCALE_ENV, HarnessTooSlow
from xenpv.stack.vcpu.hypervisor import TrapTooSlow
from xenpv.stack.vcpu.xenstore import GuestXenstore, XenstoreTooSlow
from xenpv.xenabi.xs_ring import RingServer, eventfd_doorbells
from xenpv.xenabi.xs_wire import XSD_SOCKMSG, XsdSockmsgType as T

from .stack_of import interfaces, table_of

Answer = Callable[[RingServer, int, int, bytes], None]


class ScriptedXenstored:
    """xenstored's end of a ring page, served by a thread; `answer(server, type, req_id, payload)` decides
    what goes back."""

    def __init__(self, answer: Answer) -> None:
        self.map = mmap.mmap(-1, 4096)
        self.server_bell, self.guest_bell = eventfd_doorbells()
        self.server = RingServer("dom7", memoryview(self.map), self.server_bell, 0,
                                 on_message=lambda t, r, x, p: answer(self.server, t, r, p), on_reset=lambda: None,
                                 max_outstanding=None, max_output_bytes=1 << 20)
        self.store = GuestXenstore(memoryview(self.map), self.guest_bell, timeout=0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.server_bell.wait(0.02)
            self.server.service()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.store.close()
        del self.server
        self.server_bell.close()
        self.guest_bell.close()


def reply(server: RingServer, mtype: int, req_id: int, body: bytes) -> None:
    server.send(XSD_SOCKMSG.pack(mtype, req_id, 0, len(body)) + body)


@pytest.fixture
def xenstored() -> Iterator[Callable[[Answer], ScriptedXenstored]]:
    made: list[ScriptedXenstored] = []

    def make(answer: Answer) -> ScriptedXenstored:
        made.append(ScriptedXenstored(answer))
        return made[-1]

    yield make
    for x in made:
        x.close()


def test_a_stale_reply_is_not_taken_for_the_answer(xenstored) -> None:
    def answer(server: RingServer, mtype: int, req_id: int, payload: bytes) -> None:
        reply(server, mtype, req_id + 1000, b"stale")  # the answer to a request given up on earlier
        reply(server, mtype, req_id, b"fresh")

    x = xenstored(answer)
    assert x.store.read("name") == b"fresh"
    assert x.store.read("name") == b"fresh"


def test_a_xenstored_that_does_not_answer_is_the_harness_too_slow(xenstored, monkeypatch) -> None:
    monkeypatch.setenv(TIME_SCALE_ENV, "3")
    x = xenstored(lambda server, mtype, req_id, payload: None)
    with pytest.raises(XenstoreTooSlow, match=r"no reply from xenstored to READ device/vbd within 0\.3s"):
        x.store.read("device/vbd")


def test_store_read_does_not_turn_a_late_xenstored_into_a_status(xenstored, platform) -> None:
    x = xenstored(lambda server, mtype, req_id, payload: None)
    platform.store = x.store
    st = table_of(interfaces(platform).store)
    assert st.StoreAcquire() == 0
    try:
        with pytest.raises(HarnessTooSlow):
            st.StoreRead(None, None, "device/vbd")  # was (STATUS_IO_TIMEOUT, None)
    finally:
        st.StoreRelease()


def test_a_late_trap_under_the_watch_thread_stops_the_processor_without_a_stop(platform, cpu) -> None:
    """The watch thread's ring reads notify xenstored through a trap; one xenhv does not answer in time."""
    late = TrapTooSlow("no answer from xenhv to HYPERCALL for dom7", 10.0)
    calls: list[str] = []

    def pump() -> None:
        calls.append(threading.current_thread().name)
        if len(calls) == 1:  # the watch thread's first read; xenhv answers again afterwards
            raise late

    platform.store.pump = pump
    st = table_of(interfaces(platform).store)
    with cpu.lock:
        assert st.StoreAcquire() == 0
        with pytest.raises(HarnessTooSlow) as woken:
            KeWaitForSingleObject(KEvent("a watch"), 3.0)
    st.StoreRelease()
    assert woken.value is late and cpu.too_slow is late and cpu.crashed is None
    assert calls[0] == "xenbus-store-watch"
