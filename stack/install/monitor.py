"""The xenbus_monitor service (XB src/monitor/monitor.c; reference windows-pv-drivers.md 5b/5c).

Installed by xenbus.inf since era (b), it watches `<RequestKey>\\<Module>\\Reboot` (RequestKey from its
Parameters; the drivers write the requests through xen.sys ConfigRequestReboot) and, when a module asks
(CheckRequestSubKeys: the first subkey whose `Reboot` DWORD is non-zero), TryAutoReboot:
- the first requesting module is remembered (RebootRequestedBy); once the user answered No, nothing
  more happens this session;
- `AutoReboot = N` (REG_DWORD in its Parameters; anything else counts as 0) allows N unattended reboots:
  while `RebootCount < N` it adds 1 to RebootCount (persisted) and reboots after `AutoRebootTimeout`
  seconds (default 60); otherwise, or with AutoReboot 0, it prompts;
- a check that finds no request deletes RebootCount, so the count is per chain of requested reboots.
The installer-running (MSI mutex) and ES_SYSTEM_REQUIRED deferrals are not modelled.

What the user sees (TryAutoReboot's shutdown message, PromptForReboot's WTSSendMessage) is the requesting
module's DisplayName (GetDisplayName: the text after its last ';') followed by the DialogText, and for the
prompt the DialogQuestion (the wording of src/monitor/strings.rc's IDS_DIALOG). The service that runs this
at each boot, on the registry's change notification, is stack.agent.xenbus_monitor.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

from xenpv.stack.kernel.registry import REG_DWORD, KeyNotFound, Registry, RegistryError, ValueNotFound

from .packages import SERVICES_KEY

log = logging.getLogger("stack.install.monitor")

MONITOR_PARAMETERS = rf"{SERVICES_KEY}\xenbus_monitor\Parameters"
DEFAULT_AUTO_REBOOT_TIMEOUT = 60
DIALOG_TEXT = "needs to restart the system to complete installation."
DIALOG_QUESTION = "Press 'Yes' to restart the system now or 'No' if you plan to restart the system later."


class MonitorAction(Enum):
    NONE = "none"          # no module asks for a reboot (or one was already handled this session)
    REBOOT = "reboot"      # an unattended reboot (AutoReboot allowed one more)
    PROMPT = "prompt"      # the reboot dialog
    DECLINED = "declined"  # the user said No earlier: nothing until the next boot


@dataclass(frozen=True)
class MonitorDecision:
    action: MonitorAction
    module: str | None = None
    reboot_count: int = 0
    timeout: int = 0
    auto_reboot: int = 0  # the AutoReboot budget the decision was taken under
    description: str = ""  # GetDisplayName of the module, what the message names

    def message(self) -> str:
        """The shutdown message (REBOOT) or the dialog's text (PROMPT), as monitor.c builds them."""
        if self.action == MonitorAction.REBOOT:
            return f"{self.description} {DIALOG_TEXT}"
        if self.action == MonitorAction.PROMPT:
            return f"{self.description} {DIALOG_TEXT} {DIALOG_QUESTION}"
        return ""


@dataclass
class XenbusMonitor:
    registry: Registry
    reboot_requested_by: str | None = None
    declined: bool = False  # Context->Response == IDNO
    decisions: list[MonitorDecision] = field(default_factory=list)

    def _dword(self, key: str, name: str) -> int | None:
        try:
            value = self.registry.query_value(key, name)
        except RegistryError:
            return None
        return int(value.data) if value.type == REG_DWORD else None  # type: ignore[arg-type]

    def parameter(self, name: str) -> int | None:
        """A DWORD of the service's Parameters (AutoReboot, RebootCount...); None if missing or not a DWORD."""
        return self._dword(MONITOR_PARAMETERS, name)

    def request_key(self) -> str:
        """GetRequestKeyName: the service cannot start without it."""
        try:
            name = self.registry.get_sz(MONITOR_PARAMETERS, "RequestKey")
        except (KeyNotFound, ValueNotFound) as exc:
            raise RegistryError(f"xenbus_monitor: {MONITOR_PARAMETERS}\\RequestKey is missing") from exc
        return "HKLM\\" + name.removeprefix("HKLM\\")

    def GetDisplayName(self, module: str) -> str:
        """`Services\\<module>\\DisplayName` after its last ';' (an INF's "@oem3.inf,%Desc%;Text" form); the
        module's name when there is none (monitor.c would then show no message at all)."""
        try:
            name = self.registry.get_sz(rf"{SERVICES_KEY}\{module}", "DisplayName")
        except RegistryError:
            return module
        return name.rsplit(";", 1)[-1]

    def CheckRequestSubKeys(self) -> MonitorDecision:
        key = self.request_key()
        modules = self.registry.subkeys(key) if self.registry.key_exists(key) else []
        for module in modules:
            if self._dword(f"{key}\\{module}", "Reboot"):
                if self.reboot_requested_by is not None:
                    return self._decide(MonitorDecision(MonitorAction.NONE, module))
                return self._decide(self.TryAutoReboot(module))
        try:
            self.registry.delete_value(MONITOR_PARAMETERS, "RebootCount")
        except RegistryError:
            pass
        return self._decide(MonitorDecision(MonitorAction.NONE))

    def TryAutoReboot(self, module: str) -> MonitorDecision:
        if self.reboot_requested_by is None:
            self.reboot_requested_by = module
        if self.declined:
            return MonitorDecision(MonitorAction.DECLINED, module)
        auto = self._dword(MONITOR_PARAMETERS, "AutoReboot") or 0
        count = self._dword(MONITOR_PARAMETERS, "RebootCount") or 0
        description = self.GetDisplayName(self.reboot_requested_by)
        if auto == 0 or count >= auto:
            return MonitorDecision(MonitorAction.PROMPT, self.reboot_requested_by, count, auto_reboot=auto,
                                   description=description)
        count += 1
        self.registry.set_dword(MONITOR_PARAMETERS, "RebootCount", count)
        timeout = self._dword(MONITOR_PARAMETERS, "AutoRebootTimeout")
        log.info("AutoRebooting (reboot %d of %d), requested by %s", count - 1, auto, self.reboot_requested_by)
        return MonitorDecision(MonitorAction.REBOOT, self.reboot_requested_by, count,
                               DEFAULT_AUTO_REBOOT_TIMEOUT if timeout is None else timeout, auto_reboot=auto,
                               description=description)

    def answer(self, yes: bool) -> None:
        """The user's answer to the prompt: No stops further prompts and reboots this session."""
        self.declined = not yes

    def _decide(self, decision: MonitorDecision) -> MonitorDecision:
        self.decisions.append(decision)
        return decision
