"""Console commands that run kernel code own the CPU (the kernel lock) while they do: a driver thread that
holds the CPU at DISPATCH_LEVEL meanwhile must make the command wait, not fail an IRQL rule it did not
break. `pkg` and `reg` wrote the registry without the lock; `xenpv explore` found it as a false 0xA
(IRQL_NOT_LESS_OR_EQUAL in ZwSetValueKey, "at PASSIVE_LEVEL") during `pkg upgrade`."""
from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.stack.agent import cmd_pkg  # noqa: F401 - registers the commands
from xenpv.stack.agent.console import run_command
from xenpv.stack.kernel import DISPATCH_LEVEL, Kernel, KeLowerIrql, KeRaiseIrql, Registry
from xenpv.stack.kernel.irql import Processor, set_current_processor


@pytest.fixture
def rt():
    previous = set_current_processor(Processor())
    kernel = Kernel(registry=Registry()).activate()
    yield SimpleNamespace(kernel=kernel, config=SimpleNamespace(guest=load_guest(GUESTS_DIR / "default.yaml")))
    set_current_processor(previous)


@pytest.mark.parametrize("words, expected", [
    (["pkg", "install", "xenbus", "9.1.0.10"], "installed xenbus 9.1.0.10"),
    (["reg", "add", r"HKLM\SOFTWARE\X", "/v", "N", "/t", "REG_DWORD", "/d", "1"], "completed successfully"),
])
def test_a_command_waits_for_a_driver_thread_that_owns_the_cpu_at_dispatch(rt, words: list[str], expected: str) -> None:
    holding, release, done = threading.Event(), threading.Event(), threading.Event()

    def driver_thread() -> None:
        with rt.kernel.cpu.lock:
            old = KeRaiseIrql(DISPATCH_LEVEL)
            holding.set()
            release.wait(10)
            KeLowerIrql(old)
        done.set()

    thread = threading.Thread(target=driver_thread)
    thread.start()
    try:
        assert holding.wait(10)
        threading.Timer(0.3, release.set).start()
        out = run_command(rt, words)
    finally:
        release.set()
        thread.join(10)
    assert done.is_set()
    assert expected in out
    assert rt.kernel.cpu.crashed is None
