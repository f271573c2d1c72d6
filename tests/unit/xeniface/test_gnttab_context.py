"""XENIFACE grant contexts (rig: tests/unit/xeniface/conftest.py).

A PERMIT's XENIFACE_GNTTAB_CONTEXT is pool (XI ioctl_gnttab.c): freed exactly once on every path, and
bug switch xeniface-1019522 puts back the pre-fix GnttabPermitForeignAccess that freed it on its failure
path too, so the IOCTL's own fail8 RtlZeroMemory writes to freed (special) pool: 0xD5 in xeniface.sys.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from xenpv.guests.bugs import CATALOGUE
from xenpv.stack.drivers import bugs
from xenpv.stack.drivers.xeniface import abi
from xenpv.stack.drivers.xeniface.ioctl_gnttab import XENIFACE_POOL_TAG
from xenpv.stack.kernel import BugCheck
from xenpv.stack.kernel.pool import PoolBlock
from xenpv.stack.kernel.status import STATUS_INVALID_PARAMETER, STATUS_PENDING

SWITCH = "xeniface-1019522"


@pytest.fixture
def switches() -> Iterator[None]:
    yield
    bugs.activate()


def _permit(rig, f, request_id: int):
    request = abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_IN(RequestId=request_id, RemoteDomain=0, NumberPages=1).pack()
    out_len = abi.field_offset(abi.XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS_OUT, "References", 1)
    return rig.process.DeviceIoControl(f, abi.IOCTL_XENIFACE_GNTTAB_PERMIT_FOREIGN_ACCESS, request, out_len)


def _context_blocks(monkeypatch) -> list[PoolBlock]:
    """Every context block the IOCTL allocates, in order."""
    from xenpv.stack.drivers.xeniface import ioctl_gnttab
    made: list[PoolBlock] = []
    real = ioctl_gnttab.ExAllocatePoolWithTag

    def allocate(*args, **kwargs) -> PoolBlock:
        block = real(*args, **kwargs)
        made.append(block)
        return block

    monkeypatch.setattr(ioctl_gnttab, "ExAllocatePoolWithTag", allocate)
    return made


def test_a_refused_permit_frees_its_context_once_and_a_granted_one_at_revoke(rig, monkeypatch, switches) -> None:
    bugs.activate()
    made = _context_blocks(monkeypatch)
    f = rig.open()
    granted = _permit(rig, f, 1)
    assert granted.status == STATUS_PENDING
    assert _permit(rig, f, 1).status == STATUS_INVALID_PARAMETER  # the RequestId is in use
    assert [b.tag for b in made] == [XENIFACE_POOL_TAG] * 2
    assert not made[0].freed and made[1].freed  # the refused one went (fail8), the pending one lives
    rig.process.exit()  # the pending grant is cancelled: its context goes too
    assert made[0].freed


def test_switch_1019522_frees_the_refused_context_twice(rig, switches) -> None:
    bugs.activate([SWITCH])
    f = rig.open()
    assert _permit(rig, f, 1).status == STATUS_PENDING
    with pytest.raises(BugCheck) as stop:
        _permit(rig, f, 1)
    switch = CATALOGUE[SWITCH]
    assert (stop.value.code, stop.value.module) == (switch.stop, switch.module)
    assert "IoctlGnttabPermitForeignAccess" in stop.value.bucket and "freed pool" in stop.value.message
