"""A client for QEMU's qtest protocol (system/qtest.c), the agent's CPU.

Arguments are validated before they are sent because QEMU g_asserts on some bad input (a port above
0xffff, a zero-size read) and would abort. Replies are parsed into values or `QtestError`; asynchronous
`IRQ raise/lower N` lines are routed to `irq_levels` and an optional callback wherever they appear in
the stream. Every exchange is recorded in QEMU's `-qtest-log` format, so a test's machine-side trace
replays with `qemu ... -qtest stdio < transcript` (see `replay_requests`).

A reply that does not come within `timeout` seconds (scaled by XENPV_TIME_SCALE) while QEMU is alive is
QtestTooSlow, a stack.timescale.HarnessTooSlow: QEMU answers qtest at once unless the host is overloaded.
"""
from __future__ import annotations

import base64
import logging
import re
import socket
import time
from pathlib import Path
from typing import Callable, Iterable, TextIO

from xenpv.base.errors import QtestError
from xenpv.stack.timescale import HarnessTooSlow, scaled

log = logging.getLogger("stack.vcpu.qtest")

_WIDTH_MAX = {"b": 0xFF, "w": 0xFFFF, "l": 0xFFFFFFFF, "q": 0xFFFFFFFFFFFFFFFF}
_ADDR_MAX = 0xFFFFFFFFFFFFFFFF
_LOG_LINE = re.compile(r"^\[(?P<dir>[RSI]) \+?(?P<t>[0-9.]+)\] ?(?P<text>.*)$")


class QtestTooSlow(HarnessTooSlow):
    """QEMU, still alive, did not answer a qtest command in time."""


class Qtest:
    """One qtest connection. Not thread-safe: the agent's vCPU is a single thread, as a CPU is."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        transcript: TextIO | None = None,
        on_dead: Callable[[str, bool], Exception | None] | None = None,
        on_irq: Callable[[int, bool], None] | None = None,
        timeout: float = 10.0,
    ) -> None:
        self._sock = sock
        self._sock.settimeout(0.1)
        self._buf = bytearray()
        self._transcript = transcript
        self._on_dead = on_dead
        self.on_irq = on_irq
        self.timeout = timeout
        self.irq_levels: dict[int, bool] = {}
        self._t0 = time.monotonic()
        self._log("I", "OPENED", absolute=True)

    # -- transport -------------------------------------------------------------------------------

    def _log(self, direction: str, text: str, absolute: bool = False) -> None:
        if self._transcript is not None:
            t = time.monotonic() - self._t0
            self._transcript.write(f"[{direction} {'' if absolute else '+'}{t:.6f}] {text}\n")

    def _dead(self, during: str) -> Exception:
        exc = self._on_dead(during, True) if self._on_dead else None
        return exc or QtestError(f"qtest connection closed {during}")

    def _readline(self, during: str) -> str:
        timeout = scaled(self.timeout)
        deadline = time.monotonic() + timeout
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = self._buf[:nl].decode("ascii", "replace")
                del self._buf[: nl + 1]
                return line
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                # Every 100 ms: is QEMU still there? A dead machine is reported as such, not as a timeout.
                if self._on_dead is not None and (exc := self._on_dead(during, False)) is not None:
                    raise exc from None
                if time.monotonic() > deadline:
                    raise QtestTooSlow(f"no qtest reply from QEMU ({during})", timeout) from None
                continue
            except OSError as exc:
                raise self._dead(during) from exc
            if not chunk:
                raise self._dead(during)
            self._buf += chunk

    def command(self, line: str) -> str:
        """Send one request line; return the text after OK (raise QtestError on FAIL/ERR)."""
        return self.commands([line])[0]

    def commands(self, lines: list[str]) -> list[str]:
        """Several request lines in one write, then their replies in order (QEMU answers each in turn):
        a config-address write and the data read after it cost one round trip instead of two. A refused
        request raises QtestError once the replies of the requests before it are read; the replies of
        those after it are read too, so the connection stays in step."""
        for line in lines:
            self._log("R", line)
        try:
            self._sock.sendall(b"".join(line.encode("ascii") + b"\n" for line in lines))
        except OSError as exc:
            raise self._dead(f"sending {lines[0].split(' ', 1)[0]}") from exc
        replies: list[str] = []
        refused: QtestError | None = None
        for line in lines:
            try:
                replies.append(self._reply(line))
            except QtestError as exc:
                if refused is not None or not str(exc).startswith("QEMU refused"):
                    raise
                refused = exc
                replies.append("")
        if refused is not None:
            raise refused
        return replies

    def _reply(self, line: str) -> str:
        while True:
            reply = self._readline(f"waiting for the reply to {line[:60]!r}")
            self._log("S", reply)
            if reply.startswith("IRQ "):
                self._route_irq(reply)
                continue
            if reply == "OK":
                return ""
            if reply.startswith("OK "):
                return reply[3:]
            raise QtestError(f"QEMU refused {line[:80]!r}: {reply}")

    def _route_irq(self, line: str) -> None:
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("raise", "lower") or not parts[2].isdigit():
            raise QtestError(f"malformed asynchronous line from QEMU: {line!r}")
        n, level = int(parts[2]), parts[1] == "raise"
        self.irq_levels[n] = level
        if self.on_irq is not None:
            self.on_irq(n, level)

    def rebind(self, sock: socket.socket) -> None:
        """Continue on another QEMU (the machine a restored or powered-on guest runs on): the old
        connection is closed and whatever it had buffered dropped; the transcript goes on."""
        old, self._sock = self._sock, sock
        self._sock.settimeout(0.1)
        self._buf.clear()
        self.irq_levels.clear()
        old.close()
        self._log("I", "OPENED", absolute=True)

    def close(self) -> None:
        self._log("I", "CLOSED")
        if self._transcript is not None:
            self._transcript.flush()
        self._sock.close()

    # -- validation ------------------------------------------------------------------------------

    @staticmethod
    def _check(value: int, lo: int, hi: int, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise QtestError(f"{what} must be an integer in [{lo:#x}, {hi:#x}], got {value!r}")
        return value

    def _port(self, port: int) -> int:
        return self._check(port, 0, 0xFFFF, "I/O port")

    def _span(self, addr: int, size: int, allow_zero: bool = False) -> None:
        self._check(addr, 0, _ADDR_MAX, "address")
        self._check(size, 0 if allow_zero else 1, _ADDR_MAX, "size")
        if addr + size - 1 > _ADDR_MAX:
            raise QtestError(f"{size:#x} bytes at {addr:#x} wrap the address space")

    @staticmethod
    def _int(text: str, what: str) -> int:
        try:
            return int(text, 16)
        except ValueError:
            raise QtestError(f"bad number in QEMU's reply to {what}: {text!r}") from None

    # -- port I/O --------------------------------------------------------------------------------

    def _in(self, w: str, port: int) -> int:
        return self._int(self.command(f"in{w} {self._port(port):#x}"), f"in{w}")

    def _out(self, w: str, port: int, value: int) -> None:
        self._check(value, 0, _WIDTH_MAX[w], f"out{w} value")
        self.command(f"out{w} {self._port(port):#x} {value:#x}")

    def out_in(self, out_port: int, value: int, in_port: int, in_size: int) -> int:
        """outl `value` to `out_port`, then a read of `in_size` bytes from `in_port`, in one round trip
        (PCI configuration: the address to 0xCF8, the data from 0xCFC)."""
        self._check(value, 0, _WIDTH_MAX["l"], "outl value")
        w = {1: "b", 2: "w", 4: "l"}[in_size]
        _, data = self.commands([f"outl {self._port(out_port):#x} {value:#x}", f"in{w} {self._port(in_port):#x}"])
        return self._int(data, f"in{w}")

    def inb(self, port: int) -> int:
        return self._in("b", port)

    def inw(self, port: int) -> int:
        return self._in("w", port)

    def inl(self, port: int) -> int:
        return self._in("l", port)

    def outb(self, port: int, value: int) -> None:
        self._out("b", port, value)

    def outw(self, port: int, value: int) -> None:
        self._out("w", port, value)

    def outl(self, port: int, value: int) -> None:
        self._out("l", port, value)

    # -- memory and MMIO (through the machine's address space, so MMIO reaches devices) ------------

    def _readn(self, w: str, addr: int) -> int:
        self._span(addr, {"b": 1, "w": 2, "l": 4, "q": 8}[w])
        return self._int(self.command(f"read{w} {addr:#x}"), f"read{w}")

    def _writen(self, w: str, addr: int, value: int) -> None:
        self._span(addr, {"b": 1, "w": 2, "l": 4, "q": 8}[w])
        self._check(value, 0, _WIDTH_MAX[w], f"write{w} value")
        self.command(f"write{w} {addr:#x} {value:#x}")

    def readb(self, addr: int) -> int:
        return self._readn("b", addr)

    def readw(self, addr: int) -> int:
        return self._readn("w", addr)

    def readl(self, addr: int) -> int:
        return self._readn("l", addr)

    def readq(self, addr: int) -> int:
        return self._readn("q", addr)

    def writeb(self, addr: int, value: int) -> None:
        self._writen("b", addr, value)

    def writew(self, addr: int, value: int) -> None:
        self._writen("w", addr, value)

    def writel(self, addr: int, value: int) -> None:
        self._writen("l", addr, value)

    def writeq(self, addr: int, value: int) -> None:
        self._writen("q", addr, value)

    def read(self, addr: int, size: int) -> bytes:
        self._span(addr, size)
        text = self.command(f"b64read {addr:#x} {size:#x}")
        data = base64.b64decode(text)
        if len(data) != size:
            raise QtestError(f"b64read of {size} bytes at {addr:#x} returned {len(data)} bytes")
        return data

    def write(self, addr: int, data: bytes) -> None:
        self._span(addr, len(data))
        self.command(f"b64write {addr:#x} {len(data):#x} {base64.b64encode(data).decode('ascii')}")

    def memset(self, addr: int, size: int, value: int) -> None:
        self._span(addr, size, allow_zero=True)
        self._check(value, 0, 0xFF, "memset value")
        self.command(f"memset {addr:#x} {size:#x} {value:#x}")

    # -- machine ---------------------------------------------------------------------------------

    def endianness(self) -> str:
        return self.command("endianness")

    def clock_step(self, ns: int | None = None) -> int:
        line = "clock_step" if ns is None else f"clock_step {self._check(ns, 1, (1 << 63) - 1, 'ns')}"
        return int(self.command(line))

    def clock_set(self, ns: int) -> int:
        return int(self.command(f"clock_set {self._check(ns, 0, (1 << 63) - 1, 'ns')}"))

    def irq_intercept_in(self, qom_path: str) -> None:
        self.command(f"irq_intercept_in {_word(qom_path)}")

    def irq_intercept_out(self, qom_path: str) -> None:
        self.command(f"irq_intercept_out {_word(qom_path)}")

    def set_irq_in(self, qom_path: str, name: str, num: int, level: int) -> None:
        self._check(num, 0, 0xFFFF, "irq number")
        self._check(level, -(1 << 31), (1 << 31) - 1, "irq level")
        self.command(f"set_irq_in {_word(qom_path)} {_word(name)} {num} {level}")


def _word(s: str) -> str:
    if not s or any(c.isspace() for c in s):
        raise QtestError(f"qtest arguments are single words; got {s!r}")
    return s


def parse_transcript(lines: Iterable[str]) -> list[tuple[str, str]]:
    """(direction, text) pairs of a -qtest-log transcript; direction is R (request), S (sent by QEMU) or I."""
    out = []
    for n, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        m = _LOG_LINE.match(line)
        if m is None:
            raise QtestError(f"line {n} is not in -qtest-log format: {line!r}")
        out.append((m.group("dir"), m.group("text")))
    return out


def replay_requests(transcript: Path) -> str:
    """The requests of a transcript as `-qtest stdio` input."""
    with open(transcript) as f:
        return "".join(text + "\n" for d, text in parse_transcript(f) if d == "R")


def expected_replies(transcript: Path) -> list[str]:
    """QEMU's synchronous replies in a transcript (asynchronous IRQ lines left out)."""
    with open(transcript) as f:
        return [text for d, text in parse_transcript(f) if d == "S" and not text.startswith("IRQ ")]
