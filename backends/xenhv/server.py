"""xenhv's sockets: the control socket (toolstack and harness, JSON lines, privileged) and one trap
socket per domain (the guest's vCPU). One thread, one selector: hypercalls are serialised, as they
are per vCPU on Xen, and no lock is needed around the domain state.

Containment: one process serves every domain, so nothing one request does may end it. A bad request gets
Xen's errno (XenError), a broken connection is dropped; any other exception is a defect of xenhv, and is
contained to that request: logged with its traceback, the domain and the request, counted, and answered
with EIO (a control request with an error), while every other domain goes on being served. Tests read the
count with the control operation `internal_errors` and require zero.
"""
from __future__ import annotations

import json
import logging
import os
import selectors
import socket
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from xenpv.backends.xenhv.control import FdReply
from xenpv.backends.xenhv.errors import GrantError, XenError
from xenpv.backends.xenhv.domain import Domain, RunState
from xenpv.backends.xenhv.hypervisor import Hypervisor
from xenpv.base.errors import HarnessError
from xenpv.xenabi.trap import HELLO_PLATFORM_PORTS, REPLY, TRAP, TrapKind
from xenpv.xenabi.xen import XEN_EIO, XEN_ENOSYS, XEN_ENOENT, XEN_ESRCH

log = logging.getLogger("xenhv.server")

MAX_CONTROL_LINE = 1 << 16
RECENT_INTERNAL_ERRORS = 16  # how many descriptions `internal_errors` keeps


@dataclass
class InternalErrors:
    """Exceptions xenhv contained that no rule of the model raised: each one is a defect to fix."""

    count: int = 0
    recent: list[str] = field(default_factory=list)

    def record(self, what: str, exc: BaseException) -> None:
        self.count += 1
        self.recent.append(f"{what}: {type(exc).__name__}: {exc}")
        del self.recent[:-RECENT_INTERNAL_ERRORS]
        log.error("INTERNAL ERROR #%d in %s (contained to this request; xenhv carries on)",
                  self.count, what, exc_info=exc)


@dataclass(eq=False)
class ControlConn:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)


@dataclass(eq=False)
class TrapConn:
    sock: socket.socket
    domid: int
    hello: bool = False


class Server:
    def __init__(self, run_dir: Path, hv: Hypervisor) -> None:
        self.run_dir = run_dir
        self.hv = hv
        self.sel = selectors.DefaultSelector()
        self.control_path = run_dir / "xenhv.sock"
        self._listeners: dict[int, socket.socket] = {}
        self._stopping = False
        self.control = self._listen(self.control_path)
        self.sel.register(self.control, selectors.EVENT_READ, ("control-listen", None))
        hv.on_domain_created = self._domain_created
        hv.on_domain_destroyed = self._domain_destroyed
        hv.on_unpause = self._domain_unpaused
        hv.on_resume = self._domain_resumed
        self._paused_hellos: dict[int, list[TrapConn]] = {}
        # vCPUs in SCHEDOP_shutdown(SHUTDOWN_suspend): their trap is answered when the domain resumes in
        # place; when it is destroyed instead (saved, migrated away) the connection is closed unanswered.
        self._parked: dict[int, TrapConn] = {}
        hv.register_fd = self._register_fd
        hv.unregister_fd = self._unregister_fd
        self.internal_errors = InternalErrors()
        # Control requests served, by op: benchmarks count what a data path still asks xenhv per frame.
        self.control_calls: Counter[str] = Counter()

    def _register_fd(self, fd: int, handler: Callable[[], None]) -> None:
        self.sel.register(fd, selectors.EVENT_READ, ("fd", handler))

    def _unregister_fd(self, fd: int) -> None:
        try:
            self.sel.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _listen(self, path: Path) -> socket.socket:
        if path.exists():
            path.unlink()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(8)
        s.setblocking(False)
        return s

    def trap_path(self, domid: int) -> Path:
        return self.run_dir / f"hv-{domid}.sock"

    def _domain_created(self, domid: int) -> str:
        s = self._listen(self.trap_path(domid))
        self._listeners[domid] = s
        self.sel.register(s, selectors.EVENT_READ, ("trap-listen", domid))
        return str(self.trap_path(domid))

    def _domain_resumed(self, domid: int, result: int) -> None:
        dom = self.hv.domains.get(domid)
        t = self._parked.pop(domid, None)
        if dom is not None:
            dom.vcpu_parked = False
        if t is None or t.sock.fileno() < 0:
            log.info("dom%d resumed with no parked vCPU to answer", domid)
            return
        try:
            t.sock.sendall(REPLY.pack(result, 0, 0))
        except OSError as exc:
            self._drop(t.sock, f"dom{domid}: answering the parked suspend: {exc}")

    def _domain_destroyed(self, domid: int) -> None:
        self._parked.pop(domid, None)  # its connection is closed with the domain's other traps below
        s = self._listeners.pop(domid, None)
        if s is not None:
            self.sel.unregister(s)
            s.close()
            self.trap_path(domid).unlink(missing_ok=True)
        for key in list(self.sel.get_map().values()):
            kind, obj = key.data
            if kind == "trap" and obj.domid == domid:
                self._drop(key.fileobj, "domain destroyed")

    def stop(self) -> None:
        self._stopping = True

    def serve_forever(self) -> None:
        while not self._stopping:
            self._dispatch(self.sel.select(timeout=0.2))
        self.hv.destroy_all()
        for key in list(self.sel.get_map().values()):
            if not isinstance(key.fileobj, int):
                key.fileobj.close()

    def _dispatch(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _ in events:
            # One event's handler may close another connection of the same batch (a destroyed domain drops
            # its vCPU's trap connections; a dropped control client its back-end fds): that key is stale,
            # its socket closed or its fd already reused by a new registration.
            if self.sel.get_map().get(key.fd) is key:
                self._ready(key)

    def _ready(self, key: selectors.SelectorKey) -> None:
        kind, obj = key.data
        try:
            if kind == "control-listen":
                conn, _ = self.control.accept()
                self.sel.register(conn, selectors.EVENT_READ, ("control", ControlConn(conn)))
            elif kind == "trap-listen":
                conn, _ = self._listeners[obj].accept()
                self.sel.register(conn, selectors.EVENT_READ, ("trap", TrapConn(conn, obj)))
            elif kind == "control":
                self._control_ready(obj)
            elif kind == "trap":
                self._trap_ready(obj)
            elif kind == "fd":
                obj()
        except (ConnectionError, BlockingIOError) as exc:
            if kind in ("control", "trap"):
                self._drop(obj.sock, str(exc))
        except Exception as exc:
            # Requests are contained where they are handled; this is the net under everything else (a
            # back-end channel's handler, framing). The connection's state is unknown: it goes.
            where = f"dom{obj.domid}'s trap connection" if kind == "trap" else f"{kind} handler"
            self.internal_errors.record(where, exc)
            if kind in ("control", "trap"):
                self._drop(obj.sock, f"internal error: {exc!r}")

    def _drop(self, sock: Any, reason: str) -> None:
        log.info("connection closed: %s", reason)
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    # -- control: one JSON object per line each way ----------------------------------------------

    def _control_ready(self, c: ControlConn) -> None:
        data = c.sock.recv(65536)
        if not data:
            self._drop(c.sock, "control client left")
            return
        c.buf += data
        while (nl := c.buf.find(b"\n")) >= 0:
            line = bytes(c.buf[:nl])
            del c.buf[: nl + 1]
            reply = self._control_request(line)
            result = reply.get("ok")
            if isinstance(result, FdReply):
                data = json.dumps({"ok": result.ok, "fds": len(result.fds)}).encode() + b"\n"
                # The descriptors go with the first bytes of the line; the client collects them per line.
                sent = socket.send_fds(c.sock, [data], result.fds)
                c.sock.sendall(data[sent:])
            else:
                c.sock.sendall(json.dumps(reply).encode() + b"\n")
        if len(c.buf) > MAX_CONTROL_LINE:
            self._drop(c.sock, f"control line longer than {MAX_CONTROL_LINE} bytes")

    def _control_request(self, line: bytes) -> dict[str, Any]:
        op: object = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ValueError("a request is an object with a string 'op'")
            op = req.pop("op")
            self.control_calls[op] += 1
            if op == "control_calls":
                return {"ok": dict(self.control_calls)}
            if op == "internal_errors":  # the server's own state, for tests and diagnostics
                return {"ok": {"count": self.internal_errors.count, "recent": list(self.internal_errors.recent)}}
            fn = getattr(self.hv, f"control_{op}", None)
            if fn is None:
                raise ValueError(f"unknown control op {op!r}")
            return {"ok": fn(**req)}
        except XenError as exc:
            return {"error": str(exc), "errno": exc.errno}
        except GrantError as exc:
            return {"error": str(exc), "gntst": exc.status}
        except (ValueError, TypeError, KeyError, OSError, HarnessError) as exc:
            # A malformed request, a missing file, or a device model that refused (QmpError).
            log.info("control request %r refused: %s", op, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:
            self.internal_errors.record(f"control request {line[:200]!r}", exc)
            return {"error": f"internal error: {type(exc).__name__}: {exc}", "errno": XEN_EIO}

    # -- traps from a guest's vCPU ---------------------------------------------------------------

    def _answer_hello(self, t: TrapConn, dom: Domain) -> None:
        flags = HELLO_PLATFORM_PORTS if dom.platform.present else 0
        socket.send_fds(t.sock, [REPLY.pack(0, dom.memory.hv_frames * 4096, flags)],
                        [dom.memory.frames_fd, dom.doorbells.fd])

    def _domain_unpaused(self, domid: int) -> None:
        dom = self.hv.domains.get(domid)
        for t in self._paused_hellos.pop(domid, []):
            if dom is not None and t.sock.fileno() >= 0:
                try:
                    self._answer_hello(t, dom)
                except OSError as exc:
                    self._drop(t.sock, f"dom{domid}: answering HELLO: {exc}")

    def _trap_ready(self, t: TrapConn) -> None:
        data, fds, flags, _ = socket.recv_fds(t.sock, TRAP.size, 2)
        if not data:
            for fd in fds:
                os.close(fd)
            self._drop(t.sock, f"dom{t.domid} vCPU left")
            return
        if len(data) != TRAP.size or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            self._drop(t.sock, f"dom{t.domid}: malformed trap of {len(data)} bytes")
            return
        kind, _, *a = TRAP.unpack(data)
        dom = self.hv.domains.get(t.domid)
        if dom is not None and kind == TrapKind.HELLO:
            if len(fds) != 1 or a[0] != t.domid:
                for fd in fds:
                    os.close(fd)
                self._drop(t.sock, f"dom{t.domid}: bad HELLO")
                return
            self.hv.attach_vcpu(dom, fds[0])
            t.hello = True
            if dom.state is RunState.PAUSED:
                # A paused domain's vCPU does not run: its HELLO is answered when the toolstack unpauses.
                self._paused_hellos.setdefault(t.domid, []).append(t)
                return
            self._answer_hello(t, dom)
            return
        for fd in fds:  # fds on anything but HELLO are not ours to keep
            os.close(fd)
        if dom is not None and not t.hello:
            self._drop(t.sock, f"dom{t.domid}: trap before HELLO")
            return
        if dom is None:
            result, v0 = -XEN_ESRCH, 0  # the domain is gone
        elif kind == TrapKind.DOORBELL:
            self._answer_doorbell(t, dom, a[0])
            return
        else:
            try:
                result, v0 = self._trap(dom, kind, a)
            except XenError as exc:  # a rule of the model, outside the hypercall table's own handling
                log.info("dom%d: %s: %s", t.domid, _describe_trap(kind, a), exc)
                result, v0 = exc.result, 0
            except Exception as exc:
                self.internal_errors.record(f"dom{t.domid}: {_describe_trap(kind, a)}", exc)
                result, v0 = -XEN_EIO, 0
            if dom.vcpu_parked and t.domid not in self._parked:
                # This trap suspended the domain: the vCPU stays in the hypercall (no reply) until
                # resume_domain answers it, or the domain is destroyed (the reply never comes).
                self._parked[t.domid] = t
                log.info("dom%d: vCPU parked in SCHEDOP_shutdown(SHUTDOWN_suspend)", t.domid)
                return
        t.sock.sendall(REPLY.pack(result, v0, 0))

    def _answer_doorbell(self, t: TrapConn, dom: Domain, port: int) -> None:
        fds: list[int] = []
        try:
            result, generation, vcpu, fds = self.hv.doorbell(dom, port)
        except Exception as exc:
            self.internal_errors.record(f"dom{t.domid}: DOORBELL {port:#x}", exc)
            result, generation, vcpu = -XEN_EIO, 0, 0
        try:
            if fds:
                socket.send_fds(t.sock, [REPLY.pack(result, generation, vcpu)], fds)
            else:
                t.sock.sendall(REPLY.pack(result, generation, vcpu))
        finally:
            for fd in fds:  # the vCPU has its own now
                os.close(fd)

    def _trap(self, dom: Domain, kind: int, a: list[int]) -> tuple[int, int]:
        """One trap of a domain that said HELLO: (result, value) for the reply."""
        if kind == TrapKind.HYPERCALL:
            return self.hv.hypercalls.dispatch(dom, a[0], a[1:6]), 0
        if kind == TrapKind.PIO_READ:
            return self.hv.pio_read(dom, a[0], a[1])
        if kind == TrapKind.PIO_WRITE:
            return self.hv.pio_write(dom, a[0], a[1], a[2]), 0
        if kind == TrapKind.FRAME_OF:
            index = dom.memory.frame_at(a[0])
            return (-XEN_ENOENT, 0) if index is None else (0, index * 4096)
        return -XEN_ENOSYS, 0


def _describe_trap(kind: int, a: list[int]) -> str:
    try:
        name = TrapKind(kind).name
    except ValueError:
        name = f"trap kind {kind}"
    return f"{name} {' '.join(f'{x:#x}' for x in a)}"
