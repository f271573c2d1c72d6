"""Seeded scheduling of the model's deferred work, so that a replay can take the same interleaving.

By default (mode `os`) the processor drains its DPC queue first in, first out, and runs pending
interrupts of one level in the order they arrived; which thread gets the kernel lock next is the OS's
choice. In the seeded mode (`seeded:SEED`, the agent's --schedule, recorded in the run record) every
choice the processor makes among deferred work that is ready at one of its defined points is drawn from
a random generator seeded with SEED:

- the DPC queue is drained when the IRQL drops below DISPATCH_LEVEL (KeLowerIrql, the end of an ISR or
  a DPC, a DPC queued at PASSIVE_LEVEL); with more than one DPC queued, the next to run is drawn;
- among pending interrupts of the highest runnable level, the next to run is drawn;
- `order(what, items)` draws the order of any other batch a driver chooses to hand over (the ports an
  ISR finds pending, say).

Windows gives no order among DPCs of one importance on one processor beyond FIFO, and none at all across
processors, so any drawn order is one a real machine can take; a bug that depends on it is a real bug.

Every draw is counted and folded into a trace digest. The crash dump keeps both (`summary()`), and a
replay with the same seed that reaches the STOP through the same decisions has the same digest: that is
how `xenpv repro` says whether it took the same interleaving. Arrival times of events from outside the
guest (a back-end's answer, a timer) are not the model's to choose; when one arrives at a different
defined point the digest differs, and the replay says so.
"""
from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T")


class Scheduler:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._random = random.Random(seed)
        self._trace = hashlib.sha256()
        self._lock = threading.Lock()  # drivers may call order() from their own threads
        self.decisions = 0

    def pick(self, what: str, count: int) -> int:
        """An index in range(count), drawn; a single candidate is no decision."""
        if count <= 1:
            return 0
        with self._lock:
            index = self._random.randrange(count)
            self.decisions += 1
            self._trace.update(f"{what}:{count}:{index};".encode())
        return index

    def order(self, what: str, items: Sequence[T]) -> list[T]:
        """`items` in a drawn order."""
        pool = list(items)
        out = []
        while pool:
            out.append(pool.pop(self.pick(what, len(pool))))
        return out

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {"mode": "seeded", "seed": self.seed, "decisions": self.decisions,
                    "trace": self._trace.hexdigest()[:16]}


def summary(scheduler: Scheduler | None) -> dict[str, Any]:
    return scheduler.summary() if scheduler is not None else {"mode": "os"}
