"""Crash buckets: one stable id per bug, in the spirit of !analyze's FAILURE_BUCKET_ID.

Two dumps of the same bug must get the same id on any run and any machine, and dumps of different bugs
should not. The id is built from what a bug keeps across runs (the STOP code, the module blamed, the
model function that faulted and, for some codes, one more stable fact) and never from what changes
(addresses, line numbers, counts, paths, times):

    0x<CODE>_<module>!<function>[+<qualifier>]        e.g.  0xD1_xennet!XennetAdapter.AdapterDisable+irql-dispatch

- CODE: the STOP code in upper-case hex without leading zeros (0xD1, 0x9F, 0xDEAD).
- module: the module blamed (BugCheck.module) without its `.sys`/`.exe` suffix: `xenbus`, `xennet`,
  `ntoskrnl`, or `agent` for a STOP the console injected.
- function: the model function that faulted, as the dump's `function` (see `faulting_function`): its
  qualified name (class.method), with `<locals>` steps dropped and `<lambda>` written `lambda`; `unknown`
  when the dump has none (format 1 dumps).
- qualifier, by code:
  - IRQL rules (0x9, 0xA, 0xD1, 0xC8): `irql-<level>`, the IRQL at the STOP (passive, apc, dispatch,
    dirql, high; `irql-N` for another level);
  - KMODE_EXCEPTION_NOT_HANDLED (0x1E): the exception's type (`KeyError`);
  - codes whose first parameter is a subtype (0x9F, 0xA0, 0xCA): `p1-0x<P1>` (0x9F's 3 is "an IRP
    blocked too long");
  - others: none (for 0xDEAD the function pins the BUG() site; its text may hold counts).

Anything outside `[A-Za-z0-9_.!+-]` becomes `_`, so an id is one word in a shell and a file name.
Harness-detected failures that are no STOP (a hang, an agent or dom0 crash) have ids of their own, made
by harness.explore, which never start with `0x`.
"""
from __future__ import annotations

import os
import re
from types import FrameType

IRQL_CODES = frozenset({0x09, 0x0A, 0xD1, 0xC8})
EXCEPTION_CODES = frozenset({0x1E})
SUBTYPE_CODES = frozenset({0x9F, 0xA0, 0xCA})

_IRQL_WORDS = {0: "passive", 1: "apc", 2: "dispatch", 5: "dirql", 13: "clock", 14: "ipi", 15: "high"}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.!+-]")

_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def function_name(frame: FrameType) -> str:
    """The stable name of the function `frame` runs: qualified, without `<locals>` steps."""
    code = frame.f_code
    qualname = getattr(code, "co_qualname", code.co_name)
    return clean_function(qualname)


def clean_function(qualname: str) -> str:
    parts = [p for p in qualname.split(".") if p != "<locals>"]
    return ".".join(p.strip("<>") if p.startswith("<") else p for p in parts) or "unknown"


def in_kernel_model(frame: FrameType) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(_KERNEL_DIR)


def module_word(module: str) -> str:
    for suffix in (".sys", ".exe", ".dll"):
        if module.lower().endswith(suffix):
            return module[: -len(suffix)]
    return module


def qualifier(code: int, irql: int, params: list[int] | tuple[int, ...], notes: list[str | None] | tuple[str | None, ...]) -> str:
    if code in IRQL_CODES:
        return f"irql-{_IRQL_WORDS.get(irql, str(irql))}"
    if code in EXCEPTION_CODES:
        note = notes[0] if notes else None
        if note:
            return note.split(":", 1)[0].strip() or "exception"
        return "exception"
    if code in SUBTYPE_CODES and params:
        return f"p1-0x{params[0]:X}"
    return ""


def bucket_id(code: int, module: str, function: str, *, irql: int = 0, params: list[int] | tuple[int, ...] = (),
              notes: list[str | None] | tuple[str | None, ...] = ()) -> str:
    """The bucket of a STOP (see the module docstring for the rule)."""
    text = f"0x{code:X}_{module_word(module) or 'unknown'}!{function or 'unknown'}"
    extra = qualifier(code, irql, params, notes)
    if extra:
        text += f"+{extra}"
    return _UNSAFE.sub("_", text)
