"""`xenpv run` cleans up after itself whatever ends it, and what a killed run left is reaped.

Each test starts the main job as a user would (`xenpv run`, in a session of its own so that a signal to its
process group is what a terminal's Ctrl-C or hang-up sends), signals it at one point, and then looks for
what the run owned: network namespaces (and so their TAPs and /run/netns mounts), run directories, and
processes, found by the owner mark (base.owner) and by the process groups the run's children had.
Other sessions may run at the same time: only what carries this run's mark counts."""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from xenpv.base.owner import ENV as OWNER_ENV, Owner, marked_processes, proc_stat
from xenpv.base.rundir import ENV as RUNDIR_ENV, owner_of, run_dirs
from xenpv.harness.netns import list_namespaces

pytestmark = pytest.mark.integration

TOP = Path(__file__).resolve().parents[2]
DEADLINE = 120.0


@pytest.fixture
def rundir_base() -> Iterator[Path]:
    """A base for the runs' directories of this test alone (short: sockets live there), so no other
    session's reaper can remove them before the test looks."""
    base = Path(tempfile.mkdtemp(prefix="xpvt", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _wait(cond: Callable[[], object], what: str, proc: subprocess.Popen[bytes] | None = None,
          timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Left:
    namespaces: list[str]
    run_dirs: list[Path]
    processes: list[int]

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.run_dirs or self.processes)


def left_by(owner: Owner, base: Path) -> Left:
    return Left([n for n in list_namespaces() if owner_of(n) == owner],
                sorted(d.path for d in run_dirs(base) if d.owner == owner),
                sorted(p.pid for p in marked_processes() if p.owner == owner))


def _ticks_now() -> int:
    """Now, in the unit of a process's start time (clock ticks after boot)."""
    return int(float(Path("/proc/uptime").read_text().split()[0]) * os.sysconf("SC_CLK_TCK")) + 1


def _in_groups(pgids: set[int], started_before: int) -> list[int]:
    """Live processes in these process groups that are older than `started_before`: pids are reused (often,
    with pid_max 32768), and a group number with them, but what was in the groups when the snapshot was
    taken is older than that."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = proc_stat(int(entry.name))
            if st is not None and st.pgid in pgids and st.state not in ("Z", "X") and st.start < started_before:
                found.append(st.pid)
    return found


def _netns_mounts(name: str) -> list[str]:
    """The mounts of namespace `name`'s /run/netns entry, in our mount namespace and init's."""
    return [line for mounts in ("/proc/self/mountinfo", "/proc/1/mountinfo")
            for line in Path(mounts).read_text().splitlines() if f"/run/netns/{name} " in line]


@dataclass
class Run:
    """`xenpv -v run [--console] GUEST` in a session of its own; its output is collected as it comes."""

    base: Path
    console: bool = False
    guest: str = "guests/default.yaml"
    proc: subprocess.Popen[bytes] = field(init=False)
    owner: Owner = field(init=False)
    output: bytearray = field(default_factory=bytearray)

    def __post_init__(self) -> None:
        argv = [sys.executable, "-u", "-m", "xenpv.harness.cli", "-v", "run", self.guest]
        if self.console:
            argv.append("--console")
        self.proc = subprocess.Popen(argv, cwd=TOP, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, RUNDIR_ENV: str(self.base)})
        owner = Owner.of(self.proc.pid)
        assert owner is not None
        self.owner = owner
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while chunk := self.proc.stdout.read1(65536):
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    def wait_for_output(self, needle: str) -> None:
        _wait(lambda: needle in self.text, f"{needle!r} in the output", self.proc)

    def wait_for_run_dir(self, tag: str) -> None:
        _wait(lambda: any(d.path.name.startswith(f"xpv-{tag}-") for d in run_dirs(self.base) if d.owner == self.owner),
              f"the run directory xpv-{tag}-*", self.proc)

    def finish(self, timeout: float = 60.0) -> int:
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the run did not end within {timeout:.0f}s of the signal:\n{self.text[-3000:]}")
        self._reader.join(10)
        return status

    def kill_for_good(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Snapshot:
    """What the run holds while it runs: its namespace, whether the namespace has the domain's TAP, and the
    process groups of its children."""

    namespace: str
    has_tap: bool
    pgids: set[int]
    taken: int  # clock ticks after boot


def snapshot(run: Run) -> Snapshot:
    _wait(lambda: any(owner_of(n) == run.owner for n in list_namespaces()), "the run's namespace", run.proc)
    (ns,) = [n for n in list_namespaces() if owner_of(n) == run.owner]
    links = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True).stdout
    pgids = {p.pgid for p in marked_processes() if p.owner == run.owner}
    return Snapshot(ns, bool(re.search(r"\bvif\d+\.\d+\b", links)), pgids, _ticks_now())


def assert_nothing_left(run: Run, snap: Snapshot) -> None:
    """A TAP lives only inside its namespace, and the namespace lives while its /run/netns mount or a
    process in it does: with the name, the mount and every process of the run gone, so are the TAPs.
    (The namespace's inode is no witness: the kernel gives it to the next namespace made.)"""
    left = left_by(run.owner, run.base)
    assert not left, f"left behind: {left}\n{run.text[-3000:]}"
    assert snap.namespace not in list_namespaces()
    assert not os.path.lexists(f"/run/netns/{snap.namespace}")
    assert not _netns_mounts(snap.namespace), "the namespace's mount is still there"
    assert not _in_groups(snap.pgids, snap.taken), f"processes left in the run's process groups {sorted(snap.pgids)}"


def _send(run: Run, sig: int) -> None:
    # A terminal sends SIGINT and SIGHUP to the foreground process group; `kill` sends SIGTERM to the pid.
    if sig == signal.SIGTERM:
        os.kill(run.proc.pid, sig)
    else:
        os.killpg(run.proc.pid, sig)


SIGNALS = [pytest.param(s, id=s.name) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_during_boot_leaves_nothing(rundir_base: Path, sig: signal.Signals) -> None:
    run = Run(rundir_base)
    try:
        snap = snapshot(run)
        run.wait_for_run_dir("default")  # the machine is being launched: dom0 and its namespace exist
        _send(run, sig)
        status = run.finish()
    finally:
        run.kill_for_good()
    assert status == 128 + sig, run.text[-3000:]
    assert f"interrupted by {sig.name}" in run.text
    assert_nothing_left(run, snap)


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_at_the_console_leaves_nothing(rundir_base: Path, sig: signal.Signals) -> None:
    run = Run(rundir_base, console=True)
    try:
        run.wait_for_output("guest> ")
        snap = snapshot(run)
        assert snap.has_tap and len(snap.pgids) >= 5, snap  # QEMU, agent, xenhv, xenstored, blkback, netback
        _send(run, sig)
        status = run.finish()
    finally:
        run.kill_for_good()
    assert status == 128 + sig, run.text[-3000:]
    assert_nothing_left(run, snap)


@pytest.mark.parametrize("sig", SIGNALS)
def test_signals_during_teardown_do_not_cut_it_short(rundir_base: Path, sig: signal.Signals) -> None:
    """A first signal at the console, then a Ctrl-C every 20 ms until the run has exited: whichever step of
    the teardown they land in (an `ip netns del` included), everything is still removed."""
    run = Run(rundir_base, console=True)
    try:
        run.wait_for_output("guest> ")
        snap = snapshot(run)
        _send(run, sig)
        sent = 0
        while run.proc.poll() is None:
            time.sleep(0.02)
            try:
                os.killpg(run.proc.pid, signal.SIGINT)
                sent += 1
            except ProcessLookupError:
                break
        status = run.finish()
    finally:
        run.kill_for_good()
    assert sent > 0
    assert status == 128 + sig, run.text[-3000:]
    assert_nothing_left(run, snap)


def _xenpv(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xenpv.harness.cli", *args], cwd=TOP, capture_output=True,
                          text=True, timeout=180, env={**os.environ, RUNDIR_ENV: str(base)})


@pytest.fixture
def killed_run(rundir_base: Path) -> Iterator[tuple[Run, Snapshot, subprocess.Popen[bytes]]]:
    """A run killed with SIGKILL at its console, and a process marked as its own that outlived it (as a
    helper that escaped its parent-death signal would). Other sessions on the machine may reap that
    process too (it is theirs to reap), so tests only ask that it is gone, not who said so."""
    run = Run(rundir_base, console=True)
    try:
        run.wait_for_output("guest> ")
        snap = snapshot(run)
        os.kill(run.proc.pid, signal.SIGKILL)
        assert run.finish() == -signal.SIGKILL
    finally:
        run.kill_for_good()
    straggler = subprocess.Popen(["sleep", "300"], env={**os.environ, OWNER_ENV: str(run.owner)},
                                 start_new_session=True)
    try:
        # The run directories are in this test's own base, out of other sessions' reach: they must be there.
        assert left_by(run.owner, rundir_base).run_dirs
        yield run, snap, straggler
    finally:
        if straggler.poll() is None:
            straggler.kill()
        straggler.wait()


@pytest.mark.parametrize("command, says", [
    (["clean"], "removed run directory {}"),
    (["run", "guests/no-platform.yaml"], "xenpv: removed what earlier runs that died left behind:*run directory {}"),
], ids=["xenpv clean", "the next run"])
def test_what_a_killed_run_left_is_removed(killed_run, rundir_base: Path, command: list[str], says: str) -> None:
    run, snap, straggler = killed_run
    left = left_by(run.owner, rundir_base)
    out = _xenpv(rundir_base, *command)
    assert out.returncode == 0, out.stderr[-3000:]
    for d in left.run_dirs:
        assert fnmatch.fnmatch(out.stdout + out.stderr, f"*{says.format(d)}*")
    assert straggler.wait(10) == -signal.SIGKILL
    assert_nothing_left(run, snap)


def test_clean_never_touches_a_live_run(rundir_base: Path) -> None:
    run = Run(rundir_base, console=True)
    try:
        run.wait_for_output("guest> ")
        before = left_by(run.owner, rundir_base)
        out = _xenpv(rundir_base, "clean")
        assert out.returncode == 0, out.stderr
        assert left_by(run.owner, rundir_base) == before
        assert run.proc.stdin is not None
        run.proc.stdin.write(b"devices\nquit\n")
        run.proc.stdin.flush()
        assert run.finish() == 0, run.text[-3000:]
        assert "XENBUS\\VEN_XP&DEV_VBD" in run.text.split("guest> ", 1)[1]  # the console still answered
    finally:
        run.kill_for_good()
    assert not left_by(run.owner, rundir_base)
