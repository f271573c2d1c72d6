"""harness.agent.GuestConsole against a stand-in agent process on a real pty: a guest that gave up on a
deadline is HarnessTooSlow (not a STOP, not a bare timeout), even when the agent is slow to exit after
saying so, as a loaded machine makes it."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from xenpv.base.errors import HarnessTooSlow, WaitTimeout
from xenpv.harness.agent import GuestConsole
from xenpv.stack.agent.console import PROMPT, TOO_SLOW_EXIT, TOO_SLOW_MARKER

# Prompts, takes one line, gives up on it, then takes `delay` seconds to exit.
AGENT = f"""
import sys, time
sys.stdout.write({PROMPT!r}); sys.stdout.flush()
sys.stdin.readline()
sys.stdout.write("\\n{TOO_SLOW_MARKER}: no reply from xenstored to READ name within 5s (XENPV_TIME_SCALE=1)\\n")
sys.stdout.flush()
time.sleep(float(sys.argv[1]))
sys.exit({TOO_SLOW_EXIT})
"""


@pytest.mark.parametrize("delay", [0.0, 7.0])
def test_a_guest_that_gave_up_is_the_harness_too_slow(tmp_path: Path, delay: float) -> None:
    machine = SimpleNamespace(check_alive=lambda during: None)  # no QEMU behind this stand-in
    console = GuestConsole([sys.executable, "-c", AGENT, str(delay)], tmp_path / "console.log", machine)  # type: ignore[arg-type]
    try:
        console.wait_booted(10)
        with pytest.raises(HarnessTooSlow, match="the guest gave up during 'xs read name', the harness being too "
                                                 r"slow: no reply from xenstored to READ name within 5s") as late:
            console.run("xs read name")
        assert isinstance(late.value, WaitTimeout)
    finally:
        console.close()
