"""ci/seeded_bugs.py (issue 18): a seeded bug lands on exactly the line it names or not at all, a bad list is
refused by name, and the checked-in list still applies to today's tree (a refactor that moves a rule's line
must move its seeded bug too, or the nightly would try nothing)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("seeded_bugs_under_test", ROOT / "ci" / "seeded_bugs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


SOURCE = """\
def f(x):
    if x > 1:
        return 1
    return 0


def g(x):
    if x > 1:
        return 2
"""


def test_a_bug_replaces_its_one_line_keeping_the_indentation(tmp_path: Path) -> None:
    tool = _tool()
    (tmp_path / "m.py").write_text(SOURCE)
    tool.apply(tmp_path, "m.py", "return 0", "return 5", "t")
    assert (tmp_path / "m.py").read_text() == SOURCE.replace("    return 0", "    return 5")


def test_a_line_that_occurs_twice_needs_an_anchor_and_lands_below_it(tmp_path: Path) -> None:
    tool = _tool()
    (tmp_path / "m.py").write_text(SOURCE)
    with pytest.raises(tool.SeededBugError, match=r"t: m.py has 2 lines reading 'if x > 1:', expected 1"):
        tool.apply(tmp_path, "m.py", "if x > 1:", "if x >= 1:", "t")
    assert (tmp_path / "m.py").read_text() == SOURCE  # nothing written
    tool.apply(tmp_path, "m.py", "if x > 1:", "if x >= 1:", "t", after="def g(x):")
    head, _, tail = SOURCE.partition("def g(x):")
    assert (tmp_path / "m.py").read_text() == head + "def g(x):" + tail.replace("if x > 1:", "if x >= 1:")


def test_a_missing_line_or_anchor_is_an_error(tmp_path: Path) -> None:
    tool = _tool()
    (tmp_path / "m.py").write_text(SOURCE)
    with pytest.raises(tool.SeededBugError, match="has 0 lines reading 'return 9'"):
        tool.apply(tmp_path, "m.py", "return 9", "return 8", "t")
    with pytest.raises(tool.SeededBugError, match="has 0 lines reading 'def h"):
        tool.apply(tmp_path, "m.py", "return 1", "return 8", "t", after="def h(x):")
    with pytest.raises(tool.SeededBugError, match=r"below 'def g\(x\):' has 0 lines reading 'return 1'"):
        tool.apply(tmp_path, "m.py", "return 1", "return 8", "t", after="def g(x):")


ENTRY = '''
[[bug]]
name = "b"
area = "a"
rule = "r"
file = "m.py"
line = "return 0"
new = "return 5"
tests = ["tests/x.py"]
'''


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.replace('rule = "r"\n', ""), r"missing \['rule'\]"),
    (lambda s: s + 'colour = "red"\n', r"unknown keys \['colour'\]"),
    (lambda s: s.replace('"return 5"', '"  return 0"'), "new is the line unchanged"),
    (lambda s: s.replace('["tests/x.py"]', '"tests/x.py"'), "tests must be a list"),
    (lambda s: s + s, r"a name is used twice: \['b', 'b'\]"),
], ids=["missing-key", "unknown-key", "no-change", "tests-not-a-list", "duplicate-name"])
def test_a_bad_list_is_refused_naming_what_is_wrong(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    tool = _tool()
    path = tmp_path / "bugs.toml"
    assert [b.name for b in tool.load(_write(path, ENTRY))] == ["b"]
    with pytest.raises(tool.SeededBugError, match=message):
        tool.load(_write(path, edit(ENTRY)))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_checked_in_bug_applies_to_todays_tree_and_names_tests_that_exist(tmp_path: Path) -> None:
    tool = _tool()
    bugs = tool.load()
    assert {b.area for b in bugs} >= {"xenstored", "xenhv", "netback", "driver-model", "blkback"}
    for bug in bugs:
        target = tmp_path / bug.name / bug.file
        target.parent.mkdir(parents=True)
        target.write_text((ROOT / bug.file).read_text())
        tool.apply(tmp_path / bug.name, bug.file, bug.line, bug.new, bug.name, bug.after)
        assert target.read_text() != (ROOT / bug.file).read_text()
        for test in bug.tests:
            path, _, function = test.partition("::")
            assert (ROOT / path).exists(), f"{bug.name}: {path} does not exist"
            if function:
                assert f"def {function}(" in (ROOT / path).read_text(), f"{bug.name}: no test {test}"


def test_tests_that_would_import_the_installed_tree_instead_of_the_changed_copy_are_refused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the copy's `xenpv` namespace ahead of it, the editable install would be imported: the bug
    would be tried on code that does not have it, and every verdict would be 'not caught'."""
    tool = _tool()
    bug = next(b for b in tool.load() if b.name == "hvm-param-index-off-by-one")
    monkeypatch.setattr(tool, "PACKAGES", tuple(p for p in tool.PACKAGES if p != "backends"))
    with pytest.raises(tool.SeededBugError, match=r"would import xenpv\.backends\.xenhv\.hypercall from .*"
                                                  r"not from the changed copy"):
        tool.run_bug(bug, sys.executable, list(bug.tests), None)
