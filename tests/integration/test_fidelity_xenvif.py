"""XENVIF's NET PDO start rule end to end (xcp-ng/win-xenvif 14892e7, src/xenvif/pdo.c PdoStartDevice): on
the first boot, with the emulated RTL8139 still live, the NET PDO's START fails with
STATUS_PNP_REBOOT_REQUIRED after arming the NIC unplug and asking xenbus_monitor for a reboot; after the
reboot the 8139 is gone (QMP) and the NET PDO is started and carries traffic through dom0's netback."""
from __future__ import annotations

import re
import time

import pytest

from xenpv.harness.agent import Guest

pytestmark = pytest.mark.integration

UNPLUG_KEY = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Unplug"
NET_PDO = r"XENVIF\VEN_XP&DEV_NET\0"


def _line(tree: str, prefix: str) -> str:
    lines = [line.strip() for line in tree.splitlines() if line.strip().startswith(prefix)]
    assert len(lines) == 1, f"{prefix!r} in\n{tree}"
    return lines[0]


def _emulated_nics(g: Guest) -> list[str]:
    qmp = g.machine.qmp
    assert qmp is not None
    return [d["qdev_id"] for bus in qmp.command("query-pci") for d in bus["devices"]
            if d["class_info"]["class"] == 0x0200]


def test_net_pdo_waits_for_the_reboot_that_unplugs_the_emulated_nic(host, guest_factory, dom0) -> None:
    g = Guest.boot(host, guest_factory("default"), backends=dom0)
    try:
        c = g.console
        tree = c.run("devices")
        assert "DEV_8139" in tree and _emulated_nics(g)
        net = _line(tree, NET_PDO)
        assert "problem=14:CM_PROB_NEED_RESTART (STATUS_PNP_REBOOT_REQUIRED)" in net, net
        assert "NICS = REG_DWORD 0x1" in c.run(f"registry '{UNPLUG_KEY}'")  # one NET PDO, armed once
        assert "reboot requested by: " in c.run("pkg list") and "XENVIF" in c.run("pkg list")
        assert c.run("xs read device/vif/0/state") == "1"  # the frontend never left Initialising

        assert re.match(r"boot 2 \(reboot requested by .*XENVIF", c.run("reboot", timeout=60))
        assert _emulated_nics(g) == []
        tree = c.run("devices")
        assert "DEV_8139" not in tree
        net = _line(tree, NET_PDO)
        assert "[started]" in net and "service=XENNET" in net and "problem" not in net, net
        deadline = time.monotonic() + 20.0
        while " up " not in c.run("net list"):
            assert time.monotonic() < deadline, c.run("net list")
            time.sleep(0.1)
        peer = dom0.taps[g.domain.domid][0].peer.ip
        assert not c.run(f"net ping {peer} 3").startswith("0/")
        assert "NICS = REG_DWORD 0x1" in c.run(f"registry '{UNPLUG_KEY}'")  # re-armed for the next boot
    finally:
        g.shutdown()
