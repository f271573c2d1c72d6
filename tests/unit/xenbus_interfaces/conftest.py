"""In-process fakes of XenPlatform for the XENBUS interface unit tests: guest pages as bytearrays, a
hypervisor that answers event channel ops, the real GrantTableFrontend over fake frames, an upcall
dispatcher whose events arrive on another thread, and a dict-backed xenstore with transactions and
watches. Every test also gets a fresh processor and debug log."""
from __future__ import annotations

import ctypes
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from xenpv.stack.vcpu.grants import GrantTableFrontend
from xenpv.stack.kernel.debuglog import DebugLog, set_current_log
from xenpv.stack.kernel.irql import Processor, set_current_processor
from xenpv.stack.vcpu.pages import PageAllocator
from xenpv.stack.vcpu.xenstore import XenstoreError
from xenpv.xenabi import event_channel as E
from xenpv.xenabi import xen as X
from xenpv.xenabi.xs_wire import XsdSockmsgType as T

BAR_ADDRESS = 0xF000_0000
GRANT_FRAMES = 2


class FakeVcpu:
    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.evtchn = FakeEvtchn()

    def page(self, gfn: int) -> memoryview:
        return memoryview(self.memory.setdefault(gfn, bytearray(4096)))

    def read_phys(self, gpa: int, length: int) -> bytes:
        return bytes(self.page(gpa >> 12)[gpa & 0xFFF:(gpa & 0xFFF) + length])

    def write_phys(self, gpa: int, data: bytes) -> None:
        self.page(gpa >> 12)[gpa & 0xFFF:(gpa & 0xFFF) + len(data)] = data

    def send_by_doorbell(self, port: int) -> bool:
        return False  # this fake hypervisor hands out no doorbells: every send traps

    def hypercall(self, nr: int, cmd: int, gpa: int) -> int:
        assert nr == X.HYPERCALL_NUMBERS["event_channel_op"]
        layout = E.EVTCHNOP_ARGUMENTS[cmd]
        op = layout.from_buffer_copy(self.read_phys(gpa, ctypes.sizeof(layout)))
        rc = self.evtchn.op(cmd, op)
        self.write_phys(gpa, bytes(op))
        return rc


@dataclass
class FakeEvtchn:
    next_port: int = 10
    open: set[int] = field(default_factory=set)
    sent: list[int] = field(default_factory=list)
    closed: list[int] = field(default_factory=list)

    def op(self, cmd: int, op: object) -> int:
        if cmd in (E.EVTCHNOP_alloc_unbound, E.EVTCHNOP_bind_interdomain, E.EVTCHNOP_bind_virq):
            port, self.next_port = self.next_port, self.next_port + 1
            self.open.add(port)
            setattr(op, "local_port" if cmd == E.EVTCHNOP_bind_interdomain else "port", port)
            return 0
        if cmd == E.EVTCHNOP_send:
            self.sent.append(op.port)
            return 0 if op.port in self.open else -X.XEN_EINVAL
        if cmd == E.EVTCHNOP_close:
            self.closed.append(op.port)
            self.open.discard(op.port)
            return 0
        return -X.XEN_ENOSYS


class FakeUpcalls:
    """Delivers a port to its handler from another thread, as the platform's interrupt thread does."""

    def __init__(self) -> None:
        self.handlers: dict[int, Callable[[int], None]] = {}

    def bind(self, port: int, handler: Callable[[int], None]) -> None:
        self.handlers[port] = handler

    def unbind(self, port: int) -> None:
        self.handlers.pop(port, None)

    def scan(self) -> None:
        """The 2-level scan after a resume (EVTCHN's LATE callback): nothing is pending in the fake."""
        self.scans = getattr(self, "scans", 0) + 1

    def raise_event(self, port: int) -> None:
        thread = threading.Thread(target=self.handlers[port], args=(port,))
        thread.start()
        thread.join()


class FakeStore:
    """Enough of xenstored: relative paths, transactions that conflict on any global write, watches that
    fire on registration and on writes below them."""

    def __init__(self) -> None:
        self.tree: dict[str, bytes] = {"name": b"fake"}
        self.perms: dict[str, list[str]] = {}
        self.watches: dict[str, str] = {}
        self.events: deque[tuple[str, str]] = deque()
        self.handlers: dict = {}
        self.transactions: dict[int, dict[str, bytes | None]] = {}
        self.generation = 0
        self._next_tx = 1
        self._lock = threading.Lock()
        self.denied: set[str] = set()

    def _changed(self, path: str) -> None:
        self.generation += 1
        for watched, token in self.watches.items():
            if path == watched or path.startswith(watched + "/"):
                self.events.append((path, token))

    def read(self, path: str, tx: int = 0) -> bytes:
        if tx and path in self.transactions[tx]:
            value = self.transactions[tx][path]
        else:
            value = self.tree.get(path)
        if value is None:
            raise XenstoreError("READ", path, "ENOENT")
        return value

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        if path in self.denied:
            raise XenstoreError("WRITE", path, "EACCES")
        data = value.encode() if isinstance(value, str) else value
        if tx:
            self.transactions[tx][path] = data
            return
        self.tree[path] = data
        self._changed(path)

    def rm(self, path: str, tx: int = 0) -> None:
        doomed = [k for k in self.tree if k == path or k.startswith(path + "/")]
        if not doomed:
            raise XenstoreError("RM", path, "ENOENT")
        for key in doomed:
            del self.tree[key]
        self._changed(path)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        children = sorted({k[len(path) + 1:].split("/")[0] for k in self.tree if k.startswith(path + "/")})
        if not children and path not in self.tree:
            raise XenstoreError("DIRECTORY", path, "ENOENT")
        return children

    def request(self, mtype: T, payload: bytes, tx: int = 0, what: str = "") -> bytes:
        assert mtype == T.SET_PERMS
        path, *perms = payload.rstrip(b"\0").split(b"\0")
        self.perms[path.decode()] = [p.decode() for p in perms]
        return b"OK\0"

    def watch(self, path: str, token: str, handler=None) -> None:
        if handler is not None:
            self.handlers[token] = handler
        self.watches[path] = token
        self.events.append((path, token))

    def unwatch(self, path: str, token: str) -> None:
        del self.watches[path]

    def forget(self, token: str) -> None:
        self.handlers.pop(token, None)

    def transaction_start(self) -> int:
        tx, self._next_tx = self._next_tx, self._next_tx + 1
        self.transactions[tx] = {"@generation": str(self.generation).encode()}
        return tx

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        writes = self.transactions.pop(tx)
        if not commit:
            return
        if writes.pop("@generation") != str(self.generation).encode():
            raise XenstoreError("TRANSACTION_END", "", "EAGAIN")
        for path, value in writes.items():
            self.write(path, value or b"")

    def pump(self) -> None:
        with self._lock:
            pending = list(self.events)
            self.events.clear()
        kept = []
        for path, token in pending:
            if token in self.handlers:
                self.handlers[token](path, token)
            else:
                kept.append((path, token))
        with self._lock:
            self.events.extendleft(reversed(kept))

    def wait_event(self, timeout: float) -> tuple[str, str] | None:
        with self._lock:
            return self.events.popleft() if self.events else None


@pytest.fixture(autouse=True)
def cpu() -> Iterator[Processor]:
    processor = Processor()
    previous = set_current_processor(processor)
    previous_log = set_current_log(DebugLog())
    yield processor
    set_current_processor(previous)
    set_current_log(previous_log)


@pytest.fixture
def platform() -> SimpleNamespace:
    vcpu = FakeVcpu()
    hole = BAR_ADDRESS >> 12
    grants = GrantTableFrontend([vcpu.page(hole + 1 + i) for i in range(GRANT_FRAMES)])
    resumed: list[str] = []  # what the resume callbacks asked the platform to do, in order
    return SimpleNamespace(
        vcpu=vcpu,
        device=SimpleNamespace(bars=(SimpleNamespace(kind="mem", address=BAR_ADDRESS, size=0x100000),)),
        upcalls=FakeUpcalls(), grants=grants, store=FakeStore(), pages=PageAllocator(0x400), domid=7,
        resumed=resumed, map_shared_info=lambda: resumed.append("map_shared_info"),
        map_grant_frames=lambda: resumed.append("map_grant_frames"),
        reconnect_store=lambda: resumed.append("reconnect_store") or 99)
