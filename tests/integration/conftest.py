"""Every test in this directory launches the real QEMU machine and dom0 processes: marked `integration` by
where it lives (a module without its own `pytestmark` is still selected by `-m integration` and left out
by `-m "not integration"`)."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's hook sees the whole session's items, not only its directory's.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
