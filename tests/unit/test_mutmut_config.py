"""ci/mutmut_config.py's classification of mutants that cannot change a rule (issue 18): what it skips must
really be equivalent, and what it keeps must run."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from xenpv.base.owner import proc_stat
from xenpv.base.process import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet: it runs no more."""
    st = proc_stat(pid)
    return st is None or st.state in ("Z", "X")


SOURCE = '''\
def f(payload):
    if not payload:
        raise XsError("EINVAL", "empty")
    if payload == b"x":
        raise XsError("EACCES", "no")
    raise ValueError("EINVAL", "other")
'''


def _config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutmut_config_under_test", ROOT / "ci" / "mutmut_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xserror_einval_mutated_to_an_unknown_name_is_skipped_as_its_fallback(tmp_path: Path) -> None:
    """XsError sends any name outside xsd_errors[] as EINVAL (backends/xenstored/errors.py), so
    XsError("XXEINVALXX") is XsError("EINVAL"); the message text next to it is skipped as before."""
    source = tmp_path / "mod.py"
    source.write_text(SOURCE)
    config = _config()
    lines = SOURCE.splitlines()

    def why(n: int, mutated: str) -> str | None:
        return config.classify(str(source), n, lines[n], mutated)

    assert why(2, '        raise XsError("XXEINVALXX", "empty")') == "fallback errno name"
    assert why(2, '        raise XsError("EINVAL", "XXemptyXX")') == "error message text"
    # Another name is a different errno on the wire, and another exception has no such fallback: they run.
    assert why(4, '        raise XsError("XXEACCESXX", "no")') is None
    assert why(5, '    raise ValueError("XXEINVALXX", "other")') is None


def test_selection_by_coverage_narrows_each_line_to_the_tests_that_ran_it(tmp_path: Path, monkeypatch) -> None:
    """The tests recorded for a line, in the group's file order; import-time lines and files outside the
    group select nothing (the whole list runs); ids are quoted for mutmut's shlex split."""
    from coverage import CoverageData

    config = _config()
    source = tmp_path / "backends" / "mod.py"
    source.parent.mkdir()
    source.write_text("x = 1\n")
    data = CoverageData(basename=str(tmp_path / ".coverage"))
    for context, lines in (("", [1]), ("tests/a.py::test_x[p-1]|run", [3, 4]), ("tests/b.py::test_y|run", [4]),
                           ("tests/b.py::test_y|setup", [5]), ("tests/other.py::test_z|run", [6]),
                           ("tests/dir/test_d.py::test_d|run", [4, 7])):
        data.set_context(context)
        data.add_lines({str(source): lines})
    data.write()
    # A directory in the group's list (as tests/unit/xenbus_interfaces is) selects the files under it.
    table = config.build_selection(tmp_path / ".coverage", ["tests/b.py", "tests/dir", "tests/a.py"], tmp_path)
    assert table == {"backends/mod.py": {"3": ["tests/a.py::test_x[p-1]"],
                                         "4": ["tests/b.py::test_y", "tests/dir/test_d.py::test_d",
                                               "tests/a.py::test_x[p-1]"],
                                         "5": ["tests/b.py::test_y"], "7": ["tests/dir/test_d.py::test_d"]}}
    (tmp_path / "select.json").write_text(config.json.dumps(table))
    monkeypatch.setenv(config.SELECTION_ENV, str(tmp_path / "select.json"))
    monkeypatch.setenv(config.RUNNER_ENV, "python -m pytest -x")
    assert config.selected_command("backends/mod.py", 3) == ("python -m pytest -x tests/b.py::test_y tests/dir/test_d.py::test_d "
                                                                "'tests/a.py::test_x[p-1]'")
    assert config.selected_command("backends/mod.py", 0) is None  # import time: the whole list
    assert config.selected_command("backends/mod.py", 5) is None  # only tests/other.py ran it


@pytest.mark.slow  # five pytest runs, one after another
def test_the_mutation_runner_reports_every_broken_run_as_a_kill(tmp_path: Path) -> None:
    """mutmut 2 counts only exit status 1 as a kill: ci/mutation_runner.py turns pytest's other failures (a
    mutant that breaks an import, a crash) into 1, and leaves a pass (and an empty selection) as 0."""
    import subprocess
    import sys

    cases = {
        "passes.py": ("def test_ok():\n    assert True\n", 0),
        "fails.py": ("def test_bad():\n    assert False\n", 1),
        "breaks_import.py": ("import no_such_module_here\n\ndef test_ok():\n    pass\n", 1),  # pytest: 2
        "crashes.py": ("import os, signal\n\ndef test_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n", 1),
        "empty.py": ("X = 1\n", 0),  # pytest: 5
    }
    for name, (text, want) in cases.items():
        (tmp_path / f"test_{name}").write_text(text)
        done = subprocess.run([sys.executable, str(ROOT / "ci" / "mutation_runner.py"), "-q", "-p", "no:cacheprovider",
                               "-p", "no:faulthandler", str(tmp_path / f"test_{name}")], capture_output=True, timeout=120,
                              cwd=tmp_path)
        assert done.returncode == want, (name, done.stdout[-500:])


def test_mutmuts_own_deadline_is_moved_out_of_the_way() -> None:
    """mutmut kills a run at 10 x its baseline and can then report it as a survivor (-9 is not 1): the
    baseline it divides by is raised to MIN_BASELINE_SECONDS, never lowered."""
    from types import SimpleNamespace

    config = _config()
    quick, slow = SimpleNamespace(baseline_time_elapsed=4.2), SimpleNamespace(baseline_time_elapsed=900.0)
    config.widen_deadline(quick)
    config.widen_deadline(slow)
    assert (quick.baseline_time_elapsed, slow.baseline_time_elapsed) == (config.MIN_BASELINE_SECONDS, 900.0)


def test_a_mutant_that_loops_inside_hypothesis_ends_its_run() -> None:
    """A mutant that makes a Hypothesis test loop for ever: pytest-timeout's SIGALRM raises inside the test,
    Hypothesis catches that and goes on shrinking (the run hung for minutes per xenstored mutant); with the
    options ci/mutation.sh gives its runner the whole run ends, as a kill."""
    import os
    import re
    import shlex
    import signal
    import subprocess
    import sys
    import tempfile

    script = (ROOT / "ci" / "mutation.sh").read_text()
    runner = re.search(r'export XENPV_MUTATION_RUNNER="\$py \$work/ci/mutation_runner.py ([^"]*)"', script)
    assert runner, "ci/mutation.sh no longer sets XENPV_MUTATION_RUNNER as this test reads it"
    with tempfile.TemporaryDirectory() as tmp:
        test = Path(tmp) / "test_loops.py"
        test.write_text("from hypothesis import given, settings, strategies as st\n\n"
                        "@settings(deadline=None, max_examples=5, database=None)\n@given(st.integers())\n"
                        "def test_loops(x):\n    while True:\n        pass\n")
        # The script's options, with a shorter deadline than its 20 s (a later -o wins).
        args = [*shlex.split(runner.group(1)), "-o", "timeout=2", "-p", "no:faulthandler", str(test)]
        # A session of its own: if the run hangs, the runner and its pytest go together.
        run = subprocess.Popen([sys.executable, str(ROOT / "ci" / "mutation_runner.py"), *args], cwd=tmp,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = run.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
            raise AssertionError("a looping Hypothesis test held the mutation runner for 60 s") from None
    assert run.returncode == 1, output[-500:]


def test_the_runners_pytest_dies_with_the_runner(tmp_path: Path) -> None:
    """A runner killed from outside (mutmut stopping, a deadline) takes its pytest with it: a looping mutant
    must not keep a CPU busy after its run was given up."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "test_spin.py").write_text("import os, time\n\ndef test_spin():\n"
                                           "    open('pid', 'w').write(str(os.getpid()))\n    while True:\n"
                                           "        time.sleep(0.01)\n")
    runner = subprocess.Popen([sys.executable, str(ROOT / "ci" / "mutation_runner.py"), "-q", "-p", "no:cacheprovider",
                               "-p", "no:faulthandler", str(tmp_path / "test_spin.py")], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
            assert runner.poll() is None and time.monotonic() < deadline, "the test never started"
            time.sleep(0.05)
        child = int((tmp_path / "pid").read_text())
        runner.kill()
        runner.wait(10)
        wait_for(lambda: _ended(child), timeout=10, what="the runner's pytest to end with it")
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _group_test_lists() -> dict[str, list[str]]:
    script = (ROOT / "ci" / "mutation.sh").read_text()
    return {m.group(1): m.group(2).split() for m in re.finditer(r'^tests\[([\w-]+)\]="([^"]*)"', script, re.M)}


def test_each_group_lists_its_test_files_so_that_pytest_runs_all_of_them() -> None:
    """pytest given a file and then the directory holding it runs only that file from the directory: a
    group's whole list must not name a directory below an earlier entry, or every mutant survives the tests
    the directory was meant to add (the installer's DriverDatabase keys did, until this was caught)."""
    lists = _group_test_lists()
    assert set(lists) == {"requests", "xenstored", "xenhv", "driver-model"}
    for group, tests in lists.items():
        assert len(set(tests)) == len(tests), f"{group}: a test path is listed twice"
        for i, path in enumerate(tests):
            assert (ROOT / path).exists(), f"{group}: {path} does not exist"
            for earlier in tests[:i]:
                assert not earlier.startswith(path.rstrip("/") + "/"), f"{group}: {path} holds {earlier}, listed before"


@pytest.mark.slow  # it waits out the runner's deadline
def test_a_run_that_hangs_where_pytest_timeout_cannot_reach_is_ended_as_a_kill(tmp_path: Path) -> None:
    """A mutant can make a test block in a way pytest-timeout does not end (xenstored's ring fuzz test on a
    blocking eventfd held a run for 11 minutes): the runner's own deadline ends the run, with every process
    it started, and reports the mutant as detected."""
    import os
    import subprocess
    import sys
    import time

    (tmp_path / "test_hang.py").write_text(
        "import os, signal, subprocess, sys, time\n\n"
        "def test_hang():\n"
        "    helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "    open('pids', 'w').write(f'{os.getpid()} {helper.pid}')\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "    os.read(os.eventfd(0), 8)  # blocks for good\n")
    start = time.monotonic()
    # The deadline must leave the run time to reach the test: the inner pytest's start-up is about 1.5 s of
    # CPU, and on a 2-core machine at load 12-17 a deadline of 3 s ended the run before the test began (no pids).
    done = subprocess.run([sys.executable, str(ROOT / "ci" / "mutation_runner.py"), "-q", "-p", "no:cacheprovider",
                           "-p", "no:faulthandler", str(tmp_path / "test_hang.py")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "XENPV_MUTATION_RUN_DEADLINE": "15"})
    assert done.returncode == 1 and "hung for 15 s" in done.stderr, done.stderr[-500:]
    assert time.monotonic() - start < 60
    for pid in map(int, (tmp_path / "pids").read_text().split()):
        wait_for(lambda: _ended(pid), timeout=10, what=f"process {pid} to end with the run")  # noqa: B023
