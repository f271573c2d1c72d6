"""harness.schedule: under `--dist worksteal` the `slow` tests start first, at the front of the workers'
first shares, whatever their place in the collection."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from xdist.scheduler.worksteal import WorkStealingScheduling

from xenpv.harness.schedule import share_sizes, worksteal_order

pytest_plugins = ["pytester"]


@dataclass
class _Gateway:
    id: str


@dataclass(eq=False)
class _Node:
    """What worksteal's first round uses of a worker: its name and the tests it is sent."""

    gateway: _Gateway
    sent: list[int] = field(default_factory=list)
    shutting_down: bool = False

    def send_runtest_some(self, indices: list[int]) -> None:
        self.sent += indices

    def shutdown(self) -> None:  # a worker with nothing to run (fewer tests than workers)
        self.shutting_down = True


@dataclass
class _Config:
    workers: int

    def getvalue(self, name: str) -> list[str]:
        assert name == "tx"
        return [f"{self.workers}*popen"]


def first_shares(count: int, workers: int) -> list[list[int]]:
    """The indices xdist's own worksteal scheduler sends each worker first, for a collection of `count`."""
    sched = WorkStealingScheduling(_Config(workers))  # type: ignore[arg-type]
    nodes = [_Node(_Gateway(f"gw{i}")) for i in range(workers)]
    collection = [f"t{i}" for i in range(count)]
    for node in nodes:
        sched.add_node(node)  # type: ignore[arg-type]
        sched.add_node_collection(node, collection)  # type: ignore[arg-type]
    sched.schedule()
    return [node.sent for node in nodes]


@pytest.mark.parametrize("count, workers", [(1993, 4), (10, 3), (7, 4), (3, 4), (5, 1)])
def test_share_sizes_are_worksteals_first_round(count: int, workers: int) -> None:
    shares = first_shares(count, workers)
    assert [len(s) for s in shares] == share_sizes(count, workers)
    assert [i for s in shares for i in s] == list(range(count))  # contiguous, in order


def _order(names: list[str], workers: int) -> list[str]:
    """Names are `module:test`, slow ones end in `!`."""
    return worksteal_order(names, workers, lambda n: n.endswith("!"), lambda n: n.split(":")[0])


def test_slow_tests_lead_the_shares_a_modules_together_largest_first() -> None:
    names = [f"a:{i}" for i in range(8)] + ["b:1!", "b:2!", "c:1!", "a:8", "d:1!", "d:2!", "d:3!", "a:9"]
    # d (3 slow) to the first share, b (2) to the second, c (1) to the third; shares of 5, 5 and 6.
    assert _order(names, 3) == ["d:1!", "d:2!", "d:3!", "a:0", "a:1",
                                "b:1!", "b:2!", "a:2", "a:3", "a:4",
                                "c:1!", "a:5", "a:6", "a:7", "a:8", "a:9"]


def test_without_slow_tests_the_order_is_the_collections() -> None:
    names = [f"m{i % 3}:{i}" for i in range(20)]
    assert _order(names, 4) == names


def test_more_slow_tests_than_a_share_holds_keeps_every_test() -> None:
    names = [f"m{i}:{i}!" for i in range(6)] + ["x:1", "x:2"]
    order = _order(names, 4)  # shares of 2: two slow tests in each of the first two, one in the others
    assert order == ["m0:0!", "m4:4!", "m1:1!", "m5:5!", "m2:2!", "x:1", "m3:3!", "x:2"]


def test_zero_workers_is_an_error() -> None:
    with pytest.raises(ValueError, match="workers must be at least 1"):
        _order(["a:1"], 0)


INNER = """
import json, os, pytest

def record(name):
    with open(os.environ["STARTS"], "a") as f:
        f.write(json.dumps([os.environ["PYTEST_XDIST_WORKER"], name]) + "\\n")

@pytest.mark.parametrize("i", range(6))
def test_quick(i): record(f"{__name__}: quick{i}")

@pytest.mark.slow
def test_long(): record(f"{__name__}: long")
"""


def test_under_worksteal_the_slow_tests_are_each_workers_first(pytester: pytest.Pytester, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Last in their files, first to run: each of the two workers starts with one file's slow test."""
    monkeypatch.setenv("STARTS", str(tmp_path / "starts"))
    pytester.makepyfile(test_one=INNER, test_two=INNER)
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "worksteal", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=14)
    firsts: dict[str, str] = {}
    for worker, name in map(json.loads, (tmp_path / "starts").read_text().splitlines()):
        firsts.setdefault(worker, name)
    assert sorted(firsts.values()) == ["test_one: long", "test_two: long"], firsts
