"""Cleaning up after runs: signals that end a run through its teardown, and a reaper for what runs that
died (SIGKILL, a crash, a power cut of the terminal) left behind.

- `SignalGuard`: SIGINT, SIGTERM and SIGHUP end a run the same way: the first raises `Interrupted` in the
  main thread, so the run's teardown (an ExitStack) runs; any later one, and any one that arrives once the
  teardown has begun, is only recorded, so a second Ctrl-C cannot cut the teardown short and leave the
  network namespace behind. Every teardown step has a deadline, so the wait is bounded.
- `reap()`: the resources of a run are marked with their owner (base.owner): run directories and network
  namespaces by name, processes by their environment. What belongs to an owner that is gone is removed:
  processes (with the process groups they lead) are killed first, as they hold the rest, then the network
  namespaces (their TAPs and /run/netns mounts go with them), then the run directories. `xenpv run` and
  each pytest session reap at their start; `xenpv clean` reaps on demand; a run also sweeps its own
  resources at the very end of its teardown, whatever an interrupted step may have missed.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Callable, TypeVar

from xenpv.base.owner import MarkedProcess, Owner, marked_processes, proc_stat
from xenpv.base.rundir import owner_of, remove_run_dir, run_dirs
from xenpv.harness.netns import NetnsError, delete_namespace, list_namespaces
from xenpv.harness.forkserver import stop_shared

log = logging.getLogger("harness.cleanup")

TERMINATING = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
KILL_DEADLINE = 5.0


class Interrupted(KeyboardInterrupt):
    """The run was ended by SIGINT, SIGTERM or SIGHUP; a KeyboardInterrupt, so code that handles Ctrl-C
    handles all three."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        """What a shell reports for a process killed by the signal."""
        return 128 + self.signum


def _say(text: str) -> None:
    # After SIGHUP the terminal may be gone: a message that cannot be written is not an error.
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class SignalGuard:
    """SIGINT, SIGTERM and SIGHUP while it is entered (main thread only): the first raises Interrupted,
    then, as after `teardown()`, they are recorded and not raised. On leaving, a signal recorded during a
    normal teardown is raised as Interrupted, so the exit status says the run was interrupted. At most
    one Interrupted is raised however many signals come. `run_guarded` is how a run uses it."""

    def __init__(self) -> None:
        self.tearing_down = False
        self.received: list[int] = []
        self._told = False
        self._saved: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}

    def __enter__(self) -> "SignalGuard":
        for sig in TERMINATING:
            self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.tearing_down:
            if not self._told:  # said once, however many follow
                self._told = True
                _say(f"xenpv: {signal.Signals(signum).name}: still cleaning up, a few seconds at most "
                     f"(SIGKILL would leave the run's resources to `xenpv clean`)")
            return
        # Set before raising: the teardown this starts must not be cut short by the next signal.
        self.tearing_down = True
        log.info("%s: the run ends; tearing down", signal.Signals(signum).name)
        raise Interrupted(signum)

    def teardown(self) -> None:
        self.tearing_down = True

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.received:
            # The process is on its way out with an exit status that names the signal: from here the
            # signals are ignored, so that one more Ctrl-C cannot turn that exit into a traceback or a
            # death by signal (at exit Python would put back the default action of a handler it had).
            for sig in TERMINATING:
                signal.signal(sig, signal.SIG_IGN)
            if exc is None:
                raise Interrupted(self.received[0])
            return
        for sig, handler in self._saved.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


T = TypeVar("T")


def run_guarded(body: Callable[[contextlib.ExitStack], T]) -> T:
    """Run `body(cleanup)`: each resource it makes, it registers on `cleanup` (an ExitStack) as soon as
    it exists. SIGINT, SIGTERM and SIGHUP end the body (Interrupted); the teardown then runs to its end,
    whatever else arrives, and is followed by a sweep of anything of this process's that a step cut
    short by the one interruption left (reap(only=us)). Main thread only."""
    with SignalGuard() as guard:
        try:
            with contextlib.ExitStack() as cleanup:
                try:
                    return body(cleanup)
                finally:
                    # Set here, inside the body's scope, so that no signal can land between the body and
                    # the teardown; the handler sets it too, before the one Interrupted it raises.
                    guard.teardown()
        finally:
            stop_shared()  # the agent fork server serves the whole run: it goes with the run's teardown
            left = reap(only=Owner.current())
            if left:
                log.warning("the teardown left these behind; removed: %s", "; ".join(left.lines()))


@dataclass
class Reaped:
    processes: list[MarkedProcess] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.processes or self.namespaces or self.run_dirs)

    def lines(self) -> list[str]:
        return ([f"process {p.pid} (group {p.pgid}) of run {p.owner}" for p in self.processes]
                + [f"network namespace {n}" for n in self.namespaces]
                + [f"run directory {d}" for d in self.run_dirs])


def _ancestors() -> set[int]:
    """Our own pid and those of our ancestors: never killed, whatever their environment says."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        st = proc_stat(pid)
        if st is None:
            break
        pid = st.ppid
    return found


def reap(only: Owner | None = None, dry_run: bool = False) -> Reaped:
    """Remove what belongs to owners that are gone; with `only`, everything of that owner instead (a run
    sweeping its own leftovers at its end). `dry_run` lists without removing."""

    def wanted(owner: Owner) -> bool:
        return owner == only if only is not None else not owner.alive()

    done = Reaped()
    spared = _ancestors()
    seen: set[int] = set()
    deadline = time.monotonic() + KILL_DEADLINE
    while True:
        # Again until none is left: a process may fork while we look.
        victims = [p for p in marked_processes() if p.pid not in spared and wanted(p.owner)]
        fresh = [p for p in victims if p.pid not in seen]
        done.processes += fresh
        seen.update(p.pid for p in fresh)
        if dry_run or not victims:
            break
        if time.monotonic() >= deadline:
            log.warning("processes still alive after SIGKILL: %s", ", ".join(str(p.pid) for p in victims))
            break
        for p in victims:
            try:
                if p.pgid == p.pid and p.pgid not in spared and p.pgid != os.getpgrp():
                    os.killpg(p.pgid, signal.SIGKILL)  # with any helper it forked that lost the marker
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.02)

    for name in list_namespaces():
        owner = owner_of(name)
        if owner is not None and wanted(owner):
            try:
                if dry_run or delete_namespace(name):
                    done.namespaces.append(name)
            except NetnsError as exc:
                if name in list_namespaces():  # not another reaper's doing
                    log.warning("cannot remove namespace %s: %s", name, exc)

    for rd in run_dirs():
        if wanted(rd.owner):
            if not dry_run:
                remove_run_dir(rd.path)
            done.run_dirs.append(rd.path)

    for line in done.lines():
        log.info("%s %s", "would remove" if dry_run else "removed", line)
    return done


def reap_stale() -> Reaped:
    """At the start of a run: remove what earlier runs that died left behind, saying so."""
    reaped = reap()
    if reaped:
        _say("xenpv: removed what earlier runs that died left behind:\n  " + "\n  ".join(reaped.lines()))
    return reaped
