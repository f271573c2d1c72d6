"""Protocol state of one connection (a dom0 socket client or a guest ring), independent of transport."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from xenpv.backends.xenstored.paths import domain_path
from xenpv.backends.xenstored.transactions import Transaction
from xenpv.backends.xenstored.watches import Watch


@dataclass(eq=False)
class Connection:
    name: str
    domid: int
    privileged: bool
    send: Callable[[bytes], None]  # queue one whole message for the peer
    target: int | None = None  # SET_TARGET: this domain also acts for `target`
    watches: dict[tuple[str, bytes], Watch] = field(default_factory=dict)
    transactions: dict[int, Transaction] = field(default_factory=dict)
    next_txid: int = 1
    implicit: str = ""
    path_cache: dict[bytes, str] = field(default_factory=dict, repr=False)  # raw -> canonical (core._path)

    def __post_init__(self) -> None:
        if not self.implicit:
            self.implicit = domain_path(self.domid)

    def __repr__(self) -> str:
        return f"<Connection {self.name} dom{self.domid}>"
