"""Which historical bug switches are on in this guest (the catalogue itself is guests.bugs).

`activate` runs at every boot, before xen.sys loads: the switches are the guest YAML's `bugs:` plus every
catalogue name with a non-zero DWORD under guests.bugs.BUGS_KEY in the guest's registry (the drivers read
their Parameters the same way, at load). A value there that names no switch is logged and ignored, as
Windows ignores parameters nobody reads; the guest YAML's own presets were already checked by the
schema. `enabled(name)` is what a driver function asks at the point where the fixed and the buggy code
part; asking for a name the catalogue does not have is a bug of the model (KeyError), so a typo cannot
silently leave a switch dead.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

from xenpv.guests.bugs import BUGS_KEY, CATALOGUE, BugSwitch
from xenpv.stack.kernel.debuglog import DbgLevel, DebugLog
from xenpv.stack.kernel.registry import Registry, RegistryError

__all__ = ["BUGS_KEY", "CATALOGUE", "BugSwitch", "activate", "active", "enabled"]

log = logging.getLogger("stack.drivers.bugs")

_active: frozenset[str] = frozenset()


def activate(names: Iterable[str] = (), registry: Registry | None = None,
             debug_log: DebugLog | None = None) -> frozenset[str]:
    """Set this boot's switches: `names` (the guest YAML's, already validated) and the registry's."""
    global _active
    chosen = set()
    for name in names:
        if name not in CATALOGUE:
            raise KeyError(f"no bug switch named {name!r}")
        chosen.add(name)
    if registry is not None and registry.key_exists(BUGS_KEY):
        try:
            values = registry.values(BUGS_KEY)
        except RegistryError:
            values = []
        for value in values:
            if value.name not in CATALOGUE:
                _print(debug_log, f"{BUGS_KEY}\\{value.name}: no such bug switch, ignored", DbgLevel.WARNING)
            elif isinstance(value.data, int) and value.data:
                chosen.add(value.name)
    _active = frozenset(chosen)
    for name in sorted(_active):
        switch = CATALOGUE[name]
        _print(debug_log, f"bug switch {name} ON: {switch.repository}@{switch.short} undone", DbgLevel.WARNING)
    return _active


def _print(debug_log: DebugLog | None, text: str, level: DbgLevel) -> None:
    log.warning("%s", text)
    if debug_log is not None:
        debug_log.print("SETUP", text, level)


def enabled(name: str) -> bool:
    """Whether this boot runs the pre-fix code of `name` (a catalogue name)."""
    if name not in CATALOGUE:
        raise KeyError(f"no bug switch named {name!r}: add it to guests.bugs.CATALOGUE")
    return name in _active


def active() -> frozenset[str]:
    return _active
