"""Hypothesis stateful fuzz of xenstored from an unprivileged domain, over the real ring transport.

Domain 1 talks to the real XenstoreCore through a RingServer on a shared page (the guest's GuestRing on
the other side), with small quotas, over a namespace dom0 prepared with every kind of access: its own
home, a dom0 directory it may read, one it may write, and one hidden from it. Random reads, writes,
mkdirs, removals, directory listings, permission reads and changes, watches, transactions and junk
requests are checked against a model of xenstore's permission rules (owner, ACL entries, default access,
inheritance on create, errno_from_parents for missing nodes) and of the quotas (nodes owned, node size,
permissions per node, watches, transactions). After every step the committed tree equals the model's,
and the daemon contained no internal error (a refusal must be a rule, never an EIO from a defect).
"""
from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass, replace

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xenpv.backends.xenstored.connection import Connection
from xenpv.backends.xenstored.core import SERVER_FEATURES, XenstoreCore
from xenpv.backends.xenstored.quotas import Quotas
from xenpv.xenabi.xs_ring import GuestRing, RingServer, eventfd_doorbells
from xenpv.xenabi.xs_wire import XSD_ERRORS, XsdSockmsgType as T

GUEST = 1
HOME = f"/local/domain/{GUEST}"
QUOTAS = Quotas(nodes=6, watches=2, transactions=2, node_perms=3, node_size=64)
LETTER_ACCESS = {"n": 0, "r": 1, "w": 2, "b": 3}
READ, WRITE = 1, 2

# dom0's layout: path -> perms (owner first), all values empty.
PREPARED: dict[str, tuple[str, ...]] = {
    "/local": ("n0",), "/local/domain": ("n0",), HOME: (f"n{GUEST}",), "/local/domain/0": ("n0",),
    "/shared": ("n0", f"r{GUEST}"), "/shared/ro": ("n0", f"r{GUEST}"), "/shared/rw": ("n0", f"b{GUEST}"),
    "/shared/wo": ("n0", f"w{GUEST}"), "/shared/hidden": ("n0",), "/shared/hidden/child": ("n0",),
    "/shared/open": ("b0",),  # default access: both, for everyone
}
# Hypothesis draws the first entries most: dom1's own nodes (where permission changes are allowed) first.
PATHS = [HOME, "d", f"{HOME}/a", "a/b", f"{HOME}/c", "/shared/rw/y", "/shared/ro", "/shared/ro/x", "/shared/rw",
         "/shared/rw/y/z", "/shared/wo/w", "/shared/hidden", "/shared/hidden/child", "/shared/hidden/new",
         "/shared/open/o", "/local/domain/0/x", "/nowhere/at/all"]
PERM_SETS = st.lists(st.sampled_from(["n0", "b1", "r1", "n1", "w1", "r0", "b2", "r2", "n2"]), min_size=1, max_size=4)
VALUES = st.one_of(st.binary(max_size=8), st.binary(min_size=40, max_size=70))


def canonical(path: str) -> str:
    return path if path.startswith("/") else f"{HOME}/{path}"


def parent(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


def access(perms: tuple[str, ...], domid: int = GUEST) -> int:
    """core.c perm_for_conn for an unprivileged domain: owner has all; else its ACL entry; else default."""
    if int(perms[0][1:]) == domid:
        return READ | WRITE | 4
    for p in perms[1:]:
        if int(p[1:]) == domid:
            return LETTER_ACCESS[p[0]]
    return LETTER_ACCESS[perms[0][0]]


@dataclass
class Node:
    value: bytes
    perms: tuple[str, ...]


class Model:
    def __init__(self) -> None:
        self.tree: dict[str, Node] = {"/": Node(b"", ("n0",)), "/tool": Node(b"", ("n0",)),
                                      "/tool/xenstored": Node(b"", ("n0",))}
        self.tree.update({p: Node(b"", perms) for p, perms in PREPARED.items()})

    def snapshot(self) -> Model:
        copy = Model()
        copy.tree = {p: replace(n) for p, n in self.tree.items()}
        return copy

    def children(self, p: str) -> set[str]:
        prefix = p.rstrip("/") + "/"
        return {q[len(prefix):] for q in self.tree if q.startswith(prefix) and "/" not in q[len(prefix):]}

    def owned(self) -> int:
        return sum(1 for n in self.tree.values() if int(n.perms[0][1:]) == GUEST)

    def missing(self, p: str) -> str:
        """errno_from_parents: EACCES when the nearest existing ancestor is not readable, else ENOENT."""
        anc = p
        while anc != "/":
            anc = parent(anc)
            if anc in self.tree:
                return "ENOENT" if access(self.tree[anc].perms) & READ else "EACCES"
        return "ENOENT"

    def size(self, value: bytes, perms: tuple[str, ...], children: set[str]) -> int:
        return len(value) + 8 * len(perms) + sum(len(c) + 1 for c in children)

    def lookup(self, p: str, need: int) -> Node | str:
        node = self.tree.get(p)
        if node is None:
            return self.missing(p)
        if access(node.perms) & need != need:
            return "EACCES"
        return node

    def create(self, p: str, value: bytes) -> str:
        missing = [p]
        anc = parent(p)
        while anc not in self.tree:
            missing.append(anc)
            anc = parent(anc)
        base = self.tree[anc].perms
        if not access(base) & WRITE:
            return "EACCES"
        if self.owned() + len(missing) > QUOTAS.nodes:
            return "ENOSPC"
        if self.size(value, base, set()) > QUOTAS.node_size:
            return "ENOSPC"
        perms = (base[0][0] + str(GUEST),) + base[1:]
        for q in reversed(missing):
            self.tree[q] = Node(value if q == p else b"", perms)
        return "OK"

    def write(self, p: str, value: bytes) -> str:
        node = self.tree.get(p)
        if node is None:
            return self.create(p, value)
        if not access(node.perms) & WRITE:
            return "EACCES"
        if self.size(value, node.perms, self.children(p)) > QUOTAS.node_size:
            return "ENOSPC"
        node.value = value
        return "OK"

    def mkdir(self, p: str) -> str:
        node = self.tree.get(p)
        if node is not None:
            return "OK" if access(node.perms) & WRITE else "EACCES"
        return self.create(p, b"")

    def rm(self, p: str) -> str:
        node = self.tree.get(p)
        if node is None:
            par = self.tree.get(parent(p))
            if par is None:
                return self.missing(parent(p))
            return "OK" if access(par.perms) & READ else "EACCES"
        if not access(node.perms) & WRITE:
            return "EACCES"
        for q in [q for q in self.tree if q == p or q.startswith(p + "/")]:
            del self.tree[q]
        return "OK"

    def set_perms(self, p: str, perms: tuple[str, ...]) -> str:
        if len(perms) > QUOTAS.node_perms:
            return "ENOSPC"
        node = self.lookup(p, WRITE)
        if isinstance(node, str):
            return node
        if not access(node.perms) & 4:
            return "EACCES"
        if perms[0][1:] != node.perms[0][1:]:
            return "EPERM"
        if self.size(node.value, perms, self.children(p)) > QUOTAS.node_size:
            return "ENOSPC"
        node.perms = perms
        return "OK"


class GuestRingFuzz(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory(prefix="xsrf")
        fd = os.open(os.path.join(self.dir.name, "page"), os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 4096)
        self.map = mmap.mmap(fd, 4096)
        os.close(fd)
        self.bells = eventfd_doorbells()
        self.core = XenstoreCore(QUOTAS)
        self.dom0 = Connection("dom0", 0, True, lambda m: None)
        for path, perms in PREPARED.items():
            self.core.handle(self.dom0, T.WRITE, 0, 0, path.encode() + b"\0")
            self.core.handle(self.dom0, T.SET_PERMS, 0, 0, path.encode() + b"\0" + "\0".join(perms).encode() + b"\0")
        self.conn = Connection(f"dom{GUEST}", GUEST, False, lambda m: self.server.send(m))
        self.server = RingServer(f"dom{GUEST}", memoryview(self.map), self.bells[0], SERVER_FEATURES,
                                 on_message=lambda t, r, x, p: self.core.handle(self.conn, t, r, x, p),
                                 on_reset=lambda: self.core.drop_connection(self.conn),
                                 max_outstanding=QUOTAS.outstanding, max_output_bytes=1 << 20)
        self.guest = GuestRing(memoryview(self.map), self.bells[1])
        self.model = Model()
        self.watches: set[tuple[str, str]] = set()
        # Each open transaction with the tree as it began: the daemon's transactions read a snapshot.
        self.txs: list[tuple[int, Model]] = []
        self.req_id = 0

    def teardown(self) -> None:
        del self.server, self.guest
        import gc

        gc.collect()  # the ctypes views of the page go before the mapping
        self.map.close()
        for b in self.bells:
            b.close()
        self.dir.cleanup()

    # -- the guest's side of a request -------------------------------------------------------------

    def request(self, mtype: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        self.req_id += 1
        self.guest.send(mtype, payload, self.req_id, tx)
        self.bells[0].drain()
        self.server.service()
        while True:
            rtype, rid, rtx, body = self.guest.read_message(timeout=2)
            if rtype == T.WATCH_EVENT:
                assert body.count(b"\0") == 2 and body.endswith(b"\0"), body
                continue
            assert (rid, rtx) == (self.req_id, tx), "a reply must echo its request's ids"
            return rtype, body

    def expect(self, mtype: int, payload: bytes, want: str, tx: int = 0) -> bytes:
        rtype, body = self.request(mtype, payload, tx)
        got = body[:-1].decode() if rtype == T.ERROR else "OK"
        assert got == want, f"type {mtype} {payload!r}: got {got}, the model says {want}"
        return body

    # -- rules -------------------------------------------------------------------------------------

    @rule(path=st.sampled_from(PATHS))
    def read(self, path: str) -> None:
        node = self.model.lookup(canonical(path), READ)
        body = self.expect(T.READ, path.encode() + b"\0", node if isinstance(node, str) else "OK")
        if isinstance(node, Node):
            assert body == node.value

    @rule(path=st.sampled_from(PATHS), value=VALUES)
    def write(self, path: str, value: bytes) -> None:
        self.expect(T.WRITE, path.encode() + b"\0" + value, self.model.write(canonical(path), value))

    @rule(path=st.sampled_from(PATHS))
    def mkdir(self, path: str) -> None:
        self.expect(T.MKDIR, path.encode() + b"\0", self.model.mkdir(canonical(path)))

    @rule(path=st.sampled_from(PATHS))
    def rm(self, path: str) -> None:
        self.expect(T.RM, path.encode() + b"\0", self.model.rm(canonical(path)))

    @rule(path=st.sampled_from(PATHS))
    def directory(self, path: str) -> None:
        node = self.model.lookup(canonical(path), READ)
        body = self.expect(T.DIRECTORY, path.encode() + b"\0", node if isinstance(node, str) else "OK")
        if isinstance(node, Node):
            assert set(body.decode().split("\0")[:-1]) == self.model.children(canonical(path))

    @rule(path=st.sampled_from(PATHS))
    def get_perms(self, path: str) -> None:
        node = self.model.lookup(canonical(path), READ)
        body = self.expect(T.GET_PERMS, path.encode() + b"\0", node if isinstance(node, str) else "OK")
        if isinstance(node, Node):
            assert tuple(body.decode().split("\0")[:-1]) == node.perms

    @rule(path=st.sampled_from(PATHS), perms=PERM_SETS)
    def set_perms(self, path: str, perms: list[str]) -> None:
        payload = path.encode() + b"\0" + "\0".join(perms).encode() + b"\0"
        self.expect(T.SET_PERMS, payload, self.model.set_perms(canonical(path), tuple(perms)))

    @rule(path=st.sampled_from(PATHS + ["@introduceDomain", "@releaseDomain"]), token=st.sampled_from("xyz"))
    def watch(self, path: str, token: str) -> None:
        key = (canonical(path) if path[0] != "@" else path, token)
        want = "EEXIST" if key in self.watches else "ENOSPC" if len(self.watches) >= QUOTAS.watches else "OK"
        self.expect(T.WATCH, f"{path}\0{token}\0".encode(), want)
        if want == "OK":
            self.watches.add(key)

    @rule(path=st.sampled_from(PATHS), token=st.sampled_from("xyz"))
    def unwatch(self, path: str, token: str) -> None:
        key = (canonical(path), token)
        self.expect(T.UNWATCH, f"{path}\0{token}\0".encode(), "OK" if key in self.watches else "ENOENT")
        self.watches.discard(key)

    @rule()
    def transaction_start(self) -> None:
        want = "ENOSPC" if len(self.txs) >= QUOTAS.transactions else "OK"
        body = self.expect(T.TRANSACTION_START, b"\0", want)
        if want == "OK":
            self.txs.append((int(body[:-1]), self.model.snapshot()))

    @precondition(lambda self: self.txs)
    @rule(path=st.sampled_from(PATHS), data=st.data())
    def read_in_transaction_and_abort(self, path: str, data: st.DataObject) -> None:
        """A transaction reads the tree as it was when it started; an abort changes nothing."""
        tx, snapshot = self.txs.pop(data.draw(st.integers(0, len(self.txs) - 1)))
        node = snapshot.lookup(canonical(path), READ)
        self.expect(T.READ, path.encode() + b"\0", node if isinstance(node, str) else "OK", tx)
        self.expect(T.TRANSACTION_END, b"F\0", "OK", tx)
        self.expect(T.TRANSACTION_END, b"F\0", "ENOENT", tx)  # it is gone

    @rule(mtype=st.sampled_from([T.INTRODUCE, T.RELEASE, T.SET_TARGET, T.RESUME, T.CONTROL, T.SET_QUOTA]),
          payload=st.binary(max_size=16))
    def privileged_request(self, mtype: int, payload: bytes) -> None:
        self.expect(mtype, payload, "EACCES")

    @rule(mtype=st.integers(0, 40), payload=st.binary(max_size=40), tx=st.sampled_from([0, 0, 12345]))
    def junk(self, mtype: int, payload: bytes, tx: int) -> None:
        """Anything at all: a reply or an error named in xsd_errors, never EIO; the tree is checked after."""
        rtype, body = self.request(mtype, payload, tx)
        if rtype == T.ERROR:
            assert body.endswith(b"\0") and body[:-1].decode() in XSD_ERRORS and body != b"EIO\0", body
            return
        # The junk happened to be a valid request that changes the tree: learn it from the daemon, whose
        # every change the rules above check. Only dom1's own reachable nodes can have changed.
        self.model = self._model_from_daemon()
        if mtype == T.TRANSACTION_START and rtype == mtype:
            self.txs.append((int(body[:-1]), self.model.snapshot()))
        if mtype == T.RESET_WATCHES and rtype == mtype:
            self.watches.clear()
            self.txs.clear()

    def _model_from_daemon(self) -> Model:
        m = Model()
        m.tree = {p: Node(v, tuple(perms.split("\0")[:-1])) for p, (v, perms) in self.core.dump().items()}
        return m

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def no_internal_error(self) -> None:
        assert self.core.internal_errors == 0

    @invariant()
    def the_tree_is_the_models(self) -> None:
        have = {p: (v, perms) for p, (v, perms) in self.core.dump().items()}
        want = {p: (n.value, "".join(x + "\0" for x in n.perms)) for p, n in self.model.tree.items()}
        assert have == want

    @invariant()
    def quotas_hold(self) -> None:
        assert self.model.owned() <= QUOTAS.nodes
        assert len(self.conn.watches) <= QUOTAS.watches and len(self.conn.transactions) <= QUOTAS.transactions


GuestRingFuzz.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None,
                                           derandomize=True)
test_unprivileged_ring_fuzz = pytest.mark.slow(GuestRingFuzz.TestCase)  # starts first: harness.schedule


def test_an_internal_exception_is_counted_answered_eio_and_logged(caplog) -> None:  # type: ignore[no-untyped-def]
    """What the fuzz relies on: a defect in a handler is counted (and so fails it), not just an EIO."""
    core = XenstoreCore()
    out: list[bytes] = []
    conn = Connection("dom3", 3, False, out.append)

    def broken(c: Connection, tx: object, payload: bytes) -> bytes:
        raise IndexError("injected defect")

    core.handlers[int(T.READ)] = broken
    core.handle(conn, T.READ, 9, 0, b"x\0")
    assert out[-1].endswith(b"EIO\0") and core.internal_errors == 1
    assert any("INTERNAL ERROR #1" in r.getMessage() and "dom3" in r.getMessage() and "b'x\\x00'" in r.getMessage()
               and r.exc_info for r in caplog.records)
    dom0 = Connection("dom0", 0, True, out.append)
    core.handle(dom0, T.CONTROL, 1, 0, b"internal-errors\0")
    assert out[-1].endswith(b"1\0")
    core.handle(conn, T.CONTROL, 2, 0, b"internal-errors\0")
    assert out[-1].endswith(b"EACCES\0")  # dom0's alone
