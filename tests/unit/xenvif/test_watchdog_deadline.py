"""XENVIF's watchdog thread when a deadline of the harness passes under it (its periodic read of the
backend's state meets a xenstored too slow to answer): the processor stops without a STOP and the main
thread's waiter hears why at once, instead of the thread ending quietly."""
from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from xenpv.stack.drivers.xenvif.frontend import Frontend, FrontendState
from xenpv.stack.kernel import KEvent, KeWaitForSingleObject
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.vcpu.xenstore import XenstoreTooSlow


@pytest.fixture
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


def test_a_late_xenstored_under_the_watchdog_stops_the_processor_without_a_stop(cpu: Processor) -> None:
    late = XenstoreTooSlow("no reply from xenstored to READ backend/vif/7/0/state", 5.0)
    frontend = Frontend(0, None)  # type: ignore[arg-type]  # the watchdog's check is replaced below
    frontend.wanted = FrontendState.FRONTEND_CONNECTED

    def watchdog() -> None:
        raise late

    frontend.FrontendWatchdog = watchdog  # type: ignore[method-assign]
    thread = threading.Thread(target=frontend._watchdog_run)
    with cpu.lock:
        thread.start()
        with pytest.raises(HarnessTooSlow) as woken:
            KeWaitForSingleObject(KEvent("a tx response"), 3.0)
    thread.join(5)
    assert not thread.is_alive() and not frontend._watchdog_running
    assert woken.value is late and cpu.too_slow is late and cpu.crashed is None
