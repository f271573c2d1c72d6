"""Shared by the integration tests of a guest losing and regaining its domain (test_save_restore.py,
test_hibernate.py): dom0's back-ends, a guest whose PV drivers own its devices, and the post-resume checks
of issue 13 (the `lc` fixture is this module, so tests call lc.check_after_resume(...))."""
from __future__ import annotations

import hashlib
import sys
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenpv.backends.host import HostServices
from xenpv.harness.agent import Guest
from xenpv.harness.dom0 import Dom0Backends
from xenpv.harness.lifecycle import BadSaveImage, LifecycleError, SaveFailed, read_manifest
from xenpv.harness.netns import NetNamespace
from xenpv.harness.machine import Machine

ETH_P_ARP = 0x0806
DATA_LBA = 4096
DATA_SECTORS = 8


@pytest.fixture
def dom0(host: HostServices, artifacts: Path) -> Iterator[Dom0Backends]:
    backends = Dom0Backends.start(host, artifacts / "dom0")
    yield backends
    backends.stop()


@pytest.fixture
def io_guest(host: HostServices, guest_factory: Callable[..., Machine], dom0: Dom0Backends) -> Iterator[Callable[..., Guest]]:
    """A guest whose PV drivers own its disks and NICs: booted with dom0's back-ends, then rebooted so the
    unplug its drivers asked for takes effect."""
    guests: list[Guest] = []

    def boot(spec: str = "default") -> Guest:
        g = Guest.boot(host, guest_factory(spec), backends=dom0)
        guests.append(g)
        assert re.match(r"boot 2", g.console.run("reboot", timeout=60))
        wait_for(g, "vbd list", r"^target \d+ vbd \d+ .*connected", timeout=20)
        wait_for(g, "net list", r"\bonline\b|\bup\b|\bconnected\b", timeout=20)
        return g

    yield boot
    for g in reversed(guests):
        g.shutdown()
    host.check_alive("after the test")


def wait_for(g: Guest, command: str, pattern: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = g.console.run(command, timeout=30)
        if re.search(pattern, out, re.M):
            return out
        if time.monotonic() >= deadline:
            raise AssertionError(f"{command!r} never matched {pattern!r}; last output:\n{out}")
        time.sleep(0.1)


def references(g: Guest) -> dict[str, int]:
    return {name: int(count) for name, count in (line.split() for line in g.console.run("interfaces").splitlines())}


def emulated(machine: Machine) -> tuple[dict[str, bool], set[int]]:
    """What QMP says is left of the emulated devices: disks with their medium, NIC device IDs."""
    assert machine.qmp is not None
    disks = {b["qdev"]: "inserted" in b for b in machine.qmp.command("query-block") if b.get("qdev")}
    nics = {d["id"]["device"] for bus in machine.qmp.command("query-pci") for d in bus["devices"]
            if d["class_info"]["class"] == 0x0200}
    return disks, nics


def write_marker(g: Guest, pattern: str) -> str:
    out = g.console.run(f"vbd write 0 {DATA_LBA} {pattern} {DATA_SECTORS}")
    m = re.search(r"sha256 (\w+)", out)
    assert m, out
    return m.group(1)


def image_sha(g: Guest) -> str:
    """The marker's sectors read from the image file itself, outside the guest."""
    assert g.storage is not None or g.machine.paths.image_dir.exists()
    image = (g.storage or g.machine.paths.image_dir) / "hda.img"
    with open(image, "rb") as f:
        f.seek(DATA_LBA * 512)
        return hashlib.sha256(f.read(DATA_SECTORS * 512)).hexdigest()


class ArpCapture:
    """Every ARP frame any interface of the namespace sees (including TAPs made after it opened)."""

    def __init__(self, ns: NetNamespace) -> None:
        with ns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
        self.sock.settimeout(0.1)

    def gratuitous(self, address: str, timeout: float = 5.0, want: int = 3) -> int:
        """How many gratuitous ARPs (sender and target both `address`) arrive within `timeout`."""
        ip = socket.inet_aton(address)
        seen = 0
        deadline = time.monotonic() + timeout
        while seen < want and time.monotonic() < deadline:
            try:
                frame = self.sock.recv(2048)
            except socket.timeout:
                continue
            arp = frame[14:42]
            if len(arp) == 28 and struct.unpack("!H", arp[6:8])[0] in (1, 2) and arp[14:18] == ip and arp[24:28] == ip:
                seen += 1
        return seen

    def close(self) -> None:
        self.sock.close()


def check_after_resume(g: Guest, before: dict, marker: str, dom0: Dom0Backends, capture: ArpCapture) -> None:
    """The post-resume checks of issue 13."""
    disks, nics = emulated(g.machine)
    assert disks.get("hda") is False and 0x8139 not in nics, (disks, nics)  # unplugged again (08def99)
    assert g.console.run("lifecycle status").startswith("running in dom")
    wait_for(g, "vbd list", r"^target 0 vbd \d+ .*connected", timeout=20)
    assert image_sha(g) == marker  # data written before the save, on the image
    out = g.console.run(f"vbd read 0 {DATA_LBA} {DATA_SECTORS}")
    assert re.search(rf"^sha256 {marker}\b", out, re.M), out
    again = write_marker(g, "c3")
    assert image_sha(g) == again
    taps = dom0.taps[g.domain.domid]
    assert capture.gratuitous(str(taps[0].guest)) == 3
    out = wait_for(g, f"net ping {taps[0].peer.ip} 3", r"3/3 replies", timeout=20)
    assert references(g) == before, (references(g), before)
    assert g.console.run("xs write data/probe resumed") == "OK"
    assert g.console.run("xs read data/probe") == "resumed"
    # The FDO's `device` watch was dead in the new domain and added again (its LATE callback): a device
    # the toolstack adds now is found (a new XENBUS child), which only that watch makes the FDO look for.
    assert "DEV_VKBD" not in g.console.run("devices")
    g.toolstack.xs.write(f"/local/domain/{g.domain.domid}/device/vkbd/0/state", "1")
    wait_for(g, "devices", r"XENBUS\\VEN_XP&DEV_VKBD", timeout=10)




@pytest.fixture
def lc():
    """This module's helpers (test modules are imported with importlib and cannot import each other)."""
    return sys.modules[__name__]
