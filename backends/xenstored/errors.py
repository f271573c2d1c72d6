"""Errors of the xenstore daemon and its clients."""
from __future__ import annotations

from xenpv.xenabi.xs_wire import XSD_ERRORS


class XsError(Exception):
    """A request failed with a xenstore errno name (one of xsd_errors[]); `detail` says why, for the log."""

    def __init__(self, errno_name: str, detail: str = "") -> None:
        if errno_name not in XSD_ERRORS:
            errno_name = "EINVAL"  # the wire only carries xsd_errors[] names
        self.errno_name = errno_name
        self.detail = detail
        super().__init__(f"{errno_name}: {detail}" if detail else errno_name)


class ProtocolViolation(Exception):
    """A peer broke the framing (oversize or malformed header): its connection is dropped, as cxenstored does."""
