"""The xenbus_monitor service in a booted co-installer-era guest (XB src/monitor/monitor.c): the drivers'
first-boot reboot requests (XENVIF PdoStartDevice's UNPLUG.Reboot, XENVBD's) reach MonitorMain's first
CheckRequestSubKeys; TryAutoReboot reboots the guest by itself with AutoReboot=1, PromptForReboot asks
with AutoReboot=0 and the guest stays up until someone answers."""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenpv.backends.host import HostServices
from xenpv.harness.agent import Guest
from xenpv.harness.plugin import GUESTS_DIR

pytestmark = pytest.mark.integration

MONITOR_PARAMETERS = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Parameters"


@pytest.fixture
def coinstaller_guest(host: HostServices, guest_factory, dom0, tmp_path: Path) -> Iterator[Callable[..., Guest]]:
    """The coinstaller-era guest with dom0's back-ends and xenbus_monitor's Parameters preset (a copy of
    its YAML with a `registry:` section: the agent reads the guest from the file)."""
    guests: list[Guest] = []

    def boot(name: str, **parameters: int) -> Guest:
        text = (GUESTS_DIR / "coinstaller-era.yaml").read_text()
        assert "\nregistry:" not in text and "\nname: coinstaller-era\n" in text
        text = text.replace("\nname: coinstaller-era\n", f"\nname: {name}\n")
        text += f"registry:\n  '{MONITOR_PARAMETERS}':\n" + "".join(f"    {k}: {v}\n" for k, v in parameters.items())
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        g = Guest.boot(host, guest_factory(path), backends=dom0)
        guests.append(g)
        return g

    yield boot
    for g in reversed(guests):
        g.shutdown()
    host.check_alive("after the test")


def test_auto_reboot_reboots_once_then_the_pv_devices_are_up(coinstaller_guest, lc) -> None:
    """TryAutoReboot with AutoReboot=1, AutoRebootTimeout=0: RebootCount 0 < 1, so DoReboot at once (the
    console's reboot path: services stop, S5, boot 2). Boot 2 unplugs the emulated devices, XENVIF and
    XENVBD ask for nothing, so CheckRequestSubKeys deletes RebootCount and no third boot follows."""
    g = coinstaller_guest("monitor-autoreboot", AutoReboot=1, AutoRebootTimeout=0)
    out = lc.wait_for(g, "monitor", r"boot 2; AutoReboot 1; RebootCount none; requested by none; pending none",
                      timeout=60)
    assert "running (idle)" in out, out
    # The debug log is the kernel's, one per boot: boot 1's lines are in the agent's log file.
    assert g.console.agent_log is not None
    agent_log = g.console.agent_log.read_text()
    asked = re.findall(r"XENBUS_MONITOR\|TryAutoReboot: reboot requested by (\w+): AutoRebooting \(reboot 0 of 1; "
                       r"RebootCount now 1\) in 0s: \1 needs to restart the system to complete installation\.", agent_log)
    assert len(asked) == 1 and asked[0] in ("XENVIF", "XENVBD"), agent_log
    assert "XENVIF: reboot requested" in agent_log and "XENVBD: reboot requested" in agent_log, agent_log
    assert "SETUP|reboot: boot 2" in agent_log and "boot 3" not in agent_log, agent_log
    lc.wait_for(g, "vbd list", r"^target \d+ vbd \d+ .*connected", timeout=20)
    lc.wait_for(g, "net list", r"\bonline\b|\bup\b|\bconnected\b", timeout=20)
    assert "boot 3" not in g.console.agent_log.read_text()
    assert "running (idle); boot 2; AutoReboot 1; RebootCount none" in g.console.run("monitor")


def test_without_auto_reboot_it_prompts_and_the_guest_stays_up(coinstaller_guest, lc) -> None:
    """PromptForReboot with AutoReboot=0: the dialog names the first module that asked (both did); No
    leaves the guest on this boot, its emulated disk in use."""
    g = coinstaller_guest("monitor-prompt", AutoReboot=0)
    out = lc.wait_for(g, "monitor", r"^prompt: ", timeout=30)
    assert re.search(r"\(prompting\); boot 1; AutoReboot 0; RebootCount none; requested by (XENVIF|XENVBD);", out), out
    assert re.search(r"^prompt: (XENVIF|XENVBD) needs to restart the system to complete installation\. Press "
                     r"'Yes' to restart the system now or 'No' if you plan to restart the system later\.$", out,
                     re.M), out
    assert re.search(r"; pending (XENVBD,XENVIF|XENVIF,XENVBD)$", out.splitlines()[0]), out
    assert "XENBUS_MONITOR|PromptForReboot: reboot requested by" in g.console.run("log 400")
    assert g.console.run("monitor no") == "No: no restart until the next boot"
    out = g.console.run("monitor")
    assert "(answered no); boot 1;" in out and "prompt:" not in out, out
    assert "boot 2" not in g.console.run("log 2000")
    assert re.search(r"IDE\\Disk", g.console.run("devices")), "the emulated disk is still in use"


def test_yes_on_the_prompt_restarts_now(coinstaller_guest, lc) -> None:
    """PromptForReboot: IDYES is DoReboot(NULL, 0), the restart at once; the next boot asks for nothing, so
    its service shows no prompt, and the PV disk is up."""
    g = coinstaller_guest("monitor-yes")
    lc.wait_for(g, "monitor", r"^prompt: ", timeout=30)
    assert g.console.run("monitor yes", timeout=150) == "Yes: restarting the system: boot 2"
    out = lc.wait_for(g, "monitor", r"running \(idle\); boot 2; AutoReboot 0; RebootCount none; requested by "
                      r"none; pending none$", timeout=30)
    assert "prompt:" not in out, out
    lc.wait_for(g, "vbd list", r"^target \d+ vbd \d+ .*connected", timeout=20)


def test_a_subscriber_era_guest_has_no_monitor(boot_guest) -> None:
    """The 2015 xenbus.inf installs no xenbus_monitor (no Services\\xenbus_monitor): the service control
    manager starts nothing, the console says so."""
    g = boot_guest("subscriber-era")
    assert g.console.run("monitor") == "xenbus_monitor: not running (not installed in this guest); boot 1"
    assert "XENBUS_MONITOR" not in g.console.run("log 2000")
