"""The vif's one data thread (backends/netback/vif.py): its tx budget per queue, and the frame it holds
while the frontend has no rx buffers posted. The rings and the TAP are stand-ins with the methods the
thread calls; the integration tests (tests/integration/test_netback.py) run it on real ones."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from xenpv.backends.netback import vif as V
from xenpv.backends.netback.tap import VnetHdr
from xenpv.backends.netback.vif import RX_BATCH, RX_WAIT, TX_ROUNDS, Queue, Vif


class _Xs:
    def read(self, path: str) -> bytes:
        return b"/local/domain/1/device/vif/0"


@dataclass
class _TxRing:
    pending_passes: int  # passes after which final_check says the ring is empty; -1: never

    def final_check_for_requests(self) -> bool:
        if self.pending_passes == 0:
            return False
        self.pending_passes -= 1
        return True


@dataclass
class _Tx:
    ring: _TxRing
    polls: int = 0

    def poll(self) -> tuple[list, bool]:
        self.polls += 1
        if self.polls > 100:
            raise AssertionError("the tx ring was polled without end")
        return [], False


@dataclass
class _RxRing:
    posted: bool = False

    def final_check_for_requests(self) -> bool:
        return self.posted


@dataclass
class _Rx:
    ring: _RxRing = field(default_factory=_RxRing)
    delivered: list[bytes] = field(default_factory=list)

    def fits(self, frame: bytes) -> bool:
        return True

    def ready(self, frame: bytes) -> bool:
        return self.ring.posted

    def deliver(self, hdr: VnetHdr, frame: bytes) -> bool:
        self.delivered.append(frame)
        return True


class _Tap:
    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames

    def read(self) -> tuple[VnetHdr, bytes]:
        if not self.frames:
            raise BlockingIOError
        return VnetHdr(), self.frames.pop(0)


def _vif(rx: _Rx | None = None, tx: _Tx | None = None) -> tuple[Vif, Queue]:
    v = Vif(cast(Any, None), cast(Any, _Xs()), 1, 0, on_fatal=lambda _v, _r: None)
    q = Queue(0, cast(Any, tx or _Tx(_TxRing(0))), cast(Any, rx or _Rx()), [], [5, 6])
    v.queues = [q]
    return v, q


def test_a_queue_that_keeps_posting_gets_its_budget_then_yields() -> None:
    tx = _Tx(_TxRing(-1))
    v, q = _vif(tx=tx)
    assert v._tx_service(q, cast(Any, _Tap([]))) is True
    assert tx.polls == TX_ROUNDS


def test_a_drained_tx_ring_ends_the_turn() -> None:
    tx = _Tx(_TxRing(1))
    v, q = _vif(tx=tx)
    assert v._tx_service(q, cast(Any, _Tap([]))) is False
    assert tx.polls == 2


def test_a_frame_without_rx_buffers_is_held_and_the_tap_is_left_alone() -> None:
    v, q = _vif()
    tap = _Tap([b"first", b"second"])
    owed: set[int] = set()
    held = v._rx_batch(cast(Any, tap), owed)
    assert held is not None and held[1] == b"first" and held[2] is q
    assert tap.frames == [b"second"]  # not read while a frame is held


def test_a_held_frame_goes_out_when_buffers_come() -> None:
    rx = _Rx()
    v, q = _vif(rx=rx)
    owed: set[int] = set()
    held = v._rx_batch(cast(Any, _Tap([b"frame"])), owed)
    assert v._rx_held(held, owed) == held  # no buffers yet, time left: still held
    rx.ring.posted = True
    assert v._rx_held(held, owed) is None
    assert rx.delivered == [b"frame"] and owed == {0}


def test_a_held_frame_is_dropped_when_its_time_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    rx = _Rx()
    v, q = _vif(rx=rx)
    held = v._rx_batch(cast(Any, _Tap([b"frame"])), set())
    now = V.time.monotonic()
    monkeypatch.setattr(V.time, "monotonic", lambda: now + RX_WAIT)
    assert v._rx_held(held, set()) is None
    assert v.stats.rx_drops == 1 and rx.delivered == []


def test_one_turn_reads_at_most_a_batch_from_the_tap() -> None:
    rx = _Rx(_RxRing(posted=True))
    v, q = _vif(rx=rx)
    tap = _Tap([b"f%d" % i for i in range(RX_BATCH + 3)])
    assert v._rx_batch(cast(Any, tap), set()) is None
    assert len(rx.delivered) == RX_BATCH and len(tap.frames) == 3
