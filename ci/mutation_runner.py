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
import signal
import subprocess
import sys

PASSED, NO_TESTS = 0, 5

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child: SIGKILL when the runner ends, however it ends (mutmut or a deadline killing the runner
    left its pytest spinning on a looping mutant)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":
    rc = subprocess.run([sys.executable, "-m", "pytest", *sys.argv[1:]], preexec_fn=_die_with_parent).returncode
    sys.exit(0 if rc in (PASSED, NO_TESTS) else 1)
