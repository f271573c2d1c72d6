"""One walk of XENVIF's frontend state machine at a time (XV frontend.c FrontendSetState holds
Frontend->Lock across the whole walk).

The model's backend waits give the processor away, so without a lock of its own a second FrontendSetState
(the reboot's power-down, XENNET's disable) walked the frontend while the watchdog's walk back up after a
migration waited for the backend in FrontendConnect: two connects, the second overwriting the first's grant
cache, and the power-down's disconnect then put entries of the first cache into the second, a false
0xDEAD at xenbus!CacheInterface.CachePut (`xenpv explore` found it after `!migrate` then `reboot`).

The steps are replaced by recorders (this is the lock's rule, not the steps'); the walks run on threads of
the model, each owning the processor as the watchdog thread and the power IRP's thread do."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from xenpv.stack.drivers.xenvif.frontend import Frontend, FrontendState
from xenpv.stack.kernel import KEvent, KeWaitForSingleObject
from xenpv.stack.kernel.irql import Processor, set_current_processor

S = FrontendState


@pytest.fixture
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


class Steps:
    """Records the steps a frontend walks; FrontendConnect waits for `backend` (the processor given away)."""

    def __init__(self, frontend: Frontend) -> None:
        self.log: list[str] = []
        self.inside_connect = 0
        self.most_inside_connect = 0
        self.backend = KEvent("backend Connected")
        for name in ("FrontendClose", "FrontendPrepare", "FrontendEnableStep", "FrontendDisableStep",
                     "FrontendDisconnect", "FrontendRelease", "FrontendForget"):
            setattr(frontend, name, self._recorder(name))
        frontend.FrontendConnect = self._connect  # type: ignore[method-assign]

    def _recorder(self, name: str) -> Callable[[], None]:
        return lambda: self.log.append(name)

    def _connect(self) -> None:
        self.log.append("FrontendConnect")
        self.inside_connect += 1
        self.most_inside_connect = max(self.most_inside_connect, self.inside_connect)
        try:
            KeWaitForSingleObject(self.backend, 10.0)
        finally:
            self.inside_connect -= 1


def _walk_on_a_thread(cpu: Processor, frontend: Frontend, target: FrontendState,
                      errors: list[BaseException]) -> threading.Thread:
    def run() -> None:
        try:
            with cpu.lock:
                frontend.FrontendSetState(target)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _until(what: str, condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.005)


def test_a_second_set_state_waits_for_the_walk_under_way(cpu: Processor) -> None:
    frontend = Frontend(0, None)  # type: ignore[arg-type]  # the steps are replaced
    frontend._watchdog_running = True  # no watchdog thread: its own walks are not this test's
    steps = Steps(frontend)
    errors: list[BaseException] = []

    first = _walk_on_a_thread(cpu, frontend, S.FRONTEND_ENABLED, errors)
    _until("first walk in FrontendConnect", lambda: steps.inside_connect == 1)
    second = _walk_on_a_thread(cpu, frontend, S.FRONTEND_CONNECTED, errors)
    # The second walk either waits for the state lock (fixed) or walks into FrontendConnect too (the race).
    _until("second walk blocked or connecting",
           lambda: getattr(frontend, "_state_lock", None) in cpu.waiting or steps.inside_connect == 2)
    steps.backend.set()
    first.join(10)
    second.join(10)
    assert not first.is_alive() and not second.is_alive() and not errors, errors

    assert steps.most_inside_connect == 1, steps.log
    assert steps.log == ["FrontendClose", "FrontendPrepare", "FrontendConnect", "FrontendEnableStep",
                         "FrontendDisableStep"]
    assert frontend.state == frontend.wanted == S.FRONTEND_CONNECTED


def test_a_resume_during_a_walk_is_done_by_the_walker_before_it_lets_go(cpu: Processor) -> None:
    """The LATE callback runs at DISPATCH_LEVEL and cannot wait for the lock: the walker resets the frontend
    to UNKNOWN (the old domain's queues dropped) when its walk ends, and the watchdog is woken to walk back."""
    frontend = Frontend(0, None)  # type: ignore[arg-type]
    frontend._watchdog_running = True
    steps = Steps(frontend)
    resets: list[FrontendState] = []
    frontend._queues_destroy = lambda: resets.append(frontend.state)  # type: ignore[method-assign]
    errors: list[BaseException] = []

    walker = _walk_on_a_thread(cpu, frontend, S.FRONTEND_ENABLED, errors)
    _until("walk in FrontendConnect", lambda: steps.inside_connect == 1)
    with cpu.lock:
        frontend._suspend_late(None)  # the processor is free: the walker waits for the backend
    assert resets == [] and frontend._resume_pending
    steps.backend.set()
    walker.join(10)
    assert not walker.is_alive() and not errors, errors
    assert resets == [S.FRONTEND_ENABLED]  # reset once the walk was done, with the lock still held
    assert frontend.state == S.FRONTEND_UNKNOWN and not frontend._resume_pending
    assert frontend._watchdog_event.read_state()  # the watchdog walks back up to ENABLED
