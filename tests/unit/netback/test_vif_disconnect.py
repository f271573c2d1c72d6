"""Vif.disconnect(): the vif's data thread uses its rings, grants, TAP and wake eventfd, so none is released
while it runs; a thread that does not stop in time is an error and leaves them in place."""
from __future__ import annotations

import os
import threading
from typing import Any, cast

import pytest

from xenpv.backends.netback.vif import Vif
from xenpv.base import threads
from xenpv.base.errors import WaitTimeout


class _Xs:
    def read(self, path: str) -> bytes:
        assert path.endswith("/frontend")
        return b"/local/domain/1/device/vif/0"


def test_disconnect_releases_nothing_while_a_vif_thread_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "THREAD_EXIT_DEADLINE", 0.2)
    vif = Vif(cast(Any, None), cast(Any, _Xs()), 1, 0, on_fatal=lambda v, reason: None)
    vif._wake = wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    gate = threading.Event()
    stuck = threading.Thread(target=gate.wait, args=(10,), name="vif1.0-data")
    vif._threads.append(stuck)
    stuck.start()
    with pytest.raises(WaitTimeout, match="disconnecting vif1.0: thread vif1.0-data still running"):
        vif.disconnect()
    assert vif._wake == wake
    os.fstat(wake)  # still open: the thread may be polling it
    assert os.eventfd_read(wake) >= 1  # and the disconnect woke it
    gate.set()
    vif.disconnect()  # the thread has ended: disconnect finishes the job
    assert vif._wake == -1 and vif._threads == []
    vif._kick()  # a kick still in flight on the vhost-user thread writes nothing once the fd is gone
