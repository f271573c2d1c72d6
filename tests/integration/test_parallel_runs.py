"""Runs side by side from one checkout: pytest sessions, pytest-xdist workers and `xenpv run --artifacts`
each have paths of their own, and nobody deletes what another kept."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]

TOP = Path(__file__).resolve().parents[2]

# One test, failing or passing as XENPV_INNER_FAIL says, that boots a guest on the session's dom0.
INNER = '''
import os, time
import pytest

@pytest.mark.integration
def test_guest(boot_guest):
    g = boot_guest("default")
    assert "XENBUS" in g.console.run("devices")
    if os.environ.get("XENPV_INNER_FAIL") == os.environ.get("PYTEST_XDIST_WORKER", "main"):
        assert False, "deliberate"
    time.sleep(float(os.environ.get("XENPV_INNER_LINGER", "0")))
'''


def _sessions(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def _logs(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*.log")}


def _kept_for_failure(out: str) -> Path:
    """The directory the failure report names; it holds the failed test's machine logs."""
    m = re.search(r"artifacts kept in (\S+)", out)
    assert m, out
    path = Path(m.group(1))
    assert (path / "default" / "qemu.log").exists() and (path / "default" / "qtest.log").exists(), path
    return path


def _run(pytester: pytest.Pytester, art: Path, *args: str, fail: str | None = None,
         linger: float = 0) -> subprocess.Popen[str]:
    env = {"XENPV_INNER_LINGER": str(linger)}
    if fail is not None:
        env["XENPV_INNER_FAIL"] = fail
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--rootdir={pytester.path}",
           f"--xenpv-artifacts={art}", *args, str(pytester.path / "test_inner.py")]
    # An inner session is a session of its own, even when this one is an xdist worker.
    outer = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    return subprocess.Popen(cmd, cwd=pytester.path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**outer, **env})


def _finish(p: subprocess.Popen[str]) -> tuple[int, str]:
    out, _ = p.communicate(timeout=300)
    return p.returncode, out


def test_a_later_session_keeps_an_earlier_sessions_failure(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """The same test fails in one session and then passes in the next, from the same checkout: the
    first session's artifacts (its test's logs and its dom0's xenhv and xenstored logs) stay as they were."""
    pytester.makepyfile(test_inner=INNER)
    art = tmp_path / "art"
    status, out = _finish(_run(pytester, art, fail="main"))
    assert status == 1, out
    _kept_for_failure(out)
    kept = _logs(art)
    assert {"xenhv.log", "xenstored.log", "qemu.log"} <= {p.name for p in kept}, kept

    status, out = _finish(_run(pytester, art))
    assert status == 0, out
    assert _logs(art) == kept

    (first,) = _sessions(art)  # the passing session removed its own directory, empty, and nothing else
    assert {p.relative_to(first).as_posix() for p in kept} >= {"host-services/xenhv.log", "host-services/xenstored.log"}


@pytest.mark.slow
@pytest.mark.exclusive("nested-runs")  # each runs several guests at once itself
def test_two_sessions_side_by_side(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(test_inner=INNER)
    art = tmp_path / "art"
    failing = _run(pytester, art, fail="main")
    passing = _run(pytester, art, linger=3)  # ends after the failing one kept its logs
    (s1, out1), (s2, out2) = _finish(failing), _finish(passing)
    assert (s1, s2) == (1, 0), out1 + out2
    kept = _kept_for_failure(out1)
    assert {"xenhv.log", "xenstored.log"} <= {p.name for p in _logs(art)}
    assert f"xenpv: this session's artifacts are kept in {kept.parent}" in out1


@pytest.mark.slow
@pytest.mark.exclusive("nested-runs")  # each runs several guests at once itself
def test_xdist_workers_keep_their_own_dom0_logs(pytester: pytest.Pytester, tmp_path: Path) -> None:
    """Two workers run the same test; it fails on gw0 and passes, later, on gw1. gw0's dom0 logs stay."""
    pytester.makepyfile(test_inner=INNER)
    art = tmp_path / "art"
    status, out = _finish(_run(pytester, art, "-n", "2", "--dist=each", fail="gw0", linger=3))
    assert status == 1, out
    assert re.search(r"1 failed, 1 passed", out), out
    _kept_for_failure(out)
    assert {"xenhv.log", "xenstored.log"} <= {p.name for p in _logs(art)}
    (session,) = _sessions(art)
    kept = {p.relative_to(session).as_posix() for p in _logs(art)}
    assert {"gw0/host-services/xenhv.log", "gw0/host-services/xenstored.log"} <= kept, kept
    assert not any(k.startswith("gw1/") for k in kept), kept  # the passing worker kept nothing


def test_xenpv_runs_on_one_artifacts_directory_each_get_their_own(tmp_path: Path) -> None:
    art = tmp_path / "shared"
    cmd = [sys.executable, "-m", "xenpv.harness.cli", "run", "--artifacts", str(art), "guests/default.yaml"]
    runs = [subprocess.Popen(cmd, cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in runs]
    for out, err, status in results:
        assert status == 0, err[-3000:]
        # Each did the whole job: unplug, then I/O on the PV disk and NIC.
        assert "emulated disks (QMP): hda: unplugged" in out, out[-3000:]
        written = re.search(r"wrote 16 sectors at 2048 sha256 (\w+)", out)
        read = re.search(r"^sha256 (\w+) bytes 8192$", out, re.M)
        assert written and read and written.group(1) == read.group(1), out[-3000:]
        assert "3/3 replies" in out
    dirs = []
    for out, _, _ in results:
        (line,) = [ln for ln in out.splitlines() if ln.startswith("artifacts: ")]
        dirs.append(Path(line.removeprefix("artifacts: ")))
    assert dirs[0] != dirs[1] and {d.parent for d in dirs} == {art}
    for d in dirs:
        assert (d / "qemu.log").exists() and (d / "host" / "xenhv.log").exists()
