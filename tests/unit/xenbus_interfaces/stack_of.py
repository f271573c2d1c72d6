"""Build the per-FDO interface contexts over a (fake) platform, as XENBUS's FDO does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xenpv.stack.drivers.xenbus.cache import CacheInterface
from xenpv.stack.drivers.xenbus.console import ConsoleInterface
from xenpv.stack.drivers.xenbus.debug import DebugInterface
from xenpv.stack.drivers.xenbus.evtchn import EvtchnInterface
from xenpv.stack.drivers.xenbus.gnttab import GnttabInterface
from xenpv.stack.drivers.xenbus.range_set import RangeSetInterface
from xenpv.stack.drivers.xenbus.shared_info import SharedInfoInterface
from xenpv.stack.drivers.xenbus.store import StoreInterface
from xenpv.stack.drivers.xenbus.suspend import SuspendInterface
from xenpv.stack.kernel.status import STATUS_SUCCESS


@dataclass
class Interfaces:
    debug: DebugInterface
    suspend: SuspendInterface
    shared_info: SharedInfoInterface
    evtchn: EvtchnInterface
    store: StoreInterface
    range_set: RangeSetInterface
    cache: CacheInterface
    gnttab: GnttabInterface
    console: ConsoleInterface


def interfaces(platform: Any) -> Interfaces:
    debug = DebugInterface()
    suspend = SuspendInterface(debug, lambda: STATUS_SUCCESS)
    shared_info = SharedInfoInterface(platform, debug)
    range_set = RangeSetInterface(debug)
    cache = CacheInterface(debug)
    return Interfaces(debug, suspend, shared_info, EvtchnInterface(platform, debug, suspend, shared_info),
                      StoreInterface(platform, debug, suspend), range_set, cache,
                      GnttabInterface(platform, debug, cache, range_set), ConsoleInterface(platform, debug))


def table_of(interface: Any, version: int | None = None) -> Any:
    version = interface.max_version() if version is None else version
    status, tbl = interface.get_interface(version, interface.TABLES[version].size)
    assert status == STATUS_SUCCESS
    return tbl
