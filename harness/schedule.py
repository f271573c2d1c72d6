"""The order pytest-xdist's worksteal scheduler gets the suite in: slow tests first, one group per worker.

`--dist worksteal` (ci/bootstrap.sh test) gives each worker one contiguous share of the collection at the
start (worker i: the next len(pending) // (workers - i) items), and a worker that runs dry steals the back
half of the longest queue. A worker runs its share front to back, so a test only starts early if it is near
the front of a share. In collection order the long tests (the pool-host run, minimize, the nested pytest
runs) sat in the middle of the integration folder and started when most of the suite had run: the last
minute of a run was one or two workers finishing them while the others had nothing left to steal.

Here the tests marked `slow` go to the front of the shares: a module's slow tests stay together and in their
own order (a module-scoped fixture is made once, as before), and modules are dealt to the shares largest
first, each to the share with the fewest slow tests so far. The rest keep their collection order behind
them. Every worker computes the same order from the same collection (xdist checks that the collections are
identical), so nothing is sent between them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def share_sizes(count: int, workers: int) -> list[int]:
    """The sizes of the shares worksteal's first round gives `workers` idle workers out of `count` items
    (xdist.scheduler.worksteal: each gets len(pending) // workers_remaining, in turn)."""
    sizes = []
    left = count
    for i in range(workers):
        size = left // (workers - i)
        sizes.append(size)
        left -= size
    return sizes


def worksteal_order(items: Sequence[T], workers: int, is_slow: Callable[[T], bool],
                    module_of: Callable[[T], str]) -> list[T]:
    """`items` reordered so each worker's first share starts with its part of the slow tests."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    groups: dict[str, list[T]] = {}  # module -> its slow tests, in collection order
    rest: list[T] = []
    for item in items:
        if is_slow(item):
            groups.setdefault(module_of(item), []).append(item)
        else:
            rest.append(item)
    heads: list[list[T]] = [[] for _ in range(workers)]
    # Largest module first, each to the share with the fewest slow tests (ties: the earlier share); sorted()
    # is stable, so equal modules keep their collection order and every worker gets the same answer.
    for group in sorted(groups.values(), key=len, reverse=True):
        min(heads, key=len).extend(group)
    order: list[T] = []
    taken = 0
    for head, size in zip(heads, share_sizes(len(items), workers)):
        fill = max(0, size - len(head))
        order += head + rest[taken:taken + fill]
        taken += fill
    return order + rest[taken:]
