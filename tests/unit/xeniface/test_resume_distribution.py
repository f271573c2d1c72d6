"""XENIFACE's SUSPEND LATE callback (XI fdo.c FdoSuspendCallbackLate, at DISPATCH_LEVEL) rewrites
drivers/<n> with the image's compiled-in version (MAJOR_VERSION...BUILD_NUMBER) and reads no registry:
`xenpv explore` found a false 0xD1 at ZwQueryValueKey in xeniface.sys after every local migration, when the
model looked the version up in the registry there. Rig: tests/unit/xeniface/conftest.py."""
from __future__ import annotations

from xenpv.stack.kernel.irql import DISPATCH_LEVEL, KeLowerIrql, KeRaiseIrql


def test_the_late_callback_at_dispatch_level_reads_no_registry(rig) -> None:
    old = KeRaiseIrql(DISPATCH_LEVEL)
    try:
        rig.fdo.FdoSuspendCallbackLate(None)  # SUSPEND LATE: DISPATCH_LEVEL
    finally:
        KeLowerIrql(old)
    status, buffer = rig.fdo.store.StoreRead(None, "drivers", rig.fdo.distribution)
    assert buffer.Value.decode().split()[2] == rig.fdo.version
