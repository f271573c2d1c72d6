"""The xenbus_monitor service running in the guest (XB src/monitor/monitor.c, MonitorMain): what acts on the
decisions of stack.install.monitor.

The service control manager starts it at each boot when xenbus.inf installed it (era (b) and later:
`Services\\xenbus_monitor` with Start = SERVICE_AUTO_START); the subscriber era has none, and then nothing
below happens. MonitorMain opens RequestKey (RegCreateKeyEx, non-volatile), sets its RequestEvent once so
the first pass looks at the requests made before it started (the drivers' at boot), and then waits:
each wake is CheckRequestKey, i.e. CheckRequestSubKeys and a new RegNotifyChangeKeyValue on the request
key (stack.kernel.registry notify_change), so a later xen.sys ConfigRequestReboot wakes it again.

- REBOOT (TryAutoReboot): DoReboot(message, AutoRebootTimeout) is InitiateSystemShutdownEx with that
  countdown: here the service waits AutoRebootTimeout seconds, times XENPV_TIME_SCALE like every other
  timeout of the model (0 is at once), then calls the user-mode power API (stack.agent.winpower.UserPower),
  which reboots through GuestRuntime.reboot, the console's `reboot`. A stop during the countdown cancels it.
- PROMPT (PromptForReboot): WTSSendMessage to the active session, waiting PromptTimeout seconds (scaled;
  0, the default, is for ever; IDTIMEOUT restarts like IDYES). The model's session is the console:
  `monitor` shows the dialog's text, `monitor yes` is IDYES (DoReboot at once), `monitor no` is IDNO.
  Either way RebootPending is set, so this service does nothing more until the next boot.
Each step is a line of the debug log (module XENBUS_MONITOR), which the agent's log also gets.
Not modelled: RegDeleteTree(RequestKey) at stop (the request subkeys are volatile, so a reboot loses them
anyway), CM_WaitNoPendingInstallEvents and RemoveStartOverride("stornvme").
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from xenpv.stack.agent.runtime import SERVICE_FACTORIES, GuestRuntime
from xenpv.stack.agent.winpower import UserPower
from xenpv.stack.agent.xenagent import PowerApi
from xenpv.stack.install.installer import reboot_requests
from xenpv.stack.install.monitor import MonitorAction, MonitorDecision, XenbusMonitor
from xenpv.stack.install.packages import SERVICES_KEY, StartType
from xenpv.stack.kernel.registry import RegistryError
from xenpv.stack.timescale import scaled

log = logging.getLogger("stack.agent.xenbus_monitor")

SERVICE_KEY = rf"{SERVICES_KEY}\xenbus_monitor"
LOG_MODULE = "xenbus_monitor"
# How long stop() waits for the service thread (it only ever waits on its own events).
STOP_SECONDS = 10.0


@dataclass
class MonitorStatus:
    running: bool
    state: str  # idle | rebooting | prompting | answered yes | answered no | answered timeout | failed: ...
    auto_reboot: int
    reboot_count: int | None
    requested_by: str | None
    pending: list[str] = field(default_factory=list)  # the modules with a Reboot request now
    message: str = ""  # the prompt's text while it shows, the shutdown message of an auto reboot


class MonitorService:
    """One run of the service (one boot): `start()` is the service control manager starting it, `stop()`
    SERVICE_CONTROL_STOP / _SHUTDOWN (it returns once the service has stopped)."""

    def __init__(self, kernel: Any, power: PowerApi) -> None:
        self.kernel = kernel
        self.power = power
        self.monitor = XenbusMonitor(kernel.registry)
        self.state = "idle"
        self.decision: MonitorDecision | None = None  # the one acted on (RebootPending)
        self._request = threading.Event()  # Context->RequestEvent
        self._stop = threading.Event()     # Context->StopEvent
        self._lock = threading.Lock()
        self._cancel_notify: Callable[[], None] | None = None
        self._thread: threading.Thread | None = None

    def _print(self, text: str) -> None:
        self.kernel.log.print(LOG_MODULE, text)

    # -- the service control manager's side ---------------------------------------------------------

    def start(self) -> None:
        try:
            with self.kernel.cpu.lock:
                key = self.monitor.request_key()  # GetRequestKeyName: fail7 without it
                self.kernel.registry.create_key(key)  # RegCreateKeyEx(REG_OPTION_NON_VOLATILE)
        except RegistryError as exc:
            self.state = f"failed: {exc}"
            self._print(f"MonitorMain: cannot start: {exc}")
            return
        self._request.set()  # SetEvent(Context->RequestEvent): the first pass sees the boot's requests
        self._thread = threading.Thread(target=self._service_main, name="xenbus_monitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_SECONDS) -> None:
        self._stop.set()
        self._request.set()  # wakes the wait (one event stands for WaitForMultipleObjects' two)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            with self.kernel.cpu.lock.released():  # its check may be waiting for the processor
                thread.join(timeout)
            if thread.is_alive():
                log.error("xenbus_monitor did not stop within %gs", timeout)
        if self._cancel_notify is not None:
            self._cancel_notify()
            self._cancel_notify = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the session's answer -------------------------------------------------------------------------

    def answer(self, yes: bool) -> str:
        """The user's button on the prompt: IDYES reboots now (DoReboot(NULL, 0)), IDNO leaves it."""
        with self._lock:
            if self.state != "prompting":
                return f"error: no reboot prompt is showing (xenbus_monitor is {self.state})"
            self.state = "answered yes" if yes else "answered no"
        self.monitor.answer(yes)
        self._print(f"PromptForReboot: answered {'Yes' if yes else 'No'}")
        if yes:
            self.power.InitiateSystemShutdownEx(True)
            return "Yes: restarting the system"
        return "No: no restart until the next boot"

    def status(self) -> MonitorStatus:
        """Read without the processor, as the console's `registry` reads, so `monitor` answers while the
        vCPU is parked in a save holding it."""
        registry = self.kernel.registry
        auto = self.monitor.parameter("AutoReboot")
        count = self.monitor.parameter("RebootCount")
        pending = reboot_requests(registry)
        decision = self.decision
        return MonitorStatus(self.running, self.state, auto or 0, count,
                             decision.module if decision is not None else None, pending,
                             decision.message() if decision is not None and self.state in ("prompting", "rebooting")
                             else "")

    # -- the service thread ----------------------------------------------------------------------------

    def _signal(self) -> None:
        """RegNotifyChangeKeyValue's event: runs on the thread that wrote the value."""
        self._request.set()

    def _service_main(self) -> None:
        try:
            while not self._stop.is_set():
                # WaitForMultipleObjects(StopEvent, RequestEvent, INFINITE); woken now and then to see
                # whether the guest stopped (a STOP leaves no one to signal it).
                if not self._request.wait(1.0):
                    if self.kernel.cpu.halted is not None:
                        return
                    continue
                if self._stop.is_set() or self.kernel.cpu.halted is not None:
                    return
                self._request.clear()
                self.CheckRequestKey()
        except Exception as exc:  # the service dies; Windows goes on without it
            log.exception("xenbus_monitor failed")
            self.state = f"failed: {type(exc).__name__}: {exc}"

    def CheckRequestKey(self) -> None:
        """monitor.c CheckRequestKey: CheckRequestSubKeys, then ask to be told of the next change."""
        with self.kernel.cpu.lock:
            decision = self.monitor.CheckRequestSubKeys()
            self._cancel_notify = self.kernel.registry.notify_change(self.monitor.request_key(), self._signal)
        if decision.action == MonitorAction.REBOOT:
            self._auto_reboot(decision)
        elif decision.action == MonitorAction.PROMPT:
            with self._lock:
                self.decision, self.state = decision, "prompting"
            self._print(f"PromptForReboot: reboot requested by {decision.module}: {decision.message()}")
            self._prompt_timeout()

    def _prompt_timeout(self) -> None:
        """GetPromptTimeout: WTSSendMessage's timeout (PromptTimeout, seconds; 0 or none: wait for ever). Its
        IDTIMEOUT restarts as IDYES does. The wait is scaled like the model's other timeouts."""
        timeout = self.monitor.parameter("PromptTimeout") or 0
        if timeout == 0:
            return
        seconds = scaled(timeout)
        if self._stop.wait(seconds):
            return
        with self._lock:
            if self.state != "prompting":
                return  # answered in time
            self.state = "answered timeout"
        self._print(f"PromptForReboot: no answer within {seconds:g}s (IDTIMEOUT): restarting")
        self.power.InitiateSystemShutdownEx(True)

    def _auto_reboot(self, decision: MonitorDecision) -> None:
        seconds = scaled(decision.timeout)
        with self._lock:
            self.decision, self.state = decision, "rebooting"
        # monitor.c logs the count before its increment: "reboot 0 of 1" is the first of one.
        self._print(f"TryAutoReboot: reboot requested by {decision.module}: AutoRebooting (reboot "
                    f"{decision.reboot_count - 1} of {decision.auto_reboot}; RebootCount now "
                    f"{decision.reboot_count}) in {seconds:g}s: {decision.message()}")
        if self._stop.wait(seconds):
            self._print("TryAutoReboot: the service stopped before the countdown ended: no reboot")
            return
        self.power.InitiateSystemShutdownEx(True)


def installed(registry: Any) -> bool:
    """Whether the service control manager starts xenbus_monitor at boot: its service key exists (xenbus.inf
    of era (b) or later added it) with Start = SERVICE_AUTO_START."""
    try:
        return registry.get_dword(SERVICE_KEY, "Start") == StartType.AUTO
    except RegistryError:
        return False


def start_xenbus_monitor(rt: GuestRuntime) -> MonitorService | None:
    with rt.kernel.cpu.lock:
        if not installed(rt.kernel.registry):
            return None
    service = MonitorService(rt.kernel, UserPower(rt))
    service.start()
    return service


SERVICE_FACTORIES.append(start_xenbus_monitor)
