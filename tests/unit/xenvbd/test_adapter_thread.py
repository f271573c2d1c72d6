"""XENVBD's adapter thread when a deadline of the harness passes under it (xenstored or xenhv too slow to
answer): the thread neither ends quietly nor turns it into a STOP; the processor stops and whoever waits
on the main thread hears why at once."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from xenpv.stack.drivers.xenvbd.adapter import XenvbdAdapter
from xenpv.stack.kernel import KEvent, KeWaitForSingleObject, Registry
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.status import STATUS_SUCCESS
from xenpv.stack.timescale import HarnessTooSlow
from xenpv.stack.vcpu.xenstore import XenstoreTooSlow


@pytest.fixture
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


@dataclass
class LateStore:
    """STORE whose directory read meets a xenstored that does not answer in time."""

    late: XenstoreTooSlow
    removed: list[str] = field(default_factory=list)

    def StoreWatchAdd(self, prefix: str | None, node: str, event: KEvent) -> tuple[int, str]:
        return STATUS_SUCCESS, node

    def StoreWatchRemove(self, watch: str) -> int:
        self.removed.append(watch)
        return STATUS_SUCCESS

    def StoreDirectory(self, transaction: object, prefix: str | None, node: str) -> tuple[int, None]:
        raise self.late


class Suspend:
    """SUSPEND for the adapter's resume callback, which this test never fires."""

    def SuspendRegister(self, kind: int, callback: object, argument: object) -> tuple[int, object]:
        return STATUS_SUCCESS, callback

    def SuspendDeregister(self, callback: object) -> None:
        pass


def test_a_late_xenstored_under_the_adapter_thread_stops_the_processor_without_a_stop(cpu: Processor) -> None:
    late = XenstoreTooSlow("no reply from xenstored to DIRECTORY device/vbd", 5.0)
    store = LateStore(late)
    adapter = XenvbdAdapter(device=None, lower=None, registry=Registry())  # type: ignore[arg-type]
    adapter.interfaces["STORE"] = store  # type: ignore[assignment]
    adapter.interfaces["SUSPEND"] = Suspend()  # type: ignore[assignment]
    try:
        with cpu.lock:
            adapter._enable()  # its thread needs the CPU, which this wait gives away
            with pytest.raises(HarnessTooSlow) as woken:
                KeWaitForSingleObject(KEvent("the disk's response"), 3.0)
    finally:
        adapter._disable()
    assert woken.value is late and cpu.too_slow is late and cpu.crashed is None
    assert store.removed == ["device/vbd"]
