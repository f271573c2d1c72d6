"""harness.plugin keeps pytest's rewritten test modules as .pyc files under PYTHONDONTWRITEBYTECODE too (every
xdist worker would otherwise rewrite all of tests/ again), and only during collection."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

INNER = """
import sys

def test_the_setting_is_back_after_collection():
    assert sys.dont_write_bytecode
"""


def test_collection_caches_rewritten_test_modules_under_dontwritebytecode(pytester: pytest.Pytester,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    cached = sorted(p.name for p in (pytester.path / "__pycache__").glob("test_inner.*-pytest-*.pyc"))
    assert len(cached) == 1, sorted(pytester.path.rglob("*"))
