"""One XENIFACE IOCTL as its handler sees it (the arguments XenIfaceIoctl passes each Ioctl* function)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from xenpv.stack.kernel import Irp
from xenpv.stack.kernel.io import FileObject

_context_addresses = itertools.count(0xFFFFA800_00400000, 0x40)


def context_address() -> int:
    return next(_context_addresses)


@dataclass
class Request:
    """One IOCTL as a handler sees it: the FDO state, the buffers and the issuing file object."""

    state: Any  # ioctls.XenIfaceState: its lists
    fdo: Any  # fdo.XenifaceFdo: its interfaces
    irp: Irp
    code: int
    input: bytes
    out_len: int
    file_object: FileObject

    @property
    def in_len(self) -> int:
        return len(self.input)

    def complete_with(self, output: bytes) -> None:
        self.irp.io_status.information = output
