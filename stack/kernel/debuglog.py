"""The kernel debug log: what DbgPrint and the drivers' Info/Warning/Error macros write.

A bounded ring of records (the oldest are dropped), each tagged with the module that logged it, so the
console can show it, tests can wait for a line and a crash dump can take the tail. Lines read like the PV
drivers' output: `XENBUS|FdoCreate: ...`. Listeners are called synchronously for every record; a
listener that raises is dropped from the list and reported, because logging must never fail the caller.
Timestamps are seconds since the log was created (boot), from a monotonic clock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

log = logging.getLogger("stack.kernel.debuglog")


class DbgLevel(IntEnum):
    """DPFLTR_*_LEVEL."""

    ERROR = 0
    WARNING = 1
    TRACE = 2
    INFO = 3


@dataclass(frozen=True)
class DebugRecord:
    sequence: int
    time: float
    module: str
    level: DbgLevel
    text: str

    def line(self) -> str:
        return f"{self.module}|{self.text}"


Listener = Callable[[DebugRecord], None]

_PYTHON_LEVELS = {DbgLevel.ERROR: logging.ERROR, DbgLevel.WARNING: logging.WARNING,
                  DbgLevel.TRACE: logging.DEBUG, DbgLevel.INFO: logging.INFO}


class DebugLog:
    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError("debug log capacity must be at least 1")
        self._records: deque[DebugRecord] = deque(maxlen=capacity)
        self._listeners: list[Listener] = []
        self._sequence = 0
        self._start = time.monotonic()
        # Both kernel threads log; the ring and the listener list are shared.
        self._mutex = threading.Lock()

    def print(self, module: str, text: str, level: DbgLevel = DbgLevel.INFO) -> DebugRecord:
        text = text.rstrip("\n")
        with self._mutex:
            self._sequence += 1
            record = DebugRecord(self._sequence, time.monotonic() - self._start, module.upper(), level, text)
            self._records.append(record)
            listeners = list(self._listeners)
        log.log(_PYTHON_LEVELS[level], "%s", record.line())
        for listener in listeners:
            try:
                listener(record)
            except Exception:  # noqa: BLE001 - a broken console must not break the driver logging
                log.exception("debug log listener %r failed; removed", listener)
                self.remove_listener(listener)
        return record

    def add_listener(self, listener: Listener) -> None:
        with self._mutex:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._mutex:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def records(self, module: str | None = None) -> list[DebugRecord]:
        with self._mutex:
            records = list(self._records)
        if module is not None:
            records = [r for r in records if r.module == module.upper()]
        return records

    def tail(self, lines: int = 50) -> list[str]:
        with self._mutex:
            records = list(self._records)[-lines:] if lines > 0 else []
        return [r.line() for r in records]


_current = DebugLog()


def current_log() -> DebugLog:
    return _current


def set_current_log(debug_log: DebugLog) -> DebugLog:
    global _current
    previous, _current = _current, debug_log
    return previous


def DbgPrintEx(module: str, level: DbgLevel, text: str) -> DebugRecord:
    return _current.print(module, text, level)


def DbgPrint(module: str, text: str) -> DebugRecord:
    return _current.print(module, text, DbgLevel.INFO)
