"""Pool memory and the faults of touching memory that is not there: the rules a NULL pointer, a freed
block, an index far beyond an allocation or a jump into a page that holds no code break.

The model's driver objects are Python objects, so the C driver's pointer dereferences are explicit here:
driver code passes what it dereferences through `MmAccess` (or `MmAccessElement` for an array element,
`MmExecute` for a call through a code page) where the C code reads or writes through a pointer that can
be NULL, freed or out of range. A valid pointer costs nothing; an invalid one takes the path Windows'
page fault handler takes (MmAccessFault, then KiDispatchException), which the model decides from the
current IRQL and what was touched:

- at DISPATCH_LEVEL or above, a fault on an invalid address cannot be resolved: IRQL_NOT_LESS_OR_EQUAL
  (0xA), or DRIVER_IRQL_NOT_LESS_OR_EQUAL (0xD1) when a driver touched it; p1 = the address, p2 = the
  IRQL, p3 = 0 read / 1 write / 8 execute, p4 = the instruction (here: the caller);
- a freed pool block: the model runs as if Driver Verifier's special pool were on (as an HLK run has it),
  so every freed block stays unmapped: DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL (0xD5) when a driver
  touched it, PAGE_FAULT_IN_FREED_SPECIAL_POOL (0xCC) otherwise, at any IRQL; p1 = the address, p2 = 0
  read / 1 write, p3 = the instruction;
- below DISPATCH_LEVEL, a kernel address nothing maps (an index far beyond an allocation):
  PAGE_FAULT_IN_NONPAGED_AREA (0x50); p1 = the address, p2 = 0 read / 1 write, p3 = the instruction;
- below DISPATCH_LEVEL, a NULL (user-range) address or an execute fault is an access violation
  (0xC0000005) raised in the faulting thread; the PV drivers have no __try around these paths and the
  model's PASSIVE_LEVEL code runs in system threads (PnP, power, the drivers' own threads), so it ends
  as SYSTEM_THREAD_EXCEPTION_NOT_HANDLED (0x7E): p1 = the exception code, p2 = the instruction.

`ExAllocatePoolWithTag` / `ExFreePoolWithTag` keep Windows' pool rules: BAD_POOL_CALLER (0xC2) for an
allocation above its pool type's IRQL (p1 = 0x08), a free above it (0x09), a second free of a block
(0x07), a free with another tag (0x0A) and a free of an address below the system range, NULL included
(0x40: ExFreePoolWithTag is not NULL-safe).
"""
from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from types import FrameType
from typing import Any

from .bugcheck import BugCheckCode, KeBugCheckEx, caller_module
from .irql import APC_LEVEL, DISPATCH_LEVEL, current_processor, irql_name

IRQL_NOT_LESS_OR_EQUAL = BugCheckCode.IRQL_NOT_LESS_OR_EQUAL
PAGE_FAULT_IN_NONPAGED_AREA = BugCheckCode.PAGE_FAULT_IN_NONPAGED_AREA
SYSTEM_THREAD_EXCEPTION_NOT_HANDLED = BugCheckCode.SYSTEM_THREAD_EXCEPTION_NOT_HANDLED
BAD_POOL_CALLER = BugCheckCode.BAD_POOL_CALLER
PAGE_FAULT_IN_FREED_SPECIAL_POOL = BugCheckCode.PAGE_FAULT_IN_FREED_SPECIAL_POOL
DRIVER_IRQL_NOT_LESS_OR_EQUAL = BugCheckCode.DRIVER_IRQL_NOT_LESS_OR_EQUAL
DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL = BugCheckCode.DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL

STATUS_ACCESS_VIOLATION = 0xC0000005

# BAD_POOL_CALLER's p1: what the caller did wrong.
POOL_ALLOCATE_AT_BAD_IRQL = 0x08
POOL_FREE_AT_BAD_IRQL = 0x09
POOL_FREE_TWICE = 0x07
POOL_FREE_WRONG_TAG = 0x0A
POOL_FREE_USER_ADDRESS = 0x40

MM_SYSTEM_RANGE_START = 0xFFFF8000_00000000

ACCESS_READ = 0
ACCESS_WRITE = 1
ACCESS_EXECUTE = 8


class POOL_TYPE(IntEnum):
    NonPagedPool = 0
    PagedPool = 1
    NonPagedPoolNx = 512


_KERNEL_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_addresses = itertools.count(0xFFFFB000_00100000, 0x1000)  # one page per block: special pool's layout


def pool_tag(text: str) -> int:
    """The ULONG a C driver writes as 'abcd' (the first character in the low byte)."""
    if len(text) != 4:
        raise ValueError(f"a pool tag has 4 characters, got {text!r}")
    return int.from_bytes(text.encode("ascii"), "little")


def tag_text(tag: int) -> str:
    return tag.to_bytes(4, "little").decode("ascii", "replace")


@dataclass(eq=False)
class PoolBlock:
    """An allocation: `contents` is what the driver keeps in it (a Python object or list)."""

    pool_type: POOL_TYPE
    size: int
    tag: int
    contents: Any = None
    owner: str = "ntoskrnl.exe"
    address: int = field(default_factory=lambda: next(_addresses))
    freed: bool = False

    def __str__(self) -> str:
        state = " (freed)" if self.freed else ""
        return f"POOL('{tag_text(self.tag)}' {self.size:#x} bytes at {self.address:#x}){state}"


def _caller(start: FrameType | None) -> FrameType | None:
    """The first frame outside the kernel model: the code that made the access."""
    frame = start
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_KERNEL_DIR):
        frame = frame.f_back
    return frame


def _where(frame: FrameType | None) -> str:
    if frame is None:
        return "kernel"
    return f"{frame.f_code.co_qualname} ({frame.f_code.co_filename}:{frame.f_lineno})"


def _module(frame: FrameType | None) -> str:
    return caller_module(frame) if frame is not None else caller_module()


def _fault(address: int, what: str, access: int, *, freed: bool, unmapped_kernel: bool) -> None:
    """The page fault handler's verdict for an access to `address` that no valid page backs."""
    cpu = current_processor()
    frame = _caller(sys._getframe(2))
    module, where = _module(frame), _where(frame)
    driver = module != "ntoskrnl.exe"
    kind = {ACCESS_READ: "read", ACCESS_WRITE: "write", ACCESS_EXECUTE: "execute"}[access]
    if freed:
        code = DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL if driver else PAGE_FAULT_IN_FREED_SPECIAL_POOL
        raise KeBugCheckEx(code, address, int(access == ACCESS_WRITE), where, 0, module=module,
                           message=f"{kind} of freed pool: {what} at {irql_name(cpu.irql)}")
    if cpu.irql >= DISPATCH_LEVEL:
        code = DRIVER_IRQL_NOT_LESS_OR_EQUAL if driver else IRQL_NOT_LESS_OR_EQUAL
        raise KeBugCheckEx(code, address, cpu.irql, access, where, module=module,
                           message=f"{kind} of invalid address {address:#x} ({what}) at {irql_name(cpu.irql)}")
    if unmapped_kernel and access != ACCESS_EXECUTE:
        raise KeBugCheckEx(PAGE_FAULT_IN_NONPAGED_AREA, address, int(access == ACCESS_WRITE), where, 0,
                           module=module, message=f"{kind} of unmapped kernel address {address:#x} ({what})")
    raise KeBugCheckEx(SYSTEM_THREAD_EXCEPTION_NOT_HANDLED, STATUS_ACCESS_VIOLATION, where, 0, 0, module=module,
                       message=f"access violation: {kind} of {address:#x} ({what}) at {irql_name(cpu.irql)}, "
                               "no exception handler")


def MmAccess(pointer: Any, what: str, *, write: bool = False) -> Any:
    """The driver reads (or writes) through `pointer`; returns it when the access is valid.

    None is NULL; a freed PoolBlock is freed special pool. `what` names the field, for the dump."""
    access = ACCESS_WRITE if write else ACCESS_READ
    if pointer is None:
        _fault(0, f"NULL->{what}", access, freed=False, unmapped_kernel=False)
    if isinstance(pointer, PoolBlock) and pointer.freed:
        _fault(pointer.address, f"{pointer}->{what}", access, freed=True, unmapped_kernel=False)
    return pointer


def MmAccessElement(block: PoolBlock | None, index: int, element_size: int, what: str, *,
                    write: bool = False) -> Any:
    """Element `index` of the array held in `block` (contents: a list); the C code's `Array[Index]`."""
    access = ACCESS_WRITE if write else ACCESS_READ
    MmAccess(block, what, write=write)
    assert block is not None
    address = block.address + index * element_size
    items = block.contents
    if not 0 <= index < len(items):
        # Special pool puts each block at the end of its page, so any index past the end faults; far
        # beyond it (an underflowed ULONG) nothing is mapped at all.
        _fault(address & 0xFFFFFFFF_FFFFFFFF, f"{what}[{index:#x}] of {block}", access, freed=False,
               unmapped_kernel=True)
    return items[index]


@dataclass(eq=False)
class CodePage:
    """A page the driver calls into (a hypercall page): executable only once something wrote code to it."""

    name: str
    populated: bool = False
    address: int = field(default_factory=lambda: next(_addresses))


def MmExecute(page: CodePage, entry: int, what: str) -> None:
    """A call to `page` + `entry`: a page nothing populated holds zeroes, and running them faults."""
    if not page.populated:
        _fault(page.address + entry, f"call into {page.name} ({what}), which holds no code", ACCESS_WRITE,
               freed=False, unmapped_kernel=False)


def ExAllocatePoolWithTag(pool_type: POOL_TYPE, size: int, tag: int, contents: Any = None) -> PoolBlock:
    cpu = current_processor()
    limit = APC_LEVEL if pool_type == POOL_TYPE.PagedPool else DISPATCH_LEVEL
    if cpu.irql > limit:
        raise KeBugCheckEx(BAD_POOL_CALLER, POOL_ALLOCATE_AT_BAD_IRQL, cpu.irql, int(pool_type), size,
                           module=_module(_caller(sys._getframe(1))),
                           message=f"{pool_type.name} allocation at {irql_name(cpu.irql)}")
    return PoolBlock(pool_type, size, tag, contents, owner=_module(_caller(sys._getframe(1))))


def ExFreePoolWithTag(block: PoolBlock | None, tag: int) -> None:
    """Free `block`. Not NULL-safe, as on Windows."""
    cpu = current_processor()
    module = _module(_caller(sys._getframe(1)))
    if block is None:
        raise KeBugCheckEx(BAD_POOL_CALLER, POOL_FREE_USER_ADDRESS, 0, MM_SYSTEM_RANGE_START, 0, module=module,
                           message="ExFreePoolWithTag(NULL): a free of an address below the system range")
    limit = APC_LEVEL if block.pool_type == POOL_TYPE.PagedPool else DISPATCH_LEVEL
    if cpu.irql > limit:
        raise KeBugCheckEx(BAD_POOL_CALLER, POOL_FREE_AT_BAD_IRQL, cpu.irql, int(block.pool_type), block,
                           module=module, message=f"free of {block} at {irql_name(cpu.irql)}")
    if block.freed:
        raise KeBugCheckEx(BAD_POOL_CALLER, POOL_FREE_TWICE, 0, 0, block, module=module,
                           message=f"{block} freed twice")
    if tag != block.tag:
        raise KeBugCheckEx(BAD_POOL_CALLER, POOL_FREE_WRONG_TAG, block, block.tag, tag, module=module,
                           message=f"{block} freed with tag '{tag_text(tag)}'")
    block.freed = True
    block.contents = None


def ExFreePool(block: PoolBlock | None) -> None:
    ExFreePoolWithTag(block, block.tag if block is not None else 0)
