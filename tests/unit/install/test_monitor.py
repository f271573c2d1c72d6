"""The xenbus_monitor service as XB src/monitor/monitor.c (CheckRequestSubKeys, TryAutoReboot): reboot
requests under RequestKey, AutoReboot's budget of unattended reboots counted in RebootCount."""
from __future__ import annotations

import pytest

from xenpv.stack.drivers.xen.config import Config
from xenpv.stack.install import Installer
from xenpv.stack.install.monitor import MONITOR_PARAMETERS, MonitorAction, XenbusMonitor
from xenpv.stack.kernel.registry import REG_SZ, Registry, RegistryError


def _guest(registry: Registry | None = None, **parameters: int) -> Registry:
    registry = registry if registry is not None else Registry()
    Installer(registry).install("xenbus", "9.1.0.10")  # the monitor service, its RequestKey
    for name, value in parameters.items():
        registry.set_dword(MONITOR_PARAMETERS, name, value)
    return registry


def _count(registry: Registry) -> int | None:
    try:
        return registry.get_dword(MONITOR_PARAMETERS, "RebootCount")
    except RegistryError:
        return None


def test_no_request_no_action_and_the_count_is_reset() -> None:
    registry = _guest(AutoReboot=2, RebootCount=2)
    assert XenbusMonitor(registry).CheckRequestSubKeys().action == MonitorAction.NONE
    assert _count(registry) is None  # RegDeleteValue(RebootCount) when nothing asks


def test_without_auto_reboot_a_request_prompts() -> None:
    registry = _guest()
    Config(registry).ConfigRequestReboot("XENVIF")
    decision = XenbusMonitor(registry).CheckRequestSubKeys()
    assert (decision.action, decision.module) == (MonitorAction.PROMPT, "XENVIF")


def test_auto_reboot_allows_n_unattended_reboots_then_prompts(tmp_path) -> None:
    """TryAutoReboot: while RebootCount < AutoReboot, RebootCount += 1 (persisted) and reboot after
    AutoRebootTimeout (default 60 s); the volatile request is gone at each reboot and the driver asks
    again; the third request of AutoReboot=2 prompts."""
    hive = tmp_path / "hive.json"
    registry = _guest(registry=Registry.load(hive), AutoReboot=2)
    outcomes = []
    for _ in range(3):
        Config(registry).ConfigRequestReboot("XENVBD")
        outcomes.append(XenbusMonitor(registry).CheckRequestSubKeys())  # a new service instance per boot
        registry = Registry.load(hive)  # the reboot: volatile keys (the request) are gone
        assert XenbusMonitor(registry).request_key() and not registry.key_exists(
            XenbusMonitor(registry).request_key() + r"\XENVBD")
    assert [(d.action, d.reboot_count) for d in outcomes] == [
        (MonitorAction.REBOOT, 1), (MonitorAction.REBOOT, 2), (MonitorAction.PROMPT, 2)]
    assert outcomes[0].timeout == 60


def test_auto_reboot_of_the_wrong_type_counts_as_zero_and_a_no_sticks() -> None:
    registry = _guest()
    registry.set_value(MONITOR_PARAMETERS, "AutoReboot", REG_SZ, "5")
    Config(registry).ConfigRequestReboot("XENBUS")
    monitor = XenbusMonitor(registry)
    assert monitor.CheckRequestSubKeys().action == MonitorAction.PROMPT
    monitor.answer(False)
    monitor.reboot_requested_by = None  # even a new request this session
    assert monitor.CheckRequestSubKeys().action == MonitorAction.DECLINED


def test_the_first_requester_is_remembered() -> None:
    registry = _guest()
    Config(registry).ConfigRequestReboot("XENVIF")
    monitor = XenbusMonitor(registry)
    monitor.CheckRequestSubKeys()
    Config(registry).ConfigRequestReboot("XENVBD")
    assert monitor.CheckRequestSubKeys().action == MonitorAction.NONE
    assert monitor.reboot_requested_by == "XENVIF"


def test_the_service_needs_its_request_key() -> None:
    with pytest.raises(RegistryError, match="RequestKey is missing"):
        XenbusMonitor(Registry()).CheckRequestSubKeys()


def test_the_message_names_the_display_name_after_its_last_semicolon() -> None:
    """GetDisplayName: the service's DisplayName, past its last ';' (an INF's "@oem3.inf,%Desc%;Text")."""
    registry = _guest()
    registry.set_sz(r"HKLM\SYSTEM\CurrentControlSet\Services\XENVIF", "DisplayName",
                    "@oem3.inf,%XenVifDesc%;XenServer PV Network Class")
    Config(registry).ConfigRequestReboot("XENVIF")
    decision = XenbusMonitor(registry).CheckRequestSubKeys()
    assert decision.message().startswith("XenServer PV Network Class needs to restart the system"), decision
    assert XenbusMonitor(registry).GetDisplayName("NOSUCH") == "NOSUCH"
