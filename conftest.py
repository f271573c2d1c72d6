"""Root conftest: the harness plugin itself (markers, fixtures, artifacts) is `harness.plugin`,
registered through the `pytest11` entry point in pyproject.toml.

Here: the markers a test gets from the directory it lives in, so `-m conformance` selects exactly the
conformance tests, `-m integration` exactly the integration tests (a module without its own `pytestmark`
included), and `-m "not integration and not conformance"` starts no QEMU, dom0 or peer."""
from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent / "tests"
DIRECTORY_MARKERS = {
    TESTS / "conformance": "conformance",  # real peers: xenstore-utils, libxen-dev's headers, QEMU vhost-user
    TESTS / "integration": "integration",  # the real QEMU machine and dom0 processes
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parents = Path(item.path).resolve().parents
        for directory, marker in DIRECTORY_MARKERS.items():
            if directory in parents:
                item.add_marker(marker)
