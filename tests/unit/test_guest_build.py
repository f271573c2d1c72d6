"""The guest YAML's `build` field: which build of the PV drivers the guest runs (stack.kernel.assertion)."""
from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.base.errors import GuestDefinitionError
from xenpv.guests.schema import GUESTS_DIR, load_guest


def test_default_free_and_the_checked_build_shape(tmp_path: Path) -> None:
    f = tmp_path / "g.yaml"
    f.write_text("name: g\n")
    assert load_guest(f).build == "free"
    assert load_guest(GUESTS_DIR / "checked-build.yaml").build == "checked"


@pytest.mark.parametrize("value", ["debug", "Checked", "1"])
def test_an_unknown_build_is_refused_naming_the_field(tmp_path: Path, value: str) -> None:
    f = tmp_path / "g.yaml"
    f.write_text(f"build: {value}\n")
    with pytest.raises(GuestDefinitionError, match=r"build.*must be one of free, checked"):
        load_guest(f)
