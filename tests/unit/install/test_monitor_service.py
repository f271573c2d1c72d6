"""The xenbus_monitor service at work in the guest (XB src/monitor/monitor.c: MonitorMain's first pass,
CheckRequestKey's RegNotifyChangeKeyValue, TryAutoReboot's DoReboot after AutoRebootTimeout,
PromptForReboot's answer) over a real kernel and registry; the power API records what it is asked."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from xenpv.stack.agent.console import load_command_modules, run_command
from xenpv.stack.agent.xenbus_monitor import SERVICE_KEY, MonitorService, installed, start_xenbus_monitor
from xenpv.stack.drivers.xen.config import Config
from xenpv.stack.install import Installer
from xenpv.stack.install.monitor import MONITOR_PARAMETERS
from xenpv.stack.install.packages import Era
from xenpv.stack.kernel import Kernel
from xenpv.stack.kernel.registry import KeyNotFound, Registry
from xenpv.stack.timescale import TIME_SCALE_ENV, HarnessTooSlow


class Power:
    """What the service asks of the user-mode power API (stack.agent.winpower.UserPower in the guest)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def InitiateSystemShutdownEx(self, reboot: bool) -> bool:
        self.calls.append("reboot" if reboot else "poweroff")
        return True

    def SetSystemPowerState(self) -> bool:
        raise AssertionError("xenbus_monitor never hibernates")

    def SetSuspendState(self) -> bool:
        raise AssertionError("xenbus_monitor never suspends")


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.fixture
def kernel() -> Kernel:
    registry = Registry()
    Installer(registry).install("xenbus", "9.1.0.10")  # era (c): the monitor service and its RequestKey
    return Kernel(registry=registry, seed=1).activate()


@pytest.fixture
def run(kernel: Kernel) -> Iterator[Callable[..., tuple[MonitorService, Power]]]:
    services: list[MonitorService] = []

    def start(**parameters: int) -> tuple[MonitorService, Power]:
        for name, value in parameters.items():
            kernel.registry.set_dword(MONITOR_PARAMETERS, name, value)
        power = Power()
        service = MonitorService(kernel, power)
        service.start()
        services.append(service)
        return service, power

    yield start
    for service in services:
        service.stop()
        assert not service.running


def logged(kernel: Kernel) -> str:
    return "\n".join(kernel.log.tail(200))


def test_a_request_made_before_the_service_starts_reboots_once(kernel, run) -> None:
    """MonitorMain sets RequestEvent before its loop: the drivers' requests of the boot are seen at once.
    AutoReboot=1 with AutoRebootTimeout=0: DoReboot at once, RebootCount 1, logged as monitor.c does
    ("reboot 0 of 1": the count before the increment)."""
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    service, power = run(AutoReboot=1, AutoRebootTimeout=0)
    wait_until(lambda: power.calls == ["reboot"], "the auto reboot")
    assert kernel.registry.get_dword(MONITOR_PARAMETERS, "RebootCount") == 1
    text = logged(kernel)
    assert "reboot requested by XENVIF: AutoRebooting (reboot 0 of 1; RebootCount now 1)" in text, text
    assert "XENVIF needs to restart the system to complete installation." in text
    status = service.status()
    assert (status.state, status.requested_by, status.reboot_count) == ("rebooting", "XENVIF", 1)


def test_a_later_request_wakes_the_service_through_the_registry_notification(kernel, run) -> None:
    """CheckRequestKey re-arms RegNotifyChangeKeyValue on RequestKey after each check, so xen.sys
    ConfigRequestReboot during the session (a NET PDO start, a hot-added disk) is acted on."""
    service, power = run()
    wait_until(lambda: kernel.registry.key_exists(service.monitor.request_key()) and service.running, "the service")
    wait_until(lambda: kernel.registry._notify, "the request key's notification armed")
    assert service.status().state == "idle"
    Config(kernel.registry).ConfigRequestReboot("XENVBD")
    wait_until(lambda: service.status().state == "prompting", "the prompt")
    status = service.status()
    assert status.requested_by == "XENVBD" and status.pending == ["XENVBD"]
    assert status.message == ("XENVBD needs to restart the system to complete installation. Press 'Yes' to "
                              "restart the system now or 'No' if you plan to restart the system later.")
    assert power.calls == []


def test_no_is_final_for_the_session_and_yes_reboots(kernel, run) -> None:
    """PromptForReboot: IDYES (or IDTIMEOUT) is DoReboot(NULL, 0); any answer sets RebootPending, so a later
    request shows nothing more until the next boot."""
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    service, power = run()
    wait_until(lambda: service.status().state == "prompting", "the prompt")
    assert service.answer(False).startswith("No")
    assert service.answer(True).startswith("error: no reboot prompt is showing")
    Config(kernel.registry).ConfigRequestReboot("XENVBD")
    time.sleep(0.2)
    assert service.status().state == "answered no" and power.calls == []

    kernel.registry.delete_key(service.monitor.request_key() + r"\XENVIF")
    kernel.registry.delete_key(service.monitor.request_key() + r"\XENVBD")
    service.stop()
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    again, power = run()  # the next boot's service
    wait_until(lambda: again.status().state == "prompting", "the next boot's prompt")
    assert again.answer(True) == "Yes: restarting the system" and power.calls == ["reboot"]


def test_the_countdown_is_scaled_and_a_stop_cancels_it(kernel, run, monkeypatch) -> None:
    """DoReboot(message, AutoRebootTimeout): InitiateSystemShutdownEx counts down first; the model scales
    the countdown like its other timeouts, and a shutdown of the service before it ends reboots nothing."""
    monkeypatch.setenv(TIME_SCALE_ENV, "3")
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    service, power = run(AutoReboot=2, AutoRebootTimeout=20)
    wait_until(lambda: service.status().state == "rebooting", "the countdown")
    wait_until(lambda: "before the countdown" in logged(kernel) or "in 60s" in logged(kernel), "the log")
    assert "in 60s" in logged(kernel)
    service.stop()
    assert "the service stopped before the countdown ended: no reboot" in logged(kernel)
    assert power.calls == []


def test_the_service_runs_only_where_xenbus_inf_installed_it(kernel, cpu) -> None:
    """The subscriber era's xenbus package has no monitor; a disabled service does not start."""
    assert installed(kernel.registry)
    kernel.registry.set_dword(SERVICE_KEY, "Start", 4)  # SERVICE_DISABLED
    assert not installed(kernel.registry)
    assert start_xenbus_monitor(SimpleNamespace(kernel=kernel)) is None  # type: ignore[arg-type]
    subscriber = Registry()
    Installer(subscriber).install("xenbus", "8.0.0.1", era=Era.SUBSCRIBER)
    assert not installed(subscriber)
    assert start_xenbus_monitor(SimpleNamespace(kernel=Kernel(registry=subscriber, seed=1))) is None  # type: ignore[arg-type]


def test_without_request_key_the_service_does_not_start(kernel, run) -> None:
    """MonitorMain: GetRequestKeyName fails (fail7) and the service stops."""
    kernel.registry.delete_value(MONITOR_PARAMETERS, "RequestKey")
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    service, power = run(AutoReboot=1, AutoRebootTimeout=0)
    assert not service.running and service.state.startswith("failed:") and "RequestKey is missing" in service.state
    assert power.calls == []


def test_registry_change_notification_fires_once_for_a_value_under_the_key() -> None:
    """RegNotifyChangeKeyValue(WatchSubtree=TRUE, REG_NOTIFY_CHANGE_LAST_SET): a value set or deleted at or
    below the key signals once; elsewhere, or after cancel, nothing."""
    registry = Registry()
    registry.create_key(r"HKLM\A\B")
    fired: list[int] = []
    registry.notify_change(r"HKLM\A", lambda: fired.append(1))
    registry.set_dword(r"HKLM\C", "X", 1)
    registry.create_key(r"HKLM\A\D")  # a new key is REG_NOTIFY_CHANGE_NAME, not asked for
    assert fired == []
    registry.set_dword(r"HKLM\A\B\E", "Reboot", 1)
    registry.set_dword(r"HKLM\A\B", "Y", 1)
    assert fired == [1]  # one notification per arming
    registry.notify_change(r"hklm\a\b", lambda: fired.append(2))
    registry.delete_value(r"HKLM\A\B", "Y")
    assert fired == [1, 2]
    cancel = registry.notify_change(r"HKLM\A", lambda: fired.append(3))
    cancel()
    registry.set_dword(r"HKLM\A", "Z", 1)
    assert fired == [1, 2]
    with pytest.raises(KeyNotFound):
        registry.notify_change(r"HKLM\Missing", lambda: None)


def test_a_stopped_processor_ends_the_service(kernel, run) -> None:
    """After a STOP (or the harness giving up) no code of the guest runs; the service thread ends by
    itself, since no one will signal it any more."""
    service, power = run()
    wait_until(lambda: kernel.registry._notify, "the first check")
    kernel.cpu.give_up(HarnessTooSlow("a reply from QEMU", 1.0))
    wait_until(lambda: not service.running, "the service's end", timeout=5.0)
    assert power.calls == []


def test_the_monitor_command_shows_the_state_the_prompt_and_takes_the_answer(kernel, run) -> None:
    """`monitor`: the service's state and the dialog's text; `monitor no` is IDNO; without the service,
    it says so."""
    load_command_modules()
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    service, power = run()
    rt = SimpleNamespace(services=[service], boots=1)
    wait_until(lambda: service.status().state == "prompting", "the prompt")
    out = run_command(rt, ["monitor"])  # type: ignore[arg-type]
    assert out.splitlines() == [
        "xenbus_monitor: running (prompting); boot 1; AutoReboot 0; RebootCount none; requested by XENVIF; "
        "pending XENVIF",
        "prompt: XENVIF needs to restart the system to complete installation. Press 'Yes' to restart the "
        "system now or 'No' if you plan to restart the system later."], out
    assert run_command(rt, ["monitor", "no"]) == "No: no restart until the next boot"  # type: ignore[arg-type]
    assert "(answered no)" in run_command(rt, ["monitor"]) and power.calls == []  # type: ignore[arg-type]
    assert run_command(SimpleNamespace(services=[], boots=1), ["monitor"]).startswith(  # type: ignore[arg-type]
        "xenbus_monitor: not running")


def test_an_unanswered_prompt_restarts_after_prompt_timeout(kernel, run) -> None:
    """GetPromptTimeout: WTSSendMessage gives up after PromptTimeout seconds and IDTIMEOUT restarts as IDYES
    does; an answer within the time (No) keeps the guest up."""
    Config(kernel.registry).ConfigRequestReboot("XENVIF")
    service, power = run(PromptTimeout=1)
    wait_until(lambda: service.status().state == "prompting", "the prompt")
    assert power.calls == []
    wait_until(lambda: power.calls == ["reboot"], "the restart on IDTIMEOUT", timeout=5.0)
    assert service.status().state == "answered timeout"
    assert "PromptForReboot: no answer within 1s (IDTIMEOUT): restarting" in logged(kernel)
    service.stop()

    answered, power = run()  # the next boot's service, the same request still there
    wait_until(lambda: answered.status().state == "prompting", "the next prompt")
    answered.answer(False)
    time.sleep(1.3)
    assert power.calls == [] and answered.status().state == "answered no"
