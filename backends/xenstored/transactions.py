"""Transactions: snapshot reads over private node copies, commit with cxenstored's generation rule.

A transaction copies each node on first access and remembers the generation it saw (None: absent).
Commit fails with EAGAIN if any accessed node changed since: it was modified, created or deleted.

Snapshot reads: before the tree changes a node, it hands the old state to every open transaction that
has not looked at that node yet (`preserve`). A transaction that later accesses such a node sees its
snapshot state, and is doomed (`stale`): the node changed after the transaction started, which is a
conflict under the generation rule anyway. A transaction that would have to keep more than
`preserve_limit` old nodes is doomed instead, bounding memory (a spurious EAGAIN, which the protocol
allows).
"""
from __future__ import annotations

import logging
from collections import Counter

from xenpv.backends.xenstored.tree import Node, Tree
from xenpv.backends.xenstored.watches import Event

log = logging.getLogger("xenstored.transactions")


class Transaction:
    def __init__(self, tree: Tree, txid: int, preserve_limit: int) -> None:
        self.tree = tree
        self.txid = txid
        self.preserve_limit = preserve_limit
        self.view: dict[str, Node | None] = {}
        self.preserved: dict[str, Node | None] = {}
        self.accessed: dict[str, int | None] = {}
        self.dirty: dict[str, None] = {}
        self.owned_delta: Counter[int] = Counter()
        self.stale = False  # saw a node newer than the snapshot: commit must fail
        self.overflowed = False  # stopped keeping its snapshot: commit must fail
        self.events: dict[tuple[str, bool], Event] = {}  # fired on commit, one per (path, exact)

    def preserve(self, path: str, node: Node | None) -> None:
        """The tree is about to change `path`; keep its current state if this transaction has not seen it."""
        if self.overflowed or path in self.view or path in self.preserved:
            return
        if len(self.preserved) >= self.preserve_limit:
            self.stale = self.overflowed = True
            self.preserved.clear()
            return
        self.preserved[path] = None if node is None else node.copy()

    def _load(self, path: str) -> Node | None:
        if path in self.preserved:
            node = self.preserved.pop(path)
            self.stale = True
        else:
            node = self.tree.nodes.get(path)
            self.accessed[path] = None if node is None else node.gen
            if node is not None:
                node = node.copy()
        self.view[path] = node
        return node

    def get(self, path: str) -> Node | None:
        if path in self.view:
            return self.view[path]
        return self._load(path)

    def modifiable(self, path: str) -> Node:
        node = self.get(path)
        assert node is not None, path
        self.dirty[path] = None
        return node

    def put(self, path: str, node: Node) -> None:
        old = self.get(path)
        if old is not None:
            self.owned_delta[old.perms[0].domid] -= 1
        self.owned_delta[node.perms[0].domid] += 1
        self.view[path] = node
        self.dirty[path] = None

    def delete(self, path: str) -> None:
        old = self.get(path)
        if old is not None:
            self.owned_delta[old.perms[0].domid] -= 1
        self.view[path] = None
        self.dirty[path] = None

    def count_owned(self, domid: int) -> int:
        return self.tree.count_owned(domid) + self.owned_delta[domid]

    def conflicts(self) -> bool:
        if self.stale:
            return True
        nodes = self.tree.nodes
        for path, gen in self.accessed.items():
            node = nodes.get(path)
            if (None if node is None else node.gen) != gen:
                return True
        return False

    def close(self) -> None:
        self.tree.open_txs.discard(self)
        self.preserved.clear()

    def apply(self) -> None:
        """Write the transaction's changes into the tree; the caller checked `conflicts()` first."""
        for path in self.dirty:
            node = self.view[path]
            if node is None:
                self.tree.delete(path)
            else:
                self.tree.put(path, node)
