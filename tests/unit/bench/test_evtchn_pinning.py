"""`xenpv bench evtchn`'s one-CPU figures: every thread of the pinned processes on the CPU (affinity is per
thread), and each thread's own affinity back afterwards."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from xenpv.harness.bench.evtchn import _pinned


def _affinities() -> dict[int, set[int]]:
    return {int(t.name): os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{os.getpid()}/task").iterdir()}


def test_every_thread_is_pinned_and_then_given_its_own_affinity_back() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, args=(30,), daemon=True)
    other.start()
    try:
        before = _affinities()
        assert len(before) >= 2
        with _pinned([os.getpid()], cpus[-1]):
            assert set(map(frozenset, _affinities().values())) == {frozenset({cpus[-1]})}
        assert _affinities() == before
    finally:
        stop.set()
        other.join(5)
