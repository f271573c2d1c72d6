"""Every kernel test gets a fresh processor and debug log, so a crash in one test cannot leak."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from xenpv.stack.kernel.debuglog import DebugLog, set_current_log
from xenpv.stack.kernel.irql import Processor, set_current_processor


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    previous_log = set_current_log(DebugLog())
    yield processor
    set_current_processor(previous)
    set_current_log(previous_log)
