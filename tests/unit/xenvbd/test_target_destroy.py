"""XENVBD's TargetDestroy waits for the backend to follow its close only when a backend took the device
(InitWait or later): a target PREPARED (Initialising written) whose backend never left Initialising - no
blkback running - closes straight to Closed without the two bounded waits, which otherwise ran out on
every such target. One whose backend did go to InitWait is still closed with the full handshake."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from xenpv.stack.drivers.xenvbd import target as target_module
from xenpv.stack.drivers.xenvbd.target import FrontendState, XenvbdTarget
from xenpv.stack.kernel import KEvent
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.status import STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS
from xenpv.xenabi.xenbus import XenbusState as S

BACKEND = "/local/domain/0/backend/vbd/3/768"
FRONTEND = "device/vbd/768"


@pytest.fixture
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    with processor.lock:
        yield processor
    set_current_processor(previous)


@dataclass
class Buffer:
    Value: bytes


@dataclass
class Store:
    """STORE over a dict of nodes, keeping every value written to the frontend's state."""

    nodes: dict[str, str]
    frontend_states: list[S] = field(default_factory=list)

    def StoreRead(self, transaction: object, prefix: str | None, node: str) -> tuple[int, Buffer | None]:
        path = f"{prefix}/{node}" if prefix else node
        if path not in self.nodes:
            return STATUS_OBJECT_NAME_NOT_FOUND, None
        return STATUS_SUCCESS, Buffer(self.nodes[path].encode())

    def StoreFree(self, buffer: Buffer) -> None:
        pass

    def StorePrintf(self, transaction: object, prefix: str | None, node: str, fmt: str, *args: object) -> int:
        path = f"{prefix}/{node}" if prefix else node
        self.nodes[path] = fmt % args
        if path == f"{FRONTEND}/state":
            self.frontend_states.append(S(int(self.nodes[path])))
        return STATUS_SUCCESS

    def StoreWatchRemove(self, watch: object) -> int:
        return STATUS_SUCCESS


@dataclass
class Adapter:
    """What a target uses of its adapter while it is destroyed."""

    store: Store
    gnttab: Any = None
    event: KEvent = field(default_factory=lambda: KEvent("adapter thread"))
    printed: list[str] = field(default_factory=list)

    def parameter(self, name: str) -> int | None:
        return None

    def _print(self, text: str) -> None:
        self.printed.append(text)


def _destroy_prepared(backend_state: S) -> Adapter:
    adapter = Adapter(Store({f"{BACKEND}/state": str(int(backend_state)), f"{FRONTEND}/state": "1"}))
    target = XenvbdTarget(adapter, 768, 0)  # type: ignore[arg-type]
    target.backend = BACKEND
    target.state = FrontendState.PREPARED
    target.TargetDestroy()
    assert target.state == FrontendState.GONE
    return adapter


def test_a_prepared_target_whose_backend_never_took_the_device_closes_without_waiting(cpu: Processor) -> None:
    adapter = _destroy_prepared(S.Initialising)
    assert adapter.store.frontend_states == [S.Closed]
    assert not [line for line in adapter.printed if "while closing" in line], adapter.printed


def test_a_prepared_target_whose_backend_is_in_initwait_closes_with_the_handshake(cpu: Processor,
                                                                                   monkeypatch) -> None:
    monkeypatch.setattr(target_module, "CLOSE_WAIT_SECONDS", 0.1)
    adapter = _destroy_prepared(S.InitWait)
    assert adapter.store.frontend_states == [S.Closing, S.Closed]
    # This fake backend does not follow: both bounded waits ran out and said so.
    assert [line for line in adapter.printed if "while closing" in line] == [
        "Target[0]: backend stayed InitWait while closing"] * 2
