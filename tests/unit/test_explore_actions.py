"""The explorer's action space (harness.explore): one seed draws one sequence; a guest without Xen gets no
dom0 actions; removing XENBUS or XENVBD installs it again in the same action (the model's reboot keeps
unplugged disks unplugged); fault injections only with --faults; every action is one replays can make."""
from __future__ import annotations

import random

from xenpv.base.runrecord import CONSOLE, DOM0, FAULT, LIFECYCLE, XENSTORE
from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.harness.explore import ActionSpace, GuestState


def draws(guest: str, seed: int, n: int = 400, faults: bool = False) -> list:
    g = load_guest(GUESTS_DIR / f"{guest}.yaml")
    space = ActionSpace(g, random.Random(seed), faults=faults)
    state = GuestState(g)
    return [space.draw(state) for _ in range(n)]


def lines(plans: list) -> list[str]:
    return [e.describe() for p in plans for e in p.events]


def test_one_seed_draws_one_sequence() -> None:
    assert lines(draws("default", 4)) == lines(draws("default", 4))
    assert lines(draws("default", 4)) != lines(draws("default", 5))


def test_every_kind_is_drawn_and_each_is_replayable() -> None:
    plans = draws("default", 1)
    kinds = {e.kind for p in plans for e in p.events}
    assert kinds == {CONSOLE, DOM0, XENSTORE, LIFECYCLE}  # no fault without --faults
    names = {p.name for p in plans}
    assert {"reboot", "power-S3", "power-S4", "migrate", "pkg-install", "pkg-upgrade", "backend-restart",
            "dom0-xs-state", "iface-grant"} <= names
    grants = [p.events[0].line.split() for p in plans if p.name == "iface-grant"]
    assert any(len(set(g[4:])) < len(g[4:]) for g in grants)  # a RequestId repeated: XENIFACE's refusal path
    for p in plans:
        if p.name == "power-S4":  # S4 for real powers QEMU off: the power-on is part of the action
            assert [e.data["op"] for e in p.events] == ["hibernate", "power-on"]
    for p in plans:
        for e in p.events:
            if e.kind == XENSTORE:
                assert "{domid}" in e.data["path"] and e.data["op"] in ("write", "rm")
            if e.kind == DOM0:
                assert e.data["backend"] in ("blkback", "netback")
    assert FAULT in {e.kind for p in draws("default", 1, faults=True) for e in p.events}


def test_boot_path_packages_are_reinstalled_in_the_action_that_removes_them() -> None:
    for p in draws("default", 2, 600):
        removed = [e.line.split()[2] for e in p.events if e.line and e.line.startswith("pkg remove")]
        if removed and removed[0] in ("xenbus", "xenvbd"):
            assert p.name == "pkg-remove-reinstall" and p.events[1].line.startswith(f"pkg install {removed[0]} ")


def test_a_guest_without_xen_gets_no_dom0_actions() -> None:
    assert {e.kind for p in draws("no-platform", 3) for e in p.events} == {CONSOLE}
