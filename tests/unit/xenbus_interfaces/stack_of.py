"""Build the per-FDO interface contexts over a (fake) platform, as XENBUS's FDO does."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stack.drivers.xenbus.cache import CacheInterface
from stack.drivers.xenbus.console import ConsoleInterface
from stack.drivers.xenbus.debug import DebugInterface
from stack.drivers.xenbus.evtchn import EvtchnInterface
from stack.drivers.xenbus.gnttab import GnttabInterface
from stack.drivers.xenbus.range_set import RangeSetInterface
from stack.drivers.xenbus.shared_info import SharedInfoInterface
from stack.drivers.xenbus.store import StoreInterface
from stack.drivers.xenbus.suspend import SuspendInterface
from stack.kernel.status import STATUS_SUCCESS


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
