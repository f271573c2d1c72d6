"""The registry: HKLM keys with typed values, persisted per guest.

Windows rules the PV drivers and their installers rely on:
- Key and value names compare case-insensitively and keep the case they were created with.
- Values are typed (REG_DWORD, REG_QWORD, REG_SZ, REG_EXPAND_SZ, REG_MULTI_SZ, REG_BINARY); reading with
  an expected type that differs is STATUS_OBJECT_TYPE_MISMATCH (RtlQueryRegistryValues' type check).
- A missing key or value is STATUS_OBJECT_NAME_NOT_FOUND.
- Volatile keys (REG_OPTION_VOLATILE, e.g. xenbus_monitor\\Request\\<Module>\\Reboot) are never written to
  the hive, so they are gone after a reboot; a non-volatile key cannot be created under a volatile one
  (STATUS_CHILD_MUST_BE_VOLATILE).
- Registry calls are PASSIVE_LEVEL only.
- RegNotifyChangeKeyValue(Key, WatchSubtree=TRUE, REG_NOTIFY_CHANGE_LAST_SET, Event, Asynchronous=TRUE)
  is `notify_change`: one notification (a value set or deleted at or under the key), then the caller
  asks again, as xenbus_monitor's CheckRequestKey does after each CheckRequestSubKeys.

Simplifications: only HKLM exists; `CurrentControlSet` is an ordinary key rather than a link to
ControlSet00N; there are no security descriptors or last-write times. The hive is one JSON file written
atomically (temp file + rename) after every change to persistent data, so a bugcheck never loses a write
that returned (Windows may lose the last seconds of writes on a crash; the model does not).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

from .irql import ACCESS_READ, ACCESS_WRITE, kernel_api
from .status import NTSTATUS

log = logging.getLogger("stack.kernel.registry")

HIVE_FORMAT = 1
ROOT_NAMES = ("HKLM", "HKEY_LOCAL_MACHINE", r"\REGISTRY\MACHINE")


class RegType(IntEnum):
    REG_NONE = 0
    REG_SZ = 1
    REG_EXPAND_SZ = 2
    REG_BINARY = 3
    REG_DWORD = 4
    REG_MULTI_SZ = 7
    REG_QWORD = 11


REG_SZ = RegType.REG_SZ
REG_EXPAND_SZ = RegType.REG_EXPAND_SZ
REG_BINARY = RegType.REG_BINARY
REG_DWORD = RegType.REG_DWORD
REG_MULTI_SZ = RegType.REG_MULTI_SZ
REG_QWORD = RegType.REG_QWORD

RegData = int | str | list[str] | bytes


class RegistryError(Exception):
    """A registry call failed with `status` (an NTSTATUS) on `path` (and `value`, if any)."""

    status: NTSTATUS = NTSTATUS.STATUS_UNSUCCESSFUL

    def __init__(self, path: str, value: str | None = None, detail: str = "") -> None:
        self.path = path
        self.value = value
        self.detail = detail
        where = f"{path}\\{value}" if value is not None else path
        super().__init__(f"{self.status.name}: {where}" + (f" ({detail})" if detail else ""))


class KeyNotFound(RegistryError):
    status = NTSTATUS.STATUS_OBJECT_NAME_NOT_FOUND


class ValueNotFound(RegistryError):
    status = NTSTATUS.STATUS_OBJECT_NAME_NOT_FOUND


class ValueTypeMismatch(RegistryError):
    status = NTSTATUS.STATUS_OBJECT_TYPE_MISMATCH


class InvalidValue(RegistryError):
    status = NTSTATUS.STATUS_INVALID_PARAMETER


class ChildMustBeVolatile(RegistryError):
    status = NTSTATUS.STATUS_CHILD_MUST_BE_VOLATILE


class InvalidPath(RegistryError):
    status = NTSTATUS.STATUS_OBJECT_NAME_INVALID


@dataclass
class RegValue:
    name: str
    type: RegType
    data: RegData

    def display(self) -> str:
        if self.type in (RegType.REG_DWORD, RegType.REG_QWORD):
            return f"0x{self.data:X} ({self.data})"
        if self.type == RegType.REG_MULTI_SZ:
            return " | ".join(self.data)  # type: ignore[arg-type]
        if self.type in (RegType.REG_BINARY, RegType.REG_NONE):
            return bytes(self.data).hex(" ")  # type: ignore[arg-type]
        return str(self.data)


def _validate(path: str, name: str, kind: RegType, data: object) -> RegData:
    if kind in (RegType.REG_DWORD, RegType.REG_QWORD):
        limit = 1 << (32 if kind == RegType.REG_DWORD else 64)
        if not isinstance(data, int) or isinstance(data, bool) or not 0 <= data < limit:
            raise InvalidValue(path, name, f"{kind.name} needs an unsigned int below 2**{limit.bit_length() - 1}")
        return data
    if kind in (RegType.REG_SZ, RegType.REG_EXPAND_SZ):
        if not isinstance(data, str) or "\0" in data:
            raise InvalidValue(path, name, f"{kind.name} needs a str without NUL")
        return data
    if kind == RegType.REG_MULTI_SZ:
        # An empty string would read back as the list terminator, so Windows data cannot contain one.
        if (isinstance(data, str) or not isinstance(data, Sequence)
                or not all(isinstance(s, str) and s and "\0" not in s for s in data)):
            raise InvalidValue(path, name, "REG_MULTI_SZ needs a list of non-empty str without NUL")
        return list(data)
    if kind in (RegType.REG_BINARY, RegType.REG_NONE):
        if not isinstance(data, (bytes, bytearray)):
            raise InvalidValue(path, name, f"{kind.name} needs bytes")
        return bytes(data)
    raise InvalidValue(path, name, f"unsupported type {kind!r}")


@dataclass
class RegistryKey:
    name: str
    volatile: bool = False
    values: dict[str, RegValue] = field(default_factory=dict)
    subkeys: dict[str, RegistryKey] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        values = []
        for value in self.values.values():
            data: Any = value.data.hex() if isinstance(value.data, bytes) else value.data
            values.append({"name": value.name, "type": value.type.name, "data": data})
        return {"name": self.name, "values": values,
                "subkeys": [k.to_json() for k in self.subkeys.values() if not k.volatile]}

    @classmethod
    def from_json(cls, data: dict[str, Any], path: str) -> RegistryKey:
        key = cls(name=data["name"])
        here = f"{path}\\{key.name}" if path else key.name
        for raw in data.get("values", []):
            kind = RegType[raw["type"]]
            value = bytes.fromhex(raw["data"]) if kind in (RegType.REG_BINARY, RegType.REG_NONE) else raw["data"]
            key.values[raw["name"].lower()] = RegValue(raw["name"], kind, _validate(here, raw["name"], kind, value))
        for sub in data.get("subkeys", []):
            child = cls.from_json(sub, here)
            key.subkeys[child.name.lower()] = child
        return key


def split_path(path: str) -> list[str]:
    """`HKLM\\SYSTEM\\CurrentControlSet` -> ["SYSTEM", "CurrentControlSet"]; the HKLM prefix is optional."""
    text = path.strip().strip("\\")
    upper = text.upper()
    for root in ROOT_NAMES:
        bare = root.strip("\\")
        if upper == bare:
            return []
        if upper.startswith(bare + "\\"):
            text = text[len(bare) + 1:]
            break
    parts = [p for p in text.split("\\") if p]
    if any(p in (".", "..") for p in parts):
        raise InvalidPath(path, detail="'.' and '..' are not key names")
    return parts


class Registry:
    """HKLM. `path` is the guest's hive file; without one the registry lives in memory only."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.root = RegistryKey(name="HKLM")
        self._deferred = 0
        self._dirty = False
        # notify_change's armed requests: (the watched key's split lower-case path, the callback).
        self._notify: list[tuple[tuple[str, ...], Callable[[], None]]] = []
        self._notify_lock = threading.Lock()  # armed by a service's thread, fired by any writer's

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Registry:
        """Open the guest's hive; a missing file is a fresh, empty registry (first boot)."""
        registry = cls(path)
        assert registry.path is not None
        if registry.path.exists():
            data = json.loads(registry.path.read_text())
            if data.get("format") != HIVE_FORMAT:
                raise ValueError(f"{path}: hive format {data.get('format')!r}, expected {HIVE_FORMAT}")
            registry.root = RegistryKey.from_json(data["root"], "")
        return registry

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Many changes, one write of the hive at the end (an installer's hundreds of values)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not self._deferred and self._dirty:
                self.save()

    def save(self) -> None:
        if self.path is None:
            return
        if self._deferred:
            self._dirty = True
            return
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"format": HIVE_FORMAT, "root": self.root.to_json()}, indent=1)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # an artifact of the run, kept with its crash dump for others to read
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- keys -----------------------------------------------------------------------------------

    def _walk(self, path: str) -> list[RegistryKey]:
        """The chain of keys from the root to `path`; KeyNotFound if any is missing."""
        chain = [self.root]
        for part in split_path(path):
            child = chain[-1].subkeys.get(part.lower())
            if child is None:
                raise KeyNotFound(path)
            chain.append(child)
        return chain

    def _key(self, path: str) -> RegistryKey:
        return self._walk(path)[-1]

    def _changed(self, volatile: bool) -> None:
        if not volatile:
            self.save()

    @kernel_api("RegNotifyChangeKeyValue", access=ACCESS_READ)
    def notify_change(self, path: str, callback: Callable[[], None]) -> Callable[[], None]:
        """RegNotifyChangeKeyValue(WatchSubtree=TRUE, REG_NOTIFY_CHANGE_LAST_SET, asynchronous): `callback`
        runs once, on the writer's thread, after the next value set or deleted at or under `path` (an
        existing key, else KeyNotFound); it should only signal (set an event). Returns a cancel (closing
        the key handle)."""
        self._key(path)
        entry = (tuple(part.lower() for part in split_path(path)), callback)
        with self._notify_lock:
            self._notify.append(entry)

        def cancel() -> None:
            with self._notify_lock:
                if entry in self._notify:
                    self._notify.remove(entry)
        return cancel

    def _value_changed(self, path: str) -> None:
        """Signal (once) every notify_change armed on `path` or a key above it."""
        if not self._notify:
            return
        parts = tuple(part.lower() for part in split_path(path))
        with self._notify_lock:
            fired = [entry for entry in self._notify if parts[:len(entry[0])] == entry[0]]
            self._notify = [entry for entry in self._notify if entry not in fired]
        for _, callback in fired:
            callback()

    @kernel_api("ZwCreateKey", access=ACCESS_WRITE)
    def create_key(self, path: str, *, volatile: bool = False) -> RegistryKey:
        """ZwCreateKey, creating missing parents (parents inherit nothing; only the leaf is volatile)."""
        key = self.root
        parts = split_path(path)
        created_persistent = False
        for index, part in enumerate(parts):
            child = key.subkeys.get(part.lower())
            if child is None:
                leaf = index == len(parts) - 1
                wants_volatile = volatile if leaf else key.volatile
                if key.volatile and not wants_volatile:
                    raise ChildMustBeVolatile(path)
                child = RegistryKey(name=part, volatile=wants_volatile)
                key.subkeys[part.lower()] = child
                created_persistent = created_persistent or not wants_volatile
            key = child
        if created_persistent:
            self.save()
        return key

    @kernel_api("ZwOpenKey", access=ACCESS_READ)
    def key_exists(self, path: str) -> bool:
        try:
            self._walk(path)
        except KeyNotFound:
            return False
        return True

    @kernel_api("ZwQueryKey", access=ACCESS_READ)
    def is_volatile(self, path: str) -> bool:
        return self._key(path).volatile

    @kernel_api("ZwEnumerateKey", access=ACCESS_READ)
    def subkeys(self, path: str) -> list[str]:
        """ZwEnumerateKey: names as created, in creation order."""
        return [k.name for k in self._key(path).subkeys.values()]

    @kernel_api("ZwDeleteKey", access=ACCESS_WRITE)
    def delete_key(self, path: str) -> None:
        """Delete `path` and everything under it (RegDeleteTree; ZwDeleteKey needs an empty key)."""
        chain = self._walk(path)
        if len(chain) == 1:
            raise InvalidPath(path, detail="HKLM cannot be deleted")
        parent, key = chain[-2], chain[-1]
        del parent.subkeys[key.name.lower()]
        self._changed(key.volatile)

    # -- values ---------------------------------------------------------------------------------

    @kernel_api("ZwSetValueKey", access=ACCESS_WRITE)
    def set_value(self, path: str, name: str, kind: RegType, data: RegData, *, create: bool = True) -> None:
        """ZwSetValueKey. `create` makes the key first (what drivers do with ZwCreateKey + set)."""
        key = self.create_key(path) if create else self._key(path)
        key.values[name.lower()] = RegValue(name, RegType(kind), _validate(path, name, RegType(kind), data))
        self._changed(key.volatile)
        self._value_changed(path)

    def set_dword(self, path: str, name: str, data: int) -> None:
        self.set_value(path, name, RegType.REG_DWORD, data)

    def set_sz(self, path: str, name: str, data: str) -> None:
        self.set_value(path, name, RegType.REG_SZ, data)

    def set_multi_sz(self, path: str, name: str, data: Sequence[str]) -> None:
        self.set_value(path, name, RegType.REG_MULTI_SZ, list(data))

    def set_binary(self, path: str, name: str, data: bytes) -> None:
        self.set_value(path, name, RegType.REG_BINARY, data)

    @kernel_api("ZwQueryValueKey", access=ACCESS_READ)
    def query_value(self, path: str, name: str, expected: RegType | None = None) -> RegValue:
        """ZwQueryValueKey. With `expected`, a value of another type is ValueTypeMismatch."""
        value = self._key(path).values.get(name.lower())
        if value is None:
            raise ValueNotFound(path, name)
        if expected is not None and value.type != expected:
            raise ValueTypeMismatch(path, name, f"is {value.type.name}, expected {RegType(expected).name}")
        return value

    def get_dword(self, path: str, name: str) -> int:
        return self.query_value(path, name, RegType.REG_DWORD).data  # type: ignore[return-value]

    def get_sz(self, path: str, name: str) -> str:
        return self.query_value(path, name, RegType.REG_SZ).data  # type: ignore[return-value]

    def get_multi_sz(self, path: str, name: str) -> list[str]:
        return list(self.query_value(path, name, RegType.REG_MULTI_SZ).data)  # type: ignore[arg-type]

    @kernel_api("ZwEnumerateValueKey", access=ACCESS_READ)
    def values(self, path: str) -> list[RegValue]:
        """ZwEnumerateValueKey, in creation order."""
        return list(self._key(path).values.values())

    @kernel_api("ZwDeleteValueKey", access=ACCESS_WRITE)
    def delete_value(self, path: str, name: str) -> None:
        key = self._key(path)
        if key.values.pop(name.lower(), None) is None:
            raise ValueNotFound(path, name)
        self._changed(key.volatile)
        self._value_changed(path)

    # -- display --------------------------------------------------------------------------------

    def dump(self, path: str = "HKLM") -> str:
        """An indented listing for the console and artifacts."""
        key = self._key(path)
        lines: list[str] = []
        for depth, current in self._iter(key, 0):
            marker = " (volatile)" if current.volatile else ""
            lines.append(f"{'  ' * depth}{current.name}{marker}")
            for value in current.values.values():
                lines.append(f"{'  ' * (depth + 1)}{value.name} = {value.type.name} {value.display()}")
        return "\n".join(lines) + "\n"

    def _iter(self, key: RegistryKey, depth: int) -> Iterator[tuple[int, RegistryKey]]:
        yield depth, key
        for child in key.subkeys.values():
            yield from self._iter(child, depth + 1)
