"""The node store: a flat map of absolute paths to nodes, with generation counters for transactions.

Nodes are mutated in place in the global tree (cheap appends to big directories); a transaction works on
private copies (see transactions.py). Every modification stamps the node with a fresh generation, which
is both the DIRECTORY_PART `gencnt` and the conflict detector of transactions, as in cxenstored.

The tree sits below transactions: all it asks of an open one is `Snapshot.preserve`.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from xenpv.backends.xenstored.perms import Access, Perm, Perms

log = logging.getLogger("xenstored.tree")

ROOT_PERMS: Perms = (Perm(0, Access.NONE),)


@dataclass(slots=True)
class Node:
    value: bytes
    perms: Perms
    children: dict[str, None] = field(default_factory=dict)  # names, in insertion order
    gen: int = 0

    def copy(self) -> "Node":
        return Node(self.value, self.perms, dict(self.children), self.gen)


class Snapshot(Protocol):
    """An open transaction as the tree sees it (transactions.Transaction)."""

    def preserve(self, path: str, node: Node | None) -> None:
        """`path` is about to change from `node` (None: absent)."""


class Tree:
    """The committed tree. Implements the store interface shared with `Transaction`."""

    def __init__(self) -> None:
        self.gen = 0
        self.nodes: dict[str, Node] = {"/": Node(b"", ROOT_PERMS)}
        self.owned: Counter[int] = Counter({0: 1})  # nodes per owning domain, for the node quota
        self.open_txs: set[Snapshot] = set()  # told before each change, for their snapshots

    def _preserve(self, path: str) -> None:
        node = self.nodes.get(path)
        for tx in self.open_txs:
            tx.preserve(path, node)

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    def modifiable(self, path: str) -> Node:
        if self.open_txs:
            self._preserve(path)
        node = self.nodes[path]
        self.gen += 1
        node.gen = self.gen
        return node

    def put(self, path: str, node: Node) -> None:
        if self.open_txs:
            self._preserve(path)
        old = self.nodes.get(path)
        if old is not None:
            self.owned[old.perms[0].domid] -= 1
        self.owned[node.perms[0].domid] += 1
        self.gen += 1
        node.gen = self.gen
        self.nodes[path] = node

    def delete(self, path: str) -> None:
        if self.open_txs:
            self._preserve(path)
        old = self.nodes.pop(path, None)
        if old is not None:
            self.owned[old.perms[0].domid] -= 1

    def count_owned(self, domid: int) -> int:
        return self.owned[domid]
