"""Per-domain quotas; they apply to unprivileged domains only (domain.c quotas[])."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quotas:
    nodes: int = 1000
    watches: int = 128
    outstanding: int = 20  # requests a ring may have in flight whose replies the guest has not consumed
    transactions: int = 10
    transaction_nodes: int = 1024
    node_perms: int = 5
    path_max: int = 2048
    node_size: int = 2048
    # Bytes of undelivered replies/events a ring connection may hold before its events are dropped.
    output_bytes: int = 256 * 1024
