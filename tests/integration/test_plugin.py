"""The pytest plugin as a user meets it: an inner test session run with pytester."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]

INNER = '''
import pytest

@pytest.mark.integration
def test_passes(machine):
    assert machine.qtest.inw(0xcfc) is not None

@pytest.mark.integration
def test_fails(guest_factory):
    m = guest_factory("vendor-c000")
    m.qtest.outb(0x80, 1)
    assert False, "deliberate"
'''


def test_failed_test_keeps_artifacts_and_names_them(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_inner=INNER)
    art = tmp_path / "art"
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--xenpv-artifacts={art}")
    result.assert_outcomes(passed=1, failed=1)
    (session,) = art.iterdir()  # the session's own directory: <date>-<time>-<pid>
    kept = [p.name for p in session.iterdir()]
    assert kept == ["test_inner.py_test_fails"]
    result.stdout.fnmatch_lines([f"*artifacts kept in {session}/test_inner.py_test_fails*", "*qemu.log*",
                                 "*qtest.log*", f"xenpv: this session's artifacts are kept in {session}"])
    transcript = (session / "test_inner.py_test_fails" / "vendor-c000" / "qtest.log").read_text()
    assert "[R +" in transcript and "outb 0x80 0x1" in transcript
    assert (session / "test_inner.py_test_fails" / "vendor-c000" / "replay.sh").exists()


def test_unknown_marker_is_an_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_m="import pytest\n@pytest.mark.integrashun\ndef test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--strict-markers")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*'integrashun' not found in `markers`*"])
