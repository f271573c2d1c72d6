"""The test command of ci/mutation.sh: pytest in a child process, its outcome told to mutmut 2 in the one
way mutmut reads: exit status 1 means "a test failed, the mutant is killed", anything else "survived".

pytest says a mutant broke the code in more ways than 1: 2 (an import failed during collection: the mutant
made the module unimportable), 3 (internal error), 4 (usage error), or death by a signal (a mutant that
crashes the interpreter). Each of those is a detected mutant; mutmut 2 would count it as a survivor
(its tests_pass is `returncode != 1`). 0 passes, and 5 (no test collected: a selection of tests that
no longer exist) is no verdict: both are 0, so mutmut --rerun-all runs the whole list.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PASSED, NO_TESTS = 0, 5
KILLED = 1
# A run that takes longer than this hangs (pytest-timeout ends a test that spins, but not one blocked where
# its timer cannot reach, as a mutant that made an eventfd blocking did in xenstored's ring fuzz test): the
# whole run is ended and the mutant counted as detected, as mutmut's own timeout would.
DEADLINE_ENV = "XENPV_MUTATION_RUN_DEADLINE"
DEFAULT_DEADLINE = 300.0

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the runner ends, however it ends (mutmut or a deadline killing the runner
    left its pytest spinning on a looping mutant)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run(args: list[str], deadline: float) -> int:
    """pytest on `args` in its own process group; the exit status mutmut should see."""
    child = subprocess.Popen([sys.executable, "-m", "pytest", *args], preexec_fn=_die_with_parent,
                             start_new_session=True)
    try:
        rc = child.wait(deadline)
    except subprocess.TimeoutExpired:
        # The group: pytest and whatever it started (a daemon fixture's process) go together.
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        print(f"mutation_runner: the run hung for {deadline:.0f} s: ended, counted as a kill", file=sys.stderr)
        return KILLED
    return PASSED if rc in (PASSED, NO_TESTS) else KILLED


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:], float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE))))
