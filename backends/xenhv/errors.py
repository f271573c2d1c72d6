"""The errors xenhv operations raise on a guest's bad request.

Hypercalls fail with ``-errno`` (Xen's errno values, xenabi.xen.XEN_E*): :class:`XenError`.  Grant table
operations instead report a per-operation ``GNTST_*`` status in the op structure while the hypercall itself
succeeds: :class:`GrantError`.  Both carry a message naming the operation and the offending argument, for the
log; the guest only ever sees the number.
"""
from __future__ import annotations

from xenpv.xenabi import xen
from xenpv.xenabi.grant_table import GNTST_NAMES


def _errno_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in vars(xen).items():
        # First spelling wins: EAGAIN before its alias EWOULDBLOCK, EDEADLK before EDEADLOCK.
        if name.startswith("XEN_E") and isinstance(value, int):
            names.setdefault(value, name.removeprefix("XEN_"))
    return names


ERRNO_NAMES: dict[int, str] = _errno_names()


class XenError(Exception):
    """A hypercall failed with Xen errno ``errno`` (positive); the guest receives ``result`` = -errno."""

    def __init__(self, errno: int, message: str) -> None:
        self.errno = errno
        self.message = message
        super().__init__(f"{message} ({self.name})")

    @property
    def name(self) -> str:
        return ERRNO_NAMES.get(self.errno, f"errno {self.errno}")

    @property
    def result(self) -> int:
        return -self.errno


class GrantError(Exception):
    """A grant table operation failed with ``status`` (a negative GNTST_* value written to the op's status)."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{message} ({self.name})")

    @property
    def name(self) -> str:
        return GNTST_NAMES.get(self.status, f"GNTST {self.status}")
