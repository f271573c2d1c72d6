"""In-process fixtures for the xenstored unit tests."""
from __future__ import annotations

import pytest

from xenpv.backends.xenstored.core import XenstoreCore

from .peers import Peer


@pytest.fixture
def core() -> XenstoreCore:
    return XenstoreCore()


@pytest.fixture
def dom0(core: XenstoreCore) -> Peer:
    return Peer(core)
