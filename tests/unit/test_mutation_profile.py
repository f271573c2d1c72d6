"""The Hypothesis profile ci/mutation.sh selects (XENPV_HYPOTHESIS_PROFILE=mutation, root conftest.py) caps every
Hypothesis test, including those whose own @settings(...) or TestCase.settings would override a loaded
profile: a mutant's test run must not spend minutes in fuzzers (issue 18).

The probes below are ordinary tests that count their examples into the file named by XENPV_PROFILE_PROBE
(when it is set); the tests run them in a child pytest with and without the profile."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule

ROOT = Path(__file__).resolve().parents[2]
PROBE_ENV = "XENPV_PROFILE_PROBE"
OWN_EXAMPLES = 150


def _count(tag: str) -> None:
    probe = os.environ.get(PROBE_ENV)
    if probe:
        with open(probe, "a") as f:
            f.write(tag + "\n")


@settings(max_examples=OWN_EXAMPLES, deadline=None)
@given(st.integers())
def test_probe_given(n: int) -> None:
    _count("given")


class ProbeMachine(RuleBasedStateMachine):
    @rule()
    def step(self) -> None:
        _count("step")


ProbeMachine.TestCase.settings = settings(max_examples=OWN_EXAMPLES, stateful_step_count=40, deadline=None)
TestProbeMachine = ProbeMachine.TestCase


def _run_probes(tmp_path: Path, profile: str | None) -> dict[str, int]:
    probe = tmp_path / "probe.txt"
    env = {k: v for k, v in os.environ.items() if k != "XENPV_HYPOTHESIS_PROFILE"}
    env[PROBE_ENV] = str(probe)
    if profile:
        env["XENPV_HYPOTHESIS_PROFILE"] = profile
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--no-header",
         "-k", "probe", str(Path(__file__).relative_to(ROOT))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    tags = probe.read_text().split() if probe.exists() else []
    return {tag: tags.count(tag) for tag in ("given", "step")}


def test_mutation_profile_caps_tests_with_their_own_settings(tmp_path: Path) -> None:
    counts = _run_probes(tmp_path, "mutation")
    # max_examples=10 (Hypothesis may stop earlier when the strategy is exhausted, never later), and at most
    # 10 machines of 20 steps.
    assert 1 <= counts["given"] <= 10, counts
    assert 1 <= counts["step"] <= 10 * 20, counts


def test_without_the_profile_a_test_keeps_its_own_settings(tmp_path: Path) -> None:
    counts = _run_probes(tmp_path, None)
    assert counts["given"] == OWN_EXAMPLES, counts
    assert counts["step"] > 10 * 20, counts
