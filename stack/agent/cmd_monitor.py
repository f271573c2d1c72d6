"""`monitor [yes|no]`: the xenbus_monitor service (stack.agent.xenbus_monitor): its state, the reboot prompt
it shows, and the user's answer to it."""
from __future__ import annotations

from xenpv.stack.agent.console import command
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.agent.winpower import UserPower
from xenpv.stack.agent.xenbus_monitor import MonitorService
from xenpv.stack.timescale import scaled

# `monitor yes` returns once the restart it asked for is done (or this long has passed).
ANSWER_REBOOT_SECONDS = 120.0


def _service(rt: GuestRuntime) -> MonitorService | None:
    return next((s for s in rt.services if isinstance(s, MonitorService)), None)


@command("monitor", "the xenbus_monitor service: its state, its reboot prompt, the answer to it",
         ("", "yes|no"),
         details="no argument: running or not, AutoReboot and RebootCount, the module whose request it acted "
                 "on, the modules asking now, and the prompt's text while it shows. yes|no: the prompt's "
                 "buttons (Yes restarts now; No: nothing more until the next boot)")
def _monitor(rt: GuestRuntime, args: list[str]) -> str:
    service = _service(rt)
    if service is None:
        return f"xenbus_monitor: not running (not installed in this guest); boot {rt.boots}"
    if args:
        out = service.answer(args[0] == "yes")
        if args[0] == "yes" and isinstance(service.power, UserPower) and not out.startswith("error"):
            service.power.join(scaled(ANSWER_REBOOT_SECONDS))  # the restart runs on winlogon's thread
            out += f": boot {rt.boots}"
        return out
    s = service.status()
    lines = [f"xenbus_monitor: {'running' if s.running else 'stopped'} ({s.state}); boot {rt.boots}; "
             f"AutoReboot {s.auto_reboot}; RebootCount {'none' if s.reboot_count is None else s.reboot_count}; "
             f"requested by {s.requested_by or 'none'}; pending {','.join(s.pending) or 'none'}"]
    if s.message:
        lines.append(("prompt: " if s.state == "prompting" else "message: ") + s.message)
    return "\n".join(lines)
