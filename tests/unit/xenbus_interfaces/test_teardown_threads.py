"""XENBUS interfaces that run a thread (EVTCHN's interrupt line, STORE's watch pump) stop it before they
let go of what it uses: the line is waited for with the kernel lock given away (it may be firing, i.e.
waiting for that lock), and a thread that does not stop is the harness's error, never ignored."""
from __future__ import annotations

import threading
import time

import pytest

from xenpv.base import threads
from xenpv.base.errors import WaitTimeout
from xenpv.stack.drivers.xenbus.evtchn import EVTCHN_UNBOUND
from xenpv.stack.kernel.irql import Processor
from xenpv.stack.kernel.status import STATUS_SUCCESS

from .stack_of import interfaces, table_of


def test_evtchn_release_waits_for_a_line_that_is_firing(platform, cpu: Processor) -> None:
    with cpu.lock:  # driver code owns the CPU, as during a real teardown
        ifs = interfaces(platform)
        ev = table_of(ifs.evtchn)
        assert ev.EvtchnAcquire() == STATUS_SUCCESS
        line = ifs.evtchn._line
        assert line is not None
        channel = ev.EvtchnOpen(EVTCHN_UNBOUND, lambda intr, arg: True, None, 0, False)
        port = ev.EvtchnGetPort(channel)
        ifs.evtchn._upcall(port)  # the upcall thread hands the port over; the line fires, i.e. waits for us
        deadline = time.monotonic() + 5
        while ifs.evtchn._line_wake.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)  # from clearing its wake-up to blocking on the kernel lock
        ev.EvtchnClose(channel)
        ev.EvtchnRelease()
        assert not line.is_alive(), "EVTCHN was released with its interrupt line still running"
        assert cpu.lock.owned()
    assert cpu.crashed is None


def test_store_release_with_a_watch_thread_that_does_not_stop_is_an_error(platform, cpu: Processor,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    entered, gate = threading.Event(), threading.Event()
    pump = platform.store.pump

    def stuck_pump() -> None:
        entered.set()
        gate.wait(10)
        pump()

    platform.store.pump = stuck_pump
    monkeypatch.setattr(threads, "THREAD_EXIT_DEADLINE", 0.2)
    ifs = interfaces(platform)
    st = table_of(ifs.store)
    assert st.StoreAcquire() == STATUS_SUCCESS
    assert entered.wait(5)
    held = (ifs.debug.references, ifs.suspend.references)
    with pytest.raises(WaitTimeout, match="XENBUS STORE teardown: thread xenbus-store-watch still running"):
        st.StoreRelease()
    assert (ifs.debug.references, ifs.suspend.references) == held  # nothing the thread uses was released
    gate.set()
    ifs.store._watch_thread.join(5)
