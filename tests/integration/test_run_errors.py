"""Settings `xenpv` cannot use get one line naming the setting and the reason, exit status 2, and nothing
left behind: $XENPV_RUNDIR_BASE missing, not a directory, read-only or too long for AF_UNIX socket paths;
--artifacts on a read-only mount or on a file; a guest file that is not UTF-8.

Read-only mounts are made in a mount namespace of the command's own (unshare), so they vanish with it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from xenpv.base.rundir import AF_UNIX_PATH_MAX, ENV as RUNDIR_ENV, owner_of
from xenpv.harness.netns import list_namespaces

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]
RO_MOUNT = 'mount -t tmpfs -o ro xpv-ro "$0" && exec "$@"'


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="xpvt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _xenpv(*args: str, env: dict[str, str] | None = None, read_only: Path | None = None,
           command: str = "run") -> tuple[subprocess.CompletedProcess[str], str]:
    """`xenpv COMMAND ARGS`, with `read_only` a read-only mount in its own mount namespace; returns the
    result and the single line it printed on stderr (the test fails if there is not exactly one)."""
    argv = [sys.executable, "-m", "xenpv.harness.cli", command, *args]
    if read_only is not None:
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", RO_MOUNT, str(read_only), *argv]
    proc = subprocess.Popen(argv, cwd=TOP, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    stdout, stderr = proc.communicate(timeout=120)
    out = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, out.stderr
    # unshare and sh exec what they run: xenpv is the process started here, whose pid its namespace would name.
    ours = [n for n in list_namespaces() if (o := owner_of(n)) is not None and o.pid == proc.pid]
    assert not ours, f"namespaces left behind: {ours}"
    return out, lines[0]


@pytest.mark.parametrize("what, reason", [("missing", "no such directory"), ("file", "not a directory")])
def test_rundir_base_that_is_not_a_directory(base: Path, what: str, reason: str) -> None:
    target = base / what
    if what == "file":
        target.write_text("")
    out, line = _xenpv("guests/default.yaml", env={RUNDIR_ENV: str(target)})
    assert out.returncode == 2
    assert line == f"xenpv: {RUNDIR_ENV}={target}: {reason}"


def test_rundir_base_on_a_read_only_mount(base: Path) -> None:
    out, line = _xenpv("guests/default.yaml", env={RUNDIR_ENV: str(base)}, read_only=base)
    assert out.returncode == 2
    assert line == f"xenpv: {RUNDIR_ENV}={base}: read-only file system"


def test_rundir_base_too_long_for_socket_paths(base: Path) -> None:
    deep = base / ("d" * (AF_UNIX_PATH_MAX - len(str(base)) - 20))
    deep.mkdir()
    out, line = _xenpv("guests/default.yaml", env={RUNDIR_ENV: str(deep)})
    assert out.returncode == 2
    assert line.startswith(f"xenpv: {RUNDIR_ENV}={deep}: too long for the sockets of a run directory: ")
    assert f"AF_UNIX allows {AF_UNIX_PATH_MAX}" in line
    assert list(deep.iterdir()) == []  # no run directory made


def test_artifacts_on_a_read_only_mount(base: Path) -> None:
    art = base / "art"
    art.mkdir()
    out, line = _xenpv("--artifacts", str(art), "guests/default.yaml", env={RUNDIR_ENV: str(base)}, read_only=art)
    assert out.returncode == 2
    assert line == f"xenpv: --artifacts {art}: cannot make a directory in it: Read-only file system"
    assert list(base.iterdir()) == [art] and list(art.iterdir()) == []


def test_artifacts_that_is_a_file(base: Path) -> None:
    art = base / "art"
    art.write_text("")
    out, line = _xenpv("--artifacts", str(art), "guests/default.yaml", env={RUNDIR_ENV: str(base)})
    assert out.returncode == 2
    assert line == f"xenpv: --artifacts {art}: not a directory"
    assert list(base.iterdir()) == [art]


def test_clean_with_an_unusable_rundir_base(base: Path) -> None:
    out, line = _xenpv(env={RUNDIR_ENV: str(base / "missing")}, command="clean")
    assert out.returncode == 2
    assert line == f"xenpv: {RUNDIR_ENV}={base / 'missing'}: no such directory"


def test_guest_file_that_is_not_utf8(base: Path) -> None:
    guest = base / "latin1.yaml"
    guest.write_bytes("name: caf\xe9\n".encode("latin-1"))
    out, line = _xenpv(str(guest), env={RUNDIR_ENV: str(base)})
    assert out.returncode == 2
    assert line.startswith(f"xenpv: {guest}: ") and "UTF-8" in line
    assert list(base.iterdir()) == [guest]
