"""Vif.disconnect(): the vif's threads use its rings, grants, TAP and wake pipe, so none is released while
one of them runs; a thread that does not stop in time is an error and leaves them in place."""
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
    vif._wake_r, vif._wake_w = wake = os.pipe()
    gate = threading.Event()
    stuck = threading.Thread(target=gate.wait, args=(10,), name="vif1.0-tx0")
    vif._threads.append(stuck)
    stuck.start()
    with pytest.raises(WaitTimeout, match="disconnecting vif1.0: thread vif1.0-tx0 still running"):
        vif.disconnect()
    assert (vif._wake_r, vif._wake_w) == wake
    for fd in wake:
        os.fstat(fd)  # still open: the thread may be polling it
    gate.set()
    vif.disconnect()  # the thread has ended: disconnect finishes the job
    assert (vif._wake_r, vif._wake_w) == (-1, -1) and vif._threads == []
