from __future__ import annotations

import json
from pathlib import Path

import pytest

from xenpv.stack.kernel.bugcheck import BugCheck, BugCheckCode
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, KeRaiseIrql
from xenpv.stack.kernel.registry import (REG_BINARY, REG_DWORD, REG_MULTI_SZ, ChildMustBeVolatile, InvalidValue,
                                   KeyNotFound, Registry, RegType, ValueNotFound, ValueTypeMismatch)
from xenpv.stack.kernel.status import STATUS_OBJECT_NAME_NOT_FOUND, STATUS_OBJECT_TYPE_MISMATCH

UNPLUG = r"HKLM\SYSTEM\CurrentControlSet\Services\XEN\Unplug"
REQUEST = r"HKLM\SYSTEM\CurrentControlSet\Services\xenbus_monitor\Request"


def test_typed_values_round_trip() -> None:
    reg = Registry()
    reg.set_dword(UNPLUG, "NICS", 1)
    reg.set_sz(r"HKLM\SYSTEM\CurrentControlSet\Services\XENFILT\Parameters", "ActiveDeviceID",
               r"PCI\VEN_5853&DEV_0001")
    reg.set_multi_sz(r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters", "SupportedClasses",
                     ["VIF", "VBD", "VKBD", "IFACE", "CONS"])
    reg.set_binary(UNPLUG, "Blob", b"\x01\x02")
    assert reg.get_dword(UNPLUG, "NICS") == 1
    assert reg.get_multi_sz(r"HKLM\SYSTEM\CurrentControlSet\Services\XENBUS\Parameters",
                            "SupportedClasses")[0] == "VIF"
    assert reg.query_value(UNPLUG, "Blob", REG_BINARY).data == b"\x01\x02"


def test_names_are_case_insensitive_and_keep_their_case() -> None:
    reg = Registry()
    reg.set_dword(UNPLUG, "DISKS", 1)
    assert reg.get_dword(UNPLUG.upper(), "disks") == 1
    assert reg.subkeys(r"HKLM\system\currentcontrolset\services") == ["XEN"]
    assert [v.name for v in reg.values(UNPLUG.lower())] == ["DISKS"]
    reg.set_dword(UNPLUG, "disks", 0)  # same value, renamed by the last writer as Windows does
    assert [v.name for v in reg.values(UNPLUG)] == ["disks"]


def test_missing_key_and_value_are_object_name_not_found() -> None:
    reg = Registry()
    with pytest.raises(KeyNotFound) as missing_key:
        reg.get_dword(UNPLUG, "NICS")
    assert missing_key.value.status == STATUS_OBJECT_NAME_NOT_FOUND
    reg.create_key(UNPLUG)
    with pytest.raises(ValueNotFound) as missing_value:
        reg.get_dword(UNPLUG, "NICS")
    assert missing_value.value.status == STATUS_OBJECT_NAME_NOT_FOUND
    with pytest.raises(ValueNotFound):
        reg.delete_value(UNPLUG, "NICS")


def test_type_mismatch_and_invalid_data() -> None:
    reg = Registry()
    reg.set_sz(UNPLUG, "NICS", "1")
    with pytest.raises(ValueTypeMismatch) as mismatch:
        reg.get_dword(UNPLUG, "NICS")
    assert mismatch.value.status == STATUS_OBJECT_TYPE_MISMATCH
    with pytest.raises(InvalidValue):
        reg.set_value(UNPLUG, "NICS", REG_DWORD, 1 << 32)
    with pytest.raises(InvalidValue):
        reg.set_value(UNPLUG, "List", REG_MULTI_SZ, ["a", ""])


def test_delete_value_and_recursive_key_delete() -> None:
    reg = Registry()
    reg.set_dword(UNPLUG, "NICS", 1)
    reg.set_dword(UNPLUG + r"\Deeper", "X", 1)
    reg.delete_value(UNPLUG, "NICS")
    assert reg.values(UNPLUG) == []
    reg.delete_key(r"HKLM\SYSTEM\CurrentControlSet\Services\XEN")
    assert not reg.key_exists(UNPLUG)


def test_persistence_round_trip_and_volatile_keys_vanish(tmp_path: Path) -> None:
    hive = tmp_path / "guest" / "registry.json"
    reg = Registry.load(hive)
    reg.set_dword(UNPLUG, "NICS", 1)
    reg.set_multi_sz(UNPLUG, "List", ["a", "b"])
    reg.set_binary(UNPLUG, "Blob", b"\xff")
    reg.create_key(REQUEST + r"\XENVBD", volatile=True)
    reg.set_dword(REQUEST + r"\XENVBD", "Reboot", 1)
    assert reg.get_dword(REQUEST + r"\XENVBD", "Reboot") == 1
    with pytest.raises(ChildMustBeVolatile):
        reg.create_key(REQUEST + r"\XENVBD\Persistent")
    assert not list(tmp_path.glob("guest/*.tmp"))

    rebooted = Registry.load(hive)
    assert rebooted.get_dword(UNPLUG, "NICS") == 1
    assert rebooted.get_multi_sz(UNPLUG, "List") == ["a", "b"]
    assert rebooted.query_value(UNPLUG, "Blob").type == RegType.REG_BINARY
    assert rebooted.key_exists(REQUEST) and not rebooted.key_exists(REQUEST + r"\XENVBD")
    assert json.loads(hive.read_text())["format"] == 1


def test_registry_access_above_passive_bugchecks() -> None:
    reg = Registry()
    KeRaiseIrql(DISPATCH_LEVEL)
    with pytest.raises(BugCheck) as stop:
        reg.get_dword(UNPLUG, "NICS")
    assert stop.value.code in (BugCheckCode.IRQL_NOT_LESS_OR_EQUAL, BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL)
    assert stop.value.param_notes[0] == "ZwQueryValueKey"


def test_batch_writes_the_hive_once_and_a_bugcheck_unwinding_through_it_still_writes_it(tmp_path: Path) -> None:
    """The agent's boot runs in one batch (stack/agent/runtime.py): nothing reaches the file until the batch
    ends, nested batches end with the outermost, and a STOP raised inside leaves the hive of that boot on disk
    for the dump's reader and the next boot."""
    hive = tmp_path / "registry.json"
    reg = Registry(hive)
    with pytest.raises(BugCheck):
        with reg.batch():
            reg.set_sz(r"HKLM\SYSTEM\A", "v", "1")
            with reg.batch():
                reg.set_sz(r"HKLM\SYSTEM\B", "v", "2")
            assert not hive.exists()  # the inner batch's end wrote nothing
            raise BugCheck(BugCheckCode.INACCESSIBLE_BOOT_DEVICE, (0, 0, 0, 0), module="disk")
    again = Registry.load(hive)
    assert (again.get_sz(r"HKLM\SYSTEM\A", "v"), again.get_sz(r"HKLM\SYSTEM\B", "v")) == ("1", "2")


def test_a_thread_without_the_cpu_waits_for_it_instead_of_taking_its_owners_irql(cpu) -> None:
    """A console command or a user-mode service reads the registry while a DPC holds the CPU at
    DISPATCH_LEVEL (CI, under load: xenagent's start at a reboot, a false 0xD1 'in xenvif.sys'). The read
    is the reader's own: it waits for the CPU, then runs at PASSIVE_LEVEL."""
    import threading
    import time

    from xenpv.stack.kernel.irql import KeLowerIrql, PASSIVE_LEVEL

    reg = Registry()
    reg.set_sz(r"HKLM\SOFTWARE\X", "v", "1")
    raised, done = threading.Event(), threading.Event()

    def dpc() -> None:
        with cpu.lock:
            KeRaiseIrql(DISPATCH_LEVEL)
            raised.set()
            time.sleep(0.3)
            KeLowerIrql(PASSIVE_LEVEL)
        done.set()

    t = threading.Thread(target=dpc)
    t.start()
    try:
        assert raised.wait(5)
        assert reg.get_sz(r"HKLM\SOFTWARE\X", "v") == "1"
        assert done.is_set()  # it ran only once the DPC had given the CPU back
    finally:
        t.join(5)
