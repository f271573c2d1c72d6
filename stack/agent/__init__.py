"""The guest: one process that is the vCPU, runs the kernel model and the PV drivers, and offers a
console (stdin/stdout) that the harness drives with pexpect."""

# The services this Windows runs at each boot register with the runtime when their module loads.
from xenpv.stack.agent import winpower as _services  # noqa: E402,F401
from xenpv.stack.agent import xenbus_monitor as _monitor  # noqa: E402,F401
