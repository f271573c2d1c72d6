"""Python stacks for crashes of the project's processes (faulthandler).

Every `python -m xenpv...` process calls `enable_crash_traces()` first thing: a fatal signal (SIGSEGV,
SIGBUS, SIGFPE, SIGABRT, SIGILL) then writes the Python stack of every thread to stderr before the
process dies, and SIGUSR1 writes them without stopping it (to see where a hung process is). The harness
sends every child's stderr to its log (base.process.Supervised, the agent's console log), so a crash
leaves its stack next to the exit status that ProcessDied reports.
"""
from __future__ import annotations

import faulthandler
import signal
import sys
from typing import TextIO

DUMP_SIGNAL = signal.SIGUSR1


def enable_crash_traces(stream: TextIO | None = None) -> None:
    """Dump all threads' Python stacks to `stream` (default stderr) on a fatal signal and on SIGUSR1."""
    out = stream if stream is not None else sys.stderr
    faulthandler.enable(file=out, all_threads=True)
    faulthandler.register(DUMP_SIGNAL, file=out, all_threads=True, chain=False)
