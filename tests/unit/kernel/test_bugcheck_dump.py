from __future__ import annotations

from pathlib import Path

import pytest

from xenpv.stack.kernel.bugcheck import (BUG, BugCheck, BugCheckCode, CrashDump, KeBugCheckEx,
                                   KeRegisterBugCheckCallback)
from xenpv.stack.kernel.debuglog import DbgLevel, DebugLog, DebugRecord, current_log
from xenpv.stack.kernel.irql import DISPATCH_LEVEL, KeRaiseIrql, Processor


def _stop() -> BugCheck:
    KeRaiseIrql(DISPATCH_LEVEL)
    try:
        BUG("OUTSTANDING CALLBACKS", module="xenbus.sys")
    except BugCheck as stop:
        return stop
    raise AssertionError("BUG returned")


def test_bug_uses_the_pv_drivers_assertion_failure_code() -> None:
    stop = _stop()
    assert stop.code == BugCheckCode.ASSERTION_FAILURE == 0xDEAD
    assert stop.param_notes[0] == "BUG: OUTSTANDING CALLBACKS"
    assert stop.param_notes[1].endswith("test_bugcheck_dump.py")
    assert stop.module == "xenbus.sys" and stop.irql == DISPATCH_LEVEL


def test_bugcheck_callbacks_run_while_stopping(cpu: Processor) -> None:
    seen: list[int] = []
    KeRegisterBugCheckCallback(lambda stop: seen.append(stop.code))
    with pytest.raises(BugCheck):
        KeBugCheckEx(BugCheckCode.INTERNAL_POWER_ERROR, 1)
    assert seen == [0xA0]


def test_crash_dump_json_round_trip_and_stop_screen(tmp_path: Path) -> None:
    current_log().print("xenbus", "FdoCreate: ACTIVE")
    stop = _stop()
    dump = CrashDump.from_bugcheck(
        stop, device_tree="HTREE\\ROOT\\0\n", seed=1234, debug_log=current_log().tail(10),
        reference_providers={"xenbus": lambda: {"XENBUS.STORE": 2}, "broken": lambda: 1 / 0})
    path = dump.save(tmp_path / "crash" / "dump.json")
    loaded = CrashDump.load(path)
    assert loaded == dump
    assert loaded.interface_references == {"XENBUS.STORE": 2, "broken!error": -1}
    assert "BUG" in loaded.traceback and loaded.seed == 1234
    assert loaded.debug_log == ["XENBUS|FdoCreate: ACTIVE", "XENBUS|BUG: OUTSTANDING CALLBACKS"]
    screen = loaded.stop_screen()
    assert f"*** STOP: 0x0000DEAD (0x{stop.params[0]:016X}," in screen
    assert "ASSERTION_FAILURE" in screen and "*** xenbus.sys - BUG: OUTSTANDING CALLBACKS" in screen


def test_crash_dump_rejects_unknown_format() -> None:
    with pytest.raises(ValueError):
        CrashDump.from_json('{"format": 99}')


def test_debug_log_is_a_bounded_ring_with_listeners() -> None:
    ring = DebugLog(capacity=3)
    heard: list[DebugRecord] = []
    ring.add_listener(heard.append)
    ring.add_listener(lambda record: 1 / 0)  # dropped, and logging goes on
    for n in range(5):
        ring.print("xenvif", f"line {n}", DbgLevel.WARNING)
    assert ring.tail(10) == ["XENVIF|line 2", "XENVIF|line 3", "XENVIF|line 4"]
    assert len(heard) == 5 and heard[-1].sequence == 5
    assert ring.records("XENBUS") == []
