"""XENBUS's suspend hypercall and what its result means (issue 18: the FDO's suspend path had no unit test).

xen/include/public/sched.h, SCHEDOP_shutdown with SHUTDOWN_suspend: the hypercall returns when the domain
runs again; 1 means the suspend was cancelled and the domain resumed in place (a checkpoint, a failed save),
0 that it resumed as a restored domain; a negative value is an error. XENBUS's suspend.c takes 1 as
"cancelled" (no re-plumbing of the interfaces' event channels and grants) and an error as a failed suspend.
"""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest

from xenpv.stack.drivers.xenbus import fdo as fdo_module
from xenpv.stack.kernel.status import STATUS_CANCELLED, STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.xenabi import xen as X

SCRATCH = 0x5000


@pytest.mark.parametrize("rc, status", [(0, STATUS_SUCCESS), (1, STATUS_CANCELLED), (-22, STATUS_UNSUCCESSFUL),
                                        (-1, STATUS_UNSUCCESSFUL), (2, STATUS_SUCCESS)],
                         ids=["resumed", "cancelled", "einval", "eperm", "other-positive"])
def test_suspend_domain_maps_schedop_shutdowns_result(rig, machine, monkeypatch: pytest.MonkeyPatch,
                                                      rc: int, status: int) -> None:
    fdo = rig.boot(machine(0x0001)).xenbus.active_fdo
    vcpu = fdo.platform.vcpu
    fdo.platform.hypercalls = SimpleNamespace(vcpu=vcpu, scratch=SCRATCH)
    calls: list[tuple[int, tuple[int, ...]]] = []

    def hypercall(v, nr: int, args: tuple[int, ...]) -> int:
        assert v is vcpu
        calls.append((nr, args))
        return rc

    monkeypatch.setattr(fdo_module, "parked_hypercall", hypercall)
    assert fdo._suspend_domain() == status
    assert calls == [(X.HYPERCALL_NUMBERS["sched_op"], (X.SCHEDOP_shutdown, SCRATCH))]
    op = X.SchedShutdown.from_buffer_copy(vcpu.read_phys(SCRATCH, ctypes.sizeof(X.SchedShutdown)))
    assert op.reason == X.SHUTDOWN_suspend
