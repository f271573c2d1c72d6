"""Hypothesis stateful test: random operations and transactions from three dom0 connections against a
plain-dict reference model; replies, the committed tree and every watch event are checked."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from xenpv.backends.xenstored.core import XenstoreCore
from xenpv.xenabi.xs_wire import XsdSockmsgType as T

from .peers import Peer

NPEERS = 3
paths = st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3).map(lambda c: "/t/" + "/".join(c))
values = st.binary(max_size=6)
peers = st.integers(0, NPEERS - 1)


def parent(p: str) -> str:
    return p.rsplit("/", 1)[0] or "/"


def under(p: str, top: str) -> bool:
    return p == top or p.startswith(top + "/")


@dataclass
class ModelTx:
    txid: int
    snapshot: dict[str, bytes]
    view: dict[str, bytes]
    ops: list[tuple[str, str, bytes]] = field(default_factory=list)
    read_paths: set[str] = field(default_factory=set)
    global_changed: bool = False


class Model:
    """The tree as {path: value}; events as (path, exact)."""

    @staticmethod
    def apply(tree: dict[str, bytes], op: str, path: str, value: bytes) -> tuple[str, list[tuple[str, bool]]]:
        if op in ("write", "mkdir"):
            if op == "mkdir" and path in tree:
                return "OK", []
            missing = []
            p = path
            while p not in tree:
                missing.append(p)
                p = parent(p)
            for q in reversed(missing):
                tree[q] = b""
            tree[path] = value if op == "write" else tree[path]
            return "OK", [(path, False)]
        assert op == "rm"
        if path not in tree:
            return ("OK" if parent(path) in tree else "ENOENT"), []
        gone = [p for p in tree if under(p, path)]
        for p in gone:
            del tree[p]
        return "OK", [(p, True) for p in gone if p != path] + [(path, False)]


class XenstoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = XenstoreCore()
        self.peers = [Peer(self.core) for _ in range(NPEERS)]
        self.peers[0].write("/t", "")
        self.tree: dict[str, bytes] = {"/": b"", "/tool": b"", "/tool/xenstored": b"", "/t": b""}
        self.txs: list[ModelTx | None] = [None] * NPEERS
        self.watches: list[tuple[int, str, str]] = []
        self.expected: list[list[tuple[str, str]]] = [[] for _ in range(NPEERS)]

    def _deliver(self, events: list[tuple[str, bool]]) -> None:
        for path, exact in events:
            for who, wpath, token in self.watches:
                if (wpath == path) if exact else under(path, wpath):
                    self.expected[who].append((path, token))

    def _global_change(self) -> None:
        for tx in self.txs:
            if tx is not None:
                tx.global_changed = True

    def _mutate(self, who: int, op: str, path: str, value: bytes, in_tx: bool) -> None:
        tx = self.txs[who] if in_tx else None
        mtype = {"write": T.WRITE, "mkdir": T.MKDIR, "rm": T.RM}[op]
        payload = path.encode() + b"\0" + (value if op == "write" else b"")
        rtype, body = self.peers[who].call(mtype, payload, tx.txid if tx else 0)
        result = "OK" if rtype == mtype else body[:-1].decode()
        if tx is not None:
            expect, _ = Model.apply(tx.view, op, path, value)
            tx.ops.append((op, path, value))
        else:
            before = dict(self.tree)
            expect, events = Model.apply(self.tree, op, path, value)
            if self.tree != before:
                self._global_change()
            self._deliver(events)
        assert result == expect, (op, path, result, expect)

    @rule(who=peers, path=paths, value=values, in_tx=st.booleans())
    def write(self, who: int, path: str, value: bytes, in_tx: bool) -> None:
        self._mutate(who, "write", path, value, in_tx)

    @rule(who=peers, path=paths, in_tx=st.booleans())
    def mkdir(self, who: int, path: str, in_tx: bool) -> None:
        self._mutate(who, "mkdir", path, b"", in_tx)

    @rule(who=peers, path=paths, in_tx=st.booleans())
    def rm(self, who: int, path: str, in_tx: bool) -> None:
        self._mutate(who, "rm", path, b"", in_tx)

    @rule(who=peers, path=paths, in_tx=st.booleans())
    def read(self, who: int, path: str, in_tx: bool) -> None:
        tx = self.txs[who] if in_tx else None
        rtype, body = self.peers[who].call(T.READ, path.encode() + b"\0", tx.txid if tx else 0)
        tree = tx.view if tx else self.tree
        if tx:
            tx.read_paths.add(path)
        if path in tree:
            assert (rtype, body) == (T.READ, tree[path])
        else:
            assert (rtype, body) == (T.ERROR, b"ENOENT\0")

    @rule(who=peers, path=paths, in_tx=st.booleans())
    def directory(self, who: int, path: str, in_tx: bool) -> None:
        tx = self.txs[who] if in_tx else None
        rtype, body = self.peers[who].call(T.DIRECTORY, path.encode() + b"\0", tx.txid if tx else 0)
        tree = tx.view if tx else self.tree
        if tx:
            tx.read_paths.add(path)
        if path in tree:
            children = sorted(p.rsplit("/", 1)[1] for p in tree if p != "/" and parent(p) == path)
            assert rtype == T.DIRECTORY and sorted(c.decode() for c in body.split(b"\0")[:-1]) == children
        else:
            assert (rtype, body) == (T.ERROR, b"ENOENT\0")

    @rule(who=peers, path=paths, token=st.sampled_from(["x", "y"]))
    def watch(self, who: int, path: str, token: str) -> None:
        rtype, body = self.peers[who].call(T.WATCH, f"{path}\0{token}\0".encode())
        if (who, path, token) in self.watches:
            assert body == b"EEXIST\0"
        else:
            assert body == b"OK\0"
            self.watches.append((who, path, token))
            self.expected[who].append((path, token))

    @precondition(lambda self: any(t is None for t in self.txs))
    @rule(who=peers)
    def tx_start(self, who: int) -> None:
        if self.txs[who] is not None:
            return
        txid = self.peers[who].tx_start()
        self.txs[who] = ModelTx(txid, dict(self.tree), dict(self.tree))

    @precondition(lambda self: any(t is not None for t in self.txs))
    @rule(who=peers, commit=st.booleans())
    def tx_end(self, who: int, commit: bool) -> None:
        tx = self.txs[who]
        if tx is None:
            return
        self.txs[who] = None
        result = self.peers[who].tx_end(tx.txid, commit)
        if not commit:
            assert result == "OK"
            return
        stale_read = any(self.tree.get(p) != tx.snapshot.get(p) for p in tx.read_paths)
        if not tx.global_changed:
            assert result == "OK", "nothing changed since the start: the commit must succeed"
        if stale_read:
            assert result == "EAGAIN", "a value read in the transaction changed: the commit must fail"
        assert result in ("OK", "EAGAIN")
        if result == "OK":
            before = dict(self.tree)
            events: list[tuple[str, bool]] = []
            for op, path, value in tx.ops:
                events += Model.apply(self.tree, op, path, value)[1]
            if not tx.global_changed:
                assert self.tree == tx.view, "an uncontended commit yields exactly the transaction's view"
            if self.tree != before:
                self._global_change()
            # Within a transaction each (path, kind) fires once on commit: compare as sets.
            seen: set[tuple[str, bool]] = set()
            for ev in events:
                if ev not in seen:
                    seen.add(ev)
                    self._deliver([ev])

    @invariant()
    def events_match(self) -> None:
        for who, p in enumerate(self.peers):
            got = p.take_events()
            assert sorted(got) == sorted(self.expected[who]), (who, got, self.expected[who])
            self.expected[who].clear()

    @invariant()
    def committed_tree_matches(self) -> None:
        assert {p: v for p, (v, _) in self.core.dump().items()} == self.tree


XenstoreMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=50, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestXenstoreStateful = pytest.mark.slow(XenstoreMachine.TestCase)  # starts first: harness.schedule
