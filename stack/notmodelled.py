"""NotModelled: the guest reached a path where the harness, not the drivers, would decide the outcome.

The model raises it where what follows would be an artefact of how this harness runs a guest rather than of
a driver rule, so that no STOP is invented from it. Today's case: a Windows restart is modelled in place (the
same QEMU, stack.agent.runtime reboot), while Xen's toolstack restarts an HVM domain with a new device model;
devices an earlier boot unplugged therefore stay unplugged here but would be back on Xen.

A BaseException, like BugCheck and HarnessTooSlow, so that driver code's `except Exception` cannot turn it
into a driver's failure. The console prints one line after NOT_MODELLED_MARKER (stack.agent.console) and
ends the guest; the harness raises base.errors.NotModelledPath for it, and the explorer and `xenpv repro`
count such runs apart from findings.
"""
from __future__ import annotations


class NotModelled(BaseException):
    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(what)

    def __str__(self) -> str:
        return f"not modelled: {self.what}"
