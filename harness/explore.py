"""`xenpv explore`: a bounded random search, in the spirit of syzkaller, over what a guest can go through.

From one seed the explorer draws actions and carries them out on a booted guest (harness.replay's
ReplayEnv.step, so each lands in the guest's run record exactly as a replay will make it):

- driver packages installed, upgraded and removed across the catalogue's versions and eras, and reboots
  (which make them take effect). XENBUS and XENVBD are installed again (in a drawn version) in the same
  action that removes them: the model's `reboot` keeps the machine, so disks an earlier boot unplugged
  stay unplugged, where real Xen restarts QEMU and gives them back; a guest rebooted without them would
  stop with a 0x7B (INACCESSIBLE_BOOT_DEVICE) that no real guest gets;
- power transitions: S3 and the wake to S0; on a Xen guest S4 for real (Guest.hibernate: the hiberfile,
  QEMU powered off) and the power-on (a new QEMU and domain), and a local migration (save and restore);
- I/O through the PV disks and NICs (reads, writes, pings) and the guest's own xenstore;
- on Xen guests, user-mode grants through XENIFACE (`iface grant`: a program asks for one to three grants,
  its RequestIds drawn from a small range, so one is now and then repeated and refused);
- back-end kills and restarts (blkback, netback);
- dom0 xenstore writes and removals under the guest's device paths (the back-end `state` and `online`
  nodes: what a toolstack or a back-end may write);
- with --faults, the console's fault injections (`fault ...`, `bugcheck ...`): bugs on purpose.

Toolstack hot-add and hot-remove of vbd/vif devices are not explored: the toolstack has no such
operation yet (backends.toolstack creates and destroys whole domains).

It stops at the first finding (or goes on with --keep-going): a STOP (the agent's crash dump), a console
line that did not come back within the watchdog (a hang), an agent that died, a dom0 daemon or QEMU that
died. Each finding is a dump with its run record, so `xenpv repro` and `--minimize` take it as it is.
A guest is rebooted from scratch (a new machine and domain) every --actions-per-boot actions. The guest
model runs with the seeded schedule (stack.kernel.schedule), its seed drawn from the explorer's seed, so
a replay of a finding takes the same scheduling decisions.

A run where the harness fell behind (HarnessTooSlow) is counted and ended, never reported as a finding:
it says nothing about the drivers. So is a run that reached a path the harness does not model faithfully
(stack.notmodelled, e.g. a boot that needs a device an earlier boot of the same QEMU unplugged); its reason
is kept in the report.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenpv.base.runrecord import DOM0, LIFECYCLE, XENSTORE, RecordEvent, Schedule, console_kind
from xenpv.guests.schema import GuestDefinition
from xenpv.harness.agent import GuestBugcheck
from xenpv.harness.replay import COMMAND_WATCHDOG, NOT_MODELLED, STOP, TOO_SLOW, UNREPLAYABLE, Outcome, ReplayEnv
from xenpv.base.errors import HarnessTooSlow, NotModelledPath
from xenpv.stack.install.packages import PACKAGE_NAMES, packages_named

log = logging.getLogger("harness.explore")

ACTIONS_PER_BOOT = 40
BOOT_PATH_PACKAGES = ("xenbus", "xenvbd")  # without them the boot disk is gone once it was unplugged
XENBUS_STATES = (1, 2, 3, 4, 5, 6)  # Initialising .. Closed (xenabi.xenbus_state); 0 and 7 are no state


@dataclass
class Plan:
    """One drawn action: a name for the statistics and the events that carry it out."""

    name: str
    events: list[RecordEvent]


def _console(line: str) -> RecordEvent:
    return RecordEvent(0.0, console_kind(line), "harness", {"line": line})


def _dom0(action: str, backend: str) -> RecordEvent:
    return RecordEvent(0.0, DOM0, "harness", {"action": action, "backend": backend})


def _lifecycle(op: str) -> RecordEvent:
    return RecordEvent(0.0, LIFECYCLE, "harness", {"op": op})


def _xs(op: str, path: str, value: str = "") -> RecordEvent:
    data: dict[str, Any] = {"op": op, "path": path}
    if op == "write":
        data["value"] = value
    return RecordEvent(0.0, XENSTORE, "harness", data)


@dataclass
class GuestState:
    """What the explorer keeps of the guest to draw sensible actions (which back-ends are down)."""

    guest: GuestDefinition
    down: set[str] = field(default_factory=set)


class ActionSpace:
    """The actions of one guest definition, drawn from one random generator."""

    def __init__(self, guest: GuestDefinition, rng: random.Random, *, faults: bool) -> None:
        self.guest = guest
        self.rng = rng
        self.faults = faults
        self.vbds = [d.vdev for d in guest.pv_disks]
        self.vifs = list(range(len(guest.pv_nics)))
        self.peers = [str(nic.addressing(i)[0].ip) for i, nic in enumerate(guest.pv_nics)]
        self.xen = bool(guest.platform)
        # (weight, draw) pairs; a draw returns a Plan.
        self.table: list[tuple[int, Any]] = [(6, self.package), (3, self.reboot), (3, self.power), (8, self.io),
                                             (3, self.guest_xenstore), (2, self.look)]
        if self.xen:
            self.table += [(2, self.backend), (3, self.dom0_xenstore), (1, self.migrate), (1, self.iface)]
        if faults:
            self.table.append((2, self.fault))

    def draw(self, state: GuestState) -> Plan:
        total = sum(w for w, _ in self.table)
        pick = self.rng.randrange(total)
        for weight, draw in self.table:
            if pick < weight:
                return draw(state)
            pick -= weight
        raise AssertionError("weights")

    def package(self, state: GuestState) -> Plan:
        name = self.rng.choice(PACKAGE_NAMES)
        op = self.rng.choice(("install", "upgrade", "remove"))
        version = self.rng.choice(packages_named(name)).version
        if op == "remove":
            if name in BOOT_PATH_PACKAGES:  # see the module docstring
                return Plan("pkg-remove-reinstall", [_console(f"pkg remove {name}"),
                                                     _console(f"pkg install {name} {version}")])
            return Plan("pkg-remove", [_console(f"pkg remove {name}")])
        return Plan(f"pkg-{op}", [_console(f"pkg {op} {name} {version}")])

    def reboot(self, state: GuestState) -> Plan:
        return Plan("reboot", [_console("reboot")])

    def power(self, state: GuestState) -> Plan:
        if self.xen and self.rng.random() < 0.5:
            return Plan("power-S4", [_lifecycle("hibernate"), _lifecycle("power-on")])
        return Plan("power-S3", [_console("power S3"), _console("power S0")])

    def migrate(self, state: GuestState) -> Plan:
        return Plan("migrate", [_lifecycle("migrate")])

    def io(self, state: GuestState) -> Plan:
        choices = ["vbd list", "net list"]
        if self.vbds:
            target = self.rng.randrange(len(self.vbds))
            lba, count = self.rng.randrange(4096), self.rng.choice((1, 8, 16))
            choices += [f"vbd read {target} {lba} {count} --timeout 5",
                        f"vbd write {target} {lba} seq {count} --timeout 5", f"vbd flush {target} --timeout 5"]
        if self.peers:
            choices.append(f"net ping {self.rng.choice(self.peers)} 1")
        line = self.rng.choice(choices)
        return Plan("io-" + line.split()[0] + "-" + line.split()[1], [_console(line)])

    def guest_xenstore(self, state: GuestState) -> Plan:
        key = f"data/explore{self.rng.randrange(4)}"
        line = self.rng.choice((f"xs write {key} {self.rng.randrange(1000)}", f"xs read {key}", f"xs rm {key}",
                                "xs ls device"))
        return Plan("xs-" + line.split()[1], [_console(line)])

    def iface(self, state: GuestState) -> Plan:
        ids = [str(self.rng.randrange(1, 4)) for _ in range(self.rng.randrange(1, 4))]
        return Plan("iface-grant", [_console(f"iface grant 0 {self.rng.randrange(1, 5)} {' '.join(ids)}")])

    def look(self, state: GuestState) -> Plan:
        return Plan("look", [_console(self.rng.choice(("devices", "interfaces", "pci", "log 20", "pkg list")))])

    def backend(self, state: GuestState) -> Plan:
        name = self.rng.choice(("blkback", "netback"))
        if name in state.down:
            return Plan("backend-start", [_dom0("backend-start", name)])
        action = self.rng.choice(("backend-restart", "backend-kill"))
        return Plan(action, [_dom0(action, name)])

    def dom0_xenstore(self, state: GuestState) -> Plan:
        devices = [f"backend/vbd/{{domid}}/{v}" for v in self.vbds] + [f"backend/vif/{{domid}}/{i}" for i in self.vifs]
        if not devices:
            return self.look(state)
        device = "/local/domain/0/" + self.rng.choice(devices)
        if self.rng.random() < 0.75:
            return Plan("dom0-xs-state", [_xs("write", f"{device}/state", str(self.rng.choice(XENBUS_STATES)))])
        if self.rng.random() < 0.5:
            return Plan("dom0-xs-online", [_xs("write", f"{device}/online", self.rng.choice(("0", "1")))])
        return Plan("dom0-xs-rm", [_xs("rm", f"{device}/{self.rng.choice(('online', 'state', 'feature-barrier'))}")])

    def fault(self, state: GuestState) -> Plan:
        line = self.rng.choice(("fault leak-ref STORE", "fault irql-query-interface", "fault grant",
                                "fault revoke-in-use", f"bugcheck 0x{self.rng.choice((0xE2, 0xD1, 0x9F)):X}"))
        return Plan("fault-" + line.split()[1], [_console(line)])


@dataclass
class Finding:
    outcome: Outcome
    boot: int
    action: int


@dataclass
class ExploreReport:
    seed: int
    seconds: float
    boots: int = 0
    actions: int = 0
    too_slow: int = 0
    not_modelled: list[str] = field(default_factory=list)  # why each such run ended
    unreplayable: int = 0
    findings: list[Finding] = field(default_factory=list)
    by_action: Counter[str] = field(default_factory=Counter)

    @property
    def actions_per_second(self) -> float:
        return self.actions / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "seconds": round(self.seconds, 1), "boots": self.boots, "actions": self.actions,
                "actions_per_second": round(self.actions_per_second, 2), "too_slow": self.too_slow,
                "not_modelled": self.not_modelled,
                "by_action": dict(sorted(self.by_action.items())),
                "findings": [{"kind": f.outcome.kind, "bucket": f.outcome.bucket, "dump": str(f.outcome.dump),
                              "reason": f.outcome.reason, "boot": f.boot, "action": f.action} for f in self.findings]}


def explore(guest: GuestDefinition, *, seconds: float, seed: int, artifacts: Path, faults: bool = False,
            actions_per_boot: int = ACTIONS_PER_BOOT, keep_going: bool = False, qemu: str | None = None,
            watchdog: float = COMMAND_WATCHDOG) -> ExploreReport:
    """Explore for about `seconds` (an action under way is finished; a hang takes up to the watchdog)."""
    rng = random.Random(seed)
    space = ActionSpace(guest, rng, faults=faults)
    report = ExploreReport(seed, 0.0)
    t0 = time.monotonic()
    deadline = t0 + seconds
    with ReplayEnv(artifacts, qemu=qemu) as env:
        while time.monotonic() < deadline and (keep_going or not report.findings):
            report.boots += 1
            run_dir = artifacts / f"boot-{report.boots}"
            schedule = Schedule("seeded", rng.randrange(1 << 31))
            labels = {"made-by": "xenpv explore", "explore-seed": str(seed), "boot": str(report.boots)}
            found = _one_boot(env, space, guest, run_dir, schedule, labels, deadline, actions_per_boot, report,
                              watchdog)
            if not found:
                shutil.rmtree(run_dir, ignore_errors=True)  # only findings keep their artifacts
    report.seconds = time.monotonic() - t0
    (artifacts / "explore-report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _one_boot(env: ReplayEnv, space: ActionSpace, guest: GuestDefinition, run_dir: Path, schedule: Schedule,
              labels: dict[str, str], deadline: float, actions_per_boot: int, report: ExploreReport,
              watchdog: float) -> bool:
    try:
        machine, booted = env.boot(guest, run_dir, schedule=schedule, labels=labels)
    except GuestBugcheck as stop:
        report.findings.append(Finding(Outcome(STOP, f"while booting: {stop.dump.stop_line()}", stop.bucket,
                                               stop.dump_path, 0, stop.dump.schedule), report.boots, 0))
        return True
    except HarnessTooSlow:
        report.too_slow += 1
        return False
    except NotModelledPath as limit:
        report.not_modelled.append(f"boot {report.boots}: {limit}")
        return False
    state = GuestState(guest)
    index = 0
    try:
        for _ in range(actions_per_boot):
            if time.monotonic() >= deadline:
                break
            plan = space.draw(state)
            report.by_action[plan.name] += 1
            report.actions += 1
            for event in plan.events:
                index += 1
                outcome = env.step(booted, event, index, run_dir, state.down, watchdog=watchdog)
                if outcome is None:
                    outcome = env.check_dom0(machine, booted, index, run_dir, state.down)
                if outcome is None:
                    continue
                if outcome.kind == TOO_SLOW:
                    report.too_slow += 1
                    return False
                if outcome.kind == NOT_MODELLED:
                    report.not_modelled.append(f"boot {report.boots}: {outcome.reason}")
                    return False
                if outcome.kind == UNREPLAYABLE:  # the explorer drew something replays cannot make: a bug here
                    raise AssertionError(outcome.reason)
                report.findings.append(Finding(outcome, report.boots, index))
                return True
    finally:
        env.finish(machine, booted)
    return False


__all__ = ["ActionSpace", "ExploreReport", "GuestState", "Plan", "explore"]
