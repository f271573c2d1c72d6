"""Where a reboot request lives (xcp-ng/win-xenbus 1087a8d, src/xen/config.c ConfigRequestReboot): the
RequestKey (`xenbus_monitor\\Request` unless XENBUS\\Parameters\\RequestKey says otherwise) is an ordinary key
xenbus_monitor watches across boots; only `<RequestKey>\\<Module>` is volatile, so the request itself goes
with the reboot that honours it. The installer's request (a package upgrade) is filed the same way."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenpv.stack.drivers.xen.config import Config
from xenpv.stack.install import request_reboot
from xenpv.stack.install.installer import MONITOR_REQUEST_KEY
from xenpv.stack.kernel import Registry
from xenpv.stack.kernel.irql import Processor, set_current_processor


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    yield processor
    set_current_processor(previous)


REQUESTERS: dict[str, Callable[[Registry, str], None]] = {
    "installer": request_reboot,
    "config": lambda registry, module: Config(registry).ConfigRequestReboot(module),
}


@pytest.mark.parametrize("who", sorted(REQUESTERS))
def test_only_the_module_key_is_volatile(who: str, tmp_path: Path) -> None:
    registry = Registry(tmp_path / "hive.json")
    REQUESTERS[who](registry, "XENBUS")
    assert registry.get_dword(rf"{MONITOR_REQUEST_KEY}\XENBUS", "Reboot") == 1
    assert registry.is_volatile(rf"{MONITOR_REQUEST_KEY}\XENBUS")
    assert not registry.is_volatile(MONITOR_REQUEST_KEY)
    rebooted = Registry.load(tmp_path / "hive.json")
    assert rebooted.key_exists(MONITOR_REQUEST_KEY) and rebooted.subkeys(MONITOR_REQUEST_KEY) == []

