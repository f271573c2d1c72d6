"""Every test in this directory checks the harness against a real peer (xenstore-utils, libxen-dev's
headers compiled with gcc, QEMU's vhost-user front-end): marked `conformance` by where it lives, so
`-m conformance` selects exactly these and `-m "not integration and not conformance"` starts no peer."""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A conftest's hook sees the whole session's items, not only its directory's.
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.conformance)
