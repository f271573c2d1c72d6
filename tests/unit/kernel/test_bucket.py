"""The crash bucket rule (stack.kernel.bucket): STOP code, blamed module, faulting model function and, for
some codes, one stable qualifier; never an address, a line number, a count or a path. Driver code is
compiled under a file name in stack/drivers/<module>/, as the real drivers live there."""
from __future__ import annotations

import json
import os
from typing import Any

import pytest

from xenpv.stack.kernel import (DISPATCH_LEVEL, BugCheck, BugCheckCode, KeBugCheckEx, KeInitializeDpc,
                                KeInsertQueueDpc, KeRaiseIrql, Processor)
from xenpv.stack.kernel.bucket import bucket_id, clean_function
from xenpv.stack.kernel.bugcheck import _DRIVERS_DIR, CrashDump, CrashDumpError
from xenpv.stack.kernel.irql import assert_passive


def driver(module: str, source: str, file: str = "adapter.py") -> dict[str, Any]:
    """`source` as the code of stack/drivers/<module>/<file>."""
    namespace: dict[str, Any] = {"KeBugCheckEx": KeBugCheckEx, "assert_passive": assert_passive,
                                 "KeRaiseIrql": KeRaiseIrql, "DISPATCH_LEVEL": DISPATCH_LEVEL}
    exec(compile(source, os.path.join(_DRIVERS_DIR, module, file), "exec"), namespace)
    return namespace


XENNET = """
from xenpv.stack.kernel.bugcheck import BUG

class XennetAdapter:
    def AdapterDisable(self, raise_first):
        if raise_first:
            KeRaiseIrql(DISPATCH_LEVEL)
        assert_passive("IoCallDriver")

    def AdapterReturn(self, count):
        BUG(f"RECEIVER PACKET RETURNED TWICE ({count})")
"""


def stop_of(fn: Any, *args: Any, **kwargs: Any) -> BugCheck:
    with pytest.raises(BugCheck) as stop:
        fn(*args, **kwargs)
    return stop.value


def test_an_irql_rule_broken_by_a_driver_is_code_module_function_and_irql(cpu: Processor) -> None:
    adapter = driver("xennet", XENNET)["XennetAdapter"]()
    stop = stop_of(adapter.AdapterDisable, True)
    assert stop.code == 0xD1
    assert stop.bucket == "0xD1_xennet!XennetAdapter.AdapterDisable+irql-dispatch"


def test_the_same_bug_elsewhere_in_the_file_with_other_values_is_the_same_bucket() -> None:
    """Another line (the source shifted by a comment), another count in the BUG text, another run (a
    fresh processor, so other addresses): one bucket. A different function is another bucket."""
    from xenpv.stack.kernel.irql import set_current_processor

    buckets = []
    for shift, count in ((0, 1), (7, 99)):
        set_current_processor(Processor())
        adapter = driver("xennet", "\n" * shift + XENNET)["XennetAdapter"]()
        stop = stop_of(adapter.AdapterReturn, count)
        assert stop.param_notes[1].endswith(os.path.join("xennet", "adapter.py"))
        buckets.append((stop.bucket, stop.params[2]))  # p3: the line
    (first, line1), (second, line2) = buckets
    assert line1 != line2 and first == second == "0xDEAD_xennet!XennetAdapter.AdapterReturn"
    set_current_processor(Processor())
    adapter = driver("xennet", XENNET)["XennetAdapter"]()
    assert stop_of(adapter.AdapterDisable, True).bucket != first


def test_a_dpc_exception_names_the_faulting_function_and_the_exception_type(cpu: Processor) -> None:
    code = driver("xenvif", "def reap(queue):\n    return queue[300]\n", "frontend.py")
    dpc = KeInitializeDpc(lambda *_: code["reap"]([]), module="xenbus.sys")
    stop = stop_of(KeInsertQueueDpc, dpc)
    assert stop.bucket == "0x1E_xenvif!reap+IndexError"


def test_without_a_driver_frame_the_function_is_the_caller_of_the_kernel(cpu: Processor) -> None:
    """An injected STOP blamed on the console: the code that called KeBugCheckEx, here this test."""
    with pytest.raises(BugCheck) as raised:
        KeBugCheckEx(BugCheckCode.MANUALLY_INITIATED_CRASH, 1, 2, 3, 4, module="agent")
    assert raised.value.bucket == "0xE2_agent!test_without_a_driver_frame_the_function_is_the_caller_of_the_kernel"


def test_an_explicit_function_wins_and_subtype_codes_keep_p1(cpu: Processor) -> None:
    stop = stop_of(lambda: KeBugCheckEx(BugCheckCode.DRIVER_POWER_STATE_FAILURE, 3, 0xFFFF8000, 0x1234, 0,
                                        module="xenvbd.sys", function="AdapterD0ToD3"))
    assert stop.bucket == "0x9F_xenvbd!AdapterD0ToD3+p1-0x3"


@pytest.mark.parametrize("args, expected", [
    ((0xD1, "xennet.sys", "XennetAdapter.AdapterDisable"), "0xD1_xennet!XennetAdapter.AdapterDisable+irql-passive"),
    ((0x0A, "ntoskrnl.exe", "KeLowerIrql"), "0xA_ntoskrnl!KeLowerIrql+irql-passive"),
    ((0xDEAD, "xenbus.sys", "FdoS3ToS4"), "0xDEAD_xenbus!FdoS3ToS4"),
    ((0xCA, "xenbus.sys", "", ), "0xCA_xenbus!unknown+p1-0x0"),
    ((0x7B, "", "boot stack"), "0x7B_unknown!boot_stack"),  # unsafe characters become _
])
def test_the_rule_on_fixed_inputs(args: tuple[int, str, str], expected: str) -> None:
    """Golden values: the id of a given STOP never changes (machines, runs and versions agree)."""
    code, module, function = args
    assert bucket_id(code, module, function, params=[0] * 4) == expected


def test_lambdas_and_nested_functions_have_stable_names() -> None:
    assert clean_function("_irql_query_interface.<locals>.<lambda>") == "_irql_query_interface.lambda"
    assert clean_function("") == "unknown"


def dump_dict(**changes: Any) -> dict[str, Any]:
    data = {"code": 0xD1, "name": "DRIVER_IRQL_NOT_LESS_OR_EQUAL", "params": [1, 2, 0, 0],
            "param_notes": [None] * 4, "module": "xennet.sys", "message": "", "traceback": "", "device_tree": "",
            "interface_references": {}, "irql": 2, "seed": 1, "debug_log": [], "format": 1, "extra": {}}
    data.update(changes)
    return data


def test_a_format_1_dump_is_read_and_bucketed_with_an_unknown_function() -> None:
    dump = CrashDump.from_json(json.dumps(dump_dict()))
    assert dump.bucket == "0xD1_xennet!unknown+irql-dispatch" and dump.record is None


@pytest.mark.parametrize("data, message", [
    (dump_dict(format=99), "crash dump format 99 is not one this xenpv reads (1, 2)"),
    (dump_dict(format=1, bucket="x"), "crash dump format 1 has unknown fields: ['bucket']"),
    ([1, 2], "a crash dump is a JSON object"),
])
def test_a_dump_this_xenpv_cannot_read_is_a_clear_error(data: Any, message: str, tmp_path: Any) -> None:
    path = tmp_path / "crash-000000d1.json"
    path.write_text(json.dumps(data))
    with pytest.raises(CrashDumpError) as err:
        CrashDump.load(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_a_saved_dump_is_readable_by_everyone(tmp_path: Any, cpu: Processor) -> None:
    stop = stop_of(KeBugCheckEx, 0xE2, module="agent")
    path = CrashDump.from_bugcheck(stop).save(tmp_path / "crash.json")
    assert path.stat().st_mode & 0o777 == 0o644
    assert CrashDump.load(path).bucket == stop.bucket
