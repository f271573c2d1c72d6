"""Exceptions of the harness; each carries what a reader of a failure report needs."""
from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""


class ConfigError(HarnessError):
    """A setting the user gave (option, environment variable, path) cannot be used; the message names it
    and says why. The command line exits with status 2 for it, as for a usage error."""


class ProcessDied(HarnessError):
    """A supervised process exited while something was waiting on it."""

    def __init__(self, name: str, returncode: int | None, log_tail: str, during: str = "") -> None:
        self.name = name
        self.returncode = returncode
        self.log_tail = log_tail
        self.during = during
        status = describe_status(returncode)
        where = f" while {during}" if during else ""
        tail = log_tail.rstrip() or "(no output)"
        super().__init__(f"{name} died{where}: {status}\n--- last lines of its log ---\n{tail}")


class MachineCrashed(ProcessDied):
    """QEMU died: the machine is gone."""


class LaunchFailure(HarnessError):
    """A process could not be started or did not become ready in time."""


class WaitTimeout(HarnessError):
    """A deadline passed while the processes waited on were all still alive."""


class HarnessTooSlow(WaitTimeout):
    """The guest model gave up on one of its deadlines (stack.timescale; "*** HARNESS TOO SLOW" on the
    guest's console): the machine running the harness fell behind, no driver broke a rule. XENPV_TIME_SCALE
    gives every deadline of the guest model more time."""


class NotModelledPath(HarnessError):
    """The guest reached a path the harness does not model faithfully (stack.notmodelled; "*** NOT MODELLED"
    on the guest's console) and ended without a STOP: what would follow is the harness's artefact, not a
    driver's rule."""


class QtestError(HarnessError):
    """QEMU answered a qtest command with FAIL or ERR, or the command was refused before sending."""


class GuestDefinitionError(HarnessError):
    """A guest YAML file is invalid; the message names the file, the field and the reason."""

    def __init__(self, path: str, field: str, reason: str) -> None:
        self.path = path
        self.field = field
        self.reason = reason
        super().__init__(f"{path}: {field}: {reason}")


def describe_status(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"exit status {returncode}"
