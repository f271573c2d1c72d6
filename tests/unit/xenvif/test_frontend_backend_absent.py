"""XENVIF's frontend when no back-end serves its device: the toolstack leaves the backend Closed and offline,
and FrontendPrepare gives up at once without writing Initialising (XV frontend.c FrontendPrepare: Closed
and not online -> FrontendSetOffline). When the backend's directory does not exist (it went away), the wait
for the backend's state ends at its first read, as FrontendWaitForBackendXenbusStateChange breaks on
STATUS_OBJECT_NAME_NOT_FOUND ("disappeared"). A backend that exists and is online but has not answered yet
is still waited for."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from xenpv.stack.drivers.xenvif.frontend import Frontend, FrontendError, FrontendInterfaces
from xenpv.stack.kernel import KEvent
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.status import STATUS_OBJECT_NAME_NOT_FOUND, STATUS_SUCCESS
from xenpv.xenabi.xenbus import XenbusState as S

BACKEND = "/local/domain/0/backend/vif/3/0"


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
    """STORE over a dict of nodes; counts the reads of each path."""

    nodes: dict[str, str]
    reads: dict[str, int] = field(default_factory=dict)

    def StoreRead(self, transaction: object, prefix: str | None, node: str) -> tuple[int, Buffer | None]:
        path = f"{prefix}/{node}" if prefix else node
        self.reads[path] = self.reads.get(path, 0) + 1
        if path not in self.nodes:
            return STATUS_OBJECT_NAME_NOT_FOUND, None
        return STATUS_SUCCESS, Buffer(self.nodes[path].encode())

    def StoreFree(self, buffer: Buffer) -> None:
        pass

    def StorePrintf(self, transaction: object, prefix: str | None, node: str, fmt: str, *args: object) -> int:
        self.nodes[f"{prefix}/{node}" if prefix else node] = fmt % args
        return STATUS_SUCCESS

    def StoreWatchAdd(self, prefix: str, node: str, event: KEvent) -> tuple[int, str]:
        return STATUS_SUCCESS, f"{prefix}/{node}"

    def StoreWatchRemove(self, watch: str) -> int:
        return STATUS_SUCCESS


def _frontend(nodes: dict[str, str]) -> tuple[Frontend, Store]:
    store = Store({"device/vif/0/backend": BACKEND, "device/vif/0/backend-id": "0", **nodes})
    frontend = Frontend(0, FrontendInterfaces(store, None, None, None))  # type: ignore[arg-type]
    frontend.backend_path = BACKEND
    return frontend, store


def test_a_closed_offline_backend_is_given_up_at_once(cpu: Processor) -> None:
    frontend, store = _frontend({f"{BACKEND}/state": str(int(S.Closed)), f"{BACKEND}/online": "0"})
    with pytest.raises(FrontendError, match=f"backend {BACKEND} is Closed and offline"):
        frontend.FrontendPrepare()
    assert "device/vif/0/state" not in store.nodes
    assert store.reads[f"{BACKEND}/state"] == 1


def test_a_backend_with_no_directory_is_unknown_at_the_first_read(cpu: Processor) -> None:
    frontend, store = _frontend({})
    with pytest.raises(FrontendError, match=f"backend {BACKEND} is Unknown, not InitWait"):
        frontend.FrontendPrepare()
    assert store.nodes["device/vif/0/state"] == str(int(S.Initialising))
    assert store.reads[f"{BACKEND}/state"] == 2  # the offline check's, then the wait's first and last


def test_a_backend_that_exists_is_waited_for(cpu: Processor) -> None:
    frontend, store = _frontend({f"{BACKEND}/state": str(int(S.Initialising))})
    assert frontend._wait_backend({S.InitWait}, timeout=0.2) == S.Initialising
    assert store.reads[f"{BACKEND}/state"] > 1
