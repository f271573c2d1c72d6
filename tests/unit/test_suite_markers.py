"""The suite's own selection and guards: markers by directory, peers that must be there, the timeout.

Each check runs pytest in a subprocess over this checkout, as CI and a developer run it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The conformance directory, two integration modules and an unmarked one: enough to see what each
# expression selects, without importing the whole suite four times.
PATHS = ["tests/conformance", "tests/integration/test_agent.py", "tests/integration/test_cli.py",
         "tests/unit/test_guest_schema.py"]
PEERS = ("xenstore-", "qemu-system-x86_64")  # what the conformance tests need on PATH


def _pytest(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist",
                           f"--xenpv-artifacts={tmp_path / 'artifacts'}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)


def _collected(tmp_path: Path, expression: str | None) -> set[str]:
    r = _pytest(tmp_path, "--collect-only", "-q", *(["-m", expression] if expression else []), *PATHS)
    assert r.returncode in (0, 5), r.stdout[-3000:] + r.stderr[-3000:]  # 5: nothing selected
    return {line for line in r.stdout.splitlines() if "::" in line}


def test_markers_select_by_directory(tmp_path: Path) -> None:
    everything = _collected(tmp_path, None)
    conformance = {t for t in everything if t.startswith("tests/conformance/")}
    integration = {t for t in everything if t.startswith("tests/integration/")}
    assert conformance and integration and everything - conformance - integration
    assert _collected(tmp_path, "conformance") == conformance
    assert _collected(tmp_path, "integration") == integration
    # What a quick run selects starts no QEMU, no dom0 and no peer.
    assert _collected(tmp_path, "not integration and not conformance") == everything - conformance - integration


def test_a_missing_peer_fails_the_conformance_tests_instead_of_skipping_them(tmp_path: Path) -> None:
    # PATH without xenstore-utils and the stock QEMU (everything else stays: the harness runs `ip`...):
    # the set-up installs them, so their absence is an error.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            if not name.startswith(PEERS) and not (bin_dir / name).exists():
                (bin_dir / name).symlink_to(Path(d) / name)
    env = {**os.environ, "PATH": str(bin_dir)}
    r = _pytest(tmp_path, "-q", "-rfEs", "tests/conformance/test_xenstore_utils.py",
                "tests/conformance/test_vhost_user_qemu.py", env=env)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert " skipped" not in out.splitlines()[-1], out[-3000:]
    assert "xenstore-utils is not installed" in out and "qemu-system-x86_64 is not on PATH" in out, out[-3000:]


def test_the_suite_has_a_default_timeout(pytestconfig: pytest.Config) -> None:
    assert float(pytestconfig.getini("timeout")) == 300
    assert pytestconfig.getini("timeout_method") == "signal"


def test_a_hung_test_fails_with_its_stack_and_its_teardown_runs(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(
        "import time, pytest\n"
        "@pytest.fixture\n"
        "def resource():\n"
        "    yield\n"
        "    print('TEARDOWN RAN')\n"
        "def test_hangs(resource):\n"
        "    time.sleep(60)\n")
    # The project's configuration (its timeout method), a short timeout for this one run.
    r = _pytest(tmp_path, "-c", str(ROOT / "pyproject.toml"), f"--rootdir={tmp_path}", "-o", "timeout=1", "-s",
                str(tmp_path / "test_hang.py"))
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Timeout" in out and "time.sleep(60)" in out, out[-3000:]
    assert "TEARDOWN RAN" in out, out[-3000:]
