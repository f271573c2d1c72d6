"""The guest model's deadlines: one time scale for all of them, and what their expiry means.

Windows waits as long as its drivers say; the model must not wait forever, so every wait on something
outside the agent (QEMU over qtest, xenhv's trap socket, xenstored, a back-end) has a deadline. Those
deadlines are the harness's, not the drivers': when one passes, the machine running the harness was too
slow (other runs, CPU hogs), and the guest model gives up with `HarnessTooSlow` instead of inventing a
STOP a real guest would not have had. The agent reports it on its console (stack.agent.console) with a
marker of its own and an exit status of its own; there is no STOP screen and no crash dump.

A deadline that stands for a rule of Windows or of a driver (the power manager's 0x9F for an IRP held too
long, a frontend's watchdog, a disk I/O timeout) keeps its consequence, and is scaled too.

`XENPV_TIME_SCALE` (a number, at least 1, default 1) multiplies every such deadline, so a loaded machine
can be given more time without editing code. It is read from the environment at each use (the agent
inherits it from the harness, which checks it before starting anything).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

from xenpv.base.errors import ConfigError

TIME_SCALE_ENV = "XENPV_TIME_SCALE"


def time_scale(environ: Mapping[str, str] | None = None) -> float:
    """The factor of $XENPV_TIME_SCALE (1 when unset or empty); ConfigError naming it when it is not a
    finite number of at least 1."""
    raw = (os.environ if environ is None else environ).get(TIME_SCALE_ENV, "").strip()
    if not raw:
        return 1.0
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{TIME_SCALE_ENV}={raw!r} is not a number; give a factor of at least 1 "
                          "(e.g. 2 to double every deadline of the guest model)") from None
    if not math.isfinite(value) or value < 1:
        raise ConfigError(f"{TIME_SCALE_ENV}={raw!r}: the factor must be a finite number of at least 1 "
                          "(deadlines are only ever lengthened)")
    return value


def scaled(seconds: float) -> float:
    """`seconds` times the time scale."""
    return seconds * time_scale()


class HarnessTooSlow(BaseException):
    """A deadline of the model passed: the harness was too slow, the drivers did nothing wrong.

    A BaseException, like BugCheck, so that driver code's `except Exception` cannot turn it into a driver's
    failure (a status, a STOP). `what` says what did not happen in time, worded to be followed by "within
    N s" ("no reply from QEMU to 'inb 0x1f7'"); `seconds` is the deadline, already scaled.
    """

    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        self.scale = _scale_or_none()
        super().__init__(what, seconds)

    def describe(self) -> str:
        scale = f"{TIME_SCALE_ENV}={self.scale:g}" if self.scale is not None else f"{TIME_SCALE_ENV} unusable"
        return f"{self.what} within {self.seconds:g}s ({scale})"

    def __str__(self) -> str:
        # The words a failure report is classified by (ci/stress.py).
        return f"harness too slow: {self.describe()}"


def _scale_or_none() -> float | None:
    try:
        return time_scale()
    except ConfigError:
        return None
