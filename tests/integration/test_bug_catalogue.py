"""The historical bug catalogue (guests.bugs.CATALOGUE, the README's "Historical bug catalogue"): for every
switch, its scenario with the switch on stops the guest with the STOP code the upstream bug produced,
blaming its module and function; the same scenario with the switch off runs to the end.

This measures whether the harness catches the bug classes it is for: each switch only puts the pre-fix
branch back into the modelled driver function; the STOP comes from the kernel model's own rules.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xenpv.backends.host import HostServices
from xenpv.base.errors import WaitTimeout
from xenpv.guests.bugs import CATALOGUE
from xenpv.guests.schema import GUESTS_DIR
from xenpv.harness.agent import Guest, GuestBugcheck
from xenpv.harness.dom0 import Dom0Backends
from xenpv.harness.machine import Machine

pytestmark = pytest.mark.integration

# A machine without Xen (no platform device, no hypervisor) whose disk has the PV drivers installed: what
# 080720a is about.
NON_XEN_GUEST = """\
name: non-xen
memory: 128M
seed: 5
emulated:
  disks:
    - {id: hda, bus: 0, unit: 0, size: 64M}
  nics:
    - {id: nic0, model: rtl8139, mac: "00:16:3e:00:00:05"}
drivers:
  era: current
  packages: {xenbus: 9.1.0.10, xenvif: 9.1.0.10, xennet: 9.1.0.10, xenvbd: 9.1.0.10, xeniface: 9.1.0.10}
"""


# A PV disk with no emulated twin (xvdb is target 1; the emulated disks are targets 0 and 2), so XENVBD
# connects it on the first boot: the target a reboot then disconnects and destroys.
PV_DISK_GUEST = """\
name: pv-disk
memory: 128M
seed: 6
platform:
  - {device-id: 0x0001, revision: 1}
emulated:
  disks:
    - {id: hda, bus: 0, unit: 0, size: 64M}
pv:
  disks:
    - {vdev: xvdb, size: 16M}
drivers:
  era: current
  packages: {xenbus: 9.1.0.10, xenvbd: 9.1.0.10}
"""
XVDB = (202 << 8) | 16


@dataclass(frozen=True)
class Scenario:
    """`base`: the guest YAML (text) the switch is added to; `steps(guest)`: the console actions, which
    assert what a healthy guest answers (they only finish with the switch off). Every scenario runs with
    dom0's back-ends (blkback, netback in a namespace), as `xenpv repro` replays it."""

    base: str
    steps: Callable[[Guest], None]


def _default() -> str:
    return (GUESTS_DIR / "default.yaml").read_text()


def _s4_and_back(g: Guest) -> None:
    """Hibernation for real: `power S4` (the children and then the XENBUS FDO release their interfaces on
    the way to D3, the image goes to the hiberfile), the machine off, then powered on again."""
    g.hibernate()
    g.power_on()
    assert g.console.run("xs read name") == g.domain.name  # the store works in the new domain


def _reboot_twice(g: Guest) -> None:
    """The first reboot unplugs the emulated NIC, so the NET PDO and XENNET's miniport start on boot 2 (XV
    pdo.c PdoStartDevice fails the first boot's START with STATUS_PNP_REBOOT_REQUIRED); the second reboot
    pauses that miniport for the Sx IRP and then shuts it down."""
    assert re.fullmatch(r"boot 2( \(.*\))?", g.console.run("reboot", timeout=60))
    _wait_console(g, "net list", r" up ")
    assert re.fullmatch(r"boot 3( \(.*\))?", g.console.run("reboot", timeout=60))
    assert "[started] service=XENBUS" in g.console.run("devices")


def _wait_console(g: Guest, command: str, pattern: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        out = g.console.run(command)
        if re.search(pattern, out):
            return out
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"{command!r}: no {pattern!r} within {timeout}s; last output:\n{out}")
        time.sleep(0.05)


def _pv_disk_reboot(g: Guest) -> None:
    connected = rf"target 1 vbd {XVDB} connected"
    _wait_console(g, "vbd list", connected)
    assert g.console.run("vbd write 1 0 seq 8").startswith("wrote 8 sectors")
    assert re.fullmatch(r"boot 2( \(.*\))?", g.console.run("reboot", timeout=60))
    _wait_console(g, "vbd list", connected)


def _pv_disk_migrate(g: Guest) -> None:
    """Local migration: the toolstack's suspend, save, restore into a new QEMU and domain, where the
    vCPU's suspend hypercall returns and XENBUS runs the EARLY and LATE callbacks."""
    connected = rf"target 1 vbd {XVDB} connected"
    _wait_console(g, "vbd list", connected)
    first = g.domain.domid
    g.migrate()
    assert g.domain.domid != first
    _wait_console(g, "vbd list", connected)
    assert g.console.run("vbd write 1 0 seq 8").startswith("wrote 8 sectors")


def _boot_only(g: Guest) -> None:
    tree = g.console.run("devices")
    assert r"IDE\DiskQEMU_HARDDISK\0.0.0" in tree and "XENBUS" not in tree
    assert "not running on Xen" in g.console.run("log 400")


def _iface_grant_twice(g: Guest) -> None:
    """A user-mode program grants a page to dom0 with RequestId 1 and asks again with the same RequestId,
    which XENIFACE refuses (STATUS_INVALID_PARAMETER); the program's end revokes the first grant."""
    out = g.console.run("iface grant 0 1 1 1")
    assert re.fullmatch(r"request 1: granted refs \d+\nrequest 1: STATUS_INVALID_PARAMETER\n"
                        r"process ended: 1 grant\(s\) revoked", out), out
    # The first grant went with the program: a new program may use RequestId 1 again.
    assert re.match(r"request 1: granted refs \d+\n", g.console.run("iface grant 0 1 1"))


SCENARIOS: dict[str, Scenario] = {
    "xenbus-0250399": Scenario(_default(), _s4_and_back),
    "xenbus-080720a": Scenario(NON_XEN_GUEST, _boot_only),
    "xenbus-55384e7": Scenario(PV_DISK_GUEST, _pv_disk_migrate),
    "xennet-0e04a15": Scenario(_default(), _reboot_twice),
    "xenvbd-667456d": Scenario(PV_DISK_GUEST, _pv_disk_reboot),
    "xenvbd-9f7f8b2": Scenario(PV_DISK_GUEST, _pv_disk_reboot),
    "xenvbd-4a32464": Scenario(PV_DISK_GUEST, _pv_disk_reboot),
    "xeniface-1019522": Scenario(_default(), _iface_grant_twice),
}


@pytest.fixture
def boot(host: HostServices, guest_factory: Callable[..., Machine], artifacts: Path) -> Iterator[Callable[[Path], Guest]]:
    """`boot(yaml)` boots the guest with dom0's back-ends; everything goes after the test."""
    dom0 = Dom0Backends.start(host, artifacts / "dom0")
    guests: list[Guest] = []

    def start(path: Path) -> Guest:
        g = Guest.boot(host, guest_factory(path), backends=dom0)
        guests.append(g)
        return g

    try:
        yield start
    finally:
        for g in reversed(guests):
            g.shutdown()
        dom0.stop()
    host.check_alive("after the test")


def test_every_switch_has_a_scenario() -> None:
    assert set(SCENARIOS) == set(CATALOGUE)


def _write(tmp_path: Path, name: str, scenario: Scenario, bugs: list[str]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(scenario.base + f"bugs: [{', '.join(bugs)}]\n")
    return path


def _innermost_driver_function(dump, module: str) -> str | None:
    """The function of the innermost frame of `module` (stack/drivers/<module>/...) in the dump's traceback."""
    folder = module.removesuffix(".sys")
    found = None
    for m in re.finditer(r'File "[^"]*/stack/drivers/([^/"]+)(?:/[^"]*)?", line \d+, in (\S+)', dump.traceback):
        if m.group(1).removesuffix(".py") == folder:
            found = m.group(2)
    return found


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_switch_on_stops_with_the_historical_stop(name: str, boot, tmp_path: Path) -> None:
    switch, scenario = CATALOGUE[name], SCENARIOS[name]
    with pytest.raises(GuestBugcheck) as stop:
        scenario.steps(boot(_write(tmp_path, name, scenario, [name])))
    dump = stop.value.dump
    assert (dump.code, dump.module) == (switch.stop, switch.module), dump.stop_screen() + dump.traceback
    assert dump.name == switch.stop_name
    assert _innermost_driver_function(dump, switch.module) == switch.function.split(".")[-1], dump.traceback
    assert (dump.function, dump.bucket) == (switch.function, switch.bucket)


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_switch_off_the_same_scenario_passes(name: str, boot, tmp_path: Path) -> None:
    scenario = SCENARIOS[name]
    scenario.steps(boot(_write(tmp_path, name, scenario, [])))
