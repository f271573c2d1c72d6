"""Bugchecks: `KeBugCheckEx` stops the guest, and the crash dump record the agent writes.

A bugcheck is a `BugCheck` exception. It derives from BaseException so that driver code cannot swallow
it with `except Exception`, exactly as a C driver cannot catch a STOP. The first bugcheck wins: once the
processor has crashed, any later `KeBugCheckEx` (for example from a `finally:` block unwinding through a
spin lock release) re-raises the first one, so the dump always describes the original failure.

Parameters are integers as in Windows (ULONG_PTR). Where Windows passes a pointer (a string, a device
object, an IRP) the model passes a stable pseudo-address from `address_of` and keeps what it points at in
`param_notes`, so the STOP screen looks like Windows and the dump still says "BUG: OUTSTANDING CALLBACKS".

The module that caused the bugcheck is given explicitly, or else it is the innermost Python frame under
`stack/drivers/<module>/` (reported as `<module>.sys`), or else the driver whose code the I/O manager is
running (dispatch, AddDevice, DriverEntry, completion routine, ISR, DPC), or else `ntoskrnl.exe`.

bugcheck.py and irql.py import each other: a STOP acts on the processor and the IRQL rules raise STOPs;
the imports of irql here are inside functions.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import FrameType
from typing import Any

from xenpv.base.errors import ConfigError

from .bucket import bucket_id, clean_function, function_name, in_kernel_model
from .debuglog import DbgLevel, current_log

log = logging.getLogger("stack.kernel.bugcheck")


class BugCheckCode(IntEnum):
    """Stop codes with the values of Windows' bugcodes.h (and the PV drivers' assert.h for 0xDEAD)."""

    IRQL_NOT_GREATER_OR_EQUAL = 0x09
    IRQL_NOT_LESS_OR_EQUAL = 0x0A
    # KeWaitForMultipleObjects: more objects than THREAD_WAIT_OBJECTS without a wait block array.
    MAXIMUM_WAIT_OBJECTS_EXCEEDED = 0x0C
    SPIN_LOCK_ALREADY_OWNED = 0x0F
    SPIN_LOCK_NOT_OWNED = 0x10
    # An exception nothing handled in kernel mode outside a system thread's start frame: in an ISR or a
    # DPC (KiRetireDpcList has no handler of its own). A system thread's would be 0x7E.
    KMODE_EXCEPTION_NOT_HANDLED = 0x1E
    MULTIPLE_IRP_COMPLETE_REQUESTS = 0x44
    # The memory rules of pool.py: a fault on an address nothing maps (below DISPATCH_LEVEL), an
    # exception no handler took in a system thread, bad pool calls, and freed special pool.
    PAGE_FAULT_IN_NONPAGED_AREA = 0x50
    INACCESSIBLE_BOOT_DEVICE = 0x7B
    SYSTEM_THREAD_EXCEPTION_NOT_HANDLED = 0x7E
    DRIVER_POWER_STATE_FAILURE = 0x9F
    INTERNAL_POWER_ERROR = 0xA0
    BAD_POOL_CALLER = 0xC2
    IRQL_UNEXPECTED_VALUE = 0xC8
    PNP_DETECTED_FATAL_ERROR = 0xCA
    PAGE_FAULT_IN_FREED_SPECIAL_POOL = 0xCC
    DRIVER_IRQL_NOT_LESS_OR_EQUAL = 0xD1
    DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL = 0xD5
    MANUALLY_INITIATED_CRASH = 0xE2
    # The PV drivers' include/assert.h: `#define ASSERTION_FAILURE 0x0000DEAD`; BUG(text) calls
    # KeBugCheckEx(ASSERTION_FAILURE, text, __FILE__, __LINE__, 0). Windows' own codes never use 0xDEAD.
    ASSERTION_FAILURE = 0xDEAD


def bugcheck_name(code: int) -> str:
    try:
        return BugCheckCode(code).name
    except ValueError:
        return f"BUGCHECK_0x{code:08X}"


_KERNEL_ADDRESS_BASE = 0xFFFFF800_00000000


def address_of(obj: object) -> int:
    """A stable pseudo-address for a bugcheck parameter.

    Ints pass through. Kernel objects (devices, IRPs, locks) carry a deterministic `address` assigned at
    creation; anything else is hashed from its text, so the same run (same seed) gives the same STOP line.
    """
    if isinstance(obj, bool):
        return int(obj)
    if isinstance(obj, int):
        return obj & 0xFFFFFFFF_FFFFFFFF
    address = getattr(obj, "address", None)
    if isinstance(address, int):
        return address
    return _KERNEL_ADDRESS_BASE | (zlib.crc32(str(obj).encode()) << 4)


def _note(obj: object) -> str | None:
    if obj is None or isinstance(obj, int):
        return None
    return str(obj)


_STACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DRIVERS_DIR = os.path.join(_STACK_DIR, "drivers") + os.sep


def module_of_frame(frame: FrameType) -> str | None:
    """`xenbus.sys` for a frame in stack/drivers/xenbus/... or stack/drivers/xenbus.py."""
    filename = os.path.abspath(frame.f_code.co_filename)
    if not filename.startswith(_DRIVERS_DIR):
        return None
    first = filename[len(_DRIVERS_DIR):].split(os.sep, 1)[0]
    name = first[:-3] if first.endswith(".py") else first
    if not name or name.startswith("_"):
        return None
    return f"{name}.sys"


def caller_module(start: FrameType | None = None) -> str:
    """The module to blame for a failure detected in kernel code called from `start` (default: here)."""
    frame = start if start is not None else sys._getframe(1)
    while frame is not None:
        module = module_of_frame(frame)
        if module is not None:
            return module
        frame = frame.f_back
    from .irql import current_processor  # bugcheck sits below irql; import late to avoid a cycle

    running = current_processor().running_driver()
    if running is not None:
        return running
    return "ntoskrnl.exe"


def faulting_function(module: str, start: FrameType | None) -> str:
    """The model function to name in a STOP's bucket (stack.kernel.bucket): from `start` outward, the
    innermost frame of the blamed driver module; else (a STOP blamed on the kernel or the agent, or on a
    driver whose code is not on the stack, such as a DPC's owner) the innermost frame outside the kernel
    model, which is the code that called into the rule it broke; else `unknown`."""
    frame = start
    while frame is not None:
        if module_of_frame(frame) == module:
            return function_name(frame)
        frame = frame.f_back
    frame = start
    while frame is not None:
        if not in_kernel_model(frame):
            return function_name(frame)
        frame = frame.f_back
    return "unknown"


class BugCheck(BaseException):
    """The guest stopped. Carries everything the STOP screen and the crash dump need."""

    def __init__(self, code: int, params: tuple[int, int, int, int], *, module: str,
                 param_notes: tuple[str | None, ...] = (None, None, None, None), irql: int = 0,
                 message: str = "", function: str = "unknown") -> None:
        self.code = code
        self.params = params
        self.param_notes = param_notes
        self.module = module
        self.irql = irql
        self.message = message
        self.function = function
        super().__init__(self.describe())

    @property
    def name(self) -> str:
        return bugcheck_name(self.code)

    @property
    def bucket(self) -> str:
        return bucket_id(self.code, self.module, self.function, irql=self.irql, params=self.params,
                         notes=self.param_notes)

    def describe(self) -> str:
        params = ", ".join(f"0x{p:016X}" for p in self.params)
        text = f"STOP 0x{self.code:08X} {self.name} ({params}) in {self.module}"
        return f"{text}: {self.message}" if self.message else text


BugCheckCallback = Callable[[BugCheck], None]


def KeBugCheckEx(code: int, p1: object = 0, p2: object = 0, p3: object = 0, p4: object = 0, *,
                 module: str | None = None, message: str = "", function: str | None = None) -> BugCheck:
    """Stop the guest. Never returns; the return annotation lets callers write `raise KeBugCheckEx(...)`
    where a linter needs to see that control ends. `function`: the model function to blame in the bucket
    when the caller knows it better than the stack does (see faulting_function)."""
    from .irql import current_processor  # see caller_module

    cpu = current_processor()
    if cpu.crashed is not None:
        raise cpu.crashed
    if cpu.too_slow is not None:
        # The harness gave up on this processor first (stack.timescale): nothing after that is evidence.
        raise cpu.too_slow
    raw = (p1, p2, p3, p4)
    caller = sys._getframe(1)
    culprit = module or caller_module(caller)
    bugcheck = BugCheck(
        code,
        tuple(address_of(p) for p in raw),  # type: ignore[arg-type]
        module=culprit,
        param_notes=tuple(_note(p) for p in raw),
        irql=cpu.irql,
        message=message,
        function=clean_function(function) if function else faulting_function(culprit, caller),
    )
    cpu.crash(bugcheck)
    log.error("bugcheck: %s", bugcheck.describe())
    raise bugcheck


def KeUnhandledException(exc: BaseException, routine: object, *, module: str) -> BugCheck:
    """What Windows does when an exception leaves an ISR or a DPC: KMODE_EXCEPTION_NOT_HANDLED.

    Windows' p1 is the exception code and p2 the faulting address; the model's exceptions are Python
    ones, so p1 stands for the exception (its note is "Type: text") and p2 for the routine it left. The
    culprit is the innermost driver frame of the exception's traceback (the faulting address's module, as
    Windows reports it), else ``module``, the owner of the routine. Call it from the ``except`` block, so
    the dump's traceback shows the original exception as the context of the STOP.
    """
    culprit = module
    faulting: str | None = None  # the innermost driver frame: where the exception was raised
    tb = exc.__traceback__
    while tb is not None:
        frame_module = module_of_frame(tb.tb_frame)
        if frame_module is not None:
            culprit, faulting = frame_module, function_name(tb.tb_frame)
        tb = tb.tb_next
    what = f"{type(exc).__name__}: {exc}"
    name = getattr(routine, "__qualname__", None) or str(routine)
    return KeBugCheckEx(BugCheckCode.KMODE_EXCEPTION_NOT_HANDLED, what, name, 0, 0, module=culprit,
                        message=f"unhandled {what} in {name}", function=faulting or name)


def BUG(text: str, *, module: str | None = None) -> BugCheck:
    """The PV drivers' BUG(): log "BUG: text" as an error, then ASSERTION_FAILURE (0xDEAD) with the text,
    file and line of the caller."""
    raise _bug(text, sys._getframe(1), module)


def BUG_ON(condition: object, text: str, *, module: str | None = None) -> None:
    if condition:
        raise _bug(text, sys._getframe(1), module)


def _bug(text: str, caller: FrameType, module: str | None) -> BugCheck:
    culprit = module or caller_module(caller)
    current_log().print(culprit.removesuffix(".sys"), f"BUG: {text}", DbgLevel.ERROR)
    return KeBugCheckEx(BugCheckCode.ASSERTION_FAILURE, f"BUG: {text}", caller.f_code.co_filename,
                        caller.f_lineno, 0, module=culprit, message=f"BUG: {text}")


def KeRegisterBugCheckCallback(callback: BugCheckCallback) -> None:
    """Run `callback(bugcheck)` while the guest stops (the DEBUG interface registers one of these)."""
    from .irql import current_processor

    current_processor().bugcheck_callbacks.append(callback)


def KeDeregisterBugCheckCallback(callback: BugCheckCallback) -> bool:
    from .irql import current_processor

    callbacks = current_processor().bugcheck_callbacks
    if callback in callbacks:
        callbacks.remove(callback)
        return True
    return False


# 2: function, bucket, the run record, the schedule and the time written. Format 1 dumps are still read
# (without a record they cannot be replayed; their bucket names the function `unknown`).
CRASH_DUMP_FORMAT = 2
KNOWN_DUMP_FORMATS = (1, 2)
_FORMAT_2_FIELDS = ("function", "bucket", "record", "schedule", "written")


class CrashDumpError(ConfigError, ValueError):
    """A crash dump that cannot be read: names the file and the reason (an unknown format, say)."""


@dataclass
class CrashDump:
    """What the agent writes when the guest stops; enough to read the failure without the guest, and
    (with its run record, base.runrecord) to replay it."""

    code: int
    name: str
    params: list[int]
    param_notes: list[str | None]
    module: str
    message: str
    traceback: str
    device_tree: str
    interface_references: dict[str, int]
    irql: int
    seed: int | None
    debug_log: list[str]
    format: int = CRASH_DUMP_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    function: str = "unknown"
    bucket: str = ""
    record: dict[str, Any] | None = None  # base.runrecord.RunRecord.to_dict() of the run up to the STOP
    schedule: dict[str, Any] = field(default_factory=dict)  # stack.kernel.schedule: mode, seed, decisions
    written: str = ""  # UTC, ISO 8601

    def __post_init__(self) -> None:
        if not self.bucket:
            self.bucket = bucket_id(self.code, self.module, self.function, irql=self.irql, params=self.params,
                                    notes=self.param_notes)

    @classmethod
    def from_bugcheck(cls, bugcheck: BugCheck, *, device_tree: str = "",
                      reference_providers: Mapping[str, Callable[[], Mapping[str, int]]] | None = None,
                      seed: int | None = None, debug_log: list[str] | None = None,
                      record: dict[str, Any] | None = None, schedule: dict[str, Any] | None = None) -> CrashDump:
        references: dict[str, int] = {}
        for provider_name, provider in (reference_providers or {}).items():
            # A broken provider must not lose the dump of the real failure.
            try:
                references.update({str(k): int(v) for k, v in provider().items()})
            except Exception as exc:  # noqa: BLE001 - reported in the dump instead
                references[f"{provider_name}!error"] = -1
                log.warning("reference provider %s failed: %r", provider_name, exc)
        return cls(
            code=bugcheck.code,
            name=bugcheck.name,
            params=list(bugcheck.params),
            param_notes=list(bugcheck.param_notes),
            module=bugcheck.module,
            message=bugcheck.message,
            traceback="".join(traceback.format_exception(bugcheck)),
            device_tree=device_tree,
            interface_references=references,
            irql=bugcheck.irql,
            seed=seed,
            debug_log=list(debug_log or []),
            function=bugcheck.function,
            bucket=bugcheck.bucket,
            record=record,
            schedule=dict(schedule or {}),
            written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "crash dump") -> CrashDump:
        """`where` names the dump in errors (its path)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CrashDumpError(f"{where}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise CrashDumpError(f"{where}: a crash dump is a JSON object, got {type(data).__name__}")
        fmt = data.get("format")
        if fmt not in KNOWN_DUMP_FORMATS:
            raise CrashDumpError(f"{where}: crash dump format {fmt!r} is not one this xenpv reads "
                                 f"({', '.join(map(str, KNOWN_DUMP_FORMATS))}); a newer xenpv wrote it, "
                                 "or it is no crash dump")
        known = {f.name for f in dataclasses.fields(cls)}
        allowed = known - set(_FORMAT_2_FIELDS) if fmt == 1 else known
        unknown = set(data) - allowed
        if unknown:
            raise CrashDumpError(f"{where}: crash dump format {fmt} has unknown fields: {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a field missing
            raise CrashDumpError(f"{where}: malformed crash dump: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
        # Readable by the other users of a shared machine (mkstemp makes 0600): a dump is for reading.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.to_json())
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CrashDump:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise CrashDumpError(f"{path}: cannot read the crash dump: {exc.strerror}") from None
        return cls.from_json(text, str(path))

    def stop_line(self) -> str:
        """One line: the STOP code, its name, the module and the bucket."""
        return (f"STOP 0x{self.code:08X} {self.name} in {self.module}"
                + (f" - {self.message}" if self.message else "") + f" [bucket {self.bucket}]")

    def stop_screen(self) -> str:
        params = ",".join(f"0x{p:016X}" for p in self.params)
        lines = [
            "A problem has been detected and Windows has been shut down to prevent damage to your computer.",
            "",
            self.name,
            "",
            "Technical information:",
            "",
            f"*** STOP: 0x{self.code:08X} ({params})",
            "",
            f"*** {self.module}" + (f" - {self.message}" if self.message else ""),
        ]
        for index, note in enumerate(self.param_notes, start=1):
            if note is not None:
                lines.append(f"    P{index} = {note}")
        lines.append(f"    IRQL = {self.irql}")
        return "\n".join(lines) + "\n"
