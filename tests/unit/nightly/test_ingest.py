"""What ingest reads: pytest's JUnit XML with pytest-rerunfailures' reruns (from a real pytest session), the
harness's JUnit properties, and benchmark JSON with both forms of target."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpv.base.errors import ConfigError
from xenpv.harness.bench.targets import Target, parse_target
from xenpv.harness.nightly.ingest import parse_bench, parse_junit, signature_of

pytest_plugins = ["pytester"]

INNER = '''
import itertools
import pytest

_tries = itertools.count()

def test_flaky():
    assert next(_tries) > 0, "the first try fails"

def test_broken(artifacts):
    assert False, "always at 0x7f00deadbeef"

def test_fine():
    pass

@pytest.mark.skip(reason="not here")
def test_skipped():
    pass
'''


def test_a_real_session_with_reruns(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """pytest-rerunfailures writes one <testcase> per attempt: the ingest labels a test that passed its
    rerun flaky, and the harness plugin names a failed test's artifact directory (xenpv_artifacts)."""
    pytester.makepyfile(test_inner=INNER)
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--reruns", "1", f"--junitxml={junit}",
                                           "-o", "junit_family=xunit1", f"--xenpv-artifacts={tmp_path / 'art'}")
    assert result.parseoutcomes() == {"passed": 2, "failed": 1, "skipped": 1, "rerun": 2}
    got = {r.test.rpartition("::")[2]: r for r in parse_junit(junit)}
    assert {k: (r.outcome, r.attempts) for k, r in got.items()} == {
        "test_flaky": ("flaky", 2), "test_broken": ("failed", 2), "test_fine": ("passed", 1),
        "test_skipped": ("skipped", 1)}
    # Its failed attempt is a bare <testcase>: the plugin's xenpv_failure property says how it failed.
    assert got["test_flaky"].signature == "AssertionError: the first try fails"
    assert got["test_broken"].signature == "AssertionError: always at N"
    assert got["test_broken"].artifacts and Path(got["test_broken"].artifacts).is_dir()
    assert got["test_fine"].signature is None and got["test_fine"].artifacts is None


@pytest.mark.parametrize("raw,unit,want", [
    ({"op": ">=", "value": 5000}, "IOPS", Target(">= 5000", ">=", 5000.0)),
    ("< 150 ms", "ms", Target("< 150 ms", "<", 150.0)),
    (">= 5,000", "IOPS", Target(">= 5,000", ">=", 5000.0)),
    ("≤ 2.5", "x", Target("≤ 2.5", "<=", 2.5)),
    ("< 1.5 s", "ms", Target("< 1.5 s")),  # another unit than the figure's: shown, not compared
    ("about a second", "ms", Target("about a second")),
    ("", "ms", Target(None)),
    (None, "ms", Target(None)),
])
def test_targets_old_and_new(raw: object, unit: str, want: Target) -> None:
    assert parse_target(raw, unit, "here") == want


@pytest.mark.parametrize("raw", [{"op": "=", "value": 1}, {"op": "<", "value": "1"}, {"op": "<", "value": True},
                                 {"op": "<"}, 150])
def test_a_target_that_is_neither_form_is_refused(raw: object) -> None:
    with pytest.raises(ConfigError, match="here: target"):
        parse_target(raw, "ms", "here")


def test_target_met() -> None:
    assert Target("< 150", "<", 150).met(149) is True and Target("< 150", "<", 150).met(150) is False
    assert Target(">= 0.5", ">=", 0.5).met(0.5) is True and Target(">= 0.5", ">=", 0.5).met(None) is None
    assert Target("soon").met(1.0) is None


def test_signature_prefers_the_bucket() -> None:
    assert signature_of("TimeoutError: pid 12 at 0x7fff00001234", None) == "TimeoutError: pid N at N"
    assert signature_of("anything", "0xE2_agent") == "STOP 0xE2_agent"
    assert signature_of(None, None) is None


def test_bench_json(tmp_path: Path) -> None:
    path = tmp_path / "bench-blk.json"
    path.write_text(json.dumps({"benchmark": "blk", "notes": [], "figures": {
        "read": {"value": 5200.0, "unit": "IOPS", "target": {"op": ">=", "value": 5000}},
        "ratio": {"value": float("nan"), "unit": "x"}}}))
    read, ratio = parse_bench(path)
    assert (read.benchmark, read.figure, read.value, read.target_op, read.target_value) == \
        ("blk", "read", 5200.0, ">=", 5000.0)
    assert ratio.value is None and ratio.target is None  # NaN: the benchmark printed n/a
    (tmp_path / "bench-net.json").write_text("")  # the benchmark failed: its log says why
    assert parse_bench(tmp_path / "bench-net.json") == []


@pytest.mark.parametrize("text,match", [
    ("{not json", "is not JSON"),
    ('{"figures": []}', "has no 'figures' object"),
    ('{"figures": {"a": {"unit": "ms"}}}', "figure 'a' has no value"),
    ('{"figures": {"a": {"value": "fast"}}}', "figure 'a': value 'fast' is not a number"),
])
def test_bench_json_that_cannot_be_used_is_named(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bench-x.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        parse_bench(path)


def test_junit_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text("<testsuites><testsuite>")
    with pytest.raises(ConfigError, match=f"JUnit file {path} cannot be read"):
        parse_junit(path)
