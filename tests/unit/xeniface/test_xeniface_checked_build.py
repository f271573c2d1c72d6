"""XENIFACE under a checked build of XENBUS: the EVTCHN ASSERTs its own calls must keep (win-xenbus 1087a8d
evtchn.c EvtchnSend: ASSERT3U(KeGetCurrentIrql(), >=, DISPATCH_LEVEL))."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from xenpv.stack.drivers.xeniface import abi
from xenpv.stack.kernel.assertion import set_build
from xenpv.stack.kernel.status import STATUS_SUCCESS


@pytest.fixture
def checked_build() -> Iterator[None]:
    set_build("checked")
    yield
    set_build("free")


def test_evtchn_notify_sends_at_dispatch_level(rig, checked_build) -> None:
    """XI ioctl_evtchn.c EvtchnNotify sends holding Fdo->EvtchnLock, so a checked XENBUS does not stop."""
    f = rig.open()
    handle, _event = rig.process.CreateEvent("evtchn")
    bind = abi.XENIFACE_EVTCHN_BIND_UNBOUND_IN(RemoteDomain=0, Mask=0, Event=handle).pack()
    r = rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_EVTCHN_BIND_UNBOUND, bind, 4)
    assert r.status == STATUS_SUCCESS
    port = int.from_bytes(r.output, "little")
    assert rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_EVTCHN_NOTIFY, port.to_bytes(4, "little")).status == \
        STATUS_SUCCESS
    assert port in rig.platform.vcpu.evtchn.sent
    rig.process.CloseHandle(f)
