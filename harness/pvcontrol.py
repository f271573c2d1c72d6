"""The toolstack asking a guest to power off, restart or hibernate itself (libxl__domain_pvcontrol, `xl shutdown`,
`xl reboot`; XAPI's s4), and what the harness then sees the guest do.

Each writes control/shutdown through the toolstack (backends.toolstack.domain.pvcontrol_domain) and waits for
the acknowledgement - the guest's xenagent writes "" - then for the guest's own power path:
- shutdown ("poweroff"): Windows shuts down, PM1a_CNT gets S5 and QEMU exits (QMP SHUTDOWN); the harness
  then tears the machine down as for hibernation (disks kept, domain destroyed, back-ends released): the
  guest is "off", and `power_on` boots it afresh.
- reboot ("reboot"): Windows restarts on the same machine; done when the guest's debug log says the next
  boot (the kernel's "boot N").
- hibernate ("s4"): the guest's S4 (stack.agent.hibernate) through the same teardown as
  harness.lifecycle.hibernate; `power_on` resumes it from the hiberfile.
A guest without a PV agent never acknowledges: ToolstackError, the guest running on.

Each request is a lifecycle event of the guest's run record ("pvcontrol poweroff"...); replays do not
carry them out yet (harness.replay names the operation as not replayable rather than skip it).
"""
from __future__ import annotations

import logging
import re
import time

from xenpv.backends.toolstack.domain import pvcontrol_domain
from xenpv.base.runrecord import LIFECYCLE
from xenpv.base.errors import WaitTimeout
from xenpv.harness.lifecycle import HIBERNATE_SECONDS, Guest, LifecycleError, Timings, powered_off
from xenpv.stack.timescale import scaled

log = logging.getLogger("harness.pvcontrol")

REBOOT_SECONDS = 120.0
ACK_SECONDS = 60.0
_BOOT_LINE = re.compile(r"^SETUP\|boot (\d+)", re.M)


def _check(guest: Guest, what: str) -> None:
    if guest.state != "running" or guest.domain is None or guest.toolstack is None:
        raise LifecycleError(f"{guest.name} cannot {what}: it is {guest.state}"
                             + ("" if guest.domain is not None else ", not a Xen domain"))


def _request(guest: Guest, command: str, timings: Timings) -> float:
    assert guest.toolstack is not None and guest.domain is not None
    guest.record_event(LIFECYCLE, op=f"pvcontrol {command}")
    t = time.monotonic()
    pvcontrol_domain(guest.toolstack.xs, guest.toolstack.ctl, guest.domain.domid, command,
                     ack_timeout=scaled(ACK_SECONDS), alive=lambda: guest.console.check_alive(f"{command} request"))
    return timings.add("acknowledged", t)


def shutdown(guest: Guest) -> Timings:
    """`xl shutdown`: control/shutdown=poweroff; the guest powers its machine off."""
    _check(guest, "shut down")
    timings = Timings()
    domid = guest.domain.domid  # type: ignore[union-attr]
    t = _request(guest, "poweroff", timings)
    powered_off(guest, "SHUTDOWN", timings, t, scaled(REBOOT_SECONDS))
    log.info("%s powered off; dom%d destroyed", guest.name, domid)
    return timings


def hibernate(guest: Guest) -> Timings:
    """control/shutdown=s4: the guest hibernates and its machine powers off."""
    _check(guest, "hibernate")
    timings = Timings()
    t = _request(guest, "s4", timings)
    powered_off(guest, "SUSPEND_DISK", timings, t, scaled(HIBERNATE_SECONDS))
    return timings


def reboot(guest: Guest) -> Timings:
    """`xl reboot`: control/shutdown=reboot; done when the guest has booted again."""
    _check(guest, "reboot")
    timings = Timings()
    before = _boot_number(guest)
    t = _request(guest, "reboot", timings)
    deadline = time.monotonic() + scaled(REBOOT_SECONDS)
    while _boot_number(guest) <= before:
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{guest.name} acknowledged the reboot but did not boot again within "
                              f"{scaled(REBOOT_SECONDS):.0f}s")
        time.sleep(0.1)
    timings.add("reboot", t)
    return timings


def _boot_number(guest: Guest) -> int:
    """The boot the guest runs: its debug log's last "boot N" line (1 before any restart)."""
    numbers = [int(n) for n in _BOOT_LINE.findall(guest.console.run("log 2000"))]
    return max(numbers, default=1)


