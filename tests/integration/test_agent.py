"""The guest agent as a user drives it: boot, console commands, a bugcheck that fails with its dump, and
a harness too slow for the guest model's deadlines, which is no STOP."""
from __future__ import annotations

import os
import signal

import pytest

from xenpv.base.errors import HarnessTooSlow
from xenpv.harness.agent import GuestBugcheck
from xenpv.stack.agent.console import TOO_SLOW_EXIT, TOO_SLOW_MARKER

pytestmark = pytest.mark.integration


def test_guest_boots_and_answers_on_its_console(boot_guest) -> None:
    g = boot_guest("default")
    pci = g.console.run("pci")
    assert "5853:0001" in pci and "10ec:8139" in pci
    assert "HKLM" in g.console.run("registry")
    assert g.console.run("frobnicate").startswith("unknown command")


def test_injected_bugcheck_stops_the_guest_with_a_dump(boot_guest) -> None:
    g = boot_guest("no-platform")
    with pytest.raises(GuestBugcheck) as ei:
        g.console.run("bugcheck 0xD1 0x10 2 0 0")
    dump = ei.value.dump
    assert (dump.code, dump.name, dump.module) == (0xD1, "DRIVER_IRQL_NOT_LESS_OR_EQUAL", "agent")
    assert dump.params[:2] == [0x10, 2]
    assert ei.value.dump_path.exists()
    assert "*** STOP: 0x000000D1" in (g.artifacts / "console.log").read_text()


def test_default_guest_discovers_its_pv_devices_through_the_installed_packages(boot_guest) -> None:
    g = boot_guest("default")
    tree = g.console.run("devices")
    for cls in ("VBD", "VIF", "IFACE", "CONS"):
        assert f"XENBUS\\VEN_XP&DEV_{cls}\\_" in tree, tree
    assert "installed xenbus" in g.console.run("log 200")
    refs = g.console.run("interfaces")
    assert "XENBUS.STORE" in refs


def test_guest_xenstore_through_the_store_interface(boot_guest) -> None:
    g = boot_guest("default")
    before = g.console.run("interfaces")
    assert g.console.run("xs read name") == "default"
    assert g.console.run("xs write data/hello world") == "OK"
    assert g.console.run("xs read data/hello") == "world"
    assert "hello" in g.console.run("xs ls data").splitlines()
    assert "STATUS_ACCESS_DENIED" in g.console.run("xs write /local/domain/0/x y")
    assert g.console.run("interfaces") == before  # every reference the commands took was released


def test_a_xenstored_that_stops_answering_is_the_harness_too_slow_not_a_stop(boot_guest, host) -> None:
    """xenstored frozen (as a host far too loaded would leave it): the guest gives up on its deadline and
    says so; no STOP screen, no crash dump, and the harness raises HarnessTooSlow, not GuestBugcheck."""
    g = boot_guest("default")
    os.kill(host.xenstored.pid, signal.SIGSTOP)
    try:
        with pytest.raises(HarnessTooSlow, match="the harness being too slow: no reply from xenstored to "):
            g.console.run("xs read name")
    finally:
        os.kill(host.xenstored.pid, signal.SIGCONT)
    assert g.console.child.wait() == TOO_SLOW_EXIT
    log = (g.artifacts / "console.log").read_text()
    assert TOO_SLOW_MARKER in log and "*** STOP" not in log
    assert not list(g.artifacts.glob("crash-*.json"))
