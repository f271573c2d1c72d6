"""The bug catalogue's plumbing: the guest YAML's `bugs:` and the registry key turn switches on, names that
are no switch are refused with the field and the known names, the drivers' query refuses a typo, and the
README's table lists exactly the catalogue's rows."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from xenpv.base.errors import GuestDefinitionError
from xenpv.guests.bugs import BUGS_KEY, CATALOGUE, NOT_EXPRESSED
from xenpv.guests.schema import GUESTS_DIR, load_guest
from xenpv.stack.drivers import bugs
from xenpv.stack.kernel.bucket import IRQL_CODES, bucket_id
from xenpv.stack.kernel.debuglog import DebugLog
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.kernel.registry import REG_DWORD, Registry

README = Path(__file__).resolve().parents[2] / "README.md"
ONE = next(iter(CATALOGUE))


@pytest.fixture(autouse=True)
def _no_switches():
    # A processor of its own: the registry is kernel code, and an earlier test may have left the shared
    # processor stopped (test_console's `bugcheck`).
    previous = set_current_processor(Processor())
    yield
    bugs.activate()
    set_current_processor(previous)


def _guest(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text((GUESTS_DIR / "default.yaml").read_text() + extra)
    return path


def test_the_guest_yaml_lists_switches_in_order(tmp_path: Path) -> None:
    names = sorted(CATALOGUE)[:2]
    assert load_guest(_guest(tmp_path, f"bugs: [{', '.join(names)}]\n")).bugs == tuple(names)
    assert load_guest(GUESTS_DIR / "default.yaml").bugs == ()


@pytest.mark.parametrize("extra, field, reason", [
    ("bugs: [xenbus-0000000]\n", "bugs[0]", "no bug switch named 'xenbus-0000000' (known: "),
    ("bugs: xenbus-0250399\n", "bugs", "must be a list"),
    (f"bugs: [{ONE}, {ONE}]\n", "bugs[1]", "twice"),
    (f"registry: {{'{BUGS_KEY}': {{nope: 1}}}}\n", f"registry[{BUGS_KEY}].nope", "no bug switch named 'nope'"),
    (f"registry: {{'{BUGS_KEY}': {{{ONE}: 'on'}}}}\n", f"registry[{BUGS_KEY}].{ONE}", "DWORD"),
])
def test_a_name_that_is_no_switch_is_refused_naming_the_field(tmp_path: Path, extra: str, field: str,
                                                               reason: str) -> None:
    with pytest.raises(GuestDefinitionError) as error:
        load_guest(_guest(tmp_path, extra))
    assert error.value.field == field and reason in error.value.reason, error.value
    if "known" in reason:
        assert all(name in error.value.reason for name in CATALOGUE)


def test_activate_joins_the_yaml_and_the_registry_and_ignores_unknown_values() -> None:
    names = sorted(CATALOGUE)
    registry, log = Registry(), DebugLog()
    registry.set_value(BUGS_KEY, names[1], REG_DWORD, 1)
    registry.set_value(BUGS_KEY, names[2], REG_DWORD, 0)
    registry.set_value(BUGS_KEY, "xenbus-1111111", REG_DWORD, 1)
    assert bugs.activate([names[0]], registry, log) == {names[0], names[1]}
    assert bugs.enabled(names[0]) and bugs.enabled(names[1]) and not bugs.enabled(names[2])
    text = "\n".join(log.tail(20))
    assert "xenbus-1111111: no such bug switch, ignored" in text and f"bug switch {names[1]} ON" in text
    assert bugs.activate() == frozenset() and not bugs.enabled(names[0])


def test_a_driver_asking_for_an_unknown_switch_is_a_model_bug() -> None:
    with pytest.raises(KeyError, match="add it to guests.bugs.CATALOGUE"):
        bugs.enabled("xenbus-typo123")
    with pytest.raises(KeyError):
        bugs.activate(["xenbus-typo123"])


def test_each_bucket_follows_the_bucket_rule() -> None:
    for switch in CATALOGUE.values():
        # The IRQL rules' STOPs here all happen at DISPATCH_LEVEL (under a spin lock).
        irql = 2 if switch.stop in IRQL_CODES else 0
        assert switch.bucket == bucket_id(switch.stop, switch.module, switch.function, irql=irql), switch.name


def test_catalogue_rows_are_consistent() -> None:
    for name, switch in CATALOGUE.items():
        assert name == switch.name and name.endswith(switch.commit[:7]) and len(switch.commit) == 40
        assert switch.module.endswith(".sys") and switch.function and switch.scenario and switch.why
        assert re.fullmatch(r"[A-Z_]+", switch.stop_name)
    assert not set(CATALOGUE) & set(NOT_EXPRESSED)


def _readme_section() -> str:
    text = README.read_text()
    start = text.index("## Historical bug catalogue")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def test_the_readme_table_is_the_catalogue() -> None:
    rows = [line for line in _readme_section().splitlines() if line.startswith("| `")]
    found = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        found[cells[0].strip("`")] = cells
    assert set(found) == set(CATALOGUE)
    for name, cells in found.items():
        switch = CATALOGUE[name]
        assert f"{switch.repository}@{switch.short}" in cells[1], cells
        assert cells[2] == f"0x{switch.stop:X} {switch.stop_name}", cells
        assert cells[3] == f"{switch.module}!{switch.function}", cells
        assert cells[4] == f"`{switch.bucket}`", cells
    for name in NOT_EXPRESSED:
        assert name in _readme_section(), name
