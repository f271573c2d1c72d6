"""The project's processes run faulthandler (base.crashtrace): a crash leaves every thread's Python stack in
the process log, and SIGUSR1 writes the stacks of a live process. Proved on a real xenstored."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from xenpv.base.process import Supervised, unix_socket_accepting, wait_for


def test_a_crashed_daemon_leaves_its_python_stack_in_its_log(tmp_path: Path) -> None:
    sock, out = tmp_path / "xenstored.sock", tmp_path / "xenstored.out"
    # cwd: a core file the crash may leave stays in tmp_path.
    proc = Supervised("xenstored", [sys.executable, "-m", "xenpv.backends.xenstored", "--socket", str(sock),
                                    "--log", str(tmp_path / "xenstored.log")], out, cwd=tmp_path).start()
    try:
        wait_for(lambda: unix_socket_accepting(sock), timeout=30, what="xenstored to listen", alive=[proc])
        os.kill(proc.pid, signal.SIGUSR1)
        wait_for(lambda: "serve_forever" in out.read_text(), timeout=30,
                 what="xenstored's stacks after SIGUSR1", alive=[proc])
        assert proc.alive()  # a dump on request does not stop it
        os.kill(proc.pid, signal.SIGSEGV)
        assert proc.popen is not None
        proc.popen.wait(30)
        assert proc.returncode == -signal.SIGSEGV
        crash = out.read_text().split("Fatal Python error: Segmentation fault", 1)
        assert len(crash) == 2, f"no fatal error report in the log:\n{out.read_text()}"
        assert 'File "' in crash[1] and "serve_forever" in crash[1] and "xenstored/__main__.py" in crash[1]
    finally:
        proc.stop()
