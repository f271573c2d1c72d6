"""`xenagent status|clock|clock set SECONDS`: the xenagent service (stack.agent.xenagent) and the system clock
it keeps in step with Xen's."""
from __future__ import annotations

from xenpv.stack.agent.console import command, parse_int
from xenpv.stack.agent.runtime import GuestRuntime
from xenpv.stack.agent.xenagent import XenAgent
from xenpv.stack.kernel.clock import EPOCH_1601_TO_1970, filetime_text


def _agent(rt: GuestRuntime) -> XenAgent | None:
    return next((s for s in rt.services if isinstance(s, XenAgent)), None)


@command("xenagent", "the xenagent service: its state, and the system clock it sets from Xen's",
         ("status", "clock", "clock set SECONDS"),
         details="status: running or not, the XENIFACE interface it holds, whether its control/shutdown "
                 "watch is set, the suspend count its watches were made in, how often it set the clock, "
                 "the control/shutdown requests it acted on. clock set SECONDS: the system time to "
                 "SECONDS after 1970-01-01 UTC (as a person with the Date and Time dialog would)")
def _xenagent(rt: GuestRuntime, args: list[str]) -> str:
    if args[0] == "clock":
        if rt.clock is None:
            return "error: the guest has not booted"
        if len(args) == 3:
            rt.clock.set_system_time(EPOCH_1601_TO_1970 + parse_int(args[2], "SECONDS", 0) * 10_000_000)
        now = rt.clock.query_system_time()
        return (f"system time {filetime_text(now)} UTC ({now}); local {filetime_text(rt.clock.query_local_time())}"
                f" (bias {rt.clock.bias_minutes()} min)")
    agent = _agent(rt)
    if agent is None:
        return "xenagent: not running (the XENIFACE package is not installed)"
    s = agent.status()
    return (f"xenagent: {'running' if s.running else 'stopped'}; device {s.device or 'none'}; "
            f"shutdown watch {'on' if s.shutdown_watch else 'off'}; suspend count {s.suspend_count}; "
            f"time syncs {s.time_syncs}; requests {','.join(s.requests) or 'none'}")
