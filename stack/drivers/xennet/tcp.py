"""A minimal TCP client connection (RFC 793 subset): active open, in-order data with cumulative ACKs, the
peer's window, go-back-N retransmission on a timeout, FIN in both directions. Segments are dpkt objects;
the IP layer serialises them (dpkt fills the checksums). No options but MSS, no SACK, no window scaling,
no congestion control beyond the peer's window."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import dpkt

log = logging.getLogger("stack.drivers.xennet.tcp")

RECEIVE_WINDOW = 65535
RETRANSMIT_SECONDS = 0.3

FIN, SYN, RST, PSH, ACK = dpkt.tcp.TH_FIN, dpkt.tcp.TH_SYN, dpkt.tcp.TH_RST, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_ACK


class TcpState(Enum):
    CLOSED = "CLOSED"
    SYN_SENT = "SYN_SENT"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN_WAIT_1"
    FIN_WAIT_2 = "FIN_WAIT_2"
    CLOSE_WAIT = "CLOSE_WAIT"
    LAST_ACK = "LAST_ACK"
    TIME_WAIT = "TIME_WAIT"


def seq_lt(a: int, b: int) -> bool:
    return ((a - b) & 0xFFFFFFFF) >= 0x80000000


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


@dataclass
class TcpConnection:
    """One connection; `emit(segment)` hands a dpkt.tcp.TCP to the IP layer."""

    sport: int
    dport: int
    iss: int
    emit: Callable[[dpkt.tcp.TCP], None]
    mss: int = 1460
    state: TcpState = TcpState.CLOSED
    snd_una: int = 0
    snd_nxt: int = 0
    snd_wnd: int = 0
    rcv_nxt: int = 0
    received: bytearray = field(default_factory=bytearray)
    out_of_order: dict[int, bytes] = field(default_factory=dict)
    unacked: bytearray = field(default_factory=bytearray)   # sent, not yet acknowledged (from snd_una)
    peer_fin: bool = False
    fin_sent: bool = False
    reset: bool = False
    ack_pending: bool = False
    last_send: float = 0.0
    retransmits: int = 0

    def _segment(self, flags: int, seq: int, data: bytes = b"", options: bytes = b"") -> dpkt.tcp.TCP:
        segment = dpkt.tcp.TCP(sport=self.sport, dport=self.dport, seq=seq & 0xFFFFFFFF, ack=self.rcv_nxt,
                               flags=flags, win=RECEIVE_WINDOW, data=data)
        if options:
            segment.opts = options
            segment.off = 5 + len(options) // 4
        return segment

    # -- user calls (with the adapter lock held) ------------------------------------------------------

    def open(self) -> None:
        self.snd_una = self.snd_nxt = self.iss
        options = bytes([dpkt.tcp.TCP_OPT_MSS, 4]) + self.mss.to_bytes(2, "big")
        self.emit(self._segment(SYN, self.iss, options=options))
        self.snd_nxt = (self.iss + 1) & 0xFFFFFFFF
        self.state = TcpState.SYN_SENT
        self.last_send = time.monotonic()

    def send_window(self) -> int:
        in_flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
        return max(0, self.snd_wnd - in_flight)

    def send(self, data: bytes) -> int:
        """Send what the peer's window allows now; returns the bytes taken."""
        if self.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            return 0
        taken = 0
        while taken < len(data) and (room := min(self.mss, self.send_window())) > 0:
            chunk = data[taken:taken + room]
            self.emit(self._segment(ACK | PSH, self.snd_nxt, chunk))
            self.unacked += chunk
            self.snd_nxt = (self.snd_nxt + len(chunk)) & 0xFFFFFFFF
            taken += len(chunk)
            self.last_send = time.monotonic()
        return taken

    def close(self) -> None:
        if self.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT) and not self.fin_sent:
            self.emit(self._segment(FIN | ACK, self.snd_nxt))
            self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF
            self.fin_sent = True
            self.state = TcpState.FIN_WAIT_1 if self.state == TcpState.ESTABLISHED else TcpState.LAST_ACK
            self.last_send = time.monotonic()

    def abort(self) -> None:
        if self.state not in (TcpState.CLOSED, TcpState.TIME_WAIT):
            self.emit(self._segment(RST | ACK, self.snd_nxt))
        self.state = TcpState.CLOSED

    def tick(self) -> None:
        """Go-back-N: resend everything unacknowledged after RETRANSMIT_SECONDS without progress."""
        if time.monotonic() - self.last_send < RETRANSMIT_SECONDS:
            return
        if self.state == TcpState.SYN_SENT:
            self.retransmits += 1
            options = bytes([dpkt.tcp.TCP_OPT_MSS, 4]) + self.mss.to_bytes(2, "big")
            self.emit(self._segment(SYN, self.iss, options=options))
        elif self.unacked:
            self.retransmits += 1
            for offset in range(0, min(len(self.unacked), max(self.snd_wnd, self.mss)), self.mss):
                self.emit(self._segment(ACK | PSH, self.snd_una + offset, bytes(self.unacked[offset:offset + self.mss])))
        elif self.fin_sent and self.state in (TcpState.FIN_WAIT_1, TcpState.LAST_ACK):
            self.retransmits += 1
            self.emit(self._segment(FIN | ACK, (self.snd_nxt - 1) & 0xFFFFFFFF))
        self.last_send = time.monotonic()

    def flush_ack(self) -> None:
        if self.ack_pending and self.state != TcpState.CLOSED:
            self.emit(self._segment(ACK, self.snd_nxt))
        self.ack_pending = False

    # -- segments from the peer (at DISPATCH_LEVEL) -----------------------------------------------------

    def input(self, segment: dpkt.tcp.TCP) -> None:
        flags = segment.flags
        if flags & RST:
            self.reset, self.state = True, TcpState.CLOSED
            return
        if self.state == TcpState.SYN_SENT:
            if flags & SYN and flags & ACK and segment.ack == self.snd_nxt:
                self.rcv_nxt = (segment.seq + 1) & 0xFFFFFFFF
                self.snd_una, self.snd_wnd = segment.ack, segment.win
                for option, value in dpkt.tcp.parse_opts(segment.opts):
                    if option == dpkt.tcp.TCP_OPT_MSS and len(value) == 2:
                        self.mss = min(self.mss, int.from_bytes(value, "big"))
                self.state = TcpState.ESTABLISHED
                self.ack_pending = True
                self.flush_ack()
            return
        if flags & ACK:
            self._acked(segment.ack, segment.win)
        data = bytes(segment.data)
        if data:
            self._data(segment.seq, data)
        if flags & FIN and (segment.seq + len(data)) & 0xFFFFFFFF == self.rcv_nxt and not self.peer_fin:
            self.peer_fin = True
            self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
            self.ack_pending = True
            self.state = {TcpState.ESTABLISHED: TcpState.CLOSE_WAIT, TcpState.FIN_WAIT_1: TcpState.TIME_WAIT,
                          TcpState.FIN_WAIT_2: TcpState.TIME_WAIT}.get(self.state, self.state)
            self.flush_ack()

    def _acked(self, ack: int, window: int) -> None:
        if seq_lt(self.snd_una, ack) and seq_le(ack, self.snd_nxt):
            advanced = (ack - self.snd_una) & 0xFFFFFFFF
            del self.unacked[:advanced]
            self.snd_una = ack
            self.last_send = time.monotonic()
            if self.fin_sent and ack == self.snd_nxt:
                self.state = {TcpState.FIN_WAIT_1: TcpState.FIN_WAIT_2, TcpState.LAST_ACK: TcpState.CLOSED}.get(
                    self.state, self.state)
        if seq_le(self.snd_una, ack):
            self.snd_wnd = window

    def _data(self, seq: int, data: bytes) -> None:
        self.ack_pending = True
        if seq != self.rcv_nxt:
            if seq_lt(self.rcv_nxt, seq):
                self.out_of_order[seq] = data
            return  # a duplicate, or a gap: the ACK tells the peer where we are
        self.received += data
        self.rcv_nxt = (self.rcv_nxt + len(data)) & 0xFFFFFFFF
        while self.rcv_nxt in self.out_of_order:
            more = self.out_of_order.pop(self.rcv_nxt)
            self.received += more
            self.rcv_nxt = (self.rcv_nxt + len(more)) & 0xFFFFFFFF
