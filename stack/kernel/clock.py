"""The system time: what KeQuerySystemTime reads and SetSystemTime / SetLocalTime change.

Windows keeps UTC as 100 ns units since 1601-01-01 (a FILETIME) and reads the RTC at boot; local time is UTC
minus the time zone's bias (`Control\\TimeZoneInformation\\ActiveTimeBias`, minutes, UTC = local + bias).
The model's clock runs at the host's rate from where it was last set (it starts at the host's time, as
QEMU's RTC does with its default `-rtc base=utc`); it lives with the machine, not with one boot, so a
restart keeps what was set.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from .registry import KeyNotFound, Registry, ValueNotFound

EPOCH_1601_TO_1970 = 116_444_736_000_000_000  # 100 ns units
TIME_ZONE_KEY = r"HKLM\SYSTEM\CurrentControlSet\Control\TimeZoneInformation"


def host_filetime() -> int:
    return EPOCH_1601_TO_1970 + time.time_ns() // 100


class SystemClock:
    def __init__(self, registry: Callable[[], Registry], now: Callable[[], int] = host_filetime) -> None:
        self._registry = registry
        self._now = now
        self._offset = 0  # this clock minus the host's, in 100 ns units
        self.sets = 0  # how many times it was set (SetSystemTime / SetLocalTime)

    def bias_minutes(self) -> int:
        try:
            value = self._registry().get_dword(TIME_ZONE_KEY, "ActiveTimeBias")
        except (KeyNotFound, ValueNotFound):
            return 0
        return value - (1 << 32) if value & 0x8000_0000 else value  # a DWORD holding a signed LONG

    def query_system_time(self) -> int:
        return self._now() + self._offset

    def query_local_time(self) -> int:
        return self.query_system_time() - self.bias_minutes() * 60 * 10_000_000

    def set_system_time(self, filetime: int) -> None:
        self._offset = filetime - self._now()
        self.sets += 1

    def set_local_time(self, filetime: int) -> None:
        self.set_system_time(filetime + self.bias_minutes() * 60 * 10_000_000)


def filetime_text(filetime: int) -> str:
    """`2026-12-07 06:30:00.123` (UTC or local, as the value is) for logs; FileTimeToSystemTime's fields."""
    seconds, rest = divmod(filetime - EPOCH_1601_TO_1970, 10_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{rest // 10_000:03d}"
