"""The minimiser on synthetic cases (harness.minimize): ddmin returns a 1-minimal sub-sequence in order, fault
parameters shrink while the failure holds, and the console script it writes reads back to the same actions."""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.base.errors import ConfigError
from xenpv.base.runrecord import CONSOLE, DOM0, FAULT, LIFECYCLE, XENSTORE, RecordEvent, Schedule, new_record
from xenpv.harness.minimize import (Minimizer, ddmin, parse_console_script, simpler_lines, simplify_parameters,
                                    write_console_script, write_regression_test)
from xenpv.harness.replay import domid_template, fill_domid, replayable


class Counting:
    """A failure predicate that counts its calls."""

    def __init__(self, fails) -> None:
        self.fails = fails
        self.calls = 0

    def __call__(self, items: list) -> bool:
        self.calls += 1
        return self.fails(items)


def needs(*wanted: int):
    return Counting(lambda items: all(w in items for w in wanted))


@pytest.mark.parametrize("wanted", [(17,), (3, 31), (0, 1, 2), (5, 20, 33), ()])
def test_ddmin_finds_exactly_the_essential_items_among_padding(wanted: tuple[int, ...]) -> None:
    items = list(range(34))
    fails = needs(*wanted)
    assert ddmin(items, fails) == list(wanted)
    assert fails.calls < 120  # delta debugging, not all subsets


def test_ddmin_keeps_order_and_is_one_minimal_for_an_ordered_failure() -> None:
    """The failure needs `b` after `a` (a fault then the power transition that trips it)."""
    items = ["pad"] * 10 + ["a"] + ["pad"] * 10 + ["b"] + ["pad"] * 10

    def fails(seq: list[str]) -> bool:
        return "a" in seq and "b" in seq and seq.index("a") < seq.index("b")

    result = ddmin(items, fails)
    assert result == ["a", "b"]
    for i in range(len(result)):  # 1-minimal: no single removal still fails
        assert not fails(result[:i] + result[i + 1:])


def test_ddmin_of_a_failure_that_needs_a_run_of_items() -> None:
    items = list(range(20))
    result = ddmin(items, lambda seq: sum(1 for x in seq if x % 2 == 0) >= 3)
    assert len(result) == 3 and all(x % 2 == 0 for x in result)


def test_simpler_forms_of_a_fault_line_drop_optional_numbers_then_zero_them() -> None:
    assert simpler_lines("bugcheck 0xD1 0x10 2 0 0") == ["bugcheck 0xD1 0x10 2 0", "bugcheck 0xD1 0x10 2",
                                                        "bugcheck 0xD1 0x10", "bugcheck 0xD1", "bugcheck 0 0x10 2 0 0",
                                                        "bugcheck 0xD1 0 2 0 0", "bugcheck 0xD1 0x10 0 0 0"]
    assert simpler_lines("fault leak-ref STORE") == []
    assert simpler_lines('xs write "unbalanced') == []


def line(text: str) -> RecordEvent:
    return RecordEvent(0.0, FAULT, "agent", {"line": text})


def test_parameters_shrink_while_the_bucket_holds() -> None:
    """The STOP needs the code 0xD1 and a non-zero p2: p1 goes to 0 and p3, p4 go."""
    def fails(events: list[RecordEvent]) -> bool:
        words = (events[0].line or "").split()
        return words[:2] == ["bugcheck", "0xD1"] and len(words) > 3 and int(words[3], 0) != 0

    result = simplify_parameters([line("bugcheck 0xD1 0x10 2 7 9")], fails)
    assert [e.line for e in result] == ["bugcheck 0xD1 0 2"]


def test_the_minimizer_caches_replays_and_refuses_a_record_that_does_not_fail() -> None:
    events = [line(f"xs write data/p{n} {n}") for n in range(12)] + [line("bugcheck 0xE2")]
    calls = []

    def replay(evs: list[RecordEvent]) -> str | None:
        calls.append(len(evs))
        return "0xE2_agent!_bugcheck" if any(e.line == "bugcheck 0xE2" for e in evs) else None

    minimizer = Minimizer("0xE2_agent!_bugcheck", replay)
    result = minimizer.run(events)
    assert [e.line for e in result.events] == ["bugcheck 0xE2"]
    assert result.tests == len(calls)
    before = len(calls)
    assert minimizer.fails(list(events)) and len(calls) == before  # asked again: from the cache
    with pytest.raises(ConfigError, match="does not reproduce 0xD1_x"):
        Minimizer("0xD1_x", replay).run(events)


def test_console_script_round_trip_with_dom0_actions(tmp_path: Path) -> None:
    record = new_record("default", "/nowhere/default.yaml", "name: default\nseed: 5\n", 5,
                        schedule=Schedule("seeded", 9))
    events = [line("fault leak-ref STORE"),
              RecordEvent(1.0, DOM0, "harness", {"action": "backend-kill", "backend": "blkback"}),
              RecordEvent(2.0, XENSTORE, "harness", {"op": "write", "path": "/local/domain/0/backend/vbd/{domid}/768/state",
                                                      "value": "6"}),
              RecordEvent(3.0, XENSTORE, "harness", {"op": "rm", "path": "/local/domain/{domid}/data/x y"}),
              RecordEvent(4.0, LIFECYCLE, "harness", {"op": "hibernate"}),
              RecordEvent(5.0, LIFECYCLE, "harness", {"op": "power-on"}),
              RecordEvent(6.0, LIFECYCLE, "harness", {"op": "save", "checkpoint": True}),
              RecordEvent(7.0, "console", "agent", {"line": "power S4"})]
    script = write_console_script(tmp_path / "s.console", tmp_path / "s.yaml", record, events, "0xDEAD_x!y", Path("d"))
    parsed = parse_console_script(script)
    assert parsed.expect == "0xDEAD_x!y"
    assert parsed.record.schedule == Schedule("seeded", 9) and parsed.record.seed == 5
    assert parsed.record.guest_yaml == record.guest_yaml
    assert [(e.kind, e.data) for e in parsed.record.events] == [(e.kind, e.data) for e in events]
    test = write_regression_test(tmp_path / "test_x.py", record, events, "0xDEAD_x!y", Path("d"), "5 to 5")
    compile(test.read_text(), str(test), "exec")  # a test file Python accepts


@pytest.mark.parametrize("text, message", [
    ("power S4\n", "no `# guest: FILE` line"),
    ("# guest: missing.yaml\npower S4\n", "cannot be read"),
    ("# guest: g.yaml\n!backend-frob blkback\n", ":2: not a dom0 action"),
])
def test_a_console_script_that_cannot_be_used_names_why(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "g.yaml").write_text("name: g\n")
    (tmp_path / "s.console").write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse_console_script(tmp_path / "s.console")


@pytest.mark.parametrize("path, template", [
    ("/local/domain/0/backend/vbd/5/768/state", "/local/domain/0/backend/vbd/{domid}/768/state"),
    ("/local/domain/5/device/vif/0/state", "/local/domain/{domid}/device/vif/0/state"),
    ("/local/domain/15/data", "/local/domain/15/data"),  # another domain stays itself
    ("backend/vif/5", "backend/vif/{domid}"),
])
def test_recorded_xenstore_paths_name_the_guest_by_template(path: str, template: str) -> None:
    assert domid_template(path, 5) == template
    assert fill_domid(template, 5) == path


def test_the_console_lines_of_a_lifecycle_action_are_part_of_it_not_replayed_alone() -> None:
    def ev(kind: str, **data: object) -> RecordEvent:
        return RecordEvent(0.0, kind, "agent" if kind == CONSOLE else "harness", dict(data))

    recorded = [ev(CONSOLE, line="vbd list"), ev(LIFECYCLE, op="hibernate"), ev(CONSOLE, line="power S4"),
                ev(LIFECYCLE, op="power-on"), ev(CONSOLE, line="lifecycle poweron /tmp/q.sock /tmp/ram /tmp/hv 7 3"),
                ev(CONSOLE, line="power S4"), ev(LIFECYCLE, op="migrate"),
                ev(CONSOLE, line="lifecycle resume /tmp/q2.sock /tmp/ram2 /tmp/hv2 8")]
    assert [e.describe() for e in replayable(recorded)] == [
        "console: vbd list", "lifecycle: op=hibernate", "lifecycle: op=power-on", "console: power S4",
        "lifecycle: op=migrate"]
