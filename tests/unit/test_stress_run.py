"""ci/stress.py's verdict: every failing test lands in the class its text names, and only a run with no
failure at all exits 0 (the figures in the issue notes come from this table)."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("stress", Path(__file__).resolve().parents[2] / "ci" / "stress.py")
stress = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("stress", stress)  # dataclasses look their module up there
_spec.loader.exec_module(stress)

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
<testcase classname="tests.integration.test_xennet" name="test_two_vifs_on_one_guest">
  <failure message="xenpv.base.errors.ProcessDied: agent died while booting: killed by SIGSEGV">trace</failure></testcase>
<testcase classname="tests.integration.test_agent" name="test_boot">
  <failure message="GuestBugcheck: STOP 0xD1 in xenvif.sys">trace</failure></testcase>
<testcase classname="tests.integration.test_agent" name="test_slow">
  <error message="HarnessTooSlow: qtest answer after 30 s">trace</error></testcase>
<testcase classname="tests.integration.test_agent" name="test_other">
  <failure message="assert 1 == 2">trace</failure></testcase>
<testcase classname="tests.integration.test_agent" name="test_fine"/>
<testcase classname="tests.integration.test_agent" name="test_skip"><skipped message="no"/></testcase>
</testsuite></testsuites>
"""


def _copy(tmp_path: Path, junit: str | None, returncode: int) -> object:
    c = stress.Copy(0, tmp_path)
    if junit is not None:
        c.junit.write_text(junit)
    c.returncode = returncode
    stress.read_junit(c)
    return c


def test_each_failure_is_classified_by_its_text(tmp_path: Path) -> None:
    c = _copy(tmp_path, JUNIT, 1)
    assert (c.tests, c.skipped) == (6, 1)
    assert [cls for _, cls, _ in c.failures] == ["crash", "false STOP", "harness too slow", "other failure"]
    assert c.failures[0][0] == "tests.integration.test_xennet::test_two_vifs_on_one_guest"


def test_a_copy_that_died_without_junit_is_a_crash(tmp_path: Path) -> None:
    c = _copy(tmp_path, None, -11)
    assert [cls for _, cls, _ in c.failures] == ["crash"]


@pytest.mark.parametrize("junit, rc, verdict", [
    (JUNIT, 1, 1),
    ('<testsuites><testsuite><testcase classname="a" name="b"/></testsuite></testsuites>', 0, 0),
    ('<testsuites><testsuite><testcase classname="a" name="b"/></testsuite></testsuites>', 2, 1),
])
def test_only_a_clean_run_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str], junit: str, rc: int,
                                  verdict: int) -> None:
    c = _copy(tmp_path, junit, rc)
    args = argparse.Namespace(copies=1, hogs=2)
    assert stress.report([c], args, tmp_path, 1.0) == verdict
    assert "false STOPs" in capsys.readouterr().out
