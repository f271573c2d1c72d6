"""`@pytest.mark.exclusive(name)`: tests marked with one name never overlap, across xdist workers."""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.base.errors import HarnessError
from xenpv.harness.resources import ExclusiveResource

pytest_plugins = ["pytester"]

INNER = """
import os, time, pytest

def span(name):
    t0 = time.time()
    time.sleep(1.0)
    with open(os.environ["SPANS"], "a") as f:
        f.write(f"{name} {t0} {time.time()}\\n")

def test_free1(): span("free")

def test_free2(): span("free")

@pytest.mark.exclusive("disk-hog")
def test_x1(): span("x")

@pytest.mark.exclusive("disk-hog")
def test_x2(): span("x")
"""


def _overlap(spans: list[tuple[float, float]]) -> bool:
    return any(a0 < b1 and a1 < b0 for i, (a0, b0) in enumerate(spans) for a1, b1 in spans[i + 1:])


@pytest.mark.slow  # an inner pytest -n 2 whose tests sleep
def test_marked_tests_never_overlap_across_workers(pytester: pytest.Pytester, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPANS", str(tmp_path / "spans"))
    monkeypatch.setenv("XENPV_LEASE_DIR", str(tmp_path / "leases"))
    pytester.makepyfile(test_inner=INNER)
    # --dist each: both workers run every test, in file order, at the same time.
    result = pytester.runpytest_subprocess("-n", "2", "--dist", "each", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    lines = [line.split() for line in (tmp_path / "spans").read_text().splitlines()]
    marked = [(float(a), float(b)) for name, a, b in lines if name == "x"]
    free = [(float(a), float(b)) for name, a, b in lines if name == "free"]
    assert len(marked) == 4 and not _overlap(marked), marked
    assert _overlap(free), free  # the control: the two workers did run at the same time


def test_a_held_resource_times_out_naming_its_holder(tmp_path: Path) -> None:
    held = ExclusiveResource.acquire(tmp_path, "db", timeout=1)
    try:
        with pytest.raises(HarnessError, match=r"exclusive resource 'db' still held by \d+\.\d+ after 0 s"):
            ExclusiveResource.acquire(tmp_path, "db", timeout=0.2)
    finally:
        held.release()
    ExclusiveResource.acquire(tmp_path, "db", timeout=0).release()  # free again
    with pytest.raises(HarnessError, match=r"exclusive resource name '../x'"):
        ExclusiveResource.acquire(tmp_path, "../x", timeout=0)
