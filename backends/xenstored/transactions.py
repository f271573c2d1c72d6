"""Transactions: snapshot reads over private node copies, commit with cxenstored's generation rule.

A transaction copies each node on first access and remembers the generation it saw (None: absent).
Commit fails with EAGAIN if any accessed node changed since: it was modified, created or deleted.
Isolation is exact because a node first touched *after* someone else modified it (generation newer than
the transaction's start) also dooms the commit, so the transaction never acts on a state newer than its
snapshot. A lookup of an absent node checks its nearest existing ancestor, whose children list changes
whenever the node is created or deleted.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from backends.xenstored.paths import parent_of
from backends.xenstored.tree import Node, Tree

if TYPE_CHECKING:
    from backends.xenstored.watches import Event

log = logging.getLogger("xenstored.transactions")


class Transaction:
    def __init__(self, tree: Tree, txid: int) -> None:
        self.tree = tree
        self.txid = txid
        self.start_gen = tree.gen
        self.view: dict[str, Node | None] = {}
        self.accessed: dict[str, int | None] = {}
        self.dirty: dict[str, None] = {}
        self.owned_delta: Counter[int] = Counter()
        self.stale = False  # saw a node newer than the snapshot: commit must fail
        self.events: dict[tuple[str, bool], "Event"] = {}  # fired on commit, one per (path, exact)

    def _load(self, path: str) -> Node | None:
        node = self.tree.nodes.get(path)
        if node is not None:
            self.accessed[path] = node.gen
            if node.gen > self.start_gen:
                self.stale = True
            node = node.copy()
        else:
            self.accessed[path] = None
            anc = path
            while anc != "/":
                anc = parent_of(anc)
                existing = self.tree.nodes.get(anc)
                if existing is not None:
                    if existing.gen > self.start_gen:
                        self.stale = True
                    break
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

    def apply(self) -> None:
        """Write the transaction's changes into the tree; the caller checked `conflicts()` first."""
        for path in self.dirty:
            node = self.view[path]
            if node is None:
                self.tree.delete(path)
            else:
                self.tree.put(path, node)
