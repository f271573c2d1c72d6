"""GNTTAB revoke against a back-end that pins the grant for a while (xenhv's grant copy sets GTF_reading for
its duration, and the host may deschedule xenhv in the middle): the 100 attempts, each after a pause, must
outlast a transient pin, and a grant that stays mapped is still refused after exactly 100."""
from __future__ import annotations

import threading

import pytest

from xenpv.stack.drivers.xenbus.gnttab import RESERVED_ENTRY_COUNT, REVOKE_ATTEMPTS
from xenpv.stack.kernel.status import STATUS_SUCCESS, STATUS_UNSUCCESSFUL
from xenpv.stack.timescale import TIME_SCALE_ENV
from xenpv.xenabi.grant_table import GTF_reading

from .stack_of import interfaces, table_of


@pytest.fixture
def granted(platform):
    ifs = interfaces(platform)
    gt = table_of(ifs.gnttab)
    assert gt.GnttabAcquire() == STATUS_SUCCESS
    _, cache = gt.GnttabCreateCache("vif", 0, 4, lambda a: None, lambda a: None, None)
    status, entry = gt.GnttabPermitForeignAccess(cache, False, 0, 0x1234, True)
    assert status == STATUS_SUCCESS
    frame = ifs.gnttab.platform.grants._frames[0]
    yield gt, cache, entry, frame
    gt.GnttabDestroyCache(cache)
    gt.GnttabRelease()


def _pin_for(frame, seconds: float) -> threading.Timer:
    """What a grant copy in a descheduled xenhv looks like to the guest: GTF_reading for `seconds`."""
    frame.fetch_or(RESERVED_ENTRY_COUNT * 8, 2, GTF_reading)
    unpin = threading.Timer(seconds, frame.fetch_and, args=(RESERVED_ENTRY_COUNT * 8, 2, ~GTF_reading))
    unpin.start()
    return unpin


def test_a_grant_pinned_for_a_moment_is_revoked_within_the_100_attempts(granted) -> None:
    gt, cache, entry, frame = granted
    unpin = _pin_for(frame, 0.02)
    try:
        assert gt.GnttabRevokeForeignAccess(cache, False, entry) == STATUS_SUCCESS
    finally:
        unpin.join()


def test_the_pause_between_attempts_is_scaled(granted, monkeypatch: pytest.MonkeyPatch) -> None:
    gt, cache, entry, frame = granted
    monkeypatch.setenv(TIME_SCALE_ENV, "20")  # 100 pauses of at least 10 ms
    unpin = _pin_for(frame, 0.3)
    try:
        assert gt.GnttabRevokeForeignAccess(cache, False, entry) == STATUS_SUCCESS
    finally:
        unpin.join()


def test_a_grant_that_stays_mapped_is_refused_after_exactly_100_attempts(granted, platform) -> None:
    gt, cache, entry, frame = granted
    frame.fetch_or(RESERVED_ENTRY_COUNT * 8, 2, GTF_reading)
    grants = platform.grants
    tries: list[int] = []
    revoke = grants.end_foreign_access
    grants.end_foreign_access = lambda ref: tries.append(ref) or revoke(ref)
    try:
        assert gt.GnttabRevokeForeignAccess(cache, False, entry) == STATUS_UNSUCCESSFUL
    finally:
        del grants.end_foreign_access
    assert tries == [entry.Reference] * REVOKE_ATTEMPTS == [entry.Reference] * 100
    frame.fetch_and(RESERVED_ENTRY_COUNT * 8, 2, ~GTF_reading)
    assert gt.GnttabRevokeForeignAccess(cache, False, entry) == STATUS_SUCCESS
